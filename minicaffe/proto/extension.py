"""A fork's own caffe.proto, brought by the user: `minicaffe.proto.extend(path)` / `--proto`.

minicaffe's caffe.proto already carries the popular forks' fields. For any other fork, the
user passes that fork's caffe.proto: it is compiled at run time with the protoc bundled in
grpcio-tools (extra `proto`) into a descriptor pool of its own, beside minicaffe's. Text
files are then parsed with the fork's messages and re-read into minicaffe's through the wire
format, so fields minicaffe does not know travel along as unknown fields (and are written
back unchanged when a net is saved). Layers registered outside minicaffe (custom layers,
plugins) see their `layer_param` as the fork's LayerParameter, so the fork's extra params
are plain attributes there (`self.layer_param.my_layer_param.alpha`).

One fork proto is active at a time; calling extend() again replaces it.
"""
import os
import subprocess
import sys
import tempfile

from .errors import ProtoFileError

__all__ = ["extend", "active", "reset", "ProtoExtension"]

_ACTIVE = None


class ProtoExtension:
    """The message classes compiled from one fork's caffe.proto, by minicaffe's message name."""

    def __init__(self, path, classes):
        self.path = path
        self.classes = classes  # "caffe.NetParameter" -> class from the fork's descriptor pool

    def message_class(self, full_name):
        return self.classes.get(full_name)

    def view(self, message):
        """`message` (a minicaffe message) re-read as the fork's message of the same name."""
        cls = self.classes.get(message.DESCRIPTOR.full_name)
        if cls is None:
            return message
        return cls.FromString(message.SerializeToString())


def active():
    """The ProtoExtension in use, or None."""
    return _ACTIVE


def reset():
    """Go back to minicaffe's own schema only."""
    global _ACTIVE
    _ACTIVE = None


def extend(path):
    """Use the fork's caffe.proto at `path` in addition to minicaffe's; returns the extension.

    The file must define the messages under minicaffe's names (package caffe:
    caffe.NetParameter, caffe.LayerParameter, ...), as every Caffe fork's caffe.proto does.
    """
    global _ACTIVE
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ProtoFileError(f"{path}: no such proto file")
    try:
        import grpc_tools  # noqa: F401  (protoc lives here)
    except ImportError:
        raise ImportError(f"{path}: compiling a fork's caffe.proto needs protoc from grpcio-tools: "
                          "pip install 'minicaffe[proto]'") from None
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(prefix="minicaffe-proto-") as tmp:
        out = os.path.join(tmp, "descriptor_set.pb")
        # protoc runs in a child process so that its diagnostics can be reported as one line.
        run = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{folder}",
                              f"-I{_protoc_includes()}", "--include_imports",
                              f"--descriptor_set_out={out}", os.path.abspath(path)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            first = next((line for line in run.stderr.splitlines() if line.strip()),
                         f"protoc exit status {run.returncode}")
            raise ProtoFileError(f"{path}: cannot compile it: {first}")
        with open(out, "rb") as f:
            files = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for file_proto in files.file:
        pool.Add(file_proto)
    from . import caffe_pb2
    classes = {}
    for name in caffe_pb2.DESCRIPTOR.message_types_by_name:
        full = f"caffe.{name}"
        try:
            classes[full] = message_factory.GetMessageClass(pool.FindMessageTypeByName(full))
        except KeyError:
            continue
    if "caffe.NetParameter" not in classes or "caffe.LayerParameter" not in classes:
        raise ProtoFileError(f"{path}: does not define caffe.NetParameter and caffe.LayerParameter "
                             "(expected a Caffe fork's caffe.proto with `package caffe;`)")
    _ACTIVE = ProtoExtension(path, classes)
    return _ACTIVE


def _protoc_includes():
    """grpcio-tools' copy of google/protobuf/*.proto, for forks that import them."""
    import grpc_tools
    return os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")

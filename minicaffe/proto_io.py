"""Reading and writing Caffe's protobuf files: prototxt (text), YAML, and binary.

Every reader returns an up-to-date message: V1 `layers` nets, data-layer
transformation fields and the solver's `solver_type` enum are upgraded the way
Caffe's upgrade_proto does, so old files keep working.
"""
import os
import re
import stat
import tempfile

from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError

from .proto import caffe_pb2, extension, known_forks
from .proto.errors import ProtoFileError

__all__ = ["ProtoFileError", "read_net_param", "read_solver_param", "read_proto",
           "write_binary", "atomic_write", "stage_file", "check_regular_file", "check_output_folder",
           "field_location", "upgrade_net_param", "upgrade_solver_param"]


TEMP_PREFIX = ".tmp-"


def temp_name_for(path):
    """The pattern of `stage_file`'s temporaries for `path`: (folder, prefix, suffix)."""
    path = os.fspath(path)
    return os.path.dirname(os.path.abspath(path)), TEMP_PREFIX, "-" + os.path.basename(path)


def stage_file(path, data):
    """Write bytes to a new temporary file next to `path` (flushed to disk); its name.

    Rename it over `path` to publish it; on any error nothing is left behind.
    """
    folder, prefix, suffix = temp_name_for(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    except OSError as exc:   # name the file being written, not the temporary
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would, as
        # Caffe's snapshots get, so other users and tools can read the result.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
        raise
    return tmp


def check_output_folder(path, what="output file"):
    """Raise ProtoFileError naming `path` unless its folder exists and `path` is not a folder.

    Run before writing, so the error names the user's path rather than a temporary file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ProtoFileError(f"{path}: cannot write the {what}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise ProtoFileError(f"{path}: cannot write the {what}: it is a directory")


def atomic_write(path, data):
    """Write bytes to `path` through a temporary file in the same folder, then rename."""
    path = os.fspath(path)
    check_output_folder(path)
    tmp = stage_file(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_binary(message, path):
    atomic_write(path, message.SerializeToString())


def field_location(path, field):
    """`path:line` of the first line that sets `field` (text prototxt or YAML), else `path`.

    Used to point value errors found after parsing (an unknown solver type, a negative
    max_iter) at the line the user wrote. A top-level field is what callers ask
    about, so the first match is the right one in practice.
    """
    path = os.fspath(path)
    pattern = re.compile(rf"^\s*{re.escape(field)}\s*:")
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if pattern.match(line):
                    return f"{path}:{number}"
    except (OSError, UnicodeDecodeError):
        pass
    return path


def _yaml_key_line(text, name):
    """1-based line of the first mapping key `name` in a YAML text, or None."""
    import yaml
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return None
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop(0)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == name:
                    return key.start_mark.line + 1
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None


def _extended(message):
    """The fork's message class for `message` when a fork proto is active (proto.extend)."""
    ext = extension.active()
    return ext.message_class(message.DESCRIPTOR.full_name) if ext else None


def _parse_text(text, message, path):
    cls = _extended(message)
    target = cls() if cls else message
    try:
        text_format.Parse(text, target)
    except text_format.ParseError as exc:
        line, col = exc.GetLine(), exc.GetColumn()
        where = f"{path}:{line}:{col}" if line else str(path)
        msg = str(exc)
        # protobuf prefixes "line:col : "; the location is already in `where`.
        if line and msg.startswith(f"{line}:"):
            msg = msg.split(" : ", 1)[-1]
        raise ProtoFileError(f"{where}: {msg}{known_forks.hint(msg)}") from None
    if cls:
        # Through the wire format: fields minicaffe lacks stay on as unknown fields.
        message.ParseFromString(target.SerializeToString())
        if isinstance(message, caffe_pb2.NetParameter):
            _fix_fork_ceil_mode(target, message)
    return message


def _fix_fork_ceil_mode(fork_net, net):
    """A fork's `bool ceil_mode = 13` arrives as BVLC's round_mode 13, read the other way
    round (see caffe.proto); carry the fork's value over by name instead."""
    layer_type = fork_net.DESCRIPTOR.fields_by_name["layer"].message_type
    pooling = layer_type.fields_by_name.get("pooling_param")
    ceil = pooling.message_type.fields_by_name.get("ceil_mode") if pooling else None
    if ceil is None or ceil.number != 13:
        return
    for theirs, mine in zip(fork_net.layer, net.layer):
        if theirs.HasField("pooling_param") and theirs.pooling_param.HasField("ceil_mode"):
            mine.pooling_param.ClearField("round_mode")
            mine.pooling_param.ceil_mode = theirs.pooling_param.ceil_mode


def _parse_yaml(text, message, path):
    import yaml
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ProtoFileError(f"{where}: {getattr(exc, 'problem', exc)}") from None
    cls = _extended(message)
    target = cls() if cls else message
    if not isinstance(tree, dict):
        raise ProtoFileError(f"{path}: expected a mapping of {message.DESCRIPTOR.name} fields at the "
                             f"top level, got a {type(tree).__name__}")
    try:
        json_format.ParseDict(tree, target)
    except json_format.ParseError as exc:
        msg = str(exc).splitlines()[0]
        # json_format names the field ('Failed to parse base_lr field', 'has no field named
        # "foo"'); find that key in the YAML to give its line.
        names = re.findall(r'Failed to parse (\w+) field|no field named "(\w+)"', msg)
        line = None
        for groups in reversed(names):  # the innermost field is named last
            for name in groups:
                if name and line is None:
                    line = _yaml_key_line(text, name)
        where = f"{path}:{line}" if line else path
        raise ProtoFileError(f"{where}: {msg}") from None
    if cls:
        message.ParseFromString(target.SerializeToString())
    return message


def check_regular_file(path, what="file"):
    """Raise ProtoFileError unless `path` is an existing regular file (not a folder, FIFO, device).

    Checked with stat() before any open(): opening a FIFO would block until a writer
    appears, and /dev/zero would be read forever.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ProtoFileError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise ProtoFileError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        kind = "a directory"
    elif stat.S_ISFIFO(mode):
        kind = "a FIFO (named pipe)"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    else:
        kind = "a special file"
    raise ProtoFileError(f"{path}: is {kind}, expected a regular {what}")


def read_proto(path, message):
    """Fill `message` from a text prototxt, a YAML file (.yaml/.yml) or a binary file."""
    path = os.fspath(path)
    check_regular_file(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ProtoFileError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    if path.endswith((".yaml", ".yml")):
        return _parse_yaml(raw.decode("utf-8"), message, path)
    if path.endswith((".caffemodel", ".solverstate", ".binaryproto")):
        return _parse_binary(raw, message, path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _parse_binary(raw, message, path)
    return _parse_text(text, message, path)


def _parse_binary(raw, message, path):
    try:
        message.ParseFromString(raw)
    except DecodeError as exc:
        raise ProtoFileError(f"{path}: not a valid binary {message.DESCRIPTOR.name} ({exc})") from None
    return message


# Forks whose LayerParameter field numbers collide with BVLC's (see the CONFLICT notes
# in caffe.proto): in their binary files the layer type tells which meaning is meant.
_MOVED_FIELDS = (("Interp", "input_param", "interp_param"),     # PSPNet / DeepLab: 143
                 ("Upsample", "embed_param", "upsample_param"))  # SegNet: 137


def remap_fork_numbers(net):
    """Move fork params that a binary file stored at BVLC's numbers to minicaffe's fields.

    Protobuf decodes such bytes as the BVLC message, with every mismatching field kept
    as an unknown field, so serializing and reparsing as the fork's message is lossless.
    """
    for layer in net.layer:
        for layer_type, bvlc_field, fork_field in _MOVED_FIELDS:
            if layer.type == layer_type and layer.HasField(bvlc_field) \
                    and not layer.HasField(fork_field):
                getattr(layer, fork_field).ParseFromString(
                    getattr(layer, bvlc_field).SerializeToString())
                layer.ClearField(bvlc_field)
        if layer.HasField("segnet_bn_param"):
            segnet, bn = layer.segnet_bn_param, layer.bn_param
            if segnet.HasField("scale_filler"):
                bn.scale_filler.CopyFrom(segnet.scale_filler)
            if segnet.HasField("shift_filler"):
                bn.shift_filler.CopyFrom(segnet.shift_filler)
            if segnet.HasField("bn_mode"):
                bn.bn_mode = segnet.bn_mode
            layer.ClearField("segnet_bn_param")
    return net


def _read_upgraded(path_or_param, message_type, upgrade):
    """A `message_type` from a file path (text, YAML or binary) or a message, upgraded."""
    if isinstance(path_or_param, message_type):
        param = message_type()
        param.CopyFrom(path_or_param)
        return upgrade(param)
    param = read_proto(path_or_param, message_type())
    try:
        return upgrade(param)
    except ValueError as exc:
        raise ProtoFileError(f"{os.fspath(path_or_param)}: {exc}") from None


def read_net_param(path_or_param):
    """A NetParameter from a file path (text, YAML or binary) or a message, upgraded."""
    return _read_upgraded(path_or_param, caffe_pb2.NetParameter, upgrade_net_param)


def read_solver_param(path_or_param):
    """A SolverParameter from a file path (text, YAML or binary) or a message, upgraded."""
    return _read_upgraded(path_or_param, caffe_pb2.SolverParameter, upgrade_solver_param)


# -- upgrades ------------------------------------------------------------------
_V1 = caffe_pb2.V1LayerParameter
V1_TYPE_NAMES = {
    _V1.NONE: "", _V1.ABSVAL: "AbsVal", _V1.ACCURACY: "Accuracy", _V1.ARGMAX: "ArgMax",
    _V1.BNLL: "BNLL", _V1.CONCAT: "Concat", _V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    _V1.CONVOLUTION: "Convolution", _V1.DECONVOLUTION: "Deconvolution", _V1.DATA: "Data",
    _V1.DROPOUT: "Dropout", _V1.DUMMY_DATA: "DummyData", _V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    _V1.ELTWISE: "Eltwise", _V1.EXP: "Exp", _V1.FLATTEN: "Flatten", _V1.HDF5_DATA: "HDF5Data",
    _V1.HDF5_OUTPUT: "HDF5Output", _V1.HINGE_LOSS: "HingeLoss", _V1.IM2COL: "Im2col",
    _V1.IMAGE_DATA: "ImageData", _V1.INFOGAIN_LOSS: "InfogainLoss",
    _V1.INNER_PRODUCT: "InnerProduct", _V1.LRN: "LRN", _V1.MEMORY_DATA: "MemoryData",
    _V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss", _V1.MVN: "MVN",
    _V1.POOLING: "Pooling", _V1.POWER: "Power", _V1.RELU: "ReLU", _V1.SIGMOID: "Sigmoid",
    _V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss", _V1.SILENCE: "Silence",
    _V1.SOFTMAX: "Softmax", _V1.SOFTMAX_LOSS: "SoftmaxWithLoss", _V1.SPLIT: "Split",
    _V1.SLICE: "Slice", _V1.TANH: "TanH", _V1.WINDOW_DATA: "WindowData",
    _V1.THRESHOLD: "Threshold",
}
# V1 fields copied verbatim: same name and message type in LayerParameter.
_V1_SHARED_FIELDS = [f.name for f in _V1.DESCRIPTOR.fields
                     if f.name.endswith("_param") or f.name in ("bottom", "top", "name", "include",
                                                                "exclude", "blobs", "loss_weight")]
_DATA_PARAMS_WITH_TRANSFORM = ("data_param", "image_data_param", "window_data_param")
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def _is_repeated(field):
    # protobuf 6+ has FieldDescriptor.is_repeated (and 7 drops .label); 5.x has only .label
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def _upgrade_v1_layer(v1, index):
    if v1.HasField("layer"):
        raise ValueError(f"layer {index} ({v1.name or 'unnamed'}) is in Caffe's V0 format, which "
                         "minicaffe does not upgrade; run Caffe's upgrade_net_proto_text on it first")
    layer = caffe_pb2.LayerParameter()
    for name in _V1_SHARED_FIELDS:
        if name == "blobs":
            layer.blobs.extend(v1.blobs)
            continue
        field = _V1.DESCRIPTOR.fields_by_name[name]
        if _is_repeated(field):
            getattr(layer, name).extend(getattr(v1, name))
        elif v1.HasField(name):
            target = getattr(layer, name)
            if field.message_type is not None:
                target.CopyFrom(getattr(v1, name))
            else:
                setattr(layer, name, getattr(v1, name))
    layer.type = V1_TYPE_NAMES.get(v1.type, "")
    n_specs = max(len(v1.param), len(v1.blob_share_mode), len(v1.blobs_lr), len(v1.weight_decay))
    for i in range(n_specs):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    return layer


def _upgrade_data_transform(layer):
    """Move scale/mean_file/crop_size/mirror from old data params into transform_param."""
    for pname in _DATA_PARAMS_WITH_TRANSFORM:
        if not layer.HasField(pname):
            continue
        old = getattr(layer, pname)
        for f in _TRANSFORM_FIELDS:
            if old.HasField(f):
                setattr(layer.transform_param, f, getattr(old, f))
                old.ClearField(f)


def _upgrade_inputs(param):
    """Deprecated net-level input/input_shape/input_dim become one Input layer."""
    if not len(param.input):
        return
    shapes = list(param.input_shape)
    if not shapes and len(param.input_dim):
        dims = list(param.input_dim)
        if len(dims) != 4 * len(param.input):
            raise ValueError(f"input_dim must give 4 values per input ({len(param.input)} inputs), "
                             f"got {len(dims)}")
        for i in range(len(param.input)):
            shape = caffe_pb2.BlobShape()
            shape.dim.extend(dims[4 * i: 4 * i + 4])
            shapes.append(shape)
    if len(shapes) not in (len(param.input), 1) and shapes:
        raise ValueError(f"{len(param.input)} inputs but {len(shapes)} input_shape entries")
    if not shapes:
        # An input without any shape is a legacy .caffemodel's record of its inputs; Caffe's
        # UpgradeNetInput strips it rather than make a shapeless Input layer.
        for field in ("input", "input_shape", "input_dim"):
            param.ClearField(field)
        return
    layer = caffe_pb2.LayerParameter(name="input", type="Input")
    layer.top.extend(param.input)
    for s in shapes:
        layer.input_param.shape.add().CopyFrom(s)
    layers = [layer] + list(param.layer)
    param.ClearField("layer")
    param.layer.extend(layers)
    param.ClearField("input")
    param.ClearField("input_shape")
    param.ClearField("input_dim")


def upgrade_net_param(param):
    """Upgrade a NetParameter in place (and return it)."""
    if len(param.layers):
        if len(param.layer):
            raise ValueError("the net mixes V1 'layers' and current 'layer' fields; use one")
        for i, v1 in enumerate(param.layers):
            param.layer.add().CopyFrom(_upgrade_v1_layer(v1, i))
        param.ClearField("layers")
    for layer in param.layer:
        _upgrade_data_transform(layer)
    _upgrade_inputs(param)
    remap_fork_numbers(param)
    return param


_SOLVER_TYPE_NAMES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}


def upgrade_solver_param(param):
    """Map the deprecated `solver_type` enum onto the string `type` field."""
    if param.HasField("solver_type"):
        name = _SOLVER_TYPE_NAMES[param.solver_type]
        if param.HasField("type") and param.type != name:
            raise ValueError(f"solver_type {name} contradicts type {param.type!r}; keep one")
        param.type = name
        param.ClearField("solver_type")
    return param

"""`minicaffe upgrade-net` / `upgrade-solver`: rewrite old Caffe files in the current format.

    minicaffe upgrade-net old_deploy.prototxt new_deploy.prototxt     # V1 `layers`, input_dim, ...
    minicaffe upgrade-net old.caffemodel new.caffemodel               # binary in, binary out
    minicaffe upgrade-solver old_solver.prototxt new_solver.prototxt  # solver_type -> type

Like Caffe's upgrade_net_proto_text / _binary and upgrade_solver_proto_text. minicaffe reads old
files directly, so this is for sharing them with tools that only read the current format.
"""
import os

from google.protobuf import text_format

_BINARY = (".caffemodel", ".binaryproto", ".solverstate")


def register(subparsers):
    for name, what in (("upgrade-net", "net"), ("upgrade-solver", "solver")):
        p = subparsers.add_parser(
            name, help=f"rewrite an old Caffe {what} file in the current format",
            description=f"Read a {what} file in any format Caffe ever wrote (text, YAML or "
                        f"binary), upgrade it, and write it as text (or binary when OUTPUT ends "
                        f"in {', '.join(_BINARY)}).")
        p.add_argument("input", metavar="INPUT")
        p.add_argument("output", metavar="OUTPUT")
        p.set_defaults(func=run, what=what)


def run(args):
    from ..proto_io import atomic_write, read_net_param, read_solver_param
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ValueError(f"{args.output}: write the upgraded file next to the original, not over it")
    read = read_net_param if args.what == "net" else read_solver_param
    message = read(args.input)
    if args.output.endswith(_BINARY):
        data = message.SerializeToString()
    else:
        data = text_format.MessageToString(message).encode()
    atomic_write(args.output, data)
    print(f"wrote {args.output}")
    return 0

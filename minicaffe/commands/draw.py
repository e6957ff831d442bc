"""`minicaffe draw`: a net's graph as Graphviz DOT or an image (like Caffe's python/draw_net.py).

    minicaffe draw models/lenet/lenet_train_test.prototxt lenet.dot
    minicaffe draw models/lenet/lenet_train_test.prototxt lenet.png --phase TEST --rankdir TB

.dot/.gv/.raw outputs are DOT text; any other extension is rendered by Graphviz's `dot`
program (it must be on the PATH), in the format the extension names.
"""
import os
import shutil
import subprocess


def register(subparsers):
    p = subparsers.add_parser(
        "draw", help="draw a net as a Graphviz graph",
        description="Write the net's layers and blobs as a Graphviz DOT file (.dot/.gv/.raw), or "
                    "render it (.png, .svg, .pdf, .jpg, ...) with Graphviz's dot program.")
    p.add_argument("model", metavar="NET.prototxt")
    p.add_argument("output", metavar="OUT.dot|png|svg|pdf|...")
    p.add_argument("--rankdir", default="LR", choices=["LR", "RL", "TB", "BT"],
                   help="direction of the graph (default LR, as Caffe's draw_net.py)")
    p.add_argument("--phase", default="ALL", choices=["ALL", "TRAIN", "TEST"],
                   help="draw only the layers of one phase (default: all layers)")
    p.add_argument("--display-lrm", "--display_lrm", action="store_true",
                   help="show the learning-rate multipliers of Convolution/InnerProduct layers")
    p.set_defaults(func=run)


def run(args):
    from ..draw import TEXT_EXTENSIONS, to_dot
    from ..proto import caffe_pb2
    from ..proto_io import atomic_write, read_net_param
    phase = None if args.phase == "ALL" else caffe_pb2.Phase.Value(args.phase)
    ext = os.path.splitext(args.output)[1].lower()
    if not ext:
        raise ValueError(f"{args.output}: give the output an extension (.dot for DOT text, "
                         f".png/.svg/.pdf/... for an image)")
    dot_text = to_dot(read_net_param(args.model), args.rankdir, phase, label_edges=True,
                      display_lrm=args.display_lrm)
    if ext in TEXT_EXTENSIONS:
        atomic_write(args.output, dot_text.encode())
        print(f"wrote {args.output}")
        return 0
    dot = shutil.which("dot")
    if dot is None:
        raise RuntimeError(f"{args.output}: rendering {ext} needs Graphviz's `dot` program "
                           f"(e.g. apt-get install graphviz); or write a .dot file")
    result = subprocess.run([dot, f"-T{ext[1:]}"], input=dot_text.encode(), capture_output=True)
    if result.returncode:
        raise RuntimeError(f"{args.output}: Graphviz cannot write {ext}: "
                           f"{result.stderr.decode().strip()}")
    atomic_write(args.output, result.stdout)
    print(f"wrote {args.output}")
    return 0

"""`minicaffe draw`: a net's graph as Graphviz DOT (like Caffe's python/draw_net.py, no pydot).

    minicaffe draw models/lenet/lenet_train_test.prototxt lenet.dot
    minicaffe draw models/lenet/lenet_train_test.prototxt lenet.png --phase TEST --rankdir TB

Layers are boxes (with their main parameters), blobs are octagons; an in-place layer's top is
drawn as a new node so the order of in-place steps stays visible. .png/.svg/.pdf outputs need
Graphviz's `dot` program on the PATH.
"""
import os
import shutil
import subprocess

_RENDERED = (".png", ".svg", ".pdf")


def register(subparsers):
    p = subparsers.add_parser(
        "draw", help="draw a net as a Graphviz graph",
        description="Write the net's layers and blobs as a Graphviz DOT file, or render it to "
                    ".png/.svg/.pdf with Graphviz's dot program.")
    p.add_argument("model", metavar="NET.prototxt")
    p.add_argument("output", metavar="OUT.dot|png|svg|pdf")
    p.add_argument("--rankdir", default="LR", choices=["LR", "RL", "TB", "BT"],
                   help="direction of the graph (default LR, as Caffe's draw_net.py)")
    p.add_argument("--phase", default="ALL", choices=["ALL", "TRAIN", "TEST"],
                   help="draw only the layers of one phase (default: all layers)")
    p.set_defaults(func=run)


def _quote(text):
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _describe(layer):
    """One line of the layer's key parameters, as draw_net.py shows them."""
    if layer.type in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        k = list(p.kernel_size) or [p.kernel_h]
        s = list(p.stride) or [1]
        return f"{p.num_output} out, kernel {k[0]}, stride {s[0]}"
    if layer.type == "Pooling":
        p = layer.pooling_param
        pool = layer.pooling_param.PoolMethod.Name(p.pool)
        return f"{pool} global" if p.global_pooling else f"{pool} {p.kernel_size}, stride {p.stride}"
    if layer.type == "InnerProduct":
        return f"{layer.inner_product_param.num_output} out"
    return ""


def to_dot(param, rankdir="LR", phase=None):
    """DOT text for a NetParameter (all layers, or those that `phase` includes)."""
    from ..net import filter_net
    from ..proto import caffe_pb2
    if phase is not None:
        param = filter_net(param, caffe_pb2.NetState(phase=phase))
    lines = [f"digraph {_quote(param.name or 'net')} {{", f"  rankdir={rankdir};",
             '  node [fontname="Helvetica", fontsize=10];']
    version = {}   # blob name -> how many times it was (re)written, for in-place layers

    def blob_node(name):
        return _quote(f"blob:{name}:{version.get(name, 0)}")

    for i, layer in enumerate(param.layer):
        node = _quote(f"layer:{i}")
        label = "\n".join(part for part in (layer.name, f"({layer.type})", _describe(layer)) if part)
        label = _quote(label).replace("\n", "\\n")
        lines.append(f'  {node} [shape=box, style=filled, fillcolor="#cfe2f3", label={label}];')
        for bottom in layer.bottom:
            if bottom not in version:
                version[bottom] = 0
                lines.append(f'  {blob_node(bottom)} [shape=octagon, label={_quote(bottom)}];')
            lines.append(f"  {blob_node(bottom)} -> {node};")
        for top in layer.top:
            version[top] = version.get(top, -1) + 1
            lines.append(f'  {blob_node(top)} [shape=octagon, label={_quote(top)}];')
            lines.append(f"  {node} -> {blob_node(top)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def run(args):
    from ..proto import caffe_pb2
    from ..proto_io import atomic_write, read_net_param
    phase = None if args.phase == "ALL" else caffe_pb2.Phase.Value(args.phase)
    dot_text = to_dot(read_net_param(args.model), args.rankdir, phase)
    if not args.output.endswith(_RENDERED):
        atomic_write(args.output, dot_text.encode())
        print(f"wrote {args.output}")
        return 0
    dot = shutil.which("dot")
    if dot is None:
        raise RuntimeError(f"rendering {os.path.splitext(args.output)[1]} needs Graphviz's `dot` "
                           f"program (e.g. apt-get install graphviz); or write a .dot file")
    fmt = os.path.splitext(args.output)[1][1:]
    result = subprocess.run([dot, f"-T{fmt}"], input=dot_text.encode(), capture_output=True)
    if result.returncode:
        raise RuntimeError(f"dot failed: {result.stderr.decode().strip()}")
    atomic_write(args.output, result.stdout)
    print(f"wrote {args.output}")
    return 0

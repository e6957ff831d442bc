"""pycaffe's caffe.draw: a NetParameter as a Graphviz graph.

`to_dot` writes DOT text with no dependency; `get_pydot_graph`, `draw_net` and
`draw_net_to_file` (pycaffe's signatures) go through pydot (`pip install
'minicaffe[draw]'`) and, for images, Graphviz's `dot` program.

Layers are boxes (with their main parameters), blobs are octagons. An in-place
layer's top is drawn as a new node so the order of in-place steps stays
visible; layers of different phases writing the same blob (a TRAIN and a TEST
data layer) share its node, so both connect to the layers that read it.
"""
import os

from .net import filter_net
from .proto import caffe_pb2
from .proto_io import atomic_write

__all__ = ["to_dot", "get_pydot_graph", "draw_net", "draw_net_to_file"]

# Extensions written as DOT text; anything else is rendered by Graphviz.
TEXT_EXTENSIONS = (".dot", ".gv", ".raw")


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


def _edge_label(layer):
    """The label of a layer's top edges, as pycaffe's get_edge_label."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return ""


def _lr_mults(layer):
    mults = [p.lr_mult for p in layer.param][:2]
    return mults + [1.0] * (2 - len(mults))


def to_dot(param, rankdir="LR", phase=None, label_edges=False, display_lrm=False):
    """DOT text for a NetParameter (all layers, or those that `phase` includes)."""
    if phase is not None:
        param = filter_net(param, caffe_pb2.NetState(phase=phase))
    lines = [f"digraph {_quote(param.name or 'Net')} {{", f"  rankdir={rankdir};",
             '  node [fontname="Helvetica", fontsize=10];', '  edge [fontname="Helvetica", fontsize=9];']
    version = {}   # blob name -> how many in-place layers rewrote it so far

    def blob_node(name):
        return _quote(f"blob:{name}:{version.get(name, 0)}")

    for i, layer in enumerate(param.layer):
        node = _quote(f"layer:{i}")
        parts = [layer.name, f"({layer.type})", _describe(layer)]
        if display_lrm and layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
            w, b = _lr_mults(layer)
            parts.append(f"lr mult: {w:g}, {b:g}")
        label = _quote("\n".join(p for p in parts if p)).replace("\n", "\\n")
        lines.append(f'  {node} [shape=box, style=filled, fillcolor="#cfe2f3", label={label}];')
        for bottom in layer.bottom:
            if bottom not in version:
                version[bottom] = 0
                lines.append(f'  {blob_node(bottom)} [shape=octagon, label={_quote(bottom)}];')
            lines.append(f"  {blob_node(bottom)} -> {node};")
        edge = f" [label={_quote(_edge_label(layer))}]" if label_edges and _edge_label(layer) else ""
        for top in layer.top:
            if top in layer.bottom:
                version[top] += 1        # in place: a new step of the same blob
            elif top in version:
                lines.append(f"  {node} -> {blob_node(top)}{edge};")
                continue                 # another producer (another phase) of this blob
            else:
                version[top] = 0
            lines.append(f'  {blob_node(top)} [shape=octagon, label={_quote(top)}];')
            lines.append(f"  {node} -> {blob_node(top)}{edge};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _pydot():
    try:
        import pydot
    except ImportError:
        raise ImportError("caffe.draw needs pydot: pip install 'minicaffe[draw]'") from None
    return pydot


def get_pydot_graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    """The net as a pydot.Dot graph (pycaffe's signature)."""
    graphs = _pydot().graph_from_dot_data(to_dot(caffe_net, rankdir, phase, label_edges,
                                                 display_lrm))
    return graphs[0]


def draw_net(caffe_net, rankdir, ext="png", phase=None, display_lrm=False):
    """The net rendered by Graphviz in format `ext`, as bytes."""
    if "." + ext in TEXT_EXTENSIONS:
        return to_dot(caffe_net, rankdir, phase, True, display_lrm).encode()
    return get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm).create(
        format=ext)


def draw_net_to_file(caffe_net, filename, rankdir="LR", phase=None, display_lrm=False):
    """Draw the net into `filename`, in the format its extension names (.raw/.dot: DOT text)."""
    ext = os.path.splitext(os.fspath(filename))[1][1:] or "png"
    atomic_write(filename, draw_net(caffe_net, rankdir, ext, phase, display_lrm))

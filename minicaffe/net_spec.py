"""Write nets in Python, pycaffe style: `from minicaffe import layers as L, params as P`.

    n = NetSpec()
    n.data, n.label = L.Input(shape=[dict(dim=[64, 1, 28, 28]), dict(dim=[64])], ntop=2)
    n.ip = L.InnerProduct(n.data, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip, n.label)
    print(n.to_proto())

Keyword arguments go into the layer's own `<type>_param` message when it has that
field, otherwise onto the LayerParameter itself (`loss_weight`, `include`, ...).
Dicts become messages and lists become repeated fields. `ntop=k` makes a layer
with k tops, `in_place=True` reuses the bottom's name for the top.
"""
import collections

from .proto import caffe_pb2

__all__ = ["NetSpec", "Top", "Function", "layers", "params", "to_proto", "param_name_dict",
           "assign_proto"]

# Layer types that read another type's parameter message.
_SHARED_PARAM_TYPES = {"Deconvolution": "convolution", "Im2col": "convolution",
                       "SoftmaxWithLoss": "softmax", "Silence": None}


def param_name_dict():
    """{layer type: its `*_param` field name without the suffix}, from the schema."""
    names = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name[: -len("Parameter")]
            names[type_name] = field.name[: -len("_param")]
    names.update({k: v for k, v in _SHARED_PARAM_TYPES.items() if v})
    return names


_PARAM_NAMES = param_name_dict()


def assign_proto(proto, name, value):
    """Set field `name` of `proto` from a Python value (dict -> message, list -> repeated)."""
    field = getattr(proto, name)
    repeated = hasattr(field, "extend")
    if repeated and not isinstance(value, (list, tuple)):
        value = [value]
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], dict):
            for item in value:
                message = field.add()
                for k, v in item.items():
                    assign_proto(message, k, v)
        else:
            field.extend(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            assign_proto(field, k, v)
    else:
        setattr(proto, name, value)


class Top:
    """One output blob of a Function (a layer)."""

    def __init__(self, fn, index):
        self.fn = fn
        self.index = index

    def to_proto(self):
        return to_proto(self)

    def _to_proto(self, layers, names, autonames):
        return self.fn._to_proto(layers, names, autonames)


class Function:
    """A layer: its type, input Tops and parameters."""

    def __init__(self, type_name, inputs, params):
        for i, inp in enumerate(inputs):
            if not isinstance(inp, Top):
                raise TypeError(f"{type_name} input {i} is not a Top (type is {type(inp)})")  # pycaffe's text
        self.type_name = type_name
        self.inputs = inputs
        self.params = dict(params)
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _auto_name(self, key, names, autonames):
        if key not in names:
            autonames[self.type_name] += 1
            names[key] = f"{self.type_name}{autonames[self.type_name]}"
        return names[key]

    def _to_proto(self, layers, names, autonames):
        if self in layers:
            return
        bottoms = []
        for inp in self.inputs:
            inp._to_proto(layers, names, autonames)
            bottoms.append(layers[inp.fn].top[inp.index])
        layer = caffe_pb2.LayerParameter(type=self.type_name, bottom=bottoms)
        if self.in_place:
            layer.top.extend(bottoms)
        else:
            layer.top.extend(self._auto_name(t, names, autonames) for t in self.tops)
        # A layer is named after its first top (or automatically when it has none).
        layer.name = names.get(self) or (self._auto_name(self.tops[0], names, autonames)
                                         if self.tops else self._auto_name(self, names, autonames))
        names[self] = layer.name
        own = _PARAM_NAMES.get(self.type_name)
        for key, value in self.params.items():
            if key.endswith("param") or own is None or not hasattr(getattr(layer, own + "_param"), key):
                assign_proto(layer, key, value)
            else:
                assign_proto(getattr(layer, own + "_param"), key, value)
        layers[self] = layer


def to_proto(*tops):
    """A NetParameter with every layer needed to compute `tops` (blob names made up)."""
    layers = collections.OrderedDict()
    autonames = collections.Counter()
    for top in tops:
        top.fn._to_proto(layers, {}, autonames)
    return caffe_pb2.NetParameter(layer=list(layers.values()))


class NetSpec:
    """Tops assigned as attributes (or items) are named after the attribute."""

    def __init__(self):
        super().__setattr__("tops", collections.OrderedDict())

    def __setattr__(self, name, value):
        self.tops[name] = value

    def __getattr__(self, name):
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(name) from None

    __setitem__ = __setattr__

    def __getitem__(self, name):
        return self.tops[name]

    def to_proto(self):
        names = {top: name for name, top in self.tops.items()}
        autonames = collections.Counter()
        layers = collections.OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        return caffe_pb2.NetParameter(layer=list(layers.values()))


class _Layers:
    """`layers.Convolution(bottom, kernel_size=3)` makes a Convolution Top."""

    def __getattr__(self, type_name):
        def make(*inputs, **params):
            fn = Function(type_name, inputs, params)
            if fn.ntop == 0:
                return fn
            return fn.tops[0] if fn.ntop == 1 else fn.tops
        return make


class _Params:
    """`params.Pooling.MAX` is caffe_pb2.PoolingParameter.MAX."""

    def __getattr__(self, name):
        message = getattr(caffe_pb2, name + "Parameter")

        class _Enum:
            def __getattr__(self, value):
                return getattr(message, value)
        return _Enum()


layers = _Layers()
params = _Params()

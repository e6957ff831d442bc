"""Bottom-less layers that hold a net's inputs: Input and DummyData."""
from ..fillers import fill
from ..layer import Layer, register_layer


def _shapes_from_param(layer, shapes, ntop, what):
    if len(shapes) not in (1, ntop):
        raise layer.error(f"{what}: give one shape for all tops or one per top "
                          f"({ntop} tops), got {len(shapes)}")
    return [tuple(int(d) for d in shapes[0 if len(shapes) == 1 else i].dim) for i in range(ntop)]


@register_layer("Input")
class InputLayer(Layer):
    """Tops shaped by `input_param.shape`; their data is set from outside (net.blobs[...].data)."""

    exact_num_bottom = 0
    min_num_top = 1

    def layer_setup(self, bottom, top):
        shapes = self.layer_param.input_param.shape
        if len(shapes):
            for t, shape in zip(top, _shapes_from_param(self, shapes, len(top), "input_param")):
                t.reshape(shape)

    def reshape(self, bottom, top):
        pass  # keeps whatever shape the user gave the input blobs

    def forward(self, bottom, top):
        pass


@register_layer("DummyData")
class DummyDataLayer(Layer):
    """Tops filled by `dummy_data_param.data_filler` (constant 0 by default); random fillers refill each pass."""

    exact_num_bottom = 0
    min_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.dummy_data_param
        n = len(top)
        legacy = [list(p.num), list(p.channels), list(p.height), list(p.width)]
        if len(p.shape) and any(legacy):
            raise self.error("dummy_data_param: give either shape or num/channels/height/width, not both")
        if any(legacy):
            if any(len(x) not in (1, n) for x in legacy):
                raise self.error("dummy_data_param: num/channels/height/width each need 1 or "
                                 f"{n} values")
            self.shapes = [tuple(x[0 if len(x) == 1 else i] for x in legacy) for i in range(n)]
        elif len(p.shape):
            self.shapes = _shapes_from_param(self, p.shape, n, "dummy_data_param")
        else:
            raise self.error("dummy_data_param needs a shape for its tops")
        fillers = list(p.data_filler)
        if len(fillers) not in (0, 1, n):
            raise self.error(f"dummy_data_param: give 0, 1 or {n} data_filler entries, got {len(fillers)}")
        if not fillers:
            from ..proto import caffe_pb2
            fillers = [caffe_pb2.FillerParameter(type="constant", value=0)]
        self.fillers = [fillers[0 if len(fillers) == 1 else i] for i in range(n)]
        self.refill = [f.type != "constant" for f in self.fillers]
        for t, shape, f in zip(top, self.shapes, self.fillers):
            t.reshape(shape)
            fill(t, f, f"layer {self.name!r}")

    def reshape(self, bottom, top):
        for t, shape in zip(top, self.shapes):
            t.reshape(shape)

    def forward(self, bottom, top):
        for t, f, again in zip(top, self.fillers, self.refill):
            if again:
                fill(t, f, f"layer {self.name!r}")

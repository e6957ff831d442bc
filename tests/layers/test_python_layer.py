"""Caffe's `Python` layer: pycaffe-style classes named in python_param, run unchanged.

The first tests follow BVLC's python/caffe/test/test_python_layer.py (forward,
backward, reshape, exceptions, parameters with save/load/share, phase).
"""
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import minicaffe
from minicaffe import Blob, Layer, Net, caffe_pb2, compat
from minicaffe.layer import LayerError, LayerWarning
from minicaffe.layer_factory import create_layer
from minicaffe.layers.python_layer import PythonLayer
from minicaffe.testing import check_gradient, make_blobs

HERE = __name__  # python_param.module for the classes below


# -- pycaffe-style layers (as a Caffe user writes them) ------------------------------
class SimpleLayer(Layer):
    """top = 10 * bottom."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 10 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 10 * top[0].diff


class ExceptionLayer(Layer):
    def setup(self, bottom, top):
        raise RuntimeError("refusing to set up")


class ParameterLayer(Layer):
    """One learnable scalar; forward leaves its top alone (as in Caffe's test)."""

    def setup(self, bottom, top):
        self.blobs.add_blob(1)
        self.blobs[0].data[0] = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] = 1


class PhaseLayer(Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape()

    def forward(self, bottom, top):
        top[0].data[()] = self.phase


class ParamStrLayer(Layer):
    """top = bottom * k, k read from param_str in setup."""

    def setup(self, bottom, top):
        self.k = float(self.param_str)
        self.seen_phase = self.phase

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.k * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.k * top[0].diff

    def hello(self):
        return f"k={self.k}"


class ScaleParamLayer(Layer):
    """top[n, c] = w[c] * bottom[n, c] with learnable w (pycaffe-style, add_blob)."""

    def setup(self, bottom, top):
        w = self.blobs.add_blob(bottom[0].shape[1])
        w.data[...] = np.arange(1, bottom[0].shape[1] + 1)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def w(self, bottom):
        return self.blobs[0].data.reshape((1, -1) + (1,) * (bottom[0].data.ndim - 2))

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data * self.w(bottom)

    def backward(self, top, propagate_down, bottom):
        if self.param_propagate_down[0]:
            per_channel = (top[0].diff * bottom[0].data).reshape(bottom[0].shape[:2] + (-1,))
            self.blobs[0].diff[...] += per_channel.sum(axis=(0, 2))
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * self.w(bottom)


class SquareInPlace(Layer):
    """x <- x**2, written to work in place (keeps a copy of x for backward)."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)
        self.x = np.zeros(bottom[0].shape, dtype=bottom[0].dtype)

    def forward(self, bottom, top):
        self.x[...] = bottom[0].data
        np.square(self.x, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 2 * self.x * top[0].diff


class PyEuclideanLoss(Layer):
    """pyloss-style: 1/(2N) sum (a - b)^2, using pycaffe's blob.count and blob.num."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("Need two inputs to compute distance.")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise Exception("Inputs must have the same dimension.")
        self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.

    def backward(self, top, propagate_down, bottom):
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                bottom[i].diff[...] = sign * self.diff / bottom[i].num


class DuckLayer:
    """Not a Layer subclass at all: pycaffe only needs the four methods."""

    def __init__(self, param):
        self.param = param

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = -bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = -top[0].diff


class MinicaffeStyleLayer(Layer):
    """A minicaffe-style class (layer_setup) named in python_param works too."""
    exact_num_bottom = 1

    def layer_setup(self, bottom, top):
        self.shift = 3.0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data + self.shift

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff


# -- deliberately broken layers for the checks ---------------------------------------
class HalfWriter(SimpleLayer):
    def forward(self, bottom, top):
        top[0].data[:1] = 1.0


class WrongDiffShape(SimpleLayer):
    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = np.ones((7, 7))


class ReshapesBottomInBackward(SimpleLayer):
    def backward(self, top, propagate_down, bottom):
        bottom[0].reshape(bottom[0].count)


class Float32Param(SimpleLayer):
    def setup(self, bottom, top):
        self.blobs.append(Blob((2,), dtype=np.float32))


class ArrayParam(SimpleLayer):
    def setup(self, bottom, top):
        self.blobs.append(np.zeros(2))


class GrowsParams(SimpleLayer):
    def forward(self, bottom, top):
        super().forward(bottom, top)
        self.blobs.add_blob(3)


# -- helpers ------------------------------------------------------------------------
def python_layer_param(cls_name, name="py", bottoms=("data",), tops=("out",), param_str="",
                       module=HERE, **extra):
    lp = caffe_pb2.LayerParameter(name=name, type="Python", bottom=list(bottoms), top=list(tops),
                                  **extra)
    lp.python_param.module = module
    lp.python_param.layer = cls_name
    if param_str:
        lp.python_param.param_str = param_str
    return lp


def net_text(*layers, inputs="input: 'data' input_shape { dim: 10 dim: 9 dim: 8 }",
             header="name: 'pythonnet' force_backward: true"):
    return header + "\n" + inputs + "\n" + "\n".join(layers)


def py_layer(name, cls_name, bottom, top, extra="", module=HERE, param_str=None):
    b = f"bottom: '{bottom}'" if bottom else ""
    p = f" param_str: '{param_str}'" if param_str is not None else ""
    return (f"layer {{ type: 'Python' name: '{name}' {b} top: '{top}' "
            f"python_param {{ module: '{module}' layer: '{cls_name}'{p} }} {extra} }}")


def make_net(tmp_path, text, phase=caffe_pb2.TRAIN, name="net.prototxt", **kw):
    path = tmp_path / name
    path.write_text(text)
    return Net(str(path), phase, **kw)


@pytest.fixture
def simple_net(tmp_path):
    return make_net(tmp_path, net_text(py_layer("one", "SimpleLayer", "data", "one"),
                                       py_layer("two", "SimpleLayer", "one", "two"),
                                       py_layer("three", "SimpleLayer", "two", "three")))


@pytest.fixture
def caffe_alias():
    """Leave `import caffe` as it was found."""
    before = compat.is_installed()
    yield
    if not before:
        compat.uninstall()


# -- BVLC's pycaffe tests ------------------------------------------------------------
def test_forward(simple_net):
    simple_net.blobs["data"].data[...] = 8
    simple_net.forward()
    assert np.all(simple_net.blobs["three"].data == 10 ** 3 * 8)


def test_backward(simple_net):
    simple_net.blobs["three"].diff[...] = 7
    simple_net.backward()
    assert np.all(simple_net.blobs["data"].diff == 10 ** 3 * 7)


def test_reshape(simple_net):
    simple_net.blobs["data"].reshape(4, 4, 4, 4)
    simple_net.forward()
    for blob in simple_net.blobs.values():
        assert blob.data.shape == (4, 4, 4, 4)


def test_setup_exception_names_layer_and_prototxt_and_keeps_the_cause(tmp_path):
    # Any exception type in setup becomes one LayerError line naming the prototxt and the
    # layer (issue 14); the user's exception stays chained for --debug and for callers.
    with pytest.raises(LayerError, match=r"net\.prototxt: layer 'layer' \(Python\): class "
                                          r".*ExceptionLayer failed in setup: RuntimeError: "
                                          r"refusing") as info:
        make_net(tmp_path, net_text(py_layer("layer", "ExceptionLayer", "data", "top")),
                 caffe_pb2.TEST)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_parameter_learn_save_load_share(tmp_path):
    text = net_text(py_layer("layer", "ParameterLayer", "data", "top"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerWarning)  # its forward writes nothing, on purpose
        net = make_net(tmp_path, text)
        net.forward()
        net.backward()
        layer = net.layer_dict["layer"]
        assert layer.blobs[0].data[0] == 0 and layer.blobs[0].diff[0] == 1
        assert net.params["layer"][0] is layer.blobs[0]
        assert len(net.learnable_params) == 1
        layer.blobs[0].data[0] += layer.blobs[0].diff[0]

        path = str(tmp_path / "p.caffemodel")
        net.save(path)
        layer.blobs[0].data[0] = -1
        net.copy_from(path)
        assert layer.blobs[0].data[0] == 1

        net2 = make_net(tmp_path, text, name="net2.prototxt")
        net2.share_with(net)
        assert net2.layer_dict["layer"].blobs[0].data[0] == 1


@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
def test_phase(tmp_path, phase):
    text = net_text(py_layer("layer", "PhaseLayer", None, "phase"), inputs="")
    net = make_net(tmp_path, text, phase)
    assert net.forward()["phase"] == phase


# -- python_param and the layer object ------------------------------------------------
def test_param_str_and_phase_are_set_before_setup_and_layer_attrs_reach_the_object(tmp_path):
    text = net_text(py_layer("k", "ParamStrLayer", "data", "out", param_str="2.5"))
    net = make_net(tmp_path, text, caffe_pb2.TEST)
    net.blobs["data"].data[...] = 2
    assert np.all(net.forward()["out"] == 5)
    layer = net.layers[net.layer_names.index("k")]
    assert layer.seen_phase == caffe_pb2.TEST
    assert layer.hello() == "k=2.5"           # net.layers[i] answers for the user's object
    assert layer.type == "Python" and isinstance(layer.impl, ParamStrLayer)


def test_layer_type_list_has_python():
    assert "Python" in minicaffe.layer_type_list()


def test_duck_typed_and_minicaffe_style_classes(tmp_path):
    text = net_text(py_layer("neg", "DuckLayer", "data", "neg"),
                    py_layer("shift", "MinicaffeStyleLayer", "neg", "out"))
    net = make_net(tmp_path, text)
    net.blobs["data"].data[...] = 1
    assert np.all(net.forward()["out"] == 2)
    net.blobs["out"].diff[...] = 4
    net.backward()
    assert np.all(net.blobs["data"].diff == -4)


def test_minicaffe_style_class_keeps_its_blob_count_rules(tmp_path):
    lp = python_layer_param("MinicaffeStyleLayer", bottoms=("a", "b"))
    layer = create_layer(lp)
    with pytest.raises(LayerError, match="exactly 1 bottom"):
        layer.setup(make_blobs(np.ones(2), np.ones(2)), [Blob()])


# -- forward reference, gradients, dtypes, in place -------------------------------------
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2, 2), (5, 1)])
def test_scale_layer_forward_against_loops(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape)
    layer = create_layer(python_layer_param("ScaleParamLayer"))
    bottom, top = make_blobs(x), [Blob(dtype=np.float64)]
    layer.setup(bottom, top)
    layer.run_forward(bottom, top)
    expected = np.empty(shape)
    for idx in np.ndindex(*shape):
        expected[idx] = x[idx] * (idx[1] + 1)
    np.testing.assert_allclose(top[0].data, expected)


def test_gradients_with_the_project_checker():
    rng = np.random.default_rng(1)
    layer = create_layer(python_layer_param("ScaleParamLayer"))
    bottom, top = make_blobs(rng.normal(size=(3, 4))), [Blob(dtype=np.float64)]
    check_gradient(layer, bottom, top)
    assert layer.blobs[0].dtype == np.float64  # add_blob follows the layer's dtype
    layer = create_layer(python_layer_param("ScaleParamLayer"))
    check_gradient(layer, make_blobs(rng.normal(size=(2, 3, 2, 1))), [Blob(dtype=np.float64)])


def test_float32_in_float32_out():
    layer = create_layer(python_layer_param("ScaleParamLayer"))
    bottom, top = [Blob((2, 3))], [Blob()]
    bottom[0].data[...] = 1
    layer.setup(bottom, top)
    layer.run_forward(bottom, top)
    assert top[0].dtype == np.float32 and layer.blobs[0].dtype == np.float32


def test_in_place(tmp_path):
    text = net_text(py_layer("sq", "SquareInPlace", "data", "data"),
                    inputs="input: 'data' input_shape { dim: 2 dim: 3 }")
    net = make_net(tmp_path, text)
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    net.blobs["data"].data[...] = x
    net.forward()
    np.testing.assert_allclose(net.blobs["data"].data, x ** 2)
    net.blobs["data"].diff[...] = 1
    net.backward()
    np.testing.assert_allclose(net.blobs["data"].diff, 2 * x)


# -- bad parameters -----------------------------------------------------------------------
def test_missing_python_param_is_rejected():
    lp = caffe_pb2.LayerParameter(name="p", type="Python", bottom=["data"], top=["out"])
    with pytest.raises(LayerError, match="needs python_param"):
        create_layer(lp)


def test_missing_class_lists_what_the_module_defines():
    with pytest.raises(LayerError, match="no class 'Nope'.*SimpleLayer"):
        create_layer(python_layer_param("Nope"))


def test_not_a_layer_class_is_rejected():
    with pytest.raises(LayerError, match="not a class"):
        create_layer(python_layer_param("HERE"))


def test_unimportable_module_says_where_it_looked(tmp_path):
    text = net_text(py_layer("p", "X", "data", "out", module="no_such_module_xyz"))
    with pytest.raises(LayerError) as info:
        make_net(tmp_path, text)
    message = str(info.value)
    assert "no_such_module_xyz" in message and "PYTHONPATH" in message
    assert str(tmp_path) in message


def test_module_next_to_the_prototxt_is_found_and_import_caffe_gives_minicaffe(tmp_path, caffe_alias):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "mc_next_to_model_layers.py").write_text(textwrap.dedent("""
        import caffe

        class Twice(caffe.Layer):
            def setup(self, bottom, top):
                pass
            def reshape(self, bottom, top):
                top[0].reshape(*bottom[0].data.shape)
            def forward(self, bottom, top):
                top[0].data[...] = 2 * bottom[0].data
            def backward(self, top, propagate_down, bottom):
                bottom[0].diff[...] = 2 * top[0].diff
    """))
    text = net_text(py_layer("t", "Twice", "data", "out", module="mc_next_to_model_layers"))
    try:
        net = make_net(folder, text)
        net.blobs["data"].data[...] = 3
        assert np.all(net.forward()["out"] == 6)
        assert sys.modules["caffe"] is minicaffe
    finally:
        sys.modules.pop("mc_next_to_model_layers", None)
        if str(folder) in sys.path:
            sys.path.remove(str(folder))


def test_broken_import_inside_the_module_is_not_reported_as_missing_module(tmp_path):
    (tmp_path / "mc_broken_dep_layer.py").write_text("import surely_not_installed_pkg\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(LayerError, match="found but importing it failed.*surely_not_installed"):
            create_layer(python_layer_param("X", module="mc_broken_dep_layer"))
    finally:
        sys.path.remove(str(tmp_path))


# -- checks on user code ------------------------------------------------------------------
def run_layer(cls_name, shape=(2, 3), backward=False):
    layer = create_layer(python_layer_param(cls_name))
    bottom, top = [Blob(shape)], [Blob()]
    bottom[0].data[...] = 1
    layer.setup(bottom, top)
    layer.run_forward(bottom, top)
    if backward:
        top[0].diff[...] = 1
        layer.run_backward(top, [True], bottom)
    return layer, bottom, top


def test_forward_that_writes_part_of_a_top_is_reported():
    with pytest.raises(LayerError, match="'py' \\(Python\\): forward left 3 of 6 elements"):
        run_layer("HalfWriter")


def test_forward_that_writes_nothing_warns_and_keeps_the_old_values():
    layer = create_layer(python_layer_param("ParameterLayer"))
    bottom, top = [Blob((2,))], [Blob()]
    layer.setup(bottom, top)
    top[0].data[...] = 5
    with pytest.warns(LayerWarning, match="did not write top\\[0\\]"):
        layer.run_forward(bottom, top)
    assert np.all(top[0].data == 5)


def test_backward_writing_a_diff_of_the_wrong_shape_names_the_layer():
    with pytest.raises(LayerError, match="'py' \\(Python\\): backward: .*diff must have the shape"):
        run_layer("WrongDiffShape", backward=True)


def test_backward_reshaping_a_bottom_is_reported():
    with pytest.raises(LayerError, match="backward reshaped bottom\\[0\\] from \\(2, 3\\) to \\(6,\\)"):
        run_layer("ReshapesBottomInBackward", backward=True)


def test_param_of_the_wrong_dtype_is_reported():
    layer = create_layer(python_layer_param("Float32Param"))
    with pytest.raises(LayerError, match="param blob 0 is float32 but the net computes in float64"):
        layer.setup(make_blobs(np.ones(2)), [Blob(dtype=np.float64)])
    with pytest.raises(LayerError, match="not a Blob"):
        run_layer("ArrayParam")


def test_params_added_after_setup_are_reported():
    with pytest.raises(LayerError, match="forward replaced, added or removed parameter blobs"):
        run_layer("GrowsParams")


# -- pyloss: trains exactly like the built-in EuclideanLoss ----------------------------------
def regression_net(loss_layer):
    return textwrap.dedent(f"""
        name: "linreg"
        layer {{ type: "DummyData" name: "x" top: "x"
                 dummy_data_param {{ shape {{ dim: 10 dim: 3 dim: 2 }} data_filler {{ type: "gaussian" }} }} }}
        layer {{ type: "DummyData" name: "y" top: "y"
                 dummy_data_param {{ shape {{ dim: 10 dim: 3 dim: 2 }} data_filler {{ type: "gaussian" }} }} }}
        layer {{ type: "InnerProduct" name: "ipx" bottom: "x" top: "ipx"
                 inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
        layer {{ type: "InnerProduct" name: "ipy" bottom: "y" top: "ipy"
                 inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
        {loss_layer}
    """)


def train_losses(net_text_, iters=5):
    from minicaffe.solvers import SGDSolver
    solver_param = caffe_pb2.SolverParameter(base_lr=0.1, momentum=0.9, lr_policy="fixed",
                                             max_iter=iters, random_seed=7, display=0,
                                             snapshot_after_train=False, weight_decay=5e-4)
    from minicaffe.proto_io import read_net_param  # accepts text via a NetParameter
    from google.protobuf import text_format
    text_format.Merge(net_text_, solver_param.net_param)
    solver = SGDSolver(solver_param)
    losses = []
    for _ in range(iters):
        solver.step(1)
        losses.append(solver.smoothed_loss)
    return losses, solver


BUILTIN_LOSS = 'layer { type: "EuclideanLoss" name: "loss" bottom: "ipx" bottom: "ipy" top: "loss" }'


def python_loss(module, cls):
    return (f'layer {{ type: "Python" name: "loss" bottom: "ipx" bottom: "ipy" top: "loss" '
            f'python_param {{ module: "{module}" layer: "{cls}" }} loss_weight: 1 }}')


def test_pyloss_style_layer_trains_like_the_builtin_euclidean_loss():
    builtin, _ = train_losses(regression_net(BUILTIN_LOSS))
    python, solver = train_losses(regression_net(python_loss(HERE, "PyEuclideanLoss")))
    # float32 sums taken in a different order (numpy vs the built-in kernel) differ in the last ulp
    np.testing.assert_allclose(python, builtin, rtol=1e-6, atol=1e-6)
    assert builtin[-1] < builtin[0]
    assert solver.net.layer_dict["loss"].type == "Python"


BVLC_PYLOSS = "examples/pycaffe/layers/pyloss.py"
MIRROR = "/work/.mirror/BVLC+caffe/repo"


def test_bvlc_pyloss_runs_unchanged(tmp_path, caffe_alias):
    """BVLC's own examples/pycaffe/layers/pyloss.py, read from a Caffe checkout if there is one."""
    try:
        source = subprocess.run(["git", "-C", MIRROR, "show", f"HEAD:{BVLC_PYLOSS}"],
                                capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no BVLC Caffe checkout to read pyloss.py from")
    (tmp_path / "pyloss.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    try:
        builtin, _ = train_losses(regression_net(BUILTIN_LOSS))
        bvlc, _ = train_losses(regression_net(python_loss("pyloss", "EuclideanLossLayer")))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("pyloss", None)
    np.testing.assert_allclose(bvlc, builtin, rtol=1e-6, atol=1e-6)  # float32 summation order


def test_python_layer_class_is_the_adapter():
    assert minicaffe.layer_registry()["Python"] is PythonLayer

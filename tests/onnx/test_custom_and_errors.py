"""Custom layers export through their `to_onnx(self, ctx)`; without one, export fails naming them;
without onnx installed the feature names the extra to install; the CLI writes and checks."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the ONNX export needs the onnx package (minicaffe[onnx])")
pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime (minicaffe[onnx])")

from minicaffe import Layer  # noqa: E402
from minicaffe.layer import register_layer  # noqa: E402
from minicaffe.onnx import OnnxError, export  # noqa: E402

from .helpers import export_and_check, net_from_text, randomize  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAD = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 } } }\n'


@register_layer("OnnxTestSoftsign")
class SoftsignLayer(Layer):
    """y = a * x / (1 + |x|), a learnable scalar a (blob 0): exports itself."""
    exact_num_bottom = exact_num_top = 1

    def layer_setup(self, bottom, top):
        if not self.blobs_loaded:
            self.blobs.add_blob(1).data[...] = 1.5

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        x = bottom[0].data
        top[0].data[...] = self.blobs[0].data[0] * x / (1 + np.abs(x))

    def to_onnx(self, ctx):
        a = ctx.add_initializer(ctx.weight(0).reshape(()))
        s = ctx.add_node("Softsign", [ctx.input(0)])[0]
        ctx.add_node("Mul", [s, a], [ctx.output(0)])


@register_layer("OnnxTestNoExport")
class NoExportLayer(SoftsignLayer):
    to_onnx = None


def test_custom_layer_exports_itself(tmp_path):
    net = net_from_text(HEAD + 'layer { name: "ss" type: "OnnxTestSoftsign" bottom: "data" top: "out" }')
    assert export_and_check(net, tmp_path).ok


def test_custom_layer_without_to_onnx_is_named(tmp_path):
    net = net_from_text(HEAD + 'layer { name: "nx" type: "OnnxTestNoExport" bottom: "data" top: "out" }')
    with pytest.raises(OnnxError, match=r"^layer 'nx' \(OnnxTestNoExport\): cannot export"):
        export(net, tmp_path / "m.onnx")


def test_python_layer_without_to_onnx_is_named(tmp_path, monkeypatch):
    (tmp_path / "onnx_test_pylayer.py").write_text(textwrap.dedent("""
        import caffe
        class Twice(caffe.Layer):
            def setup(self, bottom, top): pass
            def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)
            def forward(self, bottom, top): top[0].data[...] = 2 * bottom[0].data
            def backward(self, top, propagate_down, bottom): pass
        class TwiceExported(Twice):
            def to_onnx(self, ctx):
                two = ctx.add_initializer(np.float32(2.0).reshape(()))
                ctx.add_node("Mul", [ctx.input(0), two], [ctx.output(0)])
        import numpy as np
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    text = HEAD + ('layer { name: "py" type: "Python" bottom: "data" top: "out" '
                   'python_param { module: "onnx_test_pylayer" layer: "%s" } }')
    with pytest.raises(OnnxError, match=r"^layer 'py' \(Python\): cannot export to ONNX: its class "
                                        r"Twice has no to_onnx"):
        export(net_from_text(text % "Twice"), tmp_path / "m.onnx")
    assert export_and_check(net_from_text(text % "TwiceExported"), tmp_path).ok


def _run(args, **env_extra):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.update(env_extra)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=REPO)


def test_cli_export_and_check(tmp_path):
    proto = tmp_path / "net.prototxt"
    proto.write_text(HEAD.replace("dim: 4", "dim: 4 dim: 4") + textwrap.dedent("""
        layer { name: "c" type: "Convolution" bottom: "data" top: "c"
                convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
        layer { name: "p" type: "Pooling" bottom: "c" top: "p" pooling_param { pool: AVE kernel_size: 2 stride: 2 pad: 1 } }
    """))
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "net.onnx"
    r = _run(["-m", "minicaffe", "export-onnx", str(proto), str(out), "--check", "--batch", "dynamic",
              "--input", str(tmp_path / "x.npy")])
    assert r.returncode == 0, r.stderr
    assert "check OK: worst relative error" in r.stdout and out.exists()
    r = _run(["-m", "minicaffe", "export-onnx", str(proto), str(out), "--opset", "5"])
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "opset 5" in r.stderr


def test_missing_onnx_names_the_extra(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("onnx", "onnxruntime"):
                    raise ImportError(name)
        sys.meta_path.insert(0, _Block())
    """))
    proto = tmp_path / "net.prototxt"
    proto.write_text(HEAD)
    r = _run(["-m", "minicaffe", "export-onnx", str(proto), str(tmp_path / "o.onnx")],
             PYTHONPATH=f"{hide}{os.pathsep}{REPO}")
    assert r.returncode == 1
    assert r.stderr.strip() == ("minicaffe: error: the ONNX features need the 'onnx' package, from the "
                                'minicaffe[onnx] extra: pip install "minicaffe[onnx]"')


def test_net_to_onnx(tmp_path):
    import onnx
    net = randomize(net_from_text(HEAD + 'layer { name: "t" type: "TanH" bottom: "data" top: "out" }'))
    net.to_onnx(tmp_path / "n.onnx", opset=13)
    model = onnx.load(str(tmp_path / "n.onnx"))
    assert model.opset_import[0].version == 13 and [o.name for o in model.graph.output] == ["out"]

"""A corpus of bad inputs: each is refused with minicaffe's own error type, in one line that
names the culprit (file, line, layer), and leaves every file in the work folder as it was.

Each case writes its files into an empty folder, runs one call (the Python API, or the CLI
in-process with --debug so the exception itself is seen) and compares the folder before
and after. The LMDB truncation case also runs in a subprocess: unchecked, it is a SIGBUS.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import minicaffe
from minicaffe import cli
from minicaffe.datasets.imageset import ImageError
from minicaffe.db import DBError, array_to_datum, open_reader, open_writer
from minicaffe.errors import CommandError, MinicaffeError
from minicaffe.layer import LayerError
from minicaffe.plugins import PluginError
from minicaffe.proto import caffe_pb2
from minicaffe.proto_io import ProtoFileError
from minicaffe.solvers.base import SolverError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NET = """name: "t"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
SOLVER = ('net: "net.prototxt"\nbase_lr: 0.01\nmax_iter: 2\nlr_policy: "fixed"\n'
          'snapshot_prefix: "snap"\n')


def layer(text):
    return NET + text


def py_net(module, cls, param_str=""):
    return ('layer { name: "data" type: "DummyData" top: "data" '
            'dummy_data_param { shape { dim: 2 dim: 3 } } }\n'
            f'layer {{ name: "pylayer" type: "Python" bottom: "data" top: "out" '
            f'python_param {{ module: "{module}" layer: "{cls}" param_str: "{param_str}" }} }}\n')


PY_SETUP_FAILS = """import caffe
class Bad(caffe.Layer):
    def setup(self, bottom, top):
        raise {exc}("bad param_str")
    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)
    def forward(self, bottom, top):
        pass
"""


def lmdb_bytes(tmp):
    """A small valid LMDB at tmp/db (written by minicaffe)."""
    with open_writer(str(tmp / "db")) as db:
        for i in range(200):
            img = np.full((1, 8, 8), i % 256, dtype=np.uint8)
            db.put(f"{i:08d}", array_to_datum(img, i % 10).SerializeToString())


def truncated_lmdb(tmp):
    lmdb_bytes(tmp)
    data = tmp / "db" / "data.mdb"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)


def data_net(source, backend="LMDB"):
    return (f'layer {{ name: "data" type: "Data" top: "data" top: "label" '
            f'data_param {{ source: "{source}" batch_size: 4 backend: {backend} }} }}\n')


def weights_file(tmp, shape=(3, 3)):
    param = caffe_pb2.NetParameter()
    lp = param.layer.add(name="ip", type="InnerProduct")
    b = lp.blobs.add()
    b.shape.dim.extend(shape)
    b.data.extend([0.5] * int(np.prod(shape)))
    (tmp / "w.caffemodel").write_bytes(param.SerializeToString())


def net(path="net.prototxt", phase=minicaffe.TEST, **kw):
    return lambda tmp: minicaffe.Net(str(tmp / path), phase, **kw)


def solver(path="solver.prototxt"):
    return lambda tmp: minicaffe.get_solver(str(tmp / path))


def run_cli(*argv):
    def go(tmp):
        status = cli.main(["--debug", *[a.format(tmp=tmp) for a in argv]])
        raise AssertionError(f"minicaffe {' '.join(argv)} returned {status} instead of raising")
    return go


# (id, files {name: text or bytes or a function(tmp)}, action(tmp), error type, regex of
#  the culprit, env overrides)
CASES = [
    # -- net prototxts ------------------------------------------------------------------
    ("net-empty", {"net.prototxt": ""}, net(), LayerError, r"net\.prototxt: the net has no layers"),
    ("net-comments-only", {"net.prototxt": "# a comment\n\n# another\n"}, net(), LayerError,
     r"net\.prototxt: the net has no layers"),
    ("net-few-binary-bytes", {"net.prototxt": b"\xff\xfe\x00\x07"}, net(), ProtoFileError,
     r"net\.prototxt: not a valid binary NetParameter"),
    ("net-binary-name-only", {"net.caffemodel": caffe_pb2.NetParameter(name="n").SerializeToString()},
     net("net.caffemodel"), LayerError, r"net\.caffemodel: the net has no layers"),
    ("net-all-filtered-by-phase",
     {"net.prototxt": NET.replace('top: "label"\n', 'top: "label" include { phase: TRAIN }\n')
      .replace('top: "ip"\n', 'top: "ip" include { phase: TRAIN }\n')
      .replace('top: "loss" }', 'top: "loss" include { phase: TRAIN } }')},
     net(), LayerError, r"net\.prototxt: none of the net's 3 layers is included in phase TEST"),
    ("net-is-directory", {"net.prototxt/x": ""}, net(), ProtoFileError,
     r"net\.prototxt: is a directory"),
    ("net-is-fifo", {"net.prototxt": "FIFO"}, net(), ProtoFileError, r"net\.prototxt: is a FIFO"),
    ("net-is-dev-zero", {}, lambda tmp: minicaffe.Net("/dev/zero", minicaffe.TEST),
     ProtoFileError, r"/dev/zero: is a device"),
    ("net-missing", {}, net(), ProtoFileError, r"net\.prototxt: no such file"),
    ("net-syntax-error", {"net.prototxt": 'name: "t"\nlayer { name: "a" type: }\n'}, net(),
     ProtoFileError, r"net\.prototxt:2:\d+:"),
    ("net-unknown-field", {"net.prototxt": 'name: "t"\nbogus_field: 3\n'}, net(), ProtoFileError,
     r"net\.prototxt:2:\d+:.*bogus_field"),
    ("net-unknown-type", {"net.prototxt": layer('layer { name: "x" type: "Nope" bottom: "ip" top: "y" }')},
     net(), LayerError, r"net\.prototxt: layer 'x': unknown layer type 'Nope'"),
    ("net-unknown-bottom", {"net.prototxt": layer('layer { name: "x" type: "ReLU" bottom: "zz" top: "y" }')},
     net(), LayerError, r"net\.prototxt: layer 'x'.*unknown bottom blob 'zz'"),
    ("net-bad-enum", {"net.prototxt": layer('layer { name: "x" type: "Pooling" bottom: "ip" top: "y" '
                                            'pooling_param { pool: FANCY } }')},
     net(), ProtoFileError, r"net\.prototxt:7:\d+:.*FANCY"),
    ("net-include-and-exclude", {"net.prototxt": layer(
        'layer { name: "x" type: "ReLU" bottom: "ip" top: "y" include { phase: TEST } '
        'exclude { phase: TRAIN } }')}, net(), LayerError, r"net\.prototxt: layer 'x'"),
    ("net-propagate-down-count", {"net.prototxt": layer(
        'layer { name: "x" type: "ReLU" bottom: "ip" top: "y" propagate_down: true '
        'propagate_down: false }')}, net(), LayerError, r"net\.prototxt: layer 'x': propagate_down"),
    ("net-v0-format", {"net.prototxt": 'layers { layer { name: "old" type: "conv" } }\n'}, net(),
     ProtoFileError, r"net\.prototxt: layer 0 \(unnamed\) is in Caffe's V0 format"),
    ("net-mixes-v1-and-layer", {"net.prototxt": NET + 'layers { name: "v1" type: RELU bottom: "ip" top: "ip" }\n'},
     net(), ProtoFileError, r"net\.prototxt: the net mixes V1"),
    ("net-input-dim-count", {"net.prototxt": 'input: "data"\ninput_dim: 1\ninput_dim: 3\n'}, net(),
     ProtoFileError, r"net\.prototxt: input_dim must give 4 values"),
    ("net-kernel-too-big", {"net.prototxt": 'layer { name: "data" type: "Input" top: "data" '
                            'input_param { shape { dim: 1 dim: 1 dim: 4 dim: 4 } } }\n'
                            'layer { name: "conv" type: "Convolution" bottom: "data" top: "c" '
                            'convolution_param { num_output: 2 kernel_size: 9 } }\n'},
     net(), LayerError, r"net\.prototxt: layer 'conv'"),
    ("net-concat-mismatch", {"net.prototxt": NET + 'layer { name: "cat" type: "Concat" bottom: "data" '
                             'bottom: "label" top: "c" concat_param { axis: 0 } }\n'},
     net(), LayerError, r"net\.prototxt: layer 'cat'"),
    ("net-eltwise-mismatch", {"net.prototxt": NET + 'layer { name: "sum" type: "Eltwise" bottom: "data" '
                              'bottom: "ip" top: "s" }\n'}, net(), LayerError, r"net\.prototxt: layer 'sum'"),
    ("net-softmax-axis", {"net.prototxt": NET + 'layer { name: "sm" type: "Softmax" bottom: "ip" top: "p" '
                          'softmax_param { axis: 5 } }\n'}, net(), LayerError, r"net\.prototxt: layer 'sm'"),
    ("net-reshape-two-inferred", {"net.prototxt": NET + 'layer { name: "r" type: "Reshape" bottom: "ip" '
                                  'top: "r" reshape_param { shape { dim: -1 dim: -1 } } }\n'},
     net(), LayerError, r"net\.prototxt: layer 'r'"),
    ("net-inner-product-no-output", {"net.prototxt": NET.replace("num_output: 2 ", "")}, net(),
     LayerError, r"net\.prototxt: layer 'ip'"),
    ("yaml-net-syntax", {"net.yaml": "name: t\nlayer: [\n  {name: a\n"}, net("net.yaml"),
     ProtoFileError, r"net\.yaml:\d+:\d+:"),
    ("yaml-net-unknown-field", {"net.yaml": "name: t\nlayer:\n  - name: a\n    colour: red\n"},
     net("net.yaml"), ProtoFileError, r"net\.yaml:4: .*colour"),
    ("yaml-net-not-a-mapping", {"net.yaml": "- 1\n- 2\n"}, net("net.yaml"), ProtoFileError,
     r"net\.yaml: expected a mapping"),
    # -- data layers and LMDBs ------------------------------------------------------------
    ("lmdb-truncated", {"setup": truncated_lmdb, "net.prototxt": data_net("{tmp}/db")}, net(),
     LayerError, r"layer 'data' \(Data\): LMDB data file '.*db/data\.mdb' is truncated"),
    ("lmdb-missing", {"net.prototxt": data_net("{tmp}/nope")}, net(), LayerError,
     r"layer 'data' \(Data\): LMDB database '.*nope' does not exist"),
    ("lmdb-garbage", {"db/data.mdb": b"not an lmdb at all" * 300, "net.prototxt": data_net("{tmp}/db")},
     net(), LayerError, r"layer 'data' \(Data\): cannot open LMDB '.*db'"),
    ("lmdb-as-leveldb", {"setup": lmdb_bytes, "net.prototxt": data_net("{tmp}/db", "LEVELDB")},
     net(), LayerError, r"layer 'data' \(Data\): '.*db' is an LMDB but the backend is LEVELDB"),
    ("lmdb-reader-truncated", {"setup": truncated_lmdb}, lambda tmp: open_reader(str(tmp / "db")),
     DBError, r"'.*db/data\.mdb' is truncated"),
    ("lmdb-header-only", {"setup": lambda tmp: (lmdb_bytes(tmp), os.truncate(tmp / "db" / "data.mdb", 100))},
     lambda tmp: open_reader(str(tmp / "db")), DBError, r"data\.mdb' is truncated: 100 bytes"),
    ("cli-compute-mean-truncated", {"setup": truncated_lmdb}, run_cli("compute-image-mean", "{tmp}/db"),
     DBError, r"db/data\.mdb' is truncated"),
    # -- Python layers ----------------------------------------------------------------------
    ("py-disabled", {"net.prototxt": py_net("mylayer", "Bad"), "mylayer.py": PY_SETUP_FAILS.format(exc="ValueError")},
     net(), LayerError, r"net\.prototxt: layer 'pylayer' \(Python\): Python layers are disabled",
     {"MINICAFFE_PYTHON_LAYERS": "0"}),
    ("py-missing-module", {"net.prototxt": py_net("no_such_module_xyz", "Bad")}, net(), LayerError,
     r"net\.prototxt: layer 'pylayer' \(Python\): cannot import python_param\.module 'no_such_module_xyz'"),
    ("py-import-raises", {"net.prototxt": py_net("pl_raises", "Bad"), "pl_raises.py": "raise RuntimeError('boom at import')\n"},
     net(), LayerError, r"net\.prototxt: layer 'pylayer' \(Python\): .*'pl_raises'.*RuntimeError: boom at import"),
    ("py-import-inner-missing", {"net.prototxt": py_net("pl_inner", "Bad"), "pl_inner.py": "import not_installed_dep_q\n"},
     net(), LayerError, r"net\.prototxt: layer 'pylayer' \(Python\): .*'pl_inner'.*not_installed_dep_q"),
    ("py-syntax-error", {"net.prototxt": py_net("pl_syntax", "Bad"), "pl_syntax.py": "def broken(:\n"},
     net(), LayerError, r"net\.prototxt: layer 'pylayer' \(Python\): .*pl_syntax\.py:1\).*SyntaxError"),
    ("py-setup-valueerror", {"net.prototxt": py_net("pl_value", "Bad"), "pl_value.py": PY_SETUP_FAILS.format(exc="ValueError")},
     net(), LayerError, r"net\.prototxt: layer 'pylayer' \(Python\): class pl_value\.Bad failed in setup: ValueError"),
    ("py-setup-keyerror", {"net.prototxt": py_net("pl_key", "Bad"), "pl_key.py": PY_SETUP_FAILS.format(exc="KeyError")},
     net(), LayerError, r"net\.prototxt: layer 'pylayer' \(Python\): .*KeyError"),
    ("py-setup-zerodivision", {"net.prototxt": py_net("pl_zero", "Bad"), "pl_zero.py": PY_SETUP_FAILS.format(exc="ZeroDivisionError")},
     net(), LayerError, r"net\.prototxt: layer 'pylayer'.*ZeroDivisionError"),
    ("py-missing-class", {"net.prototxt": py_net("pl_nocls", "Missing"), "pl_nocls.py": "class Other: pass\n"},
     net(), LayerError, r"net\.prototxt: layer 'pylayer' \(Python\): module 'pl_nocls'.*has no class 'Missing'"),
    ("py-no-module-given", {"net.prototxt": py_net("", "")}, net(), LayerError,
     r"net\.prototxt: layer 'pylayer' \(Python\): type \"Python\" needs python_param"),
    # -- solver files -----------------------------------------------------------------------
    ("solver-empty", {"solver.prototxt": ""}, solver(), SolverError, r"solver\.prototxt: "),
    ("solver-unknown-type", {"solver.prototxt": SOLVER + 'type: "Magic"\n', "net.prototxt": NET},
     solver(), SolverError, r"solver\.prototxt:6: unknown solver type 'Magic'"),
    ("solver-negative-max-iter", {"solver.prototxt": SOLVER.replace("max_iter: 2", "max_iter: -5"), "net.prototxt": NET},
     solver(), SolverError, r"solver\.prototxt:3: max_iter must be >= 0, got -5"),
    ("solver-yaml-bad-value", {"solver.yaml": "net: net.prototxt\nmax_iter: 2\nbase_lr: fast\n", "net.prototxt": NET},
     solver("solver.yaml"), ProtoFileError, r"solver\.yaml:3: Failed to parse base_lr"),
    ("solver-yaml-unknown-key", {"solver.yaml": "net: net.prototxt\nmaxiter: 2\n"}, solver("solver.yaml"),
     ProtoFileError, r"solver\.yaml:2: .*maxiter"),
    ("solver-syntax", {"solver.prototxt": 'net: "net.prototxt"\nbase_lr 0.01\n'}, solver(), ProtoFileError,
     r"solver\.prototxt:2:\d+:"),
    ("solver-net-missing", {"solver.prototxt": SOLVER}, solver(), SolverError,
     r"solver\.prototxt: .*net\.prototxt"),
    ("solver-type-contradiction", {"solver.prototxt": SOLVER + 'type: "Adam"\nsolver_type: SGD\n'},
     solver(), ProtoFileError, r"solver\.prototxt: solver_type SGD contradicts type 'Adam'"),
    ("solver-iter-size-zero", {"solver.prototxt": SOLVER + "iter_size: 0\n", "net.prototxt": NET},
     solver(), SolverError, r"solver\.prototxt:6: iter_size must be at least 1"),
    ("solver-snapshot-negative", {"solver.prototxt": SOLVER + "snapshot: -1\n", "net.prototxt": NET},
     solver(), SolverError, r"solver\.prototxt:6: snapshot must be >= 0"),
    ("solver-regularization", {"solver.prototxt": SOLVER + 'weight_decay: 0.1\nregularization_type: "L3"\n',
                               "net.prototxt": NET}, solver(), SolverError,
     r"solver\.prototxt: unknown regularization_type 'L3'"),
    ("solver-lr-policy", {"solver.prototxt": SOLVER.replace('"fixed"', '"wobbly"'), "net.prototxt": NET},
     solver(), SolverError, r"solver\.prototxt: .*wobbly"),
    ("solver-is-directory", {"solver.prototxt/x": ""}, solver(), ProtoFileError,
     r"solver\.prototxt: is a directory"),
    ("solver-empty-net", {"solver.prototxt": SOLVER, "net.prototxt": "# nothing here\n"}, solver(),
     LayerError, r"net file net\.prototxt\): the net has no layers"),
    ("cli-train-empty-net", {"solver.prototxt": SOLVER, "net.prototxt": ""},
     run_cli("train", "--solver", "{tmp}/solver.prototxt", "--no-progress"), LayerError,
     r"net file net\.prototxt\): the net has no layers"),
    # -- caffemodels --------------------------------------------------------------------------
    ("weights-directory", {"net.prototxt": NET, "w.caffemodel/x": ""},
     lambda tmp: minicaffe.Net(str(tmp / "net.prototxt"), minicaffe.TEST).copy_from(str(tmp / "w.caffemodel")),
     ProtoFileError, r"w\.caffemodel: is a directory, expected a regular weights file"),
    ("weights-fifo", {"net.prototxt": NET, "w.caffemodel": "FIFO"},
     lambda tmp: minicaffe.Net(str(tmp / "net.prototxt"), minicaffe.TEST).copy_from(str(tmp / "w.caffemodel")),
     ProtoFileError, r"w\.caffemodel: is a FIFO"),
    ("weights-dev-zero", {"net.prototxt": NET},
     lambda tmp: minicaffe.Net(str(tmp / "net.prototxt"), minicaffe.TEST).copy_from("/dev/zero"),
     ProtoFileError, r"/dev/zero: is a device"),
    ("weights-garbage", {"net.prototxt": NET, "w.caffemodel": b"\xff\xff\xff\xff garbage"},
     lambda tmp: minicaffe.Net(str(tmp / "net.prototxt"), minicaffe.TEST).copy_from(str(tmp / "w.caffemodel")),
     ProtoFileError, r"w\.caffemodel: neither HDF5 nor a binary \.caffemodel"),
    ("weights-shape", {"net.prototxt": NET, "setup": lambda tmp: weights_file(tmp, (5, 5))},
     lambda tmp: minicaffe.Net(str(tmp / "net.prototxt"), minicaffe.TEST).copy_from(str(tmp / "w.caffemodel")),
     LayerError, r"w\.caffemodel: layer 'ip' "),
    ("weights-missing", {"net.prototxt": NET},
     net(weights="nope.caffemodel"),
     ProtoFileError, r"nope\.caffemodel: no such weights file"),
    ("cli-test-weights-dir", {"net.prototxt": NET, "w.caffemodel/x": ""},
     run_cli("test", "--model", "{tmp}/net.prototxt", "--weights", "{tmp}/w.caffemodel", "--iterations", "1"),
     ProtoFileError, r"w\.caffemodel: is a directory"),
    # -- command lines and output paths -----------------------------------------------------------
    ("cli-log-missing-folder", {"solver.prototxt": SOLVER, "net.prototxt": NET},
     run_cli("train", "--solver", "{tmp}/solver.prototxt", "--log", "{tmp}/no/dir/train.log"),
     ProtoFileError, r"no/dir/train\.log: cannot write the log file: folder .* does not exist"),
    ("cli-draw-missing-folder", {"net.prototxt": NET},
     run_cli("draw", "{tmp}/net.prototxt", "{tmp}/no/dir/net.dot"), ProtoFileError,
     r"no/dir/net\.dot: cannot write the output file: folder"),
    ("cli-upgrade-missing-folder", {"net.prototxt": NET},
     run_cli("upgrade-net", "{tmp}/net.prototxt", "{tmp}/no/dir/up.prototxt"), ProtoFileError,
     r"no/dir/up\.prototxt: cannot write the output file"),
    ("cli-upgrade-onto-directory", {"net.prototxt": NET, "out/x": ""},
     run_cli("upgrade-net", "{tmp}/net.prototxt", "{tmp}/out"), ProtoFileError, r"out: cannot write"),
    ("cli-time-empty-net", {"net.prototxt": "\n"}, run_cli("time", "--model", "{tmp}/net.prototxt", "--iterations", "1"),
     LayerError, r"net\.prototxt: the net has no layers"),
    ("cli-time-filtered-net", {"net.prototxt": 'layer { name: "d" type: "DummyData" top: "x" include { phase: TEST } '
                               'dummy_data_param { shape { dim: 1 } } }\n'},
     run_cli("time", "--model", "{tmp}/net.prototxt", "--iterations", "1"), LayerError,
     r"net\.prototxt: none of the net's 1 layers is included in phase TRAIN"),
    ("cli-plugin-missing", {}, run_cli("--plugin", "{tmp}/gone.py", "layers"), PluginError,
     r"gone\.py does not exist"),
    ("cli-convert-missing-images", {"list.txt": "a.png 0\nb.png 1\n"},
     run_cli("convert-imageset", "{tmp}/", "{tmp}/list.txt", "{tmp}/out_lmdb"), ImageError,
     r"no image of '.*list\.txt' could be read \(the first, '.*a\.png'"),
    ("cli-convert-empty-list", {"list.txt": "\n"},
     run_cli("convert-imageset", "{tmp}/", "{tmp}/list.txt", "{tmp}/out_lmdb"), ImageError,
     r"image list '.*list\.txt' is empty"),
    ("cli-convert-existing-db", {"list.txt": "a.png 0\n", "setup": lmdb_bytes},
     run_cli("convert-imageset", "{tmp}/", "{tmp}/list.txt", "{tmp}/db"), DBError, r"'.*db' already exists"),
]


def _write(tmp, files):
    for name, content in files.items():
        if name == "setup":
            continue
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "FIFO":
            os.mkfifo(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif name.endswith("/x") and content == "":
            path.parent.mkdir(exist_ok=True)
            path.unlink(missing_ok=True)
        else:
            path.write_text(content.replace("{tmp}", str(tmp)))
    if "setup" in files:
        files["setup"](tmp)


def _snapshot(tmp):
    """{relative path: bytes (files), 'dir' or 'special'} of everything under tmp."""
    out = {}
    for p in sorted(tmp.rglob("*")):
        if p.name == "__pycache__" or "__pycache__" in p.parts:
            continue
        key = p.relative_to(tmp).as_posix()
        out[key] = p.read_bytes() if p.is_file() else ("dir" if p.is_dir() else "special")
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(case, tmp_path, monkeypatch):
    name, files, action, error, culprit = case[:5]
    env = case[5] if len(case) > 5 else {}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)   # Python layer modules are found next to the prototxt / here
    _write(tmp_path, files)
    before = _snapshot(tmp_path)
    try:
        with pytest.raises(error) as info:
            action(tmp_path)
    finally:
        for mod in [m for m in sys.modules if m.startswith("pl_") or m == "mylayer"]:
            del sys.modules[mod]
    exc = info.value
    assert isinstance(exc, MinicaffeError), f"{type(exc).__mro__} is not a MinicaffeError"
    message = str(exc)
    assert "\n" not in message, message
    assert re.search(culprit, message), f"{culprit!r} not in {message!r}"
    assert _snapshot(tmp_path) == before, "a failing call changed, added or removed files"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_truncated_lmdb_in_a_subprocess_is_exit_1_naming_the_file(tmp_path):
    # Unchecked, lmdb maps the short file and the first read past its end is a SIGBUS.
    truncated_lmdb(tmp_path)
    (tmp_path / "net.prototxt").write_text(data_net(tmp_path / "db"))
    for argv in (["time", "--model", str(tmp_path / "net.prototxt"), "--iterations", "1"],
                 ["compute-image-mean", str(tmp_path / "db")]):
        proc = subprocess.run([sys.executable, "-m", "minicaffe", *argv], capture_output=True,
                              text=True, env=_env(), timeout=120)
        assert proc.returncode == 1, (proc.returncode, proc.stderr)
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("minicaffe: error: ") and "db/data.mdb' is truncated" in last, last


def test_stale_plugin_env_warns_for_help_and_layers_but_stops_net_commands(tmp_path):
    env = _env()
    env["MINICAFFE_PLUGINS"] = str(tmp_path / "deleted_plugin.py")
    (tmp_path / "net.prototxt").write_text(NET)
    for argv, status in ((["--help"], 0), (["layers"], 0),
                         (["time", "--model", str(tmp_path / "net.prototxt"), "--iterations", "1"], 1)):
        proc = subprocess.run([sys.executable, "-m", "minicaffe", *argv], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == status, (argv, proc.stderr)
        assert "deleted_plugin.py does not exist" in proc.stderr


def test_no_python_layers_flag_after_the_command(tmp_path):
    (tmp_path / "net.prototxt").write_text(py_net("mylayer", "Bad"))
    (tmp_path / "mylayer.py").write_text("raise SystemExit('must not be imported')\n")
    env = _env()
    env.pop("MINICAFFE_PYTHON_LAYERS", None)
    proc = subprocess.run([sys.executable, "-m", "minicaffe", "time", "--model",
                           str(tmp_path / "net.prototxt"), "--no-python-layers"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert "Python layers are disabled" in proc.stderr and "must not be imported" not in proc.stderr


def test_convert_imageset_skips_unreadable_images_and_keeps_the_rest(tmp_path):
    pytest.importorskip("PIL", reason="convert-imageset needs Pillow")
    from minicaffe.datasets.imageset import convert_imageset, encode_image
    (tmp_path / "ok.png").write_bytes(encode_image(np.zeros((3, 4, 4), np.uint8), "png"))
    (tmp_path / "list.txt").write_text("missing.png 0\nok.png 1\n")
    with pytest.warns(UserWarning, match="missing.png"):
        count = convert_imageset(str(tmp_path), str(tmp_path / "list.txt"), str(tmp_path / "out"))
    assert count == 1 and len(open_reader(str(tmp_path / "out"))) == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_commands_error_base_class():
    assert issubclass(CommandError, MinicaffeError) and issubclass(CommandError, ValueError)

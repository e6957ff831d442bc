"""Registering custom layer types; loading them as plugins, from MINICAFFE_PLUGINS and
entry points; `minicaffe layers`; `--plugin` anywhere on the command line; the caffe alias."""
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import minicaffe
from minicaffe import Layer, Net, caffe_pb2, compat, layer as layer_module, plugins
from minicaffe.cli import main
from minicaffe.layer import LayerError, layer_source, register_layer

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def isolated(monkeypatch):
    """Undo registrations, plugin bookkeeping and imported modules after the test."""
    registry, sources = dict(layer_module._REGISTRY), dict(layer_module._SOURCES)
    modules = set(sys.modules)
    path = list(sys.path)
    for name in ("_loaded", "_loaded_modules"):
        monkeypatch.setattr(plugins, name, dict(getattr(plugins, name)))
    monkeypatch.setattr(plugins, "_failed", list(plugins._failed))
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    yield
    layer_module._REGISTRY.clear()
    layer_module._REGISTRY.update(registry)
    layer_module._SOURCES.clear()
    layer_module._SOURCES.update(sources)
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    sys.path[:] = path


def plugin_source(type_name, factor):
    return textwrap.dedent(f"""
        import minicaffe

        @minicaffe.register_layer({type_name!r})
        class Times(minicaffe.Layer):
            allows_in_place = True

            def reshape(self, bottom, top):
                top[0].reshape(bottom[0].shape)

            def forward(self, bottom, top):
                top[0].data[...] = {factor} * bottom[0].data

            def backward(self, top, propagate_down, bottom):
                if propagate_down[0]:
                    bottom[0].diff[...] = {factor} * top[0].diff
    """)


def write_plugin(folder, module, type_name, factor=3):
    path = pathlib.Path(folder) / f"{module}.py"
    path.write_text(plugin_source(type_name, factor))
    return path


def net_using(type_name):
    return textwrap.dedent(f"""
        name: "uses_plugin"
        input: "data" input_shape {{ dim: 2 dim: 3 }}
        layer {{ name: "custom" type: "{type_name}" bottom: "data" top: "out" }}
    """)


def run_net(tmp_path, type_name, value=1.0):
    path = tmp_path / "net.prototxt"
    path.write_text(net_using(type_name))
    net = Net(str(path), caffe_pb2.TEST)
    net.blobs["data"].data[...] = value
    return net.forward()["out"]


# -- register_layer ---------------------------------------------------------------------
def test_registered_type_is_usable_in_a_prototxt(tmp_path, isolated):
    @register_layer("PlugTestNegate")
    class Negate(Layer):
        def reshape(self, bottom, top):
            top[0].reshape(bottom[0].shape)

        def forward(self, bottom, top):
            top[0].data[...] = -bottom[0].data

    assert np.all(run_net(tmp_path, "PlugTestNegate", 2.0) == -2)
    assert "PlugTestNegate" in minicaffe.layer_type_list()
    assert layer_source("PlugTestNegate").startswith(__name__)


def test_registering_a_name_twice_needs_override(isolated):
    @register_layer("PlugTestTwice")
    class First(Layer):
        pass

    class Second(Layer):
        pass

    with pytest.raises(ValueError, match="'PlugTestTwice' is already registered by .*override=True"):
        register_layer("PlugTestTwice")(Second)
    register_layer("PlugTestTwice", override=True)(Second)
    assert minicaffe.layer_registry()["PlugTestTwice"] is Second
    with pytest.raises(ValueError, match="already registered"):
        register_layer("ReLU")(First)  # built-ins are protected the same way


def test_rerunning_the_same_class_definition_is_not_a_clash(isolated):
    def define():
        @register_layer("PlugTestRerun")
        class Same(Layer):
            pass
        return Same

    first, second = define(), define()
    assert first is not second
    assert minicaffe.layer_registry()["PlugTestRerun"] is second


def test_register_layer_rejects_non_layers():
    with pytest.raises(TypeError, match="minicaffe.Layer subclass"):
        register_layer("PlugTestBad")(object)
    with pytest.raises(TypeError, match="type string"):
        register_layer("")


def test_unknown_type_lists_types_and_says_how_to_register(tmp_path):
    with pytest.raises(LayerError) as info:
        run_net(tmp_path, "ReLu")
    message = str(info.value)
    assert "unknown layer type 'ReLu'" in message and "Did you mean 'ReLU'?" in message
    assert "InnerProduct" in message and "@minicaffe.register_layer('ReLu')" in message
    assert "--plugin" in message and "MINICAFFE_PLUGINS" in message and "Python" in message
    assert str(tmp_path / "net.prototxt") in message


# -- load_plugin -------------------------------------------------------------------------
def test_plugin_from_a_py_path(tmp_path, isolated):
    path = write_plugin(tmp_path, "mc_plug_path", "PlugTestPath", factor=3)
    module = plugins.load_plugin(str(path))
    assert module.__name__ == "mc_plug_path"
    assert plugins.load_plugin(str(path)) is module  # second time: nothing new
    assert np.all(run_net(tmp_path, "PlugTestPath", 2.0) == 6)
    assert layer_source("PlugTestPath") == f"mc_plug_path ({os.path.realpath(path)}) [plugin]"
    assert str(tmp_path) in sys.path  # its neighbours (e.g. Python layers) import too


def test_plugin_by_module_name_from_sys_path_and_from_the_working_directory(tmp_path, isolated,
                                                                           monkeypatch):
    on_path = tmp_path / "on_path"
    on_path.mkdir()
    write_plugin(on_path, "mc_plug_mod", "PlugTestMod")
    sys.path.insert(0, str(on_path))
    plugins.load_plugin("mc_plug_mod")
    assert "PlugTestMod" in minicaffe.layer_registry()

    here = tmp_path / "cwd"
    here.mkdir()
    write_plugin(here, "mc_plug_cwd", "PlugTestCwd")
    monkeypatch.chdir(here)
    plugins.load_plugin("mc_plug_cwd")
    assert "PlugTestCwd" in minicaffe.layer_registry()


def test_plugin_errors_are_actionable(tmp_path, isolated):
    with pytest.raises(plugins.PluginError, match="no module 'mc_plug_nowhere'.*--plugin path/to"):
        plugins.load_plugin("mc_plug_nowhere")
    with pytest.raises(plugins.PluginError, match="does not exist"):
        plugins.load_plugin(str(tmp_path / "missing.py"))
    bad = tmp_path / "mc_plug_raises.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(plugins.PluginError, match="mc_plug_raises.py failed to import: RuntimeError: boom"):
        plugins.load_plugin(str(bad))
    assert "mc_plug_raises" not in sys.modules
    dep = tmp_path / "mc_plug_dep.py"
    dep.write_text("import mc_surely_missing_dependency\n")
    sys.path.insert(0, str(tmp_path))
    with pytest.raises(plugins.PluginError, match="could not be imported.*mc_surely_missing"):
        plugins.load_plugin("mc_plug_dep")


def test_environment_variable(tmp_path, isolated, monkeypatch):
    a = write_plugin(tmp_path, "mc_plug_env_a", "PlugTestEnvA")
    b = write_plugin(tmp_path, "mc_plug_env_b", "PlugTestEnvB")
    monkeypatch.setenv(plugins.ENV_VAR, f"{a}{os.pathsep}{b}")
    assert plugins.plugins_from_env() == [str(a), str(b)]
    assert plugins.plugins_from_env({plugins.ENV_VAR: " x, y " + os.pathsep + "z"}) == ["x", "y", "z"]
    plugins.load_default_plugins(force=True)
    assert {"PlugTestEnvA", "PlugTestEnvB"} <= set(minicaffe.layer_registry())
    assert layer_source("PlugTestEnvA").endswith("[MINICAFFE_PLUGINS]")


def write_distribution(site):
    site.mkdir()
    (site / "mc_ep_layers.py").write_text(plugin_source("EpModuleType", 2))
    (site / "mc_ep_classes.py").write_text(textwrap.dedent("""
        import minicaffe

        class EpClass(minicaffe.Layer):
            def reshape(self, bottom, top):
                top[0].reshape(bottom[0].shape)

            def forward(self, bottom, top):
                top[0].data[...] = bottom[0].data + 1

        def register_more():
            minicaffe.register_layer("EpFuncType")(type("Made", (EpClass,), {}))
    """))
    info = site / "mc_ep_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mc-ep-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [minicaffe.layers]
        mod = mc_ep_layers
        EpClassType = mc_ep_classes:EpClass
        func = mc_ep_classes:register_more
        broken = mc_ep_missing_module
    """))


def test_entry_points(tmp_path, isolated):
    site = tmp_path / "site"
    write_distribution(site)
    sys.path.insert(0, str(site))
    with pytest.warns(RuntimeWarning, match="entry point broken = mc_ep_missing_module in "
                                            "mc-ep-demo 0.1 failed to load"):
        plugins.load_entry_points()
    registry = minicaffe.layer_registry()
    assert {"EpModuleType", "EpClassType", "EpFuncType"} <= set(registry)
    assert "[entry point mod = mc_ep_layers in mc-ep-demo 0.1]" in layer_source("EpModuleType")
    assert np.all(run_net(tmp_path, "EpClassType", 1.0) == 2)
    assert np.all(run_net(tmp_path, "EpModuleType", 1.0) == 2)
    assert plugins.load_entry_points() == []  # loaded once
    # The failure is remembered and shown when a type turns out to be missing.
    with pytest.raises(LayerError, match="broken = mc_ep_missing_module .* failed to load"):
        run_net(tmp_path, "EpMissingType")


def test_extract_plugin_args():
    argv = ["--plugin", "a", "train", "--solver", "s", "--plugin=b.py", "--", "--plugin", "c"]
    rest, specs = plugins.extract_plugin_args(argv)
    assert specs == ["a", "b.py"]
    assert rest == ["train", "--solver", "s", "--", "--plugin", "c"]
    with pytest.raises(plugins.PluginError, match="needs a module name"):
        plugins.extract_plugin_args(["layers", "--plugin"])


# -- the command line ----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["before", "after", "equals"])
def test_minicaffe_layers_lists_plugin_types_wherever_plugin_is_given(tmp_path, isolated, capsys, where):
    path = write_plugin(tmp_path, f"mc_plug_cli_{where}", f"PlugTestCli{where}")
    argv = {"before": ["--plugin", str(path), "layers"],
            "after": ["layers", "--plugin", str(path)],
            "equals": ["layers", "--custom", f"--plugin={path}"]}[where]
    assert main(argv) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith(f"PlugTestCli{where}"))
    assert str(os.path.realpath(path)) in line and "[--plugin]" in line
    if where == "equals":
        assert "ReLU" not in out
    else:
        assert "ReLU" in out and "built-in (minicaffe.layers.neuron)" in out


def test_cli_reports_a_bad_plugin_in_one_line(capsys, isolated):
    assert main(["layers", "--plugin", "mc_plug_not_there"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minicaffe: error: plugin 'mc_plug_not_there' not found")


def test_cli_loads_the_environment_variable(tmp_path, isolated, monkeypatch, capsys):
    path = write_plugin(tmp_path, "mc_plug_cli_env", "PlugTestCliEnv")
    monkeypatch.setenv(plugins.ENV_VAR, str(path))
    monkeypatch.setattr(plugins, "_defaults_done", False)
    assert main(["layers", "--custom"]) == 0
    assert "PlugTestCliEnv" in capsys.readouterr().out


# -- the caffe alias ----------------------------------------------------------------------
@pytest.fixture
def no_alias():
    before = compat.is_installed()
    compat.uninstall()
    yield
    compat.uninstall()
    if before:
        compat.install()


def test_install_makes_import_caffe_find_minicaffe(no_alias):
    assert "caffe" not in sys.modules
    compat.install()
    import caffe
    from caffe.proto import caffe_pb2 as pb2
    import caffe.io
    assert caffe is minicaffe and pb2 is minicaffe.caffe_pb2
    assert caffe.Layer is minicaffe.Layer and caffe.io is minicaffe.io
    assert caffe.TRAIN == caffe_pb2.TRAIN
    with pytest.raises(ImportError):
        import caffe.no_such_submodule  # noqa: F401
    compat.uninstall()
    assert "caffe" not in sys.modules


def test_install_refuses_to_hide_a_real_caffe(no_alias, monkeypatch):
    fake = type(sys)("caffe")
    monkeypatch.setitem(sys.modules, "caffe", fake)
    with pytest.raises(RuntimeError, match="different 'caffe' module is already imported"):
        compat.install()
    assert not compat.install_if_absent()
    compat.install(replace=True)
    assert sys.modules["caffe"] is minicaffe


def test_python_m_minicaffe_compat_runs_a_pycaffe_script(tmp_path):
    script = tmp_path / "pycaffe_script.py"
    script.write_text(textwrap.dedent("""
        import sys
        import caffe
        from caffe.proto import caffe_pb2
        caffe.set_mode_cpu()
        print(caffe.__name__, caffe_pb2.__name__, sys.argv[1:])
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "minicaffe.compat", str(script), "x", "--y"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["minicaffe", "minicaffe.proto.caffe_pb2", "['x',", "'--y']"]

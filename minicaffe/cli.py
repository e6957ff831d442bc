"""`minicaffe` command line: `minicaffe <command> ...`.

Each module in minicaffe/commands defines `register(subparsers)`, adding its
subcommand(s) with `set_defaults(func=run)`; `run(args)` returns an exit status.
Errors print as one line `minicaffe: error: ...` (exit 1); `--debug` shows the traceback.

`--plugin MODULE_OR_FILE.py` (repeatable) loads custom layers before the command
runs; it may be given before the command (`minicaffe --plugin m train ...`) or
anywhere after it (`minicaffe train ... --plugin m`).

`--proto FORK_caffe.proto` (before or after the command) reads every file with that Caffe
fork's schema in addition to minicaffe's (minicaffe.proto.extend; needs the `proto` extra).
"""
import argparse
import importlib
import os
import pkgutil
import sys

from . import commands, plugins
from .argv_options import take_option
from .proto import extension
from .layers.python_layer import PYTHON_LAYERS_ENV

__all__ = ["main", "build_parser"]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="minicaffe", description="Caffe in pure Python: train, test and time Caffe models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--no-python-layers", action="store_true",
                        help="refuse type: \"Python\" layers, whose prototxt names code to import "
                             f"and run (also {PYTHON_LAYERS_ENV}=0); for serving untrusted files")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE.py",
                        help="import a module or .py file that registers custom layers before "
                             "the command runs; repeatable, and accepted after the command too "
                             f"(see also ${plugins.ENV_VAR} and the '{plugins.ENTRY_POINT_GROUP}' "
                             "entry points)")
    parser.add_argument("--proto", metavar="FORK_caffe.proto",
                        help="also use this Caffe fork's caffe.proto to read nets, weights and "
                             "solvers, so its fields parse and its layers can be custom layers "
                             "(needs pip install 'minicaffe[proto]'); accepted after the command too")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # --plugin is taken out before parsing so that it works after any subcommand.
    try:
        argv, proto_paths = take_option(argv, "--proto", "the path of a fork's caffe.proto")
        if proto_paths:
            extension.extend(proto_paths[-1])
        argv, plugin_specs = plugins.extract_plugin_args(argv)
        # Global, but accepted after the command too, like --plugin.
        head = argv[:argv.index("--")] if "--" in argv else argv
        no_python_layers = "--no-python-layers" in head
        if no_python_layers:
            argv = [a for a in head if a != "--no-python-layers"] + argv[len(head):]
        env_failures = plugins.load_default_plugins(strict=False)
        plugins.load_plugins(plugin_specs, origin="--plugin")
    except Exception as exc:
        if "--debug" in argv:
            raise
        print(f"minicaffe: error: {exc}", file=sys.stderr)
        return 1
    # A stale MINICAFFE_PLUGINS entry must not lock the user out of --help or the
    # layer listing; commands that build nets refuse to run without it.
    for exc in env_failures:
        print(f"minicaffe: warning: {exc}", file=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.plugin = plugin_specs
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if no_python_layers or args.no_python_layers:
        os.environ[PYTHON_LAYERS_ENV] = "0"  # read where Python layers are built
    if env_failures and not getattr(args, "runs_without_plugins", False):
        print(f"minicaffe: error: {env_failures[0]} (remove it from {plugins.ENV_VAR} or fix it)",
              file=sys.stderr)
        return 1
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("minicaffe: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for users, the traceback with --debug
        if args.debug:
            raise
        print(f"minicaffe: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`minicaffe` command line: `minicaffe <command> ...`.

Each module in minicaffe/commands defines `register(subparsers)`, adding its
subcommand(s) with `set_defaults(func=run)`; `run(args)` returns an exit status.
Errors print as one line `minicaffe: error: ...` (exit 1); `--debug` shows the traceback.
"""
import argparse
import importlib
import pkgutil
import sys

from . import commands

__all__ = ["main", "build_parser"]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="minicaffe", description="Caffe in pure Python: train, test and time Caffe models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
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

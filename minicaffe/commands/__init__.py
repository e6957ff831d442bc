"""CLI subcommands: each module here defines `register(subparsers)`, found by minicaffe.cli."""

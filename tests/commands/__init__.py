"""Tests of the CLI subcommands."""

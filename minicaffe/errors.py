"""The base class of every error minicaffe raises about its user's input.

Each specific error (a bad file, layer, database, solver, ...) subclasses
`MinicaffeError` and a builtin type (ValueError, ImportError), so callers can
catch all of minicaffe's own complaints at once while older code that catches
ValueError keeps working. The CLI prints them as one line.
"""

__all__ = ["MinicaffeError", "CommandError"]


class MinicaffeError(Exception):
    """An input minicaffe cannot use; the message names the file, layer or blob at fault."""


class CommandError(MinicaffeError, ValueError):
    """A bad combination of command-line flags or paths; printed as one line by the CLI."""

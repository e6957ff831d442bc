"""The error for files that cannot be read (re-exported as minicaffe.proto_io.ProtoFileError)."""

from ..errors import MinicaffeError

__all__ = ["ProtoFileError"]


class ProtoFileError(MinicaffeError, ValueError):
    """A file that cannot be read as the message it should hold; the text names the file."""

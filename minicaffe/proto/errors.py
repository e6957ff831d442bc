"""The error for files that cannot be read (re-exported as minicaffe.proto_io.ProtoFileError)."""

__all__ = ["ProtoFileError"]


class ProtoFileError(ValueError):
    """A file that cannot be read as the message it should hold; the text names the file."""

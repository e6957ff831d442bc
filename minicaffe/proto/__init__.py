"""minicaffe's Caffe schema (caffe_pb2, generated from caffe.proto) and `extend` for a fork's own proto."""
from .extension import extend

__all__ = ["extend"]

"""minicaffe: Caffe in pure Python on numpy, with pycaffe's API.

    import minicaffe as caffe
    net = caffe.Net("deploy.prototxt", caffe.TEST, weights="model.caffemodel")
"""
from . import _blas_env  # noqa: F401  (first: BLAS settings must precede numpy's import)
from .proto import caffe_pb2
from .errors import MinicaffeError  # noqa: F401
from .blob import Blob
from .layer import Layer, LayerError, register_layer, layer_registry, layer_source  # noqa: F401
from .layer_factory import create_layer, layer_type_list  # noqa: F401
from .rng import set_random_seed
from .net import Net
from . import layers as _builtin_layers  # noqa: F401  (registers the built-in layer types)
# pycaffe's `caffe.layers` / `caffe.params` are the NetSpec helpers; they shadow the
# package attribute, and the layer modules stay importable as minicaffe.layers.<family>.
from .net_spec import NetSpec, layers, params, to_proto
from . import io  # noqa: F401  (pycaffe's caffe.io)
from .classifier import Classifier  # noqa: F401
from .detector import Detector  # noqa: F401
from .solvers import (get_solver, Solver, SGDSolver, NesterovSolver, AdaGradSolver,  # noqa: F401
                      RMSPropSolver, AdaDeltaSolver, AdamSolver)
from .logging_util import init_log, log, Timer  # noqa: F401  (pycaffe's caffe.init_log, log, Timer)
from . import plugins, testing  # noqa: F401  (custom layers: load_plugin, check_gradient)
from .plugins import load_plugin  # noqa: F401

from . import parallel  # noqa: F401  (data-parallel training on MPI; mpi4py imported on use)
from .parallel import (NCCL, set_multiprocess, set_solver_count, set_solver_rank,  # noqa: F401
                       solver_count, solver_rank)

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST

__version__ = "0.1.0"


def set_mode_cpu():
    """pycaffe compatibility: minicaffe always runs on the CPU."""


def set_device(device_id):
    """pycaffe compatibility: there is only the CPU."""


def has_nccl():
    """pycaffe compatibility: no NCCL (multi-GPU) here; minicaffe.parallel runs on processes."""
    return False


def set_mode_gpu():
    raise RuntimeError("minicaffe runs on the CPU only; remove caffe.set_mode_gpu() or use set_mode_cpu()")

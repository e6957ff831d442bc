"""Caffe's GradientChecker rule for the test suite; the implementation is public as minicaffe.testing."""
from minicaffe.testing import (GradientCheckError, check_gradient, check_gradient_net,  # noqa: F401
                               make_blobs)

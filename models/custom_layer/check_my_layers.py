"""Check the custom layers' gradients with minicaffe's checker, as you should for your own.

    python models/custom_layer/check_my_layers.py

`minicaffe.testing.check_gradient(layer, bottom, top)` sets the layer up, runs
backward once, and compares every bottom and parameter gradient with central
differences of forward (Caffe's GradientChecker rule). Use float64 blobs
(`make_blobs` makes them) so the differences are accurate, and separate top
blobs (the checker perturbs the bottoms, so it cannot run a layer in place).
"""
import os
import sys

import numpy as np

import minicaffe
from minicaffe import Blob, caffe_pb2
from minicaffe.testing import check_gradient, make_blobs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import my_layers  # noqa: E402,F401  (registers LearnableSwish)


def swish_layer(beta=1.0):
    param = caffe_pb2.LayerParameter(name="swish", type="LearnableSwish")
    param.swish_param.beta = beta
    return minicaffe.create_layer(param)


def check_learnable_swish():
    rng = np.random.default_rng(0)
    for shape in [(2, 3), (2, 3, 2, 2)]:
        for beta in (1.0, 0.5):
            layer = swish_layer(beta)
            bottom = make_blobs(rng.normal(size=shape))
            check_gradient(layer, bottom, [Blob(dtype=np.float64)])


if __name__ == "__main__":
    check_learnable_swish()
    print("LearnableSwish: gradients match numeric differences")

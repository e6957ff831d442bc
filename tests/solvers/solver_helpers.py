"""Shared pieces for the solver and CLI tests: a fixed least-squares data set and nets over it.

`SolverTestData` is a test-only data layer serving rows of a registered array in
order (wrapping around), like Caffe's HDF5Data in its solver tests: with
batch_size = N / iter_size, iter_size passes see the same N rows as one full batch.
"""
import contextlib

import numpy as np

from minicaffe import Layer, layer_registry, register_layer
from minicaffe import layer as layer_module
from minicaffe.proto import caffe_pb2

# name -> (data (N, D), targets (N, 1)); the layer's hdf5_data_param.source picks one.
DATASETS = {}


def make_dataset(name="lsq", num=4, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(num, dim)).astype(np.float32)
    targets = rng.normal(size=(num, 1)).astype(np.float32)
    DATASETS[name] = (data, targets)
    return data, targets


class SolverTestDataLayer(Layer):
    """tops data (B, D), targets (B, 1): the next B rows of DATASETS[source], cycling."""

    exact_num_bottom = 0
    exact_num_top = 2

    def layer_setup(self, bottom, top):
        p = self.layer_param.hdf5_data_param
        self.data, self.targets = DATASETS[p.source]
        self.batch = p.batch_size
        self.cursor = 0

    def reshape(self, bottom, top):
        top[0].reshape(self.batch, self.data.shape[1])
        top[1].reshape(self.batch, 1)

    def forward(self, bottom, top):
        rows = (self.cursor + np.arange(self.batch)) % len(self.data)
        self.cursor = (self.cursor + self.batch) % len(self.data)
        top[0].data[...] = self.data[rows]
        top[1].data[...] = self.targets[rows]


@contextlib.contextmanager
def registered_data_layer():
    """Register SolverTestData for the duration of a test only (keeps the registry clean)."""
    assert "SolverTestData" not in layer_registry()
    register_layer("SolverTestData")(SolverTestDataLayer)
    try:
        yield SolverTestDataLayer
    finally:
        layer_module._REGISTRY.pop("SolverTestData", None)
        layer_module._SOURCES.pop("SolverTestData", None)


def lsq_net_text(batch, source="lsq", share=False):
    """Caffe's least-squares solver-test net: data -> InnerProduct(1) -> EuclideanLoss.

    share=True splits the batch in two halves through two InnerProducts sharing
    'weights' and 'bias' and concatenates them again (same loss, shared params).
    """
    data = f"""
  layer {{ name: 'data' type: 'SolverTestData' top: 'data' top: 'targets'
          hdf5_data_param {{ source: '{source}' batch_size: {batch} }} }}"""
    ip = """
  layer {{ name: '{name}' type: 'InnerProduct' bottom: '{bottom}' top: '{top}'
          param {{ name: 'weights' }} param {{ name: 'bias' }}
          inner_product_param {{ num_output: 1
            weight_filler {{ type: 'gaussian' std: 1.0 }}
            bias_filler {{ type: 'gaussian' std: 1.0 }} }} }}"""
    if share:
        body = """
  layer { name: 'slice' type: 'Slice' bottom: 'data' top: 'data1' top: 'data2'
          slice_param { axis: 0 } }"""
        body += ip.format(name="innerprod", bottom="data1", top="innerprod1")
        body += ip.format(name="innerprod2", bottom="data2", top="innerprod2")
        body += """
  layer { name: 'concat' type: 'Concat' bottom: 'innerprod1' bottom: 'innerprod2'
          top: 'innerprod' concat_param { axis: 0 } }"""
    else:
        body = ip.format(name="innerprod", bottom="data", top="innerprod")
    loss = """
  layer { name: 'loss' type: 'EuclideanLoss' bottom: 'innerprod' bottom: 'targets' top: 'loss' }"""
    return "name: 'TestNetwork'" + data + body + loss + "\n"


def lsq_solver_param(solver_type="SGD", base_lr=0.1, weight_decay=0.0, momentum=0.0,
                     max_iter=10, iter_size=1, num=4, share=False, seed=1701, **fields):
    """A SolverParameter training the least-squares net with the given settings."""
    param = caffe_pb2.SolverParameter(
        type=solver_type, base_lr=base_lr, lr_policy="fixed", max_iter=max_iter,
        iter_size=iter_size, random_seed=seed, snapshot_after_train=False)
    if weight_decay:
        param.weight_decay = weight_decay
    if momentum:
        param.momentum = momentum
    from google.protobuf import text_format
    text_format.Parse(lsq_net_text(num // iter_size, share=share), param.net_param)
    for key, value in fields.items():
        if isinstance(value, (list, tuple)):
            getattr(param, key).extend(value)
        else:
            setattr(param, key, value)
    return param

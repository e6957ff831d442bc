"""A Python layer written exactly as for Caffe's pycaffe: a toy regression data source.

    layer { name: "data" type: "Python" top: "x" top: "y"
            python_param { module: "sine_data" layer: "SineDataLayer"
                           param_str: "{batch_size: 64, seed: 1}" } }

Each forward draws a fresh batch x ~ U(-3, 3) of shape (batch_size, 1) with
targets y = sin(x). param_str is YAML; the TEST phase uses a different seed from
TRAIN so the test batches are unseen points. `import caffe` finds minicaffe
when the layer runs under minicaffe.
"""
import caffe
import numpy as np
import yaml


class SineDataLayer(caffe.Layer):

    def setup(self, bottom, top):
        params = yaml.safe_load(self.param_str) or {}
        self.batch_size = int(params.get("batch_size", 64))
        seed = int(params.get("seed", 0)) + (1000 if self.phase == caffe.TEST else 0)
        # A generator of its own, so the data stream is the same whatever else
        # uses random numbers (fillers, dropout).
        self.rng = np.random.default_rng(seed)
        if len(bottom) != 0 or len(top) != 2:
            raise Exception("SineDataLayer takes no bottoms and produces two tops: x and y")

    def reshape(self, bottom, top):
        top[0].reshape(self.batch_size, 1)
        top[1].reshape(self.batch_size, 1)

    def forward(self, bottom, top):
        x = self.rng.uniform(-3.0, 3.0, size=(self.batch_size, 1))
        top[0].data[...] = x
        top[1].data[...] = np.sin(x)

    def backward(self, top, propagate_down, bottom):
        pass  # a data layer has nothing to propagate

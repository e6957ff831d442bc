"""py-faster-rcnn's Python layers run next to ROIPooling: the pycaffe API they use.

A proposal-style layer written here uses what rbgirshick/py-faster-rcnn's
lib/rpn/proposal_layer.py uses: `import caffe`, `caffe.Layer`, YAML in the older
`self.param_str_`, a config keyed by `str(self.phase)`, tops reshaped in setup and
again in forward to the number of boxes found, `bottom[i].data` slices.
"""
import textwrap

import numpy as np

import minicaffe as caffe

LAYER_MODULE = textwrap.dedent('''
    import caffe
    import numpy as np
    import yaml

    CFG = {"TRAIN": {"top_n": 4}, "TEST": {"top_n": 3}}


    class BoxLayer(caffe.Layer):
        def setup(self, bottom, top):
            params = yaml.safe_load(self.param_str_)
            self._stride = params["feat_stride"]
            self._size = params.get("size", 8)
            top[0].reshape(1, 5)
            if len(top) > 1:
                top[1].reshape(1, 1, 1, 1)

        def forward(self, bottom, top):
            assert bottom[0].data.shape[0] == 1, "Only single item batches are supported"
            top_n = CFG[str(self.phase)]["top_n"]
            scores = bottom[0].data[:, 1:, :, :].ravel()
            height, width = bottom[0].data.shape[-2:]
            im_h, im_w = bottom[1].data[0, :2]
            order = scores.argsort()[::-1][:top_n]
            ys, xs = np.unravel_index(order, (height, width))
            x1 = np.clip(xs * self._stride, 0, im_w - 1)
            y1 = np.clip(ys * self._stride, 0, im_h - 1)
            boxes = np.stack([np.zeros_like(x1), x1, y1, np.minimum(x1 + self._size, im_w - 1),
                              np.minimum(y1 + self._size, im_h - 1)], axis=1).astype(np.float32)
            top[0].reshape(*boxes.shape)
            top[0].data[...] = boxes
            if len(top) > 1:
                top[1].reshape(len(order), 1)
                top[1].data[...] = scores[order].reshape(-1, 1)

        def backward(self, top, propagate_down, bottom):
            pass

        def reshape(self, bottom, top):
            pass
''')

NET = '''
input: "data" input_shape { dim: 1 dim: 3 dim: 32 dim: 48 }
input: "im_info" input_shape { dim: 1 dim: 3 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "score" type: "Convolution" bottom: "conv" top: "score"
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
layer { name: "proposal" type: "Python" bottom: "prob" bottom: "im_info" top: "rois" top: "scores"
  python_param { module: "box_layer" layer: "BoxLayer" param_str: "'feat_stride': 4" } }
layer { name: "roi_pool" type: "ROIPooling" bottom: "conv" bottom: "rois" top: "pool"
  roi_pooling_param { pooled_w: 2 pooled_h: 2 spatial_scale: 0.25 } }
'''


def build(tmp_path, phase):
    (tmp_path / "box_layer.py").write_text(LAYER_MODULE)
    (tmp_path / "net.prototxt").write_text(NET)
    net = caffe.Net(str(tmp_path / "net.prototxt"), phase)
    net.blobs["data"].data[...] = np.random.default_rng(0).standard_normal(net.blobs["data"].shape)
    net.blobs["im_info"].data[...] = [[32, 48, 1]]
    return net


def test_proposal_style_layer_feeds_roi_pooling(tmp_path):
    net = build(tmp_path, caffe.TEST)
    out = net.forward()
    rois = net.blobs["rois"].data
    assert rois.shape == (3, 5) and out["pool"].shape == (3, 4, 2, 2)
    assert out["scores"].shape == (3, 1)
    assert np.all(np.diff(out["scores"].ravel()) <= 0)
    # ROIPooling pooled exactly the boxes the Python layer chose
    conv = net.blobs["conv"].data[0]
    x1, y1 = int(round(rois[0, 1] * 0.25)), int(round(rois[0, 2] * 0.25))
    x2, y2 = int(round(rois[0, 3] * 0.25)), int(round(rois[0, 4] * 0.25))
    assert out["pool"][0].max() <= conv[:, y1: y2 + 1, x1: x2 + 1].max() + 1e-6


def test_phase_is_named_like_pycaffe(tmp_path):
    net = build(tmp_path, caffe.TRAIN)
    net.forward()
    assert net.blobs["rois"].shape == (4, 5)     # CFG["TRAIN"]
    layer = net.layer_dict["proposal"]
    assert layer.phase == caffe.TRAIN and str(layer.impl.phase) == "TRAIN"
    assert layer.impl.param_str_ == layer.impl.param_str == "'feat_stride': 4"

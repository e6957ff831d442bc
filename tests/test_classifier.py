import numpy as np
import pytest

import minicaffe as caffe

DEPLOY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@pytest.fixture
def model(tmp_path):
    caffe.set_random_seed(0)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY)
    weights = tmp_path / "w.caffemodel"
    caffe.Net(str(deploy), caffe.TEST).save(str(weights))
    return str(deploy), str(weights)


def test_forward_all_batches_and_pads(model):
    net = caffe.Net(model[0], caffe.TEST, weights=model[1])
    x = np.random.default_rng(0).random((10, 3, 8, 8)).astype(np.float32)
    out = net.forward_all(data=x)["prob"]
    assert out.shape == (10, 5)
    single = net.forward(data=x[9:10].repeat(4, axis=0))["prob"][0]
    np.testing.assert_allclose(out[9], single, rtol=1e-5)


def test_classifier_center_crop_matches_manual_preprocessing(model):
    clf = caffe.Classifier(model[0], model[1], image_dims=(10, 10), mean=np.array([0.1, 0.2, 0.3]),
                           raw_scale=255, channel_swap=(2, 1, 0))
    images = [np.random.default_rng(i).random((12, 12, 3)).astype(np.float32) for i in range(3)]
    scores = clf.predict(images, oversample=False)
    assert scores.shape == (3, 5)
    np.testing.assert_allclose(scores.sum(1), 1, rtol=1e-5)
    resized = caffe.io.resize_image(images[1], (10, 10))[1:9, 1:9, :]
    manual = (resized[:, :, ::-1].transpose(2, 0, 1) * 255 - np.array([0.1, 0.2, 0.3])[:, None, None])
    net = caffe.Net(model[0], caffe.TEST, weights=model[1])
    expected = net.forward(data=np.repeat(manual[None].astype(np.float32), 4, axis=0))["prob"][0]
    np.testing.assert_allclose(scores[1], expected, rtol=1e-4)


def test_classifier_oversample_averages_ten_crops(model):
    clf = caffe.Classifier(model[0], model[1], image_dims=(10, 10))
    image = np.random.default_rng(5).random((10, 10, 3)).astype(np.float32)
    scores = clf.predict([image])
    crops = caffe.io.oversample([image], (8, 8))
    batch = np.stack([c.transpose(2, 0, 1) for c in crops])
    expected = clf.forward_all(data=batch)["prob"].mean(0)
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5)

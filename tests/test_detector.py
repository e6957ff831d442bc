"""caffe.Detector and the `classify` / `detect` subcommands on a tiny deploy net."""
import csv

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe.cli import main

DEPLOY = """
name: "tiny_deploy"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@pytest.fixture
def files(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="images need Pillow (the image extra)")
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY)
    caffe.set_random_seed(5)
    weights = tmp_path / "tiny.caffemodel"
    caffe.Net(str(deploy), caffe.TEST).save(str(weights))
    rng = np.random.default_rng(0)
    image = tmp_path / "im.png"
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(image)
    return deploy, weights, image


def test_detect_windows_scores_each_warped_window(files):
    deploy, weights, image = files
    det = caffe.Detector(str(deploy), str(weights), raw_scale=255, channel_swap=(2, 1, 0))
    windows = [np.array([0, 0, 10, 12]), np.array([5, 6, 20, 24]), np.array([2, 3, 9, 9])]
    out = det.detect_windows([(str(image), windows)])
    assert [d["filename"] for d in out] == [str(image)] * 3
    im = caffe.io.load_image(str(image))
    for d, w in zip(out, windows):
        crop = im[w[0]:w[2], w[1]:w[3]]
        x = det.transformer.preprocess("data", crop)
        det.blobs["data"].reshape(1, 3, 8, 8)
        expected = det.forward(data=x[None])["prob"][0].copy()
        np.testing.assert_allclose(d["prediction"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(d["window"], w)


def test_context_crop_pads_with_the_raw_mean(files):
    deploy, weights, image = files
    mean = np.array([10.0, 20.0, 30.0])          # net (BGR) order, in raw_scale units
    det = caffe.Detector(str(deploy), str(weights), mean=mean, raw_scale=255,
                         channel_swap=(2, 1, 0), context_pad=2)
    assert tuple(det.crop_dims) == (8, 8, 3)
    np.testing.assert_allclose(det.crop_mean[0, 0], [30 / 255, 20 / 255, 10 / 255], rtol=1e-6)
    im = caffe.io.load_image(str(image))
    crop = det.crop(im, np.array([0, 0, 6, 6]))   # at the corner: context falls off the image
    assert crop.shape == (8, 8, 3)
    np.testing.assert_allclose(crop[0, 0], det.crop_mean[0, 0])
    inside = det.crop(im, np.array([6, 6, 14, 14]))
    assert not np.allclose(inside[0, 0], det.crop_mean[0, 0])
    det.configure_crop(None)
    np.testing.assert_array_equal(det.crop(im, np.array([1, 2, 5, 7])), im[1:5, 2:7])


def test_selective_search_without_its_package_says_so(files):
    deploy, weights, image = files
    det = caffe.Detector(str(deploy), str(weights))
    with pytest.raises(ImportError, match="selective_search_ijcv_with_python"):
        det.detect_selective_search([str(image)])


def test_classify_and_detect_commands(files, tmp_path, capsys):
    deploy, weights, image = files
    common = ["--model_def", str(deploy), "--pretrained_model", str(weights)]
    out = tmp_path / "scores.npy"
    assert main(["classify", str(image), str(out), *common, "--images_dim", "10,10"]) == 0
    scores = np.load(out)
    assert scores.shape == (1, 4) and np.allclose(scores.sum(), 1, rtol=1e-5)
    windows = tmp_path / "windows.csv"
    windows.write_text(f"filename,ymin,xmin,ymax,xmax\n{image},0,0,10,12\n{image},4,4,18,20\n")
    table = tmp_path / "dets.csv"
    assert main(["detect", str(windows), str(table), *common, "--crop_mode", "list",
                 "--context_pad", "1"]) == 0
    rows = list(csv.DictReader(open(table)))
    assert len(rows) == 2 and list(rows[0])[:5] == ["filename", "ymin", "xmin", "ymax", "xmax"]
    assert sum(float(rows[1][f"class{i}"]) for i in range(4)) == pytest.approx(1, rel=1e-5)
    assert main(["detect", str(windows), str(table), *common, "--crop_mode", "list"]) == 1
    assert "context_pad 16 leaves no room" in capsys.readouterr().err
    assert main(["classify", str(image), str(out), *common, "--gpu"]) == 1
    assert "CPU only" in capsys.readouterr().err

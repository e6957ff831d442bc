import pathlib
import re
import shutil

import pytest

from minicaffe.cli import main

LENET = pathlib.Path(__file__).resolve().parents[2] / "models" / "lenet" / "lenet_train_test.prototxt"


def test_draw_writes_dot_with_layers_blobs_and_in_place_versions(tmp_path):
    out = tmp_path / "lenet.dot"
    assert main(["draw", str(LENET), str(out), "--phase", "TEST"]) == 0
    text = out.read_text()
    assert text.startswith('digraph "LeNet"') and "rankdir=LR" in text
    assert "conv1\\n(Convolution)\\n20 out, kernel 5, stride 1" in text
    assert "MAX 2, stride 2" in text
    # relu1 works in place on ip1: the blob gets a second node, version 1
    assert '"blob:ip1:0" -> "layer:' in text and '-> "blob:ip1:1"' in text
    # TEST phase: one data layer (the TEST one) and the accuracy layer
    assert len(re.findall(r"\(Data\)", text)) == 1 and "(Accuracy)" in text


def test_draw_all_phases_and_render_errors(tmp_path, capsys):
    out = tmp_path / "all.dot"
    assert main(["draw", str(LENET), str(out)]) == 0
    assert len(re.findall(r"\(Data\)", out.read_text())) == 2
    if shutil.which("dot") is None:
        assert main(["draw", str(LENET), str(tmp_path / "x.png")]) == 1
        assert "needs Graphviz" in capsys.readouterr().err
    else:
        assert main(["draw", str(LENET), str(tmp_path / "x.svg")]) == 0
        assert (tmp_path / "x.svg").read_text().lstrip().startswith("<?xml")


def test_draw_all_phases_connects_both_data_layers(tmp_path):
    out = tmp_path / "all.dot"
    assert main(["draw", str(LENET), str(out)]) == 0
    text = out.read_text()
    data_layers = re.findall(r'("layer:\d+") \[[^\]]*\(Data\)', text)
    assert len(data_layers) == 2
    for node in data_layers:
        assert f'{node} -> "blob:data:0"' in text
    assert '"blob:data:0" -> "layer:' in text


def test_draw_image_extension_without_graphviz_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = tmp_path / "net.jpg"
    assert main(["draw", str(LENET), str(out)]) == 1
    assert "needs Graphviz" in capsys.readouterr().err and not out.exists()


def test_draw_display_lrm_and_edge_labels(tmp_path):
    out = tmp_path / "lrm.dot"
    assert main(["draw", str(LENET), str(out), "--display_lrm", "--phase", "TRAIN"]) == 0
    text = out.read_text()
    assert "lr mult: 1, 2" in text                       # LeNet's weights and biases
    assert '[label="Batch 64"]' in text and '[label="500"]' in text   # draw_net.py's edge labels

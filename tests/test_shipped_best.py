"""The second shipped model: model/resnet9_best.pth (`train.py --recipe best`), its torch.hub entry
`resnet9_best`, and what the README says of it."""
import json
from pathlib import Path

import pytest
import torch

import evaluate
import export
import hubconf
import train
from model import count_parameters
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import RECIPES

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "model" / "resnet9_best.pth"
CURVES = ROOT / "model" / "resnet9_best"
needs_shipped = pytest.mark.skipif(not SHIPPED.is_file(), reason="no model/resnet9_best.pth in this clone")


def test_best_hub_entry_loads_its_own_file_in_eval_mode(trained_run, monkeypatch):
    assert hubconf.BEST_WEIGHTS == SHIPPED and hubconf.BEST_WEIGHTS != hubconf.SHIPPED_WEIGHTS
    best = load_checkpoint(trained_run / train.BEST_NAME)
    monkeypatch.setattr(hubconf, "BEST_WEIGHTS", trained_run / train.BEST_NAME)  # stands in for the shipped file
    model = hubconf.resnet9_best()
    assert not model.training and torch.equal(model.linear.weight, best["model"]["linear.weight"])
    monkeypatch.setattr(hubconf, "BEST_WEIGHTS", trained_run / "absent.pth")
    with pytest.raises(CheckpointError, match="absent.pth: no such file"):
        hubconf.resnet9_best()


@needs_shipped
def test_hub_loads_the_shipped_best_checkpoint():
    model = torch.hub.load(str(ROOT), "resnet9_best", source="local")
    assert not model.training and model.linear.out_features == 10


@needs_shipped
def test_shipped_best_is_the_papers_network_trained_by_the_best_recipe():
    ckpt = load_checkpoint(SHIPPED)
    config = ckpt["config"]
    assert config["recipe"] == "best" and ckpt["epoch"] == config["epochs"] == 100
    for key, value in RECIPES["best"].items():  # the recipe as it is defined today, not an edited run
        assert config[key] == value, key
    model = hubconf.resnet9_best()
    assert count_parameters(model) == 4_903_242 and not model.training
    # Trained on all 40,000 training images and evaluated once, after the last epoch.
    assert [h["epoch"] for h in ckpt["history"]] == list(range(1, 101))
    assert [h["epoch"] for h in ckpt["history"] if h["val_acc"] is not None] == [100]
    assert json.loads((CURVES / "history.json").read_text()) == ckpt["history"]
    for name in ("accuracy_curve.png", "loss_curve.png"):
        assert (CURVES / name).stat().st_size > 10_000


@pytest.mark.slow
@needs_shipped
def test_shipped_best_exports_to_onnx_unchanged(tmp_path):
    pytest.importorskip("onnx")
    out = tmp_path / "resnet9_best.onnx"
    assert export.main([str(SHIPPED), "--format", "onnx", "--out", str(out)]) == 0
    assert out.stat().st_size > 19_000_000  # 4.9 M float32 weights


@pytest.mark.slow
@needs_shipped
def test_shipped_best_reaches_its_figure_on_the_held_out_images(proxy_dir, tmp_path):
    """evaluate.py, unchanged, on the first 2,000 `test_batch` images of the proxy, one view, in fp32.
    The checkpoint's metrics hold the run's own figure: 6-view TTA on all 10,000. One view scores
    about 0.9 points under it (README), and 2,000 images hold that within about 1.2 points (two
    standard errors at 92%), so the bar is 2.5 points under the run's figure."""
    ckpt = load_checkpoint(SHIPPED)
    assert ckpt["config"]["tta"]
    code = evaluate.main([str(SHIPPED), "--data-dir", str(proxy_dir), "--out-dir", str(tmp_path), "--limit", "2000",
                          "--device", "cpu", "--no-amp", "--no-robustness"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0 and report["n"] == 2000
    assert report["accuracy"] >= ckpt["metrics"]["val_acc"] - 2.5

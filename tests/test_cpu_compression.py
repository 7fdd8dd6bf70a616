"""bench/cpu_compression.py: prune, evaluate, export and time against the parent, kept and drawn."""
import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import cpu_compression  # noqa: E402

pytest.importorskip("torch_pruning")
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("bad", ["prune-0.5", "oneshot-0.5-l1-kd", "prune-1.5-l1", "prune-0-l1", "prune-0.5-l2"])
def test_a_bad_item_name_is_refused(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="expected oneshot-F-C"):
        cpu_compression.item_name(bad)


@pytest.mark.slow
def test_a_dry_run_prunes_fine_tunes_with_the_parent_as_teacher_times_and_draws(trained_run, tiny_cifar, tmp_path,
                                                                               capsys):
    parent = trained_run / "learn_rate_consistent_model.pth"
    out, png = tmp_path / "bench", tmp_path / "figure.png"
    args = ["--parent", str(parent), "--data-dir", str(tiny_cifar), "--out", str(out), "--dry-run",
            "--items", "oneshot-0.5-l1", "prune-0.25-group-kd"]
    assert cpu_compression.main([*args, "--throughput", "--plot", str(png)]) == 0
    results = {r["item"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(results) == ["parent", "oneshot-0.5-l1", "prune-0.25-group-kd"]
    base = results["parent"]
    assert base["eval_exit"] == base["export_exit"] == 0 and base["params"] == 4_903_242
    for name, kept in (("oneshot-0.5-l1", 0.5), ("prune-0.25-group-kd", 0.25)):
        r = results[name]
        assert r["prune_exit"] == r["eval_exit"] == r["export_exit"] == 0
        assert abs(r["macs"] / base["macs"] - kept) <= 0.05 * kept  # the budget, within 5%
        assert r["params"] < base["params"] and 0 <= r["plain"] <= 100 and 0 <= r["tta"] <= 100
        assert r["ort_speedup"] > 0 and r["ort_parent_images_per_s"] > 0
        assert all(w % 16 == 0 for w in r["widths"]) and "--round-to 16" in r["command"]
    assert "--teacher" in results["prune-0.25-group-kd"]["command"]  # the parent distils into the fine-tune
    assert "--finetune-epochs 0" in results["oneshot-0.5-l1"]["command"]
    kd = json.loads((out / "pruned" / "prune-0.25-group-kd-finetune" / "step-1" / "history.json").read_text())
    assert len(kd) == 1  # the fine-tune ran, through train.py's loop
    assert png.stat().st_size > 10_000
    capsys.readouterr()
    assert cpu_compression.main(args) == 0  # again: every item is measured, so nothing runs
    assert capsys.readouterr().out.count("done already, kept") == 3

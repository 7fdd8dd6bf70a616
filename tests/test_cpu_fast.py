"""bench/cpu_fast.py: a variant run end to end (train.py, then evaluate.py --tta), kept, and drawn."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import cpu_fast  # noqa: E402


@pytest.mark.slow
def test_a_dry_run_times_both_processes_keeps_the_result_and_draws_it(tiny_cifar, tmp_path, capsys):
    out, png = tmp_path / "bench", tmp_path / "figure.png"
    args = ["--data-dir", str(tiny_cifar), "--out", str(out), "--variants", "e12-r16", "--dry-run", "--plot", str(png)]
    assert cpu_fast.main(args) == 0
    [result] = json.loads((out / "results.json").read_text())
    assert result["train_exit"] == 0 and result["eval_exit"] == 0
    assert result["resolutions"] == [16]  # the variant's progressive resizing reached train.py
    assert 0 <= result["plain"] <= 100 and 0 <= result["tta"] <= 100
    assert result["minutes"] * 60 >= result["train_s"] + result["eval_s"] - 1 and result["cpu"]
    assert png.stat().st_size > 10_000
    capsys.readouterr()
    assert cpu_fast.main(args[:-2]) == 0  # run again: the variant is done, so it is kept, not rerun
    assert "done already, kept" in capsys.readouterr().out
    assert len(json.loads((out / "results.json").read_text())) == 1


@pytest.mark.slow
def test_a_distillation_variant_takes_its_teacher_from_the_recipes_run_in_out(tiny_cifar, tmp_path):
    out = tmp_path / "bench"
    args = ["--data-dir", str(tiny_cifar), "--out", str(out), "--dry-run"]
    assert cpu_fast.main([*args, "--variants", "fast", "fast-kd"]) == 0
    student = {r["variant"]: r for r in json.loads((out / "results.json").read_text())}["fast-kd"]
    assert student["train_exit"] == 0 and "tta" in student
    teacher = str(out / "runs" / "fast-s0" / "learn_rate_consistent_model.pth")
    assert student["flags"][:2] == ["--teacher", teacher]
    from training.checkpoint import load_checkpoint
    config = load_checkpoint(out / "runs" / "fast-kd-s0" / "last.pth")["config"]
    assert config["teacher"] == [teacher] and len(config["teacher_sha256"][0]) == 64

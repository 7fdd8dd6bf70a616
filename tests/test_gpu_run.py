"""bench/gpu_run.py --dry-run: every stage of the GPU run, on the CPU with tiny sizes, writes its report."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_run.py"


def _gpu_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_reports(tiny_cifar, tmp_path):
    out = tmp_path / "gpu"
    result = _gpu_run("--out", str(out), "--data-dir", str(tiny_cifar), "--dry-run")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["data", "tests", "bench", "fast", "paper", "reading", "bench_compile"]
    assert all(s["status"] == "ok" for name, s in stages.items() if name != "bench_compile")
    assert stages["tests"]["skipped"] == stages["tests"]["tests"] > 0  # no GPU here: every CUDA test skips
    assert any(n.startswith("reference") for n in stages["bench"]["training"])
    assert [r["seed"] for r in stages["fast"]["runs"]] == [0, 1, 2]
    assert all(r["epochs"] == 1 and 0 <= r["final_acc"] <= 100 for r in stages["fast"]["runs"])
    paper, reading = stages["paper"], stages["reading"]
    assert paper["epochs_done"] == paper["epochs"] == 2 and paper["flags"] == "(defaults)"
    assert reading["flags"] in ("--no-reload-best", "--reload-best") and reading["epochs_done"] == 2
    assert 0 <= paper["evaluation"]["heldout_acc"] <= 100
    for name in ("paper", "reading"):
        assert (out / name / "learn_rate_consistent_model.pth").is_file()
    assert (out / "reload_readings.png").is_file() and (out / "logs" / "tests.log").is_file()
    md = (out / "report.md").read_text()
    assert "| paper | held-out accuracy of the best checkpoint (evaluate.py) |" in md and "torch" in md

    # Continuing it: the finished stages are kept as they were, not run again.
    again = _gpu_run("--out", str(out), "--resume-from", str(out), "--dry-run", "--data-dir", str(tiny_cifar))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    kept = json.loads((out / "report.json").read_text())["stages"]
    assert kept["fast"] == stages["fast"] and kept["paper"] == stages["paper"]


@pytest.mark.slow
def test_dry_run_of_the_accuracy_stages(tiny_cifar, tmp_path):
    out = tmp_path / "acc"
    result = _gpu_run("--out", str(out), "--data-dir", str(tiny_cifar), "--dry-run", "--stages", "best",
                      "paper_test", "activations", "--budget", "900")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert list(stages) == ["data", "best", "paper_test", "activations"]
    best = stages["best"]
    assert [r["seed"] for r in best["runs"]] == [0, 1] and best["finished"] == 2
    for r in best["runs"]:
        ev = r["evaluation"]
        assert r["epochs"] == 1 and 0 <= ev["heldout_acc"] <= 100 and 0 <= ev["heldout_tta_acc"] <= 100
        assert load_checkpoint(out / f"best-seed{r['seed']}" / "learn_rate_consistent_model.pth")["config"][
            "recipe"] == "best"
    plain = [r["evaluation"]["heldout_acc"] for r in best["runs"]]
    assert best["plain_mean"] == round(sum(plain) / 2, 2)
    paper = stages["paper_test"]
    assert paper["flags"] == "--val-size 0" and paper["epochs_done"] == 2
    assert load_checkpoint(out / "paper_test" / "last.pth")["config"]["val_size"] == 0
    table = stages["activations"]["table"]
    assert list(table) == ["relu", "celu", "elu", "gelu"] and all(t["seeds"] == [0] for t in table.values())
    configs = {load_checkpoint(out / f"act-{a}-seed0" / "learn_rate_consistent_model.pth")["config"]["activation"]
               for a in table}
    assert configs == set(table)
    md = (out / "report.md").read_text()
    assert "selected on the test set: optimistic" in md and "--activation gelu" in md


def test_resume_from_a_folder_without_report_is_one_line(tmp_path):
    result = _gpu_run("--out", str(tmp_path), "--resume-from", str(tmp_path), "--dry-run")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no earlier report" in result.stderr

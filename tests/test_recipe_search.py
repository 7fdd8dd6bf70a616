"""bench/recipe_search.py on the CPU with its tiny grid: every run trained and scored, the best
variants confirmed with two more seeds, results.json complete and readable by the plot script."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_trains_scores_and_confirms(tiny_cifar, tmp_path):
    out = tmp_path / "search"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "recipe_search.py"), "--data-dir", str(tiny_cifar),
                           "--out", str(out), "--dry-run", "--budget", "400", "--confirm", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    runs = report["runs"]
    assert len(runs) == 3 + 2  # the tiny grid, then seeds 1 and 2 of its best variant
    for run in runs:
        assert run["status"] == "ok", run
        assert run["epochs_done"] == run["epochs"] == len(run["history"])
        assert set(run["score"]) == {"plain", "flip", "flip_shift2"}
        assert all(0 <= acc <= 100 for acc in run["score"].values())
    seed0 = [r for r in runs if r["seed"] == 0]
    best = max(seed0, key=lambda r: r["score"]["flip_shift2"])
    confirmed = [r for r in runs if r["seed"] != 0]
    assert {r["seed"] for r in confirmed} == {1, 2}
    assert all(r["name"] == best["name"] and r["flags"] == best["flags"] for r in confirmed)
    (row,) = report["confirmed"]
    accs = [r["score"]["flip_shift2"] for r in runs if r["name"] == best["name"]]
    assert row["seeds"] == [0, 1, 2] and abs(row["mean"] - sum(accs) / 3) < 0.01
    assert "±" in proc.stdout


def test_plot_reads_results(tmp_path):
    """The plot script draws a PNG from a results.json, and says so in one line when it cannot read one."""
    run = lambda epochs, seed, acc: {"name": "base", "epochs": epochs, "seed": seed, "flags": [],
                                     "score": {"plain": acc, "flip": acc, "flip_shift2": acc},
                                     "history": [{"epoch": e + 1, "val_acc": acc} for e in range(epochs)]}
    report = {"runs": [run(10, 0, 80.0), run(20, 0, 85.0), run(20, 1, 84.0), run(20, 2, 86.0)],
              "confirmed": [{"variant": "base-e20", "seeds": [0, 1, 2], "mean": 85.0, "std": 1.0, "flags": []}]}
    (tmp_path / "results.json").write_text(json.dumps(report))
    script = str(ROOT / "bench" / "plot_search.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path / "results.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "time_to_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = subprocess.run([sys.executable, script, str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing.json" in proc.stderr

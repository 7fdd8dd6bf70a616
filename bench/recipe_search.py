"""The fast recipe's search: many short train.py runs side by side on one GPU, scored on held-out images.

    python bench/recipe_search.py --data-dir /tmp/cifar10 --out /tmp/search --budget 500    # a CUDA machine
    python bench/recipe_search.py --data-dir /tmp/tiny --out /tmp/dry --dry-run   # a tiny grid on the CPU

Each variant is `train.py --recipe fast --val-size 0` plus its own flags: it trains on all training
images and watches the held-out `test_batch` after every epoch (never to pick an epoch: the fast
recipe keeps its last). After a run its last.pth is scored on the held-out images three ways: plain,
flip TTA (2 views), flip + 2-pixel shifts (6 views). The variants run --lanes at a time, since one
short run leaves most of a large GPU idle; their seconds are therefore not speed figures, only
their accuracies are. Once the grid is done (or --confirm-at of the budget has passed), the best
--confirm variants within --max-epochs run again with seeds 1 and 2, for a mean of 3 seeds; their
pick used seed 0's held-out accuracy, which these seeds' runs do not see.

OUT/results.json holds every run (flags, exit code, seconds, per-epoch history, the three scores)
and is rewritten after each run, so a run stopped by the budget keeps everything finished before.
bench/plot_search.py draws the time-to-accuracy figure from it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_run import read_history, run_logged  # noqa: E402

CONFIRM_SEEDS = (1, 2)


# The search ran on the fast recipe as it then was: 32 px throughout, the held-out split watched with
# 6-view TTA after every epoch. The recipe has since gained progressive resizing (chosen on a CPU,
# docs/fast-recipe.md); these flags give the searched recipe back, so its grids mean what they meant.
SEARCHED_AT = ["--min-res", "32", "--eval-every", "1", "--tta"]


@dataclass
class Variant:
    """One recipe to try: a name, its epochs and the train.py flags it adds to `--recipe fast`."""

    name: str
    epochs: int
    flags: list[str] = field(default_factory=list)
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.name}-e{self.epochs}-s{self.seed}"


def V(name: str, epochs: int, *flags: str) -> Variant:
    return Variant(name, epochs, list(flags))


# The grid, most informative first: the lanes take runs in this order. Batch sizes come with the
# peak lr scaled linearly from the recipe's 0.4 at 512.
B256, B128 = ("--batch-size", "256", "--lr", "0.2"), ("--batch-size", "128", "--lr", "0.1")
CUT_LS = ("--cutout", "8", "--label-smoothing", "0.2")
GRID = [
    # one change at a time, 20 epochs
    V("base", 20), V("bs256", 20, *B256), V("bs128", 20, *B128), V("cut8", 20, "--cutout", "8"),
    V("ls0.2", 20, "--label-smoothing", "0.2"), V("ema", 20, "--ema", "0.99"), V("lr0.8", 20, "--lr", "0.8"),
    V("lr0.2", 20, "--lr", "0.2"), V("wd1e-3", 20, "--weight-decay", "1e-3"), V("cut12", 20, "--cutout", "12"),
    # the changes together
    V("bs256-cut8-ls0.2", 20, *B256, *CUT_LS), V("bs128-cut8-ls0.2", 20, *B128, *CUT_LS),
    V("bs256-cut8-ls0.2-ema", 20, *B256, *CUT_LS, "--ema", "0.99"),
    # other lengths, for the time axis
    V("base", 10), V("base", 15), V("base", 30), V("bs256", 10, *B256), V("bs256", 15, *B256), V("bs256", 30, *B256),
    V("bs256-cut8-ls0.2", 15, *B256, *CUT_LS), V("bs256-cut8-ls0.2", 30, *B256, *CUT_LS), V("bs128", 15, *B128),
    V("bs128-cut8-ls0.2", 15, *B128, *CUT_LS),
    V("bs256", 60, *B256),  # how far this model goes on this data
]
# The second round, around the first round's best (bs128-cut8-ls0.2, 20 epochs): its length, peak
# lr, warm-up, cutout size, label smoothing alone, and batch 64.
CUT_LS_128 = (*B128, *CUT_LS)
ROUND2 = [
    V("bs64-cut8-ls0.2", 20, "--batch-size", "64", "--lr", "0.05", *CUT_LS),
    V("bs128-cut8-ls0.2", 10, *CUT_LS_128), V("bs128-cut8-ls0.2", 30, *CUT_LS_128),
    V("bs128-lr0.2-cut8-ls0.2", 20, *CUT_LS_128, "--lr", "0.2"),
    V("bs128-lr0.05-cut8-ls0.2", 20, *CUT_LS_128, "--lr", "0.05"),
    V("bs128-cut8-ls0.2-warm0.1", 20, *CUT_LS_128, "--warmup", "0.1"),
    V("bs128-cut12-ls0.2", 20, *B128, "--cutout", "12", "--label-smoothing", "0.2"),
    V("bs128-cut8", 20, *B128, "--cutout", "8"),
    V("bs128-cut8-ls0.2-wd1e-3", 20, *CUT_LS_128, "--weight-decay", "1e-3"),
    V("bs128-cut8-ls0.2-ema0.999", 20, *CUT_LS_128, "--ema", "0.999", "--ema-every", "1"),
]
GRIDS = {"main": GRID, "round2": ROUND2}
DRY_GRID = [V("base", 2), V("cut8-ema", 2, "--cutout", "8", "--ema", "0.9"),
            V("bs32", 1, "--batch-size", "32", "--lr", "0.05")]


# ----------------------------------------------------------------------------- scoring one run

def score(run_dir: Path, data_dir: str, device: str, limit: int = 0) -> dict:
    """Held-out accuracy (%) of a run's last weights (its weight average under --ema): plain,
    with flip TTA, and with flip and 2-pixel shifts."""
    import torch

    from evaluate import channels_last, load_test_set
    from training.checkpoint import load_checkpoint, model_from_checkpoint
    from training.evaluation import evaluate, make_eval_loader
    from training.runtime import default_amp, pick_device

    ckpt = load_checkpoint(run_dir / "last.pth")
    if isinstance(ckpt.get("ema"), dict) and isinstance(ckpt["ema"].get("model"), dict):
        ckpt = {**ckpt, "model": ckpt["ema"]["model"]}  # --ema: the average is the model
    dev = pick_device(device)
    model = model_from_checkpoint(ckpt, str(run_dir / "last.pth")).to(dev)
    if channels_last(dev):
        model = model.to(memory_format=torch.channels_last)
    images, labels = load_test_set(data_dir, limit)
    loader = make_eval_loader(images, labels, 500, workers=0, device=dev, on_device=True)
    amp = default_amp(dev)[0]
    views = {"plain": {"tta": False}, "flip": {"tta": True}, "flip_shift2": {"tta": True, "shift": 2}}
    return {name: round(evaluate(model, loader, dev, amp=amp, channels_last=channels_last(dev), **kw)["acc"], 2)
            for name, kw in views.items()}


# ----------------------------------------------------------------------------- the search

class Search:
    """The queue, the lanes that drain it, and results.json; thread-safe where the lanes meet."""

    def __init__(self, args: argparse.Namespace, grid: list[Variant]) -> None:
        self.args, self.queue, self.results = args, list(grid), []
        self.out = Path(args.out)
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self.confirmed = False

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def write(self) -> None:
        done = [r for r in self.results if r.get("score")]
        report = {"budget_s": self.args.budget, "lanes": self.args.lanes, "data_dir": self.args.data_dir,
                  "elapsed_s": round(time.monotonic() - self.start, 1), "runs": self.results,
                  "confirmed": confirmed_means(done)}
        tmp = self.out / ".results.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, self.out / "results.json")

    def next_variant(self) -> Variant | None:
        """The next run to start. The confirmations are queued once the grid is done (its runs
        still going waited for) or the confirm point of the budget has passed."""
        while True:
            with self.lock:
                past_point = time.monotonic() - self.start > self.args.confirm_at * self.args.budget
                in_flight = any(r["status"] == "running" for r in self.results)
                if not self.confirmed and (past_point or not (self.queue or in_flight)):
                    self.confirmed = True
                    self.queue[:0] = confirmations(self.results, self.args.confirm, self.args.max_epochs)
                if self.queue or self.confirmed:
                    return self.queue.pop(0) if self.queue else None
            time.sleep(1.0)  # the grid's last runs are still going: their scores may change the pick

    def lane(self) -> None:
        while self.left() > self.args.min_run and (variant := self.next_variant()) is not None:
            record = {**asdict(variant), "key": variant.key, "status": "running"}
            with self.lock:
                self.results.append(record)
            result = self.train(variant)
            with self.lock:
                record.update(result)
                self.write()

    def train(self, v: Variant) -> dict:
        run_dir = self.out / "runs" / v.key
        cmd = [sys.executable, str(ROOT / "train.py"), "--recipe", "fast", "--val-size", "0", *SEARCHED_AT,
               "--data-dir", self.args.data_dir, "--device", self.args.device, "--seed", str(v.seed),
               "--epochs", str(v.epochs), "--out", str(run_dir), "--overwrite", *v.flags]
        code, seconds = run_logged(cmd, self.out / "logs" / f"{v.key}.log", self.left())
        history = read_history(run_dir / "history.json")
        result = {"exit": code, "wall_s": round(seconds, 1), "epochs_done": len(history),
                  "train_s": round(sum(h.get("train_seconds", h["seconds"]) for h in history), 2),
                  "history": [{k: h[k] for k in ("epoch", "train_acc", "val_acc", "train_seconds") if k in h}
                              for h in history]}
        result["status"] = "ok" if code == 0 and len(history) == v.epochs else "stopped" if history else "failed"
        if result["status"] == "ok":
            score_cmd = [sys.executable, str(Path(__file__)), "--score", str(run_dir), "--data-dir",
                         self.args.data_dir, "--device", self.args.device, "--score-limit", str(self.args.score_limit)]
            code, _ = run_logged(score_cmd, self.out / "logs" / f"{v.key}.score.log", max(30.0, self.left()))
            try:
                result["score"] = json.loads((run_dir / "score.json").read_text())
            except (OSError, ValueError):
                result["status"] = "score failed"
        return result


def final(run: dict) -> float:
    """A run's figure of merit: its last weights' held-out accuracy with 6-view TTA."""
    return run["score"]["flip_shift2"]


def confirmations(results: list[dict], count: int, max_epochs: int) -> list[Variant]:
    """Seeds 1 and 2 of the `count` best seed-0 variants of at most `max_epochs` epochs."""
    seed0 = [r for r in results if r.get("score") and r["seed"] == 0 and r["epochs"] <= max_epochs]
    best = sorted(seed0, key=final, reverse=True)[:count]
    return [Variant(r["name"], r["epochs"], r["flags"], seed) for r in best for seed in CONFIRM_SEEDS]


def confirmed_means(done: list[dict]) -> list[dict]:
    """Mean and std over seeds of each variant that has more than one scored seed."""
    groups: dict[str, list[dict]] = {}
    for r in done:
        groups.setdefault(f"{r['name']}-e{r['epochs']}", []).append(r)
    rows = []
    for name, runs in groups.items():
        if len(runs) > 1:
            accs = [final(r) for r in runs]
            rows.append({"variant": name, "seeds": sorted(r["seed"] for r in runs), "flags": runs[0]["flags"],
                         "mean": round(statistics.mean(accs), 2), "std": round(statistics.stdev(accs), 2)})
    return sorted(rows, key=lambda row: -row["mean"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    p.add_argument("--out", default="search", help="folder for results.json, logs/ and runs/")
    p.add_argument("--device", default="auto")
    p.add_argument("--budget", type=float, default=500.0, help="seconds in all; runs still going then get SIGTERM")
    p.add_argument("--grid", choices=sorted(GRIDS), default="main", help="which list of variants")
    p.add_argument("--lanes", type=int, default=4, help="runs at a time")
    p.add_argument("--confirm", type=int, default=2, help="how many of the best variants get seeds 1 and 2")
    p.add_argument("--confirm-at", type=float, default=0.6, help="fraction of the budget after which they start")
    p.add_argument("--max-epochs", type=int, default=20, help="the longest variant that may be confirmed")
    p.add_argument("--min-run", type=float, default=25.0, help="seconds left below which no run starts")
    p.add_argument("--dry-run", action="store_true", help="a tiny grid on the CPU, 2 lanes (a test; give it tiny data)")
    p.add_argument("--score", metavar="RUN_DIR", help=argparse.SUPPRESS)  # internal: score one finished run
    p.add_argument("--score-limit", type=int, default=0, help=argparse.SUPPRESS)  # its first N test images only
    args = p.parse_args(argv)
    if args.score:
        result = score(Path(args.score), args.data_dir, args.device, args.score_limit)
        (Path(args.score) / "score.json").write_text(json.dumps(result))
        print(json.dumps(result))
        return 0
    grid = GRIDS[args.grid]
    if args.dry_run:
        grid = DRY_GRID
        args.device, args.max_epochs, args.min_run, args.lanes = "cpu", 2, 1.0, 2
    search = Search(args, grid)
    search.out.mkdir(parents=True, exist_ok=True)
    lanes = [threading.Thread(target=search.lane) for _ in range(args.lanes)]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    search.write()
    for row in confirmed_means([r for r in search.results if r.get("score")]):
        print(f"{row['variant']}: {row['mean']:.2f} ± {row['std']:.2f} % over seeds {row['seeds']} "
              f"({' '.join(row['flags'])})")
    print(f"{search.out / 'results.json'}: {len(search.results)} runs in {time.monotonic() - search.start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

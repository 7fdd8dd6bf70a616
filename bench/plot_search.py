"""The fast recipe's time-to-accuracy figure, from bench/recipe_search.py's results.json.

    python bench/plot_search.py bench/gpu/search/results.json --out bench/gpu/search/time_to_accuracy.png \\
        --images-per-second 375

Left: each variant family's final held-out accuracy (6-view TTA, seed 0; mean ± std where it ran
3 seeds) against its length in epochs, on a second axis the minutes those epochs take at
--images-per-second (the training speed of the CPU the recipe is for), with the 40-minute budget
drawn. Right: held-out accuracy after every epoch of each family's 20-epoch run (flip TTA, as
train.py measures it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

TRAIN_IMAGES = 40_000  # the proxy's training images, all trained on (--val-size 0)
BUDGET_MINUTES = 40.0


def families(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("score"):
            out.setdefault(r["name"], []).append(r)
    return out


def plot(report: dict, path: Path, images_per_second: float) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    means = {row["variant"]: row for row in report.get("confirmed", [])}
    for name, runs in sorted(families(report["runs"]).items()):
        seed0 = sorted((r for r in runs if r["seed"] == 0), key=lambda r: r["epochs"])
        if not seed0:
            continue
        line, = left.plot([r["epochs"] for r in seed0], [r["score"]["flip_shift2"] for r in seed0], "o-", label=name)
        for r in seed0:
            row = means.get(f"{name}-e{r['epochs']}")
            if row:
                left.errorbar(r["epochs"] + 0.3, row["mean"], yerr=row["std"], fmt="s", color=line.get_color(),
                              capsize=4)
        twenty = next((r for r in seed0 if r["epochs"] == 20), None)
        if twenty:
            right.plot([h["epoch"] for h in twenty["history"]], [h["val_acc"] for h in twenty["history"]],
                       color=line.get_color(), label=name)
    minutes_per_epoch = TRAIN_IMAGES / images_per_second / 60
    left.axvline(BUDGET_MINUTES / minutes_per_epoch, color="grey", ls="--", lw=1)
    left.set_xlabel("epochs of 40,000 images")
    left.set_ylabel("held-out accuracy at the end, 6-view TTA (%)")
    left.set_title("final accuracy vs length (seed 0; squares: mean ± std of 3 seeds)")
    top = left.secondary_xaxis("top", functions=(lambda e: e * minutes_per_epoch, lambda m: m / minutes_per_epoch))
    top.set_xlabel(f"minutes of training at {images_per_second:.0f} images/s (dashed: {BUDGET_MINUTES:.0f} min)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.set_xlabel("epoch")
    right.set_ylabel("held-out accuracy after the epoch, flip TTA (%)")
    right.set_title("the 20-epoch runs, epoch by epoch (seed 0)")
    right.set_ylim(40, 100)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="results.json written by bench/recipe_search.py")
    p.add_argument("--out", default=None, help="the PNG (default: time_to_accuracy.png beside the results)")
    p.add_argument("--images-per-second", type=float, default=375.0,
                   help="training speed that turns epochs into minutes (default 375: 2 AMX cores, bf16)")
    args = p.parse_args(argv)
    try:
        report = json.loads(Path(args.results).read_text())
    except (OSError, ValueError) as e:
        print(f"error: {args.results}: cannot read it ({e})", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.results).with_name("time_to_accuracy.png")
    print(plot(report, out, args.images_per_second))
    return 0


if __name__ == "__main__":
    sys.exit(main())

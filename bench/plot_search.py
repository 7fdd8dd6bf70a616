"""The fast recipe's time-to-accuracy figure, from bench/recipe_search.py's results.json.

    python bench/plot_search.py bench/gpu/search/round1.json bench/gpu/search/round2.json \\
        --out bench/gpu/search/time_to_accuracy.png --images-per-second 375

Left: the final held-out accuracy (6-view TTA, seed 0; mean ± std where it ran 3 seeds) of each
variant that ran at several lengths, against its length in epochs, and on a second axis the
minutes those epochs take at --images-per-second (the training speed of the CPU the recipe is
for), with the 40-minute budget drawn. Right: every variant's final accuracy at 20 epochs, sorted,
the old recipe (`base`) marked: what each change gave.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from recipe_search import final  # the figure of merit (bench/, this script's folder, is on sys.path)

TRAIN_IMAGES = 40_000  # the proxy's training images, all trained on (--val-size 0)
BUDGET_MINUTES = 40.0


def merged(reports: list[dict]) -> dict:
    """The runs and 3-seed means of several searches (rounds) as one."""
    return {"runs": [r for rep in reports for r in rep["runs"]],
            "confirmed": [row for rep in reports for row in rep.get("confirmed", [])]}


def families(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("score"):
            out.setdefault(r["name"], []).append(r)
    return out


def plot(report: dict, path: Path, images_per_second: float, epochs: int = 20) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1.1, 1]})
    means = {row["variant"]: row for row in report.get("confirmed", [])}
    bars = []
    for name, runs in sorted(families(report["runs"]).items()):
        seed0 = sorted((r for r in runs if r["seed"] == 0), key=lambda r: r["epochs"])
        at = next((r for r in seed0 if r["epochs"] == epochs), None)
        if at:
            row = means.get(f"{name}-e{epochs}")
            bars.append((name, row["mean"] if row else final(at), row["std"] if row else 0.0, bool(row)))
        if len(seed0) < 2:
            continue
        line, = left.plot([r["epochs"] for r in seed0], [final(r) for r in seed0], "o-", label=name)
        for r in seed0:
            row = means.get(f"{name}-e{r['epochs']}")
            if row:
                left.errorbar(r["epochs"] + 0.4, row["mean"], yerr=row["std"], fmt="s", color=line.get_color(),
                              capsize=4)
    minutes_per_epoch = TRAIN_IMAGES / images_per_second / 60
    left.axvline(BUDGET_MINUTES / minutes_per_epoch, color="grey", ls="--", lw=1)
    left.set_xlabel("epochs of 40,000 images")
    left.set_ylabel("held-out accuracy at the end, 6-view TTA (%)")
    left.set_title("final accuracy vs run length (seed 0; squares: mean ± std of 3 seeds)", fontsize=10)
    top = left.secondary_xaxis("top", functions=(lambda e: e * minutes_per_epoch, lambda m: m / minutes_per_epoch))
    top.set_xlabel(f"minutes of training at {images_per_second:.0f} images/s (dashed: {BUDGET_MINUTES:.0f} min)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    bars.sort(key=lambda b: b[1])
    y = range(len(bars))
    right.barh(y, [b[1] for b in bars], xerr=[b[2] for b in bars], capsize=3,
               color=["tab:orange" if b[0] == "base" else "tab:green" if b[3] else "tab:blue" for b in bars])
    right.set_yticks(list(y), [f"{b[0]}{' (3 seeds)' if b[3] else ''}" for b in bars], fontsize=8)
    low = min((b[1] for b in bars), default=80.0)
    right.set_xlim(low - 1.0, max((b[1] for b in bars), default=90.0) + 0.8)
    for i, b in enumerate(bars):
        right.text(b[1] + b[2] + 0.05, i, f"{b[1]:.2f}", va="center", fontsize=7)
    right.set_xlabel("held-out accuracy at the end, 6-view TTA (%)")
    right.set_title(f"every variant at {epochs} epochs (orange: the old recipe; green: mean of 3 seeds)",
                    fontsize=10)
    right.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="results.json files written by bench/recipe_search.py (rounds)")
    p.add_argument("--out", default=None, help="the PNG (default: time_to_accuracy.png beside the results)")
    p.add_argument("--images-per-second", type=float, default=375.0,
                   help="training speed that turns epochs into minutes (default 375: 2 AMX cores, bf16)")
    args = p.parse_args(argv)
    reports = []
    for name in args.results:
        try:
            reports.append(json.loads(Path(name).read_text()))
        except (OSError, ValueError) as e:
            print(f"error: {name}: cannot read it ({e})", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else Path(args.results[0]).with_name("time_to_accuracy.png")
    print(plot(merged(reports), out, args.images_per_second))
    return 0


if __name__ == "__main__":
    sys.exit(main())

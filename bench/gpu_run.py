"""Every GPU figure of docs/results.md in one command: CUDA tests, benchmark, fast recipe, paper recipe.

    python bench/gpu_run.py --out /tmp/gpu --data-dir /tmp/cifar10     # on a CUDA machine, ~8 min
    python bench/gpu_run.py --out /tmp/gpu --resume-from /tmp/gpu      # continue what did not finish
    python bench/gpu_run.py --out /tmp/dry --data-dir D --dry-run       # every stage on the CPU, tiny
    python bench/gpu_run.py --out /tmp/gpu --stages data best paper_test activations   # the accuracy runs

Stages, in order, each in its own process with its log under OUT/logs/, each given a share of the
time budget (--budget seconds in all) so that it ends cleanly and the next one still runs:
1. data: the CIFAR-10 proxy built from `.proxy/` (its archive and builder) unless --data-dir is given;
2. tests: `python -m pytest -m cuda`;
3. bench: bench/bench_train.py on the device (reference vs default images/s, the fast recipe's
   batch); once more at the end, if time is left, with fp32 and --compile (alone and in the graph);
4. fast: `train.py --recipe fast` for 3 seeds on all training images, the held-out split watched
   every epoch (never used to select: the fast recipe keeps its last epoch): wall time, time to
   94%, final accuracy;
5. paper: the paper's recipe (100 epochs, batch 64, seed 0) with the default settings; a run that
   reaches the end of its share is stopped with SIGTERM, which saves last.pth, and --resume-from
   continues it; then evaluate.py on its best checkpoint;
6. reading: the paper's recipe with the other reading of its best-weights reload (as many epochs as
   the time left allows, up to 100), evaluated the same way, and both runs' curves in one figure;
and, asked for by name (--stages):
7. best: `train.py --recipe best` for 3 seeds (all training images, the last epoch kept, the held-out
   test_batch seen once, at the end), each then evaluate.py plain and with 6-view TTA: mean ± std;
8. paper_test: the paper's recipe under the paper's own protocol: all training images, `--val-size 0`,
   the best epoch picked on test_batch (reported as selected on the test set: optimistic);
9. activations: the fast recipe with each --activation, seed by seed (every activation's seed 0,
   then seed 1, ...) for as long as the stage's share lasts: mean ± std per activation.
These three share what is left of the budget 4 : 2 : 3 (SHARE_WEIGHTS), each taking its part of what
is left when it starts, the weighted stages after it counted.
OUT/report.md holds every figure in one table with the GPU, driver, CUDA and torch versions;
OUT/report.json the same numbers; everything else a stage wrote stays under OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAST_SEEDS = (0, 1, 2)
BEST_SEEDS = (0, 1, 2)
ACTIVATION_SEEDS = (0, 1, 2)
DEFAULT_STAGES = ("data", "tests", "bench", "fast", "paper", "reading", "bench_compile")
STAGES = (*DEFAULT_STAGES, "best", "paper_test", "activations")
FAST_TARGET = 94.0  # held-out accuracy (%) whose time is reported for the fast recipe
GOALS = {"paper_train_seconds": 120.0, "default_over_reference": 8.0, "fast_seconds_to_target": 15.0}
OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED")
EVAL_RESERVE = 40.0  # seconds kept back from a training stage for evaluate.py and the report


@dataclass
class Plan:
    """The sizes of every stage: the real ones on a GPU, tiny ones on the CPU for --dry-run."""

    device: str
    paper_epochs: int
    fast_epochs: int | None  # None: the recipe's own
    bench: list[str]
    paper_extra: list[str] = field(default_factory=list)  # train.py flags added to the paper stages
    fast_extra: list[str] = field(default_factory=list)  # and to the fast recipe's runs
    eval_extra: list[str] = field(default_factory=list)
    caps: dict = field(default_factory=dict)  # most seconds a stage may take
    best_extra: list[str] = field(default_factory=list)  # train.py flags added to the best recipe's runs
    best_seeds: tuple[int, ...] = BEST_SEEDS
    activation_seeds: tuple[int, ...] = ACTIVATION_SEEDS

    @staticmethod
    def for_run(dry_run: bool) -> Plan:
        if dry_run:
            return Plan("cpu", 2, 1, ["--steps", "2", "--repeats", "1", "--eval-images", "100"],
                        ["--val-size", "20", "--workers", "0"], ["--workers", "0", "--batch-size", "64"],
                        ["--limit", "100", "--no-robustness"],
                        {"data": 120, "tests": 120, "bench": 150, "bench_compile": 0, "fast": 150},
                        ["--epochs", "1", "--batch-size", "64", "--workers", "0"], (0, 1), (0,))
        return Plan("cuda", 100, None, ["--steps", "200", "--repeats", "3"], [], [], [],
                    {"data": 90, "tests": 180, "bench": 90, "bench_compile": 100, "fast": 120})


class Clock:
    """Seconds left of the whole budget."""

    def __init__(self, budget: float) -> None:
        self.end = time.monotonic() + budget

    def left(self) -> float:
        return self.end - time.monotonic()


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run a command with its output in `log`; past `timeout` seconds it gets SIGTERM (a training
    run saves its place), then SIGKILL 30 s later. Returns (exit code or None if killed, seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = None
            f.write(f"\n[gpu_run: stopped after {timeout:.0f} s, the stage's share of the budget]\n")
    return code, time.monotonic() - start


def tail(path: Path, lines: int = 3) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])[-400:]
    except OSError:
        return ""


def environment() -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cpu": platform.processor() or platform.machine(),
           "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


# ----------------------------------------------------------------------------- stages

def stage_data(args, plan: Plan, out: Path, clock: Clock) -> dict:
    if args.data_dir:
        folder = Path(args.data_dir)
        ok = (folder / "cifar-10-batches-py" / "data_batch_1").is_file()
        return {"status": "ok" if ok else "failed", "data_dir": str(folder),
                **({} if ok else {"error": f"{folder} holds no cifar-10-batches-py/data_batch_1"})}
    builder, archive = ROOT / ".proxy" / "make_cifar10_proxy.py", ROOT / ".proxy" / "cifar10-train-jpeg.tar.gz"
    folder = out / "data"
    if (folder / "cifar-10-batches-py" / "test_batch").is_file():
        return {"status": "ok", "data_dir": str(folder), "note": "built earlier"}
    if not (builder.is_file() and archive.is_file()):
        return {"status": "failed", "error": f"no --data-dir and no proxy in {ROOT / '.proxy'} "
                "(make_cifar10_proxy.py and cifar10-train-jpeg.tar.gz); pass --data-dir"}
    cmd = [sys.executable, str(builder), str(folder), "--train", str(archive)]
    if args.dry_run:
        cmd += ["--limit", "300"]
    code, seconds = run_logged(cmd, out / "logs" / "data.log", min(plan.caps["data"], clock.left()))
    return {"status": "ok" if code == 0 else "failed", "seconds": round(seconds, 1), "data_dir": str(folder),
            "proxy": True, **({} if code == 0 else {"error": tail(out / "logs" / "data.log")})}


def stage_tests(args, plan: Plan, out: Path, clock: Clock) -> dict:
    xml = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rA", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    code, seconds = run_logged(cmd, out / "logs" / "tests.log", min(plan.caps["tests"], clock.left()))
    counts = {}
    if xml.is_file():
        import xml.etree.ElementTree as ET
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    status = "ok" if code == 0 else "failed" if code is not None else "timed out"
    log = out / "logs" / "tests.log"
    outcomes = {}  # from the -rA summary lines, which a stopped run may still have printed in part
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        words = line.split()
        if len(words) >= 2 and words[0] in OUTCOMES and "::" in words[1]:  # -rA: "PASSED path::test"
            outcomes[words[1]] = words[0]
        elif len(words) >= 2 and "::" in words[0] and words[1] in OUTCOMES:  # -v: "path::test PASSED [ 10%]"
            outcomes[words[0]] = words[1]
    return {"status": status, "seconds": round(seconds, 1), **counts, "outcomes": outcomes,
            "summary": tail(log, 1)}


def _bench(args, plan: Plan, out: Path, clock: Clock, extra: list[str], name: str, cap: float) -> dict:
    path = out / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--data-dir", args.data_dir, "--device",
           plan.device, *plan.bench, "--extra", *extra, "--json", str(path)]
    code, seconds = run_logged(cmd, out / "logs" / f"{name}.log", min(cap, clock.left() - EVAL_RESERVE))
    if code != 0 or not path.is_file():
        return {"status": "failed" if code is not None else "timed out", "seconds": round(seconds, 1),
                "error": tail(out / "logs" / f"{name}.log")}
    results = json.loads(path.read_text())
    rows = {n: {"images_per_s": round(r["median"], 1), "ratio": round(r["ratio"], 2)}
            for n, r in results["training"].items()}
    return {"status": "ok", "seconds": round(seconds, 1), "training": rows,
            "augmentation": {k: round(v) for k, v in results["augmentation"].items()},
            "evaluation": {k: round(v) for k, v in results["evaluation"].items()}, "memory": results["memory"]}


def stage_bench(args, plan: Plan, out: Path, clock: Clock) -> dict:
    result = _bench(args, plan, out, clock, ["fast-recipe"], "bench", plan.caps["bench"])
    if result["status"] == "ok":
        default = next((r for n, r in result["training"].items() if n.startswith("default") and "batch" not in n),
                       None)
        result["default_over_reference"] = default["ratio"] if default else None
    return result


def stage_bench_compile(args, plan: Plan, out: Path, clock: Clock) -> dict:
    """The benchmark once more with --compile: last, because compiling takes a minute of the budget."""
    if not plan.caps["bench_compile"]:
        return {"status": "skipped", "reason": "not in a dry run (compiling on the CPU takes minutes)"}
    if clock.left() < plan.caps["bench_compile"] + 20:
        return {"status": "skipped", "reason": f"{clock.left():.0f} s left of the budget"}
    return _bench(args, plan, out, clock, ["fp32", "compile", "compile-graph"], "bench-compile",
                  plan.caps["bench_compile"])


def read_history(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def time_to(history: list[dict], target: float) -> float | None:
    """Training seconds (evaluation excluded) until the first epoch whose selection accuracy reaches target."""
    total = 0.0
    for row in history:
        total += row.get("train_seconds", row["seconds"])
        if row["val_acc"] is not None and row["val_acc"] >= target:
            return round(total, 2)
    return None


def stage_fast(args, plan: Plan, out: Path, clock: Clock) -> dict:
    runs = []
    stage_end = time.monotonic() + min(plan.caps["fast"], clock.left() - EVAL_RESERVE)
    for i, seed in enumerate(FAST_SEEDS):
        run_dir = out / f"fast-seed{seed}"
        share = (stage_end - time.monotonic()) / (len(FAST_SEEDS) - i)
        cmd = [sys.executable, str(ROOT / "train.py"), "--recipe", "fast", "--data-dir", args.data_dir,
               "--val-size", "0", "--eval-every", "1", "--seed", str(seed), "--out", str(run_dir),
               "--device", plan.device, "--overwrite",
               *(["--epochs", str(plan.fast_epochs)] if plan.fast_epochs else []), *plan.fast_extra]
        code, seconds = run_logged(cmd, out / "logs" / f"fast-seed{seed}.log", share)
        history = read_history(run_dir / "history.json")
        runs.append({"seed": seed, "exit": code, "wall_seconds": round(seconds, 1), "epochs": len(history),
                     "train_seconds": round(sum(h.get("train_seconds", h["seconds"]) for h in history), 2),
                     "final_acc": history[-1]["val_acc"] if history else None,
                     "seconds_to_target": time_to(history, FAST_TARGET)})
    done = [r for r in runs if r["exit"] == 0]
    accs = [r["final_acc"] for r in done]
    result = {"status": "ok" if len(done) == len(runs) else "failed", "target": FAST_TARGET, "runs": runs,
              "note": "selection split = the held-out test_batch, watched per epoch, never used to pick an epoch "
                      "(the fast recipe keeps its last); accuracy with the recipe's 6-view TTA"}
    if accs:
        import statistics
        result["final_acc_mean"] = round(statistics.mean(accs), 2)
        result["final_acc_std"] = round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0
        reached = [r["seconds_to_target"] for r in done if r["seconds_to_target"] is not None]
        result["seconds_to_target_mean"] = round(statistics.mean(reached), 2) if len(reached) == len(done) else None
    return result


def _evaluate(args, plan: Plan, out: Path, clock: Clock, run_dir: Path, name: str, tta: bool = False) -> dict:
    best = run_dir / "learn_rate_consistent_model.pth"
    if not best.is_file():
        return {"status": "failed", "error": f"{best} was not written"}
    eval_dir = out / f"{name}-eval"
    cmd = [sys.executable, str(ROOT / "evaluate.py"), str(best), "--data-dir", args.data_dir, "--out-dir",
           str(eval_dir), "--device", plan.device, *plan.eval_extra, *(["--tta", "--no-robustness"] if tta else [])]
    code, seconds = run_logged(cmd, out / "logs" / f"{name}-eval.log", max(30.0, min(300.0, clock.left())))
    try:
        report = json.loads((eval_dir / "report.json").read_text())
    except (OSError, ValueError):
        return {"status": "failed", "seconds": round(seconds, 1), "error": tail(out / "logs" / f"{name}-eval.log")}
    return {"status": "ok" if code == 0 else "failed", "seconds": round(seconds, 1),
            "heldout_acc": report.get("accuracy"), "heldout_loss": report.get("loss"),
            "ece": report.get("calibration", {}).get("ece"), "n": report.get("n"),
            **({"heldout_tta_acc": (report.get("tta") or {}).get("accuracy")} if tta else {})}


def _train_paper(args, plan: Plan, out: Path, clock: Clock, name: str, flags: list[str], epochs: int,
                 timeout: float | None = None) -> dict:
    run_dir = out / name
    last = run_dir / "last.pth"
    if last.is_file():  # a run an earlier command stopped: continue it
        cmd = [sys.executable, str(ROOT / "train.py"), "--resume", str(last), "--data-dir", args.data_dir,
               "--epochs", str(epochs)]
    else:
        cmd = [sys.executable, str(ROOT / "train.py"), "--data-dir", args.data_dir, "--seed", "0",
               "--out", str(run_dir), "--device", plan.device, "--epochs", str(epochs), *plan.paper_extra, *flags]
    code, seconds = run_logged(cmd, out / "logs" / f"{name}.log",
                               clock.left() - EVAL_RESERVE if timeout is None else timeout)
    history = read_history(run_dir / "history.json")
    best = max((h for h in history if h["val_acc"] is not None), key=lambda h: h["val_acc"], default=None)
    result = {"status": "ok" if code == 0 and len(history) >= epochs else "partial" if history else "failed",
              "exit": code, "wall_seconds": round(seconds, 1), "epochs_done": len(history), "epochs": epochs,
              "flags": " ".join(flags) or "(defaults)",
              "train_seconds": round(sum(h.get("train_seconds", h["seconds"]) for h in history), 1),
              "seconds": round(sum(h["seconds"] for h in history), 1),
              "reloads": sum(bool(h.get("reloaded")) for h in history)}
    if best:
        result.update(best_epoch=best["epoch"], best_val_acc=best["val_acc"], train_acc_at_best=best["train_acc"],
                      final_train_acc=history[-1]["train_acc"], final_val_acc=history[-1]["val_acc"],
                      seconds_per_epoch=round(result["seconds"] / len(history), 2))
    if code not in (0, None) and not history:
        result["error"] = tail(out / "logs" / f"{name}.log")
    if history:
        result["evaluation"] = _evaluate(args, plan, out, clock, run_dir, name)
    return result


def stage_paper(args, plan: Plan, out: Path, clock: Clock) -> dict:
    result = _train_paper(args, plan, out, clock, "paper", [], plan.paper_epochs)
    if result["status"] == "failed" and plan.device == "cuda" and clock.left() > 120:
        # A run that could not even finish its first epoch: once more without the CUDA graph, so
        # that the run still yields its figures; the failure stays in the report and the log.
        retry = _train_paper(args, plan, out, clock, "paper", ["--no-cuda-graph", "--overwrite"], plan.paper_epochs)
        retry["first_try"] = result
        return retry
    return result


def stage_reading(args, plan: Plan, out: Path, clock: Clock, paper: dict) -> dict:
    """The other reading of the paper's reload, for as many epochs as fit (30 at least)."""
    from training.config import TrainConfig
    flag = "--no-reload-best" if TrainConfig().reload_best else "--reload-best"
    same = [f for f in paper.get("flags", "").split() if f == "--no-cuda-graph"]  # as the paper run went
    per_epoch = paper.get("seconds_per_epoch") or 10.0
    epochs = min(plan.paper_epochs, int((clock.left() - 2 * EVAL_RESERVE) / (per_epoch * 1.1)))
    if epochs < min(30, plan.paper_epochs) and not (out / "reading" / "last.pth").is_file():
        return {"status": "skipped", "reason": f"{clock.left():.0f} s left: fewer than 30 epochs would fit"}
    result = _train_paper(args, plan, out, clock, "reading", [flag, *same], epochs)
    histories = {name: read_history(out / name / "history.json") for name in ("paper", "reading")}
    if all(histories.values()):
        from reports import plots
        default = "reload after a worse epoch" if TrainConfig().reload_best else "no reload"
        other = "no reload" if TrainConfig().reload_best else "reload after a worse epoch"
        plots.save_run_comparison({f"default ({default})": histories["paper"], f"{flag} ({other})":
                                   histories["reading"]}, out / "reload_readings.png")
        result["figure"] = "reload_readings.png"
    return result


# Shares of the budget for the stages that have no fixed cap: each gets its weight's part of what is
# left when it starts, counting the weighted stages still to come.
SHARE_WEIGHTS = {"best": 4.0, "paper_test": 2.0, "activations": 3.0}


def share(clock: Clock, name: str, queue: list[str]) -> float:
    weights = sum(SHARE_WEIGHTS[n] for n in queue if n in SHARE_WEIGHTS)
    return max(0.0, clock.left() - EVAL_RESERVE) * SHARE_WEIGHTS[name] / weights


def _recipe_run(args, plan: Plan, out: Path, clock: Clock, name: str, flags: list[str], timeout: float,
                kept: dict | None) -> dict:
    """One train.py run, then evaluate.py plain and with TTA. A run an earlier command finished is
    kept as it was; one it stopped is continued from its last.pth."""
    if kept and kept.get("exit") == 0 and kept.get("evaluation", {}).get("status") == "ok":
        return kept
    run_dir, log = out / name, out / "logs" / f"{name}.log"
    if kept is not None and (run_dir / "last.pth").is_file():
        cmd = [sys.executable, str(ROOT / "train.py"), "--resume", str(run_dir / "last.pth"), "--data-dir",
               args.data_dir]
    else:
        cmd = [sys.executable, str(ROOT / "train.py"), "--data-dir", args.data_dir, "--out", str(run_dir),
               "--device", plan.device, "--overwrite", *flags]
    start = time.monotonic()
    code, seconds = run_logged(cmd, log, timeout)
    history = read_history(run_dir / "history.json")
    if code not in (0, None) and not history and plan.device == "cuda" and "--resume" not in cmd:
        # Not even one epoch: once more without the CUDA graph (as stage_paper does); the log keeps both.
        code, _ = run_logged([*cmd, "--no-cuda-graph"], log, timeout - (time.monotonic() - start))
        seconds, history = time.monotonic() - start, read_history(run_dir / "history.json")
    result = {"exit": code, "wall_seconds": round(seconds, 1), "epochs": len(history),
              "train_seconds": round(sum(h.get("train_seconds", h["seconds"]) for h in history), 1)}
    if code == 0:
        result["evaluation"] = _evaluate(args, plan, out, clock, run_dir, name, tta=True)
    else:
        result["error"] = tail(log)
    return result


def _accuracies(runs: list[dict]) -> dict:
    """Mean and std over the finished runs of held-out accuracy, plain and with TTA."""
    import statistics
    done = [r["evaluation"] for r in runs if r.get("exit") == 0 and r.get("evaluation", {}).get("status") == "ok"]
    out = {"finished": len(done)}
    for key, name in (("heldout_acc", "plain"), ("heldout_tta_acc", "tta")):
        values = [e[key] for e in done if e.get(key) is not None]
        if values:
            out[f"{name}_mean"] = round(statistics.mean(values), 2)
            out[f"{name}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else None
    return out


def stage_best(args, plan: Plan, out: Path, clock: Clock) -> dict:
    """`--recipe best` for each seed in turn; a seed may use all of the stage's share that is left."""
    end = time.monotonic() + share(clock, "best", args.queue)
    kept = {r["seed"]: r for r in args.previous.get("best", {}).get("runs", [])}
    runs = []
    for seed in plan.best_seeds:
        left = end - time.monotonic()
        if left < 10:
            runs.append({"seed": seed, "exit": None, "error": "not started: the stage's share was used up"})
            continue
        runs.append({"seed": seed, **_recipe_run(args, plan, out, clock, f"best-seed{seed}",
                                                 ["--recipe", "best", "--seed", str(seed), *plan.best_extra],
                                                 left, kept.get(seed))})
    acc = _accuracies(runs)
    return {"status": "ok" if acc["finished"] == len(runs) else "partial" if acc["finished"] else "failed",
            "runs": runs, **acc, "note": "all training images, the last epoch kept; test_batch evaluated once, at "
            "the end, choosing nothing; evaluate.py plain and with 6-view TTA"}


def stage_paper_test(args, plan: Plan, out: Path, clock: Clock) -> dict:
    """The paper's recipe under the paper's protocol: the best epoch picked on the held-out test_batch."""
    result = _train_paper(args, plan, out, clock, "paper_test", ["--val-size", "0"], plan.paper_epochs,
                          timeout=share(clock, "paper_test", args.queue))
    result["note"] = ("all training images; the best epoch picked on test_batch, as the paper did: selected on the "
                      "test set, so the figure is optimistic")
    return result


def stage_activations(args, plan: Plan, out: Path, clock: Clock) -> dict:
    """The fast recipe with each --activation, every activation's seed 0 first, then seed 1, ...,
    while the stage's share lasts (a run is started only if the longest so far would fit)."""
    from model import ACTIVATIONS
    names = sorted(ACTIVATIONS, key=lambda a: (a != "relu", a))  # the default first: the reference
    end = time.monotonic() + share(clock, "activations", args.queue)
    kept = {(r["activation"], r["seed"]): r for r in args.previous.get("activations", {}).get("runs", [])}
    runs, longest = [], 0.0
    for seed in plan.activation_seeds:
        for act in names:
            left = end - time.monotonic()
            if left < max(10.0, 1.2 * longest):
                break
            flags = ["--recipe", "fast", "--activation", act, "--seed", str(seed), "--val-size", "0",
                     *(["--epochs", str(plan.fast_epochs)] if plan.fast_epochs else []), *plan.fast_extra]
            run = _recipe_run(args, plan, out, clock, f"act-{act}-seed{seed}", flags, left, kept.get((act, seed)))
            longest = max(longest, run["wall_seconds"] + run.get("evaluation", {}).get("seconds", 0.0))
            runs.append({"activation": act, "seed": seed, **run})
    table = {act: {"seeds": [r["seed"] for r in runs if r["activation"] == act],
                   **_accuracies([r for r in runs if r["activation"] == act])} for act in names}
    failed = [r for r in runs if r.get("exit") != 0]
    complete = all(t["finished"] for t in table.values())
    return {"status": "ok" if complete and not failed else "partial" if runs else "failed", "runs": runs,
            "table": table, "note": "the fast recipe (all training images, the last epoch kept, test_batch seen "
            "once, at the end) with each activation; evaluate.py plain and with 6-view TTA"}


# ----------------------------------------------------------------------------- report

def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.2f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1))
    env, st = report["environment"], report["stages"]
    lines = [f"# GPU run{' (dry run on the CPU)' if report['dry_run'] else ''}", "",
             f"{env.get('gpu', 'no GPU')}, driver {env.get('driver', '—')}, CUDA {env.get('cuda')}, cuDNN "
             f"{env.get('cudnn')}, torch {env.get('torch')}, Python {env.get('python')}; host CPU {env.get('cpu')} "
             f"({env.get('cpu_cores')} cores). Data: {report.get('data_note', '')}. Started {report['started']}; "
             f"{report['seconds']:.0f} s in all.", "",
             "| stage | figure | value | goal |", "| --- | --- | --- | --- |"]

    def row(stage, figure, value, goal=""):
        lines.append(f"| {stage} | {figure} | {value} | {goal} |")

    for name, s in st.items():
        wall = s.get("wall_seconds", s.get("seconds"))
        row(name, "status", s.get("status", "—") + (f" ({wall} s)" if wall is not None else "")
            + (f": {s.get('reason') or s.get('error')}" if s.get("reason") or s.get("error") else ""))
    tests = st.get("tests", {})
    if "tests" in tests:
        row("tests", "pytest -m cuda", f"{tests['tests'] - tests['failures'] - tests['errors'] - tests['skipped']} "
            f"passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped")
    bench = st.get("bench", {})
    for n, r in bench.get("training", {}).items():
        row("bench", f"training images/s, {n}", f"{r['images_per_s']:,.0f} ({r['ratio']:.2f}x)",
            f"≥ {GOALS['default_over_reference']:.0f}x" if n.startswith("default") and "batch" not in n else "")
    for n, r in st.get("bench_compile", {}).get("training", {}).items():
        if "compile" in n:
            row("bench", f"training images/s, {n}", f"{r['images_per_s']:,.0f} ({r['ratio']:.2f}x)")
    fast = st.get("fast", {})
    if fast.get("runs"):
        row("fast", f"held-out accuracy, last epoch, {len(fast['runs'])} seeds (mean ± std)",
            f"{_fmt(fast.get('final_acc_mean'))} ± {_fmt(fast.get('final_acc_std'))} %")
        row("fast", f"training seconds to {FAST_TARGET:.0f}% held-out (mean)", _fmt(fast.get("seconds_to_target_mean")),
            f"≤ {GOALS['fast_seconds_to_target']:.0f} s")
        for r in fast["runs"]:
            row("fast", f"seed {r['seed']}: epochs, training s, wall s, final acc, s to {FAST_TARGET:.0f}%",
                f"{r['epochs']}, {r['train_seconds']}, {r['wall_seconds']}, {_fmt(r['final_acc'])}, "
                f"{_fmt(r['seconds_to_target'])}")
    best = st.get("best", {})
    if best.get("runs"):
        row("best", f"--recipe best, held-out accuracy, last epoch, {best['finished']} of {len(best['runs'])} seeds "
            "(mean ± std): plain; 6-view TTA", f"{_fmt(best.get('plain_mean'))} ± {_fmt(best.get('plain_std'))} %; "
            f"{_fmt(best.get('tta_mean'))} ± {_fmt(best.get('tta_std'))} %", "≥ 92.5% on the proxy")
        for r in best["runs"]:
            ev = r.get("evaluation", {})
            row("best", f"seed {r['seed']}: epochs, training s, wall s, plain, TTA",
                f"{r.get('epochs')}, {r.get('train_seconds')}, {r.get('wall_seconds')}, "
                f"{_fmt(ev.get('heldout_acc'))}, {_fmt(ev.get('heldout_tta_acc'))}")
    for act, t in st.get("activations", {}).get("table", {}).items():
        row("activations", f"fast recipe, --activation {act}: seeds; plain; 6-view TTA (mean ± std)",
            f"{t['seeds']}; {_fmt(t.get('plain_mean'))} ± {_fmt(t.get('plain_std'))} %; "
            f"{_fmt(t.get('tta_mean'))} ± {_fmt(t.get('tta_std'))} %")
    for name in ("paper", "reading", "paper_test"):
        p = st.get(name, {})
        if "epochs_done" not in p:
            continue
        ev = p.get("evaluation", {})
        row(name, f"{p['flags']}: epochs done / asked", f"{p['epochs_done']} / {p['epochs']}")
        row(name, "training seconds (evaluation excluded); all seconds; per epoch",
            f"{p['train_seconds']}; {p['seconds']}; {_fmt(p.get('seconds_per_epoch'))}",
            f"≤ {GOALS['paper_train_seconds']:.0f} s for 100 epochs" if name == "paper" else "")
        row(name, "best epoch; selection acc there; train acc there",
            f"{p.get('best_epoch')}; {_fmt(p.get('best_val_acc'))}%; {_fmt(p.get('train_acc_at_best'))}%")
        row(name, "last epoch: train acc; selection acc; reloads",
            f"{_fmt(p.get('final_train_acc'))}%; {_fmt(p.get('final_val_acc'))}%; {p.get('reloads')}")
        row(name, "held-out accuracy of the best checkpoint (evaluate.py)", f"{_fmt(ev.get('heldout_acc'))}%",
            "selected on the test set: optimistic" if name == "paper_test" else "")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the report, logs, checkpoints and figures")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py/ (default: build the proxy "
                   "from .proxy/ into OUT/data)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all stages together (default 540)")
    p.add_argument("--resume-from", default=None, metavar="DIR",
                   help="an earlier run's --out: stages it finished are kept, a stopped training run continues")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU with tiny sizes (a few minutes)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(DEFAULT_STAGES), metavar="STAGE",
                   help=f"the stages to run, in the order above (default: {' '.join(DEFAULT_STAGES)}; also: "
                   f"{' '.join(n for n in STAGES if n not in DEFAULT_STAGES)}); data is always run")
    args = p.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.monotonic()
    clock = Clock(args.budget)
    out = Path(args.resume_from or args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = {}
    if args.resume_from:
        try:
            previous = json.loads((out / "report.json").read_text())["stages"]
        except (OSError, ValueError, KeyError):
            print(f"error: {out / 'report.json'}: no earlier report to continue", file=sys.stderr)
            return 2
    args.previous = previous
    plan = Plan.for_run(args.dry_run)
    if plan.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("error: no CUDA GPU visible; run on a GPU machine, or pass --dry-run", file=sys.stderr)
            return 2
    report = {"started": started, "dry_run": args.dry_run, "budget": args.budget, "environment": environment(),
              "stages": {}, "seconds": 0.0}

    def record(name: str, result: dict) -> None:
        report["stages"][name] = result
        report["seconds"] = time.monotonic() - t0
        write_report(out, report)
        print(f"[gpu_run] {name}: {result.get('status')} ({clock.left():.0f} s of the budget left)", flush=True)

    data = stage_data(args, plan, out, clock)
    record("data", data)
    if data["status"] != "ok":
        return 1
    args.data_dir = data["data_dir"]
    report["data_note"] = f"{args.data_dir}" + (" (the JPEG proxy of CIFAR-10)" if data.get("proxy") else "")
    stages = {"tests": stage_tests, "bench": stage_bench, "fast": stage_fast, "paper": stage_paper,
              "reading": lambda *a: stage_reading(*a, report["stages"].get("paper", {})), "best": stage_best,
              "paper_test": stage_paper_test, "activations": stage_activations, "bench_compile": stage_bench_compile}
    # In the order of STAGES, except that the compile benchmark, which only fills what time is left, comes last.
    queue = [n for n in STAGES if n in args.stages and n not in ("data", "bench_compile")]
    queue += ["bench_compile"] if "bench_compile" in args.stages else []
    for i, name in enumerate(queue):
        fn = stages[name]
        args.queue = queue[i:]
        if previous.get(name, {}).get("status") == "ok":
            record(name, previous[name])  # finished by the earlier command
            continue
        record(name, fn(args, plan, out, clock))
    print((out / "report.md").read_text())
    return 0 if all(s.get("status") in ("ok", "skipped") for s in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

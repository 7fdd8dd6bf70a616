"""The paper's hyperparameter search, reproduced: optimizer, learning rate, momentum and weight decay,
searched with Optuna on the selection split (held-out training images, never the test set).

    python tune.py --trials 24 --epochs 5 --subset 10000 --data-dir data          # study in tune/optuna.db
    python tune.py --trials 24 --epochs 5 --subset 10000 --storage postgresql://user:pw@host/tune
                                                   # the same on any number of processes and machines
    python tune.py --trials 12 ...                 # again: adds 12 trials to the same study

Flags other than tune.py's own are train.py flags that stay fixed over the search. Each trial is a
plain `python train.py ...` command line (the fixed flags and the trial's four settings), trained by
train.py's own `fit`; after every epoch the trial reports its selection-split accuracy, and a
trial behind the median of earlier trials at that epoch is pruned (or Hyperband's rule, --pruner).
The objective is the best selection-split accuracy over the trial's epochs, the epoch train.py
keeps. Sampling is TPE, seeded from --sampler-seed and the trial's number, so one process repeats
exactly and processes that share a study draw different points. The paper's own point (SGD, lr
0.01, momentum 0.9, no weight decay) is the first trial of every new study.

Written to --out/<study>/ after the trials (and at Ctrl-C): trials.csv, best_command.txt (also
printed last), history.png, importances.png, parallel.png, and trial-NNNN/ with each trial's
history.json and curves (its checkpoints are deleted: the best command trains the model again).
Ctrl-C stops the running trial at the next step (recorded as failed) and keeps the study; a
trial that raises is recorded as failed and the search goes on. See docs/tuning.md.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import errno
import json
import os
import re
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import train
from data import DataError
from files.lock import hold
from files.writes import WriteError, causes, missing_folders, reason, remove_empty, replaced
from training.checkpoint import CheckpointError
from training.config import (
    NONNEG_INT,
    RUN_ENVIRONMENT,
    OneLineParser,
    TrainConfig,
    UsageError,
    fresh_config,
    parse_args,
)
from training.run import Run
from training.runtime import pick_device

if TYPE_CHECKING:
    import optuna

# The search space, as the paper names it. "optimizer" maps to train.py flags in OPTIMIZER_FLAGS.
OPTIMIZER_FLAGS = {"sgd": ["--optimizer", "sgd", "--no-nesterov"], "sgd-nesterov": ["--optimizer", "sgd", "--nesterov"],
                   "adamw": ["--optimizer", "adamw", "--no-nesterov"]}
LR_RANGE = (1e-4, 0.3)  # learning rate, log-uniform; SGD at batch 64 diverges above about 0.3 without warm-up
MOMENTUM_RANGE = (0.5, 0.99)  # SGD momentum, AdamW's beta1; uniform
WEIGHT_DECAY_RANGE = (1e-6, 1e-1)  # log-uniform when weight decay is on (L2 for SGD, decoupled for AdamW)
PAPER_POINT = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay_on": False}
SEARCHED = ("optimizer", "nesterov", "lr", "momentum", "weight_decay")  # TrainConfig fields set per trial
# Fields that say where and how fast a trial runs, which processes sharing a study may set differently;
# every other field is part of what the study measures and must be the same in all of its trials.
PLACE = RUN_ENVIRONMENT - {"epochs", "amp"}
TPE_STARTUP_TRIALS = 6  # random trials before TPE models the results: a search here is tens of trials
MEDIAN_STARTUP_TRIALS = 4  # the median pruner compares against this many finished trials at least
HEARTBEAT_S, GRACE_S = 60, 300  # a trial whose process died is marked failed after GRACE_S without a beat
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
KEPT, AGAIN = "the study keeps every trial that finished before", "run the same command to add more"


def search_space() -> dict:
    """The search space as the study records it, to refuse a study of another space."""
    return {"optimizer": list(OPTIMIZER_FLAGS), "lr": [*LR_RANGE, "log"], "momentum": [*MOMENTUM_RANGE],
            "weight_decay": [*WEIGHT_DECAY_RANGE, "log", "or 0"]}


def suggest(trial: optuna.Trial) -> dict:
    params = {"optimizer": trial.suggest_categorical("optimizer", list(OPTIMIZER_FLAGS)),
              "lr": trial.suggest_float("lr", *LR_RANGE, log=True),
              "momentum": trial.suggest_float("momentum", *MOMENTUM_RANGE),
              "weight_decay_on": trial.suggest_categorical("weight_decay_on", [False, True])}
    if params["weight_decay_on"]:
        params["weight_decay"] = trial.suggest_float("weight_decay", *WEIGHT_DECAY_RANGE, log=True)
    return params


def trial_flags(params: dict) -> list[str]:
    """The train.py flags of a trial's settings; numbers to 4 significant digits, which the trial trains with."""
    return [*OPTIMIZER_FLAGS[params["optimizer"]], "--lr", f"{params['lr']:.4g}", "--momentum",
            f"{params['momentum']:.4g}", "--weight-decay", f"{params.get('weight_decay', 0.0):.4g}"]


def describe(params: dict) -> str:
    decay = f"weight decay {params['weight_decay']:.4g}" if params.get("weight_decay_on") else "no weight decay"
    return f"{params.get('optimizer')} lr {params.get('lr', 0):.4g} momentum {params.get('momentum', 0):.4g} {decay}"


def command_line(flags: list[str]) -> str:
    return "python train.py " + shlex.join(flags)


# ----------------------------------------------------------------------------- Optuna

def import_optuna() -> None:
    try:
        import optuna
    except ImportError:
        raise UsageError("tune.py needs Optuna: pip install -r requirements-optional.txt") from None
    # tune.py prints a line per trial itself, and the traceback of a trial that raised
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def trial_seeded_tpe(seed: int) -> optuna.samplers.BaseSampler:
    """TPE whose random draws for trial n are seeded from (seed, n): one process from scratch
    repeats exactly, a resumed study does not replay its first trials' draws, and processes that
    share a study draw different points (with one seed each of them would draw the same ones)."""
    import optuna

    def tpe(number: int) -> optuna.samplers.TPESampler:
        trial_seed = int(np.random.SeedSequence([seed, number]).generate_state(1)[0])
        return optuna.samplers.TPESampler(seed=trial_seed, n_startup_trials=TPE_STARTUP_TRIALS)

    class TrialSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self.tpe = tpe(0)

        def before_trial(self, study, trial) -> None:
            self.tpe = tpe(trial.number)
            self.tpe.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.tpe.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, space):
            return self.tpe.sample_relative(study, trial, space)

        def sample_independent(self, study, trial, name, distribution):
            return self.tpe.sample_independent(study, trial, name, distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self.tpe.after_trial(study, trial, state, values)

    return TrialSeededTPE()


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    import optuna
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if name == "median":  # from the first epoch on: a search here is a few epochs per trial
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study database, or a UsageError saying why it cannot be opened."""
    import optuna
    import sqlalchemy
    # SQLite serialises writers: wait for another process's write rather than fail at once
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                                      grace_period=GRACE_S)
            except sqlalchemy.exc.SQLAlchemyError as e:
                # another process is creating the same new database's tables at this moment: once they
                # exist, opening it succeeds (seen with two processes starting on one SQLite file)
                if attempt == 4 or not re.search(r"already exists|UNIQUE constraint|Duplicate", str(e)):
                    raise
                time.sleep(0.2 * (attempt + 1))
    except (ImportError, ValueError, OSError, sqlalchemy.exc.SQLAlchemyError) as e:
        why = " ".join(str(e).split("\n")[0].split())[:200] or type(e).__name__
        raise UsageError(f"--storage {shown_url(url)}: cannot open it ({why}); give a database URL such as "
                         "sqlite:///tune/optuna.db or postgresql://user:password@host/dbname") from None


def shown_url(url: str) -> str:
    """The URL with its password starred, for printing."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def open_study(storage, name: str, sampler, pruner, fixed: dict) -> optuna.Study:
    """Create the study (recording its search space and fixed flags, and queueing the paper's point
    as its first trial), or load it and check that it is a study of this search."""
    import optuna
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler,
                                    pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    else:  # the paper's point first: a process that sees the search recorded sees it queued
        queue_paper_point(study)
        study.set_user_attr("search_space", search_space())
        study.set_user_attr("fixed", fixed)
        return study
    where = f"study {name!r}"
    if study.directions != [optuna.study.StudyDirection.MAXIMIZE]:
        raise UsageError(f"{where} does not maximise one value, so tune.py did not make it; choose another --study")
    attrs = study.user_attrs
    if "search_space" not in attrs:
        if any(not t.user_attrs.get("paper") for t in study.trials):
            raise UsageError(f"{where} was not made by tune.py (it records no search space); choose another --study")
        # made a moment ago by another tune.py process that has not recorded its search yet
        study.set_user_attr("search_space", search_space())
        study.set_user_attr("fixed", fixed)
        return study
    if attrs["search_space"] != search_space():
        raise UsageError(f"{where} searched another space ({json.dumps(attrs['search_space'])}); this tune.py "
                         f"searches {json.dumps(search_space())}: choose another --study")
    theirs = attrs.get("fixed", {})
    differ = sorted(k for k in fixed.keys() | theirs.keys() if fixed.get(k) != theirs.get(k))
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')} {theirs.get(k)} (here {fixed.get(k)})" for k in differ[:4])
        raise UsageError(f"{where} fixes {flags}; give the same train.py flags to add to it, or choose another --study")
    queue_paper_point(study)
    return study


def queue_paper_point(study: optuna.Study) -> None:
    """Queue the paper's point unless a trial of it has finished, runs or waits: one that failed
    (interrupted, or its process died) is queued again, so that every study measures it."""
    if not any(t.user_attrs.get("paper") and t.state.name != "FAIL" for t in study.trials):
        study.enqueue_trial(PAPER_POINT, user_attrs={"paper": True})


def paper_trial(trials: list) -> optuna.trial.FrozenTrial | None:
    """The trial of the paper's point: the one that did not fail, else the last one."""
    ours = [t for t in trials if t.user_attrs.get("paper")]
    return next((t for t in ours if t.state.name != "FAIL"), ours[-1] if ours else None)


# ----------------------------------------------------------------------------- one trial

def write_failure(e: BaseException, url: str) -> WriteError | None:
    """The failed write behind `e`, as one line: of a trial's files (train.py's WriteError) or of the
    study's database (SQLite on a full or read-only disk); None if `e` is something else."""
    for cause in causes(e):
        if isinstance(cause, WriteError):
            return cause.explained(KEPT, AGAIN)
        found = re.search(r"database or disk is full|readonly database|disk I/O error", str(cause))
        if found and type(cause).__module__.split(".")[0] in ("sqlite3", "sqlalchemy"):
            db = Path(url.split(":///", 1)[1]) if url.startswith("sqlite:///") else Path(shown_url(url))
            read_only = db.parent.is_dir() and os.statvfs(db.parent).f_flag & os.ST_RDONLY
            code = {"database or disk is full": errno.ENOSPC, "disk I/O error": errno.EIO}.get(
                found.group(), errno.EROFS if read_only else errno.EACCES)
            why, remedy = reason(OSError(code, os.strerror(code)), db)
            return WriteError("the study", db, why, remedy, KEPT, AGAIN)
    return None


def _note(trial: optuna.Trial, text: str) -> None:
    """Record a note on the trial, if its database can still be written."""
    with contextlib.suppress(Exception):  # the note says why the study's database could not be written
        trial.set_user_attr("note", text[:300])


def make_objective(fixed: list[str], folder: Path, device, fatal: list[Exception], url: str) -> Callable:
    """The objective: train the trial's command line with train.fit, report each epoch, return the best.
    An error no other trial would escape (bad fixed flags, a disk that cannot be written) stops the
    study and goes into `fatal`."""
    import optuna

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial)
        flags = [*fixed, *trial_flags(params)]
        trial_dir = folder / f"trial-{trial.number:04d}"
        trial.set_user_attr("flags", flags)
        print(f"trial {trial.number}: {command_line([*flags, '--out', str(trial_dir)])}", flush=True)
        best = {"acc": -1.0, "epoch": 0}

        def report(run: Run) -> None:
            row = run.progress.history[-1]
            if row["val_acc"] is None:  # an epoch not evaluated (--eval-every): nothing to report
                return
            if row["val_acc"] > best["acc"]:
                best.update(acc=row["val_acc"], epoch=row["epoch"])
            trial.report(row["val_acc"], row["epoch"])
            if row["epoch"] < run.cfg.epochs and trial.should_prune():  # after the last epoch it would save nothing
                trial.set_user_attr("note", f"behind the earlier trials after epoch {row['epoch']}")
                raise optuna.TrialPruned(f"epoch {row['epoch']}: val acc {row['val_acc']:.2f}%")

        code = None
        try:
            given, _ = parse_args([*flags, "--out", str(trial_dir)])
            code = train.fit(fresh_config(given), device=device, after_epoch=report, overwrite=True)
        except train.NonFiniteLoss:
            trial.set_user_attr("note", "diverged: the loss became non-finite")
            raise optuna.TrialPruned("diverged") from None
        except optuna.TrialPruned:  # from report(), through fit
            raise
        except (UsageError, DataError, CheckpointError) as e:  # the fixed flags cannot work: no trial would
            fatal.append(e)
            _note(trial, f"failed: {e}")
            trial.study.stop()
            raise
        except Exception as e:  # a bug or a machine problem: say where, and go on with the next trial
            failed = write_failure(e, url)
            if failed is not None:  # no trial would write what this one could not
                fatal.append(failed)
                _note(trial, f"failed: {failed}")
                trial.study.stop()
                raise failed from None
            traceback.print_exc()
            trial.set_user_attr("note", f"failed: {type(e).__name__}: {' '.join(str(e).split())}"[:300])
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: stopped at once
            trial.set_user_attr("note", "interrupted")
            raise
        finally:
            with contextlib.suppress(Exception):  # a database that cannot be written is said above
                trial.set_user_attr("best_epoch", best["epoch"])
            if not code:  # a trial stopped by a signal keeps the last.pth train.py just pointed to
                for name in (train.BEST_NAME, train.LAST_NAME):  # the best command retrains: free the disk
                    (trial_dir / name).unlink(missing_ok=True)
        if code:
            trial.set_user_attr("note", f"interrupted by signal {code - 128}")
            raise KeyboardInterrupt
        return best["acc"]

    return objective


def outcome(trial: optuna.trial.FrozenTrial) -> str:
    """How a trial ended: state, the epochs it reported, its best selection accuracy, a note."""
    values = trial.intermediate_values
    result = f"best val acc {max(values.values()):.2f}% in {len(values)} epoch(s)" if values else "no epoch finished"
    note = trial.user_attrs.get("note", "")
    return f"{trial.state.name.lower()}, {result}{f' ({note})' if note else ''}"


def trial_line(trial: optuna.trial.FrozenTrial) -> str:
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    return f"trial {trial.number}: {outcome(trial)} | {describe(trial.params)} | {seconds:.0f} s"


# ----------------------------------------------------------------------------- outputs

def _replace(path: Path, write: Callable[[Path], None], what: str) -> None:
    """Write through a temporary file (per process: several may share the folder), then rename; a
    failed write raises WriteError."""
    with replaced(path, what) as tmp:
        write(tmp)


def ranked(trials: list) -> list:
    """The complete trials, best first."""
    return sorted((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: -t.value)


def write_csv(trials: list, path: Path) -> None:
    rank = {t.number: i + 1 for i, t in enumerate(ranked(trials))}
    columns = ["number", "state", "rank", "val_acc", "best_epoch", "epochs_run", "optimizer", "lr", "momentum",
               "weight_decay", "seconds", "paper", "note", "command"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(columns)
            for t in trials:
                values = t.intermediate_values
                flags = t.user_attrs.get("flags")
                out.writerow([t.number, t.state.name, rank.get(t.number, ""),
                              f"{max(values.values()):.2f}" if values else "", t.user_attrs.get("best_epoch", ""),
                              len(values), t.params.get("optimizer", ""),
                              *(f"{t.params[k]:.4g}" if k in t.params else "" for k in ("lr", "momentum")),
                              f"{t.params.get('weight_decay', 0.0):.4g}" if t.params else "",
                              f"{t.duration.total_seconds():.1f}" if t.duration else "",
                              "yes" if t.user_attrs.get("paper") else "", t.user_attrs.get("note", ""),
                              command_line(flags) if flags else ""])
    _replace(path, write, "the table")


def save_plots(study: optuna.Study, folder: Path) -> list[str]:
    """Optimization history, parameter importances and parallel coordinates as PNG; what was written
    or why not (importances need two complete trials)."""
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as oplt
    plt.switch_backend("agg")  # files only, no display
    complete = len(ranked(study.trials))
    plots = {"history.png": oplt.plot_optimization_history, "parallel.png": oplt.plot_parallel_coordinate,
             "importances.png": oplt.plot_param_importances}
    done = []
    for name, plot in plots.items():
        need = 2 if name == "importances.png" else 1
        if complete < need:
            done.append(f"{name} skipped (needs {need} complete trial{'s' * (need > 1)}, the study has {complete})")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)  # "few trials in a regime": the plot says enough
                ax = plot(study)
            fig = ax.figure if hasattr(ax, "figure") else np.ravel(ax)[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            _replace(folder / name, lambda tmp, fig=fig: fig.savefig(tmp, dpi=90, format="png"), "the plot")
            plt.close(fig)
            done.append(str(folder / name))
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            done.append(f"{name} skipped ({' '.join(str(e).split())[:120]})")
    return done


def summarize(study: optuna.Study, folder: Path, shown_storage: str) -> str | None:
    """Write the CSV, the plots and the best command; print the summary. Returns the best command."""
    trials = study.trials
    write_csv(trials, folder / "trials.csv")
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    print(f"study {study.study_name!r} in {shown_storage}: {len(trials)} trial(s): "
          + ", ".join(f"{n} {s.lower()}" for s, n in states.items() if n))
    best = ranked(trials)
    paper = paper_trial(trials)
    if paper is not None:
        if paper.state.name == "COMPLETE":
            place = f"rank {best.index(paper) + 1} of {len(best)} complete, val acc {paper.value:.2f}%"
        else:
            place = outcome(paper)
        print(f"the paper's point (trial {paper.number}: {describe(paper.params)}): {place}")
    for line in save_plots(study, folder):
        print(f"plot: {line}")
    print(f"table: {folder / 'trials.csv'}")
    if not best:
        print("no trial has completed yet, so there is no best command")
        return None
    top = best[0]
    command = command_line([*top.user_attrs["flags"], "--out", str(folder / "best")])
    _replace(folder / "best_command.txt", lambda tmp: tmp.write_text(command + "\n"), "the best command")
    print(f"best: trial {top.number}, val acc {top.value:.2f}% at epoch {top.user_attrs.get('best_epoch')} "
          f"({describe(top.params)}); its command is in {folder / 'best_command.txt'}:")
    print(command)
    return command


# ----------------------------------------------------------------------------- the command line

def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Search optimizer, learning rate, momentum and weight decay with Optuna. "
                      "Any other flag is a train.py flag that stays fixed in every trial (train.py --help).",
                      allow_abbrev=False)  # so that a train.py flag is never taken for one of these
    p.add_argument("--trials", type=NONNEG_INT, required=True,
                   help="trials this process runs, added to the study's (run again to add more; 0: only write "
                   "the table, the plots and the best command)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/optuna.db); a PostgreSQL or "
                   "MySQL URL lets processes on many machines share one study")
    p.add_argument("--study", default="resnet9", help="study name (default: resnet9)")
    p.add_argument("--out", default="tune", help="folder for the SQLite study and, under OUT/STUDY/, the trials, "
                   "the table, the plots and the best command (default: tune)")
    p.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"),
                   help="stop a trial behind the median of earlier ones at the same epoch, or by Hyperband's "
                   "rule (default: median)")
    p.add_argument("--sampler-seed", type=NONNEG_INT, default=0, help="seed of the TPE sampler (default: 0)")
    return p


def fixed_flags(rest: list[str]) -> tuple[list[str], TrainConfig]:
    """The train.py flags that stay fixed, checked, with the best-weights reload made explicit (its
    default may change); and the config they give."""
    given, args = parse_args(rest)
    for name in ("resume", "overwrite"):
        if hasattr(args, name):
            raise UsageError(f"--{name} is not for tune.py: each trial is a new run in OUT/STUDY/trial-NNNN")
    searched = [k for k in SEARCHED if k in given]
    if searched:
        raise UsageError(f"--{searched[0].replace('_', '-')} is what tune.py searches; leave it out "
                         "(the search space is in docs/tuning.md)")
    cfg = fresh_config(given)
    if cfg.val_size == 0:
        raise UsageError("--val-size 0 would select on the test set; tune.py selects on held-out training images "
                         "only: give --val-size N > 0 (default 5000)")
    reload_flag = [] if "reload_best" in given else ["--reload-best" if cfg.reload_best else "--no-reload-best"]
    return [*rest, *reload_flag], cfg


def main(argv: list[str] | None = None) -> int:
    args, rest = get_args_parser().parse_known_args(argv)
    made: list[Path] = []  # folders made here, removed again if the study cannot be opened
    try:
        if "WORLD_SIZE" in os.environ:
            raise UsageError("tune.py runs each trial in one process: start more tune.py processes on one "
                             "study instead of torchrun")
        if not STUDY_NAME.fullmatch(args.study):
            raise UsageError(f"--study {args.study!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
        flags, cfg = fixed_flags(rest)
        device = pick_device(cfg.device)
        import_optuna()
        out = Path(args.out)
        folder = out / args.study
        made = missing_folders(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why, remedy = reason(e, folder)
            raise UsageError(f"cannot write to --out {out}: {why}; {remedy}") from None
        url = args.storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
        storage = open_storage(url)
        recipe = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in PLACE and k not in SEARCHED}
        try:
            study = open_study(storage, args.study, trial_seeded_tpe(args.sampler_seed),
                               make_pruner(args.pruner, cfg.epochs), recipe)
        except Exception as e:  # a database on a full or read-only disk: refused before any trial, in one line
            raise UsageError(str(_failed_write(e, url))) from None
    except (UsageError, ValueError) as e:
        remove_empty(made)
        print(f"error: {e}", file=sys.stderr)
        return 2
    shown = shown_url(url)
    finished = sum(t.state.is_finished() for t in study.trials)
    print(f"study {args.study!r} in {shown}: {finished} finished trial(s) so far; adding {args.trials}, "
          f"{cfg.epochs} epoch(s) each on device {device}; pruner {args.pruner}; outputs in {folder}", flush=True)
    fatal: list[Exception] = []
    start, code, best = time.perf_counter(), 0, None
    try:
        study.optimize(make_objective(flags, folder, device, fatal, url), n_trials=args.trials, catch=(Exception,),
                       callbacks=[lambda study, trial: print(trial_line(trial), flush=True)])
    except KeyboardInterrupt:
        print("stopped by a signal: the running trial is recorded as failed; the study keeps every finished "
              "trial (run the same command to add more)", file=sys.stderr, flush=True)
        code = 130
    except Exception as e:  # the study's database could not be written while a trial was recorded
        fatal.append(_failed_write(e, url))
    print(f"this process ran for {(time.perf_counter() - start) / 60:.1f} min")
    try:  # the workers of a study share its folder: each trial has its own (locked by train.fit), and the
        with hold(folder, "--out", wait=True):  # summary files are written by one worker at a time
            best = summarize(study, folder, shown)
    except Exception as e:  # a full or read-only disk: the first failure is the one said
        fatal.append(_failed_write(e, url))
    if fatal:
        print(f"error: {fatal[0]}", file=sys.stderr)
        return 1 if isinstance(fatal[0], WriteError) else 2
    return code or (0 if best else 1)


def _failed_write(e: Exception, url: str) -> WriteError:
    """`e` as a failed write, or `e` raised again if it is something else."""
    failed = write_failure(e, url)
    if failed is None:
        raise e
    return failed


if __name__ == "__main__":
    sys.exit(main())

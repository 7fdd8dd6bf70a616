"""TensorBoard logging for train.py --tensorboard [DIR] (docs/tensorboard.md).

    python train.py --tensorboard                 # logs to runs/<run id>
    tensorboard --logdir runs

Per epoch (step = epoch): loss and accuracy of training and of the selection split, the learning
rate, images/s and seconds; the same numbers as history.json. Within epochs (step = optimizer step
of the run): the training loss at the loop's existing sync points, so logging adds no host sync. At
the start one grid of augmented training images; at the end the confusion matrix of the selection
split and the hyperparameters with the final metrics (the HPARAMS tab). Only rank 0 writes under
torchrun; elsewhere a TensorBoardLog without a writer does nothing. TensorBoard is an optional
package (requirements-optional.txt), imported only when logging is asked for.

TensorBoard's writer thread writes the events in the background, so a failed write (a full disk)
shows in a later call. The log then stops logging, and the failure is raised as one WriteError at
the next point all processes reach together: the end of an epoch (`epoch`), or the end of the run
(`hparams`).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from files.writes import WriteError, reason, write_error
from training.config import UsageError

AUTO = "auto"  # --tensorboard without a folder: runs/<run id>


def folder_for(setting: str, run_id: str) -> Path:
    """The log folder of a run: the one given, or runs/<run id> for `auto`."""
    return Path("runs") / run_id if setting == AUTO else Path(setting)


def require_tensorboard() -> None:
    """Fail in one line, before the run starts, if the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install -r requirements-optional.txt"
                         ) from None


class TensorBoardLog:
    """Writes a run's numbers and figures to TensorBoard event files; a no-op without a writer."""

    def __init__(self, folder: Path | None = None) -> None:
        self.writer, self.failure = None, None  # failure: a WriteError not raised yet
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter
            try:
                self.writer = SummaryWriter(log_dir=str(folder))
            except OSError as e:
                why, remedy = reason(e, folder)
                raise UsageError(f"--tensorboard {folder}: cannot write there ({why}); {remedy}") from None
            self._excepthook, threading.excepthook = threading.excepthook, self._quiet_writer_thread
        self.folder = folder
        self._last_sync = (0.0, 0.0)  # (loss sum, images) at the previous sync point of the epoch

    def _quiet_writer_thread(self, args) -> None:
        """The writer thread's failed write is raised again by the next call, as one line: no traceback."""
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            self._excepthook(args)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write (this one's, or the writer thread's earlier one) ends the log and is kept."""
        try:
            yield
        except OSError as e:
            self.failure = self.failure or write_error(e, self.folder, "the TensorBoard log") or \
                WriteError("the TensorBoard log", self.folder, str(e), "check the disk")
            self.close()

    def check(self) -> None:
        """Raise the failed write, if there was one since the last check."""
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure

    def start_epoch(self, partial: Sequence[float]) -> None:
        """Where the epoch's running sums start (non-zero when resumed mid-epoch)."""
        self._last_sync = (float(partial[0]), float(partial[2]))

    def sync_loss(self, global_step: int, loss_sum: float, images: float) -> None:
        """The mean training loss since the previous sync point, from sums already on the host."""
        last_loss, last_images = self._last_sync
        self._last_sync = (loss_sum, images)
        if self.writer is not None and images > last_images:
            with self._writing():
                self.writer.add_scalar("train_steps/loss", (loss_sum - last_loss) / (images - last_images),
                                       global_step)

    def epoch(self, row: dict, sel_name: str) -> None:
        """One history.json row; raises WriteError if the log could not be written since the last epoch."""
        if self.writer is not None:
            step, w = row["epoch"], self.writer
            with self._writing():
                for tag, key in epoch_tags(sel_name).items():
                    if row[key] is not None:  # the selection numbers of an epoch not evaluated (--eval-every)
                        w.add_scalar(tag, row[key], step)
                w.flush()
        self.check()

    def augmented_images(self, images: torch.Tensor, step: int = 0) -> None:
        """uint8 N x 3 x H x W training images as the augmentation hands them to the model."""
        if self.writer is None:
            return
        from torchvision.utils import make_grid
        with self._writing():
            self.writer.add_image("training/augmented_images", make_grid(images, nrow=8, padding=2), step)

    def confusion_matrix(self, cm: np.ndarray, classes: Sequence[str], sel_name: str, step: int, which: str) -> None:
        """The confusion matrix as a figure and as a table of counts (rows: true class)."""
        if self.writer is None:
            return
        from matplotlib.figure import Figure

        from reports import plots
        fig = Figure(figsize=(7, 6))
        ax = fig.subplots()
        fig.colorbar(plots.draw_confusion_matrix(ax, cm, classes), ax=ax)
        ax.set_title(f"{sel_name} split, {which}")
        fig.tight_layout()
        tag = f"confusion_matrix/{sel_name}"
        header = "| true \\ predicted | " + " | ".join(classes) + " |"
        rows = [f"| {name} | " + " | ".join(str(int(v)) for v in counts) + " |" for name, counts in zip(classes, cm,
                                                                                                       strict=True)]
        with self._writing():
            self.writer.add_figure(tag, fig, step)
            self.writer.add_text(tag, "\n".join([f"{which}; rows are true classes", "", header,
                                                 "|" + " --- |" * (len(classes) + 1), *rows]), step)

    def hparams(self, config: dict, metrics: dict[str, float]) -> None:
        """The run's hyperparameters with its final metrics, in this run's own event file; raises
        WriteError if the log could not be written since the last epoch."""
        if self.writer is not None:
            from torch.utils.tensorboard.summary import hparams
            plain = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}
            with self._writing():
                writer = self.writer._get_file_writer()  # add_hparams would start a second run in a subfolder
                for summary in hparams(plain, metrics):
                    writer.add_summary(summary)
                for tag, value in metrics.items():
                    self.writer.add_scalar(tag, value)
                self.writer.flush()
        self.check()

    def close(self) -> None:
        """Close the writer; a failed write kept for `check` (never raised here: closing runs while
        another error may be on its way out)."""
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError as e:
                self.failure = self.failure or write_error(e, self.folder, "the TensorBoard log")
            threading.excepthook = self._excepthook


def epoch_tags(sel_name: str) -> dict[str, str]:
    """TensorBoard tag -> history.json key, for the per-epoch scalars."""
    return {"loss/train": "train_loss", f"loss/{sel_name}": "val_loss", "accuracy/train": "train_acc",
            f"accuracy/{sel_name}": "val_acc", "lr": "lr", "speed/images_per_second": "images_per_second",
            "time/epoch_seconds": "seconds", "time/training_seconds": "train_seconds"}

"""What a training run records as it goes: the CSV log (:class:`TrainLog`), the per-step loss statistics gathered
over processes (:class:`StepStatistics`) and a SIGTERM / SIGINT turned into a checkpoint-then-exit request (log lines
are kept above the progress bar by :func:`diffusers_bksdm.cli.logs_above_progress_bars`). Used by :mod:`diffusers_bksdm.training.train`."""

from __future__ import annotations

import csv
import os
import logging
import signal
import threading
import time
from typing import Any

import torch

from ..outputs import atomic_write

__all__ = ["LOSS_TERMS", "TrainLog", "StepStatistics"]

LOSS_TERMS = ("loss", "task_loss", "output_kd_loss", "feature_kd_loss")


#: the one logger of a training run, whichever module of the trainer writes
LOGGER_NAME = "diffusers_bksdm.training.train"


def _logger():
    from accelerate.logging import get_logger

    return get_logger(LOGGER_NAME, log_level="INFO")


class TrainLog:
    """A CSV file with one row per optimizer step (every loss term, per feature pair, learning rate, ...).

    On resumption, rows after the checkpoint's step are dropped so that the file reads like one straight run.
    """

    def __init__(self, path: str, fields: list[str], resume_step: int | None = None):
        self.path, self.fields = path, fields
        rows: list[dict[str, str]] = []
        if resume_step is not None and os.path.isfile(path):
            with open(path, encoding="utf-8", newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self._file = open(path, "a", encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=fields, extrasaction="ignore")

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop writes a checkpoint at the next step and exits. A second signal raises."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt(f"second signal {signum}")
        self.signal = signum
        logging.getLogger(LOGGER_NAME).warning(
            "Received %s: writing a checkpoint at the end of this step, then exiting.", signal.Signals(signum).name
        )

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, accelerator) -> int | None:
        """The signal received by any process (a collective call with several processes), or `None`."""
        if accelerator.num_processes == 1:
            return self.signal
        flag = torch.tensor([float(self.signal or 0)], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item()) or None


class StepStatistics:
    """The loss terms of each optimizer step, averaged over its micro-batches and processes, and the run's counters.

    :meth:`add` takes each micro-batch's :class:`~diffusers_bksdm.DistillationOutput`; :meth:`end_step` closes an
    optimizer step and returns its log row (every loss term, each feature pair, learning rate, gradient norm, ...).

    Args:
        pair_names (`list[str]`): the feature pairs, `"teacher->student"`; one `feat/<pair>` column each.
        device (`torch.device`): the accelerator's device (the sums are gathered across processes).
        samples (`int`, *optional*, defaults to 0): samples seen by all processes (a resumed run's count).
        skipped_steps (`int`, *optional*, defaults to 0): micro-batches whose loss was non-finite and skipped.
        nonfinite_in_a_row (`int`, *optional*, defaults to 0): optimizer steps skipped in a row for a non-finite
            loss or gradient (`--on_nonfinite skip`).
    """

    def __init__(self, pair_names: list[str], device: torch.device, *, samples: int = 0, skipped_steps: int = 0,
                 nonfinite_in_a_row: int = 0):
        self.pair_names = list(pair_names)
        self.device = device
        self.samples, self.skipped_steps, self.nonfinite_in_a_row = samples, skipped_steps, nonfinite_in_a_row
        self.window_nonfinite = False  # a micro-batch of this accumulation window (on any process) was non-finite
        self.last_row: dict[str, Any] = {}
        self.step_times: list[float] = []  # wall seconds of each optimizer step of this run
        self.step_cpu_times: list[float] = []  # process CPU seconds of each optimizer step of this run
        self._sums = torch.zeros(len(LOSS_TERMS) + len(self.pair_names), device=device, dtype=torch.float64)
        self._micro = 0
        self.start()

    def start(self) -> None:
        """Start the clocks: the run's (`started`) and the first step's."""
        self.started = self._step_started = time.perf_counter()
        self._step_cpu_started = time.process_time()

    @property
    def fields(self) -> list[str]:
        """The columns of a log row."""
        return ["step", "epoch", *LOSS_TERMS, "lr", "grad_norm", "samples", "skipped_steps", "update_skipped",
                *[f"feat/{p}" for p in self.pair_names]]

    @property
    def steps(self) -> int:
        """Optimizer steps taken in this run."""
        return len(self.step_times)

    def add(self, accelerator, output, batch_size: int) -> None:
        """Add one micro-batch's loss terms (the mean over processes) and count its samples (a collective call)."""
        terms = [output.loss, output.task_loss, output.output_kd_loss, output.feature_kd_loss,
                 *[output.feature_losses[p] for p in self.pair_names]]
        terms = torch.cat([torch.stack([t.detach().to(torch.float64) for t in terms]),
                           torch.tensor([float(output.skipped), float(batch_size)], dtype=torch.float64,
                                        device=self.device)])
        gathered = accelerator.gather(terms[None])
        self._sums += gathered[:, :-2].mean(0)
        self.samples += int(gathered[:, -1].sum().item())
        self.window_nonfinite = self.window_nonfinite or bool(gathered[:, -2].max().item() > 0)
        self._micro += 1
        self.skipped_steps += int(output.skipped)

    def end_step(self, *, step: int, epoch: int, lr: float, grad_norm: Any, update_skipped: bool) -> dict[str, Any]:
        """Close an optimizer step: time it, average its micro-batches and return its log row."""
        now, now_cpu = time.perf_counter(), time.process_time()
        self.step_times.append(now - self._step_started)
        self.step_cpu_times.append(now_cpu - self._step_cpu_started)
        self._step_started, self._step_cpu_started = now, now_cpu
        self.window_nonfinite = False
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if update_skipped else 0
        means = (self._sums / max(self._micro, 1)).tolist()
        self._sums.zero_()
        self._micro = 0
        self.last_row = {"step": step, "epoch": epoch, **dict(zip(LOSS_TERMS, means[: len(LOSS_TERMS)], strict=True)),
                         "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                         "samples": self.samples, "skipped_steps": self.skipped_steps,
                         "update_skipped": int(update_skipped),
                         **{f"feat/{p}": v for p, v in zip(self.pair_names, means[len(LOSS_TERMS):], strict=True)}}
        return self.last_row

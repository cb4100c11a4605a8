"""Progress while training: rank 0 measures its steps and, once per interval, sends one record
through a Ray queue; the driver prints each as one line (epoch, step/total, per-task loss,
samples/s, ETA). Ray Train's own reports stay once per epoch, so Tune and checkpoints see epochs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from typing import Self


@dataclass
class Progress:
    """One progress record: where rank 0 is, its running mean loss per task this epoch, and the
    speed and time left of the training steps (evaluation and checkpoints not counted)."""

    epoch: int  # 0-based
    epochs: int
    step: int
    steps: int
    losses: dict[str, float]
    samples_per_s: float
    eta_s: float
    step_s: float = 0.0  # mean seconds per training step this epoch


def mlflow_metrics(p: Progress) -> list[tuple[str, float, int]]:
    """(key, value, step) for MLflow: the step counts training steps over all epochs so far, so
    curves from several epochs line up on one axis."""
    step = p.epoch * p.steps + p.step
    out = [("train/samples_per_s", p.samples_per_s, step), ("train/step_time_s", p.step_s, step)]
    out += [(f"train/{task}/loss", loss, step) for task, loss in sorted(p.losses.items())]
    return out


def format_line(p: Progress) -> str:
    losses = " ".join(f"{task} {value:.4f}" for task, value in sorted(p.losses.items()))
    return (
        f"epoch {p.epoch + 1}/{p.epochs}  step {p.step}/{p.steps}  loss {losses}  "
        f"{p.samples_per_s:.1f} samples/s  ETA {_clock(p.eta_s)}"
    )


def _clock(seconds: float) -> str:
    total = round(seconds)
    return f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"


class StepMeter:
    """Rank 0's step hook: a record every `every_s` seconds and at each epoch's last step.
    Speed is measured from the epoch's first step, so evaluation pauses never count."""

    def __init__(
        self,
        send: Callable[[Progress], None],
        every_s: float,
        epochs: int,
        samples_per_step: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.send = send
        self.every_s = every_s
        self.epochs = epochs
        self.samples_per_step = samples_per_step
        self.clock = clock
        self._epoch = -1
        self._start = (0.0, 0)  # (time, step) of the epoch's first step
        self._last = 0.0

    def __call__(self, epoch: int, step: int, steps: int, losses: dict[str, float]) -> None:
        now = self.clock()
        if epoch != self._epoch:
            self._epoch, self._start, self._last = epoch, (now, step), now
        if now - self._last < self.every_s and step < steps:
            return
        self._last = now
        began, first = self._start
        rate = (step - first) / (now - began) if now > began and step > first else 0.0
        left = steps - step + (self.epochs - epoch - 1) * steps
        self.send(
            Progress(
                epoch=epoch,
                epochs=self.epochs,
                step=step,
                steps=steps,
                losses=dict(losses),
                samples_per_s=rate * self.samples_per_step,
                eta_s=left / rate if rate else 0.0,
                step_s=1 / rate if rate else 0.0,
            )
        )


def queue_sender(queue: Any) -> Callable[[Progress], None]:
    """Send records into a `ray.util.queue.Queue`; a full queue or a gone driver costs the line,
    never the training run (progress is best effort)."""

    def send(p: Progress) -> None:
        with contextlib.suppress(Exception):
            queue.put_nowait(asdict(p))

    return send


class ProgressPrinter:
    """The driver's side: a queue the workers write to and a thread printing what arrives (and
    handing it to `on_record`, e.g. the MLflow logger). Use as a context manager around
    `trainer.fit()`; `queue` goes into the loop config."""

    def __init__(
        self, console: Console, on_record: Callable[[Progress], None] | None = None
    ) -> None:
        from ray.util.queue import Queue

        self.console = console
        self.on_record = on_record
        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="polytask-progress", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()
        self.queue.shutdown()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                record = self.queue.get(block=True, timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - Ray going away ends the printing, not the run
                return
            self._print(record)

    def _drain(self) -> None:
        try:
            records = self.queue.get_nowait_batch(self.queue.qsize())
        except Exception:  # noqa: BLE001
            return
        for record in records:
            self._print(record)

    def _print(self, record: dict[str, Any]) -> None:
        progress = Progress(**record)
        self.console.print(format_line(progress), highlight=False, soft_wrap=True)
        if self.on_record is not None:
            self.on_record(progress)

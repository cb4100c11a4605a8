"""Which batch comes next: the task of every step (`TaskSampler`), a task's batches from memory
(`TaskBatches`) or from a Ray Data shard (`StreamBatches`), padding (`collate`), eval batches.

Kept apart from `data` (loading, checking, tokenizing): this is what a Train worker runs each step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from polytask.tasks import IGNORE_INDEX
from polytask.training.data import DataError

if TYPE_CHECKING:
    import torch


def collate(
    features: list[dict[str, Any]], pad_token_id: int, token_labels: bool = False
) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest sequence (never to max_length); sequence labels (token
    tags, generation targets: their own length) pad with -100."""
    import torch

    pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if key == "labels" and not token_labels:
            is_float = isinstance(values[0], float) or (
                isinstance(values[0], list) and isinstance(values[0][0], float)
            )
            batch[key] = torch.tensor(values, dtype=torch.float32 if is_float else torch.long)
            continue
        pad = pad_values.get(key, 0)
        longest = max(len(v) for v in values)
        batch[key] = torch.tensor([v + [pad] * (longest - len(v)) for v in values], dtype=torch.long)
    return batch


# --- sharding, batching and task sampling ------------------------------------------------------


def shard_indices(n: int, rank: int, world_size: int, seed: int, epoch: int = 0) -> np.ndarray:
    """This rank's disjoint slice of a seeded permutation: ranks never share an example."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[rank::world_size]


def batch_indices(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


class TaskSampler:
    """Picks the task of every step. Same sequence on every rank (so DDP steps stay in lockstep),
    a pure function of (seed, epoch, step), so its state is just the position."""

    def __init__(
        self,
        sizes: dict[str, int],
        strategy: str,
        temperature: float = 2.0,
        seed: int = 0,
        epochs: int = 1,
        steps_per_epoch: int | None = None,
        batch_size: int = 1,
    ) -> None:
        self.sizes = dict(sizes)
        self.strategy = strategy
        self.temperature = temperature
        self.seed = seed
        self.epochs = epochs
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch or sum(
            math.ceil(n / batch_size) for n in sizes.values()
        )
        self.epoch = 0
        self.step = 0

    def probabilities(self, epoch: int | None = None) -> dict[str, float]:
        epoch = self.epoch if epoch is None else epoch
        n = np.array([self.sizes[t] for t in self.sizes], dtype=np.float64)
        if self.strategy == "uniform":
            w = np.ones_like(n)
        elif self.strategy == "proportional":
            w = n
        else:
            temp = self.temperature
            if self.strategy == "annealed" and self.epochs > 1:
                temp = self.temperature - (self.temperature - 1.0) * epoch / (self.epochs - 1)
            w = n ** (1.0 / temp)
        return dict(zip(self.sizes, w / w.sum()))

    def schedule(self, epoch: int) -> list[str]:
        """The task of each step of `epoch`."""
        names = list(self.sizes)
        probs = self.probabilities(epoch)
        rng = np.random.default_rng([self.seed, epoch, 7])
        return [names[i] for i in rng.choice(len(names), self.steps_per_epoch, p=[probs[t] for t in names])]

    def __iter__(self) -> Iterator[str]:
        """Remaining tasks of the current epoch, advancing the checkpointable position."""
        plan = self.schedule(self.epoch)
        while self.step < len(plan):
            task = plan[self.step]
            self.step += 1
            yield task

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


class TaskBatches:
    """Per-task batch streams over this rank's shard, reshuffled on every pass. Streams restart
    from (seed, epoch) at each epoch, so a run resumed from an epoch checkpoint sees the same data."""

    def __init__(
        self,
        features: dict[str, list[dict[str, Any]]],
        token_tasks: set[str],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        pad_token_id: int,
    ) -> None:
        self.features = features
        self.token_tasks = token_tasks
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        self._streams = {t: self._stream(t, epoch) for t in self.features}

    def _stream(self, task: str, epoch: int) -> Iterator[np.ndarray]:
        n = len(self.features[task])
        for rnd in range(10**9):
            shard = shard_indices(n, self.rank, self.world_size, self.seed, epoch * 100_003 + rnd)
            if len(shard) == 0:  # fewer examples than ranks: reuse rather than stall DDP
                shard = np.arange(n)
            yield from batch_indices(shard, self.batch_size)

    def next(self, task: str) -> dict[str, torch.Tensor]:
        idx = next(self._streams[task])
        feats = [self.features[task][i] for i in idx]
        return collate(feats, self.pad_token_id, token_labels=task in self.token_tasks)


SHUFFLE_BUFFER_ROWS = 4096  # a streamed shard is shuffled within a window of this many rows


class StreamBatches:
    """TaskBatches over Ray Data: one dataset shard iterator per task (`ray.train.get_dataset_shard`),
    read pass after pass. Every pass is shuffled within a SHUFFLE_BUFFER_ROWS window seeded by
    (seed, epoch, pass), and the shards arrive in a fixed order (DataConfig preserve_order), so
    a resumed epoch sees the same batches as the first try.

    Ray Data's split gives every rank as many rows, so in lockstep all ranks finish a pass at
    the same step: a new pass starts the split's next epoch, a barrier over all ranks."""

    def __init__(
        self,
        shards: dict[str, Any],
        token_tasks: set[str],
        batch_size: int,
        seed: int,
        pad_token_id: int,
    ) -> None:
        self.shards = shards
        self.token_tasks = token_tasks
        self.batch_size = batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self._streams: dict[str, Iterator[list[dict[str, Any]]]] = {}

    def start_epoch(self, epoch: int) -> None:
        for stream in self._streams.values():
            stream.close()  # type: ignore[attr-defined]  # ends the pass early: Ray stops reading
        self._streams = {t: self._stream(t, epoch) for t in self.shards}

    def _stream(self, task: str, epoch: int) -> Iterator[list[dict[str, Any]]]:
        for rnd in itertools.count():
            seed = int(np.random.SeedSequence([self.seed, epoch, rnd]).generate_state(1)[0])
            empty = True
            for table in self.shards[task].iter_batches(
                batch_size=self.batch_size,
                batch_format="pyarrow",
                local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                local_shuffle_seed=seed,
            ):
                empty = False
                yield table.to_pylist()
            if empty:
                raise DataError(f"tasks.{task}: this worker's shard of the train split is empty")

    def next(self, task: str) -> dict[str, torch.Tensor]:
        return collate(next(self._streams[task]), self.pad_token_id, task in self.token_tasks)


class JointBatches:
    """In-memory and streamed tasks in one run: each task's batches come from its own source."""

    def __init__(self, memory: TaskBatches, streamed: StreamBatches) -> None:
        self.parts = (memory, streamed)
        self.source = {t: memory for t in memory.features} | {t: streamed for t in streamed.shards}

    def start_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.start_epoch(epoch)

    def next(self, task: str) -> dict[str, torch.Tensor]:
        return self.source[task].next(task)


def eval_batches(
    features: list[dict[str, Any]], batch_size: int, pad_token_id: int, token_labels: bool
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Length-sorted evaluation batches (less padding), yielding the original indices too."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    for chunk in batch_indices(np.asarray(order), batch_size):
        yield list(chunk), collate([features[i] for i in chunk], pad_token_id, token_labels)

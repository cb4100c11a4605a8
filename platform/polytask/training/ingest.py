"""Train splits as Ray Datasets: read (`read_csv` / `read_json` / `read_parquet`, or `from_items`
for what the driver had to parse itself) and tokenized by `map_batches` on Ray's workers, then
split across the Train workers by Ray Train's DataConfig. The driver never holds a streamed
table file's rows nor any streamed split's tokenized features. Only tasks whose train split
streams (`data.streams`) get a dataset: small data never starts Ray Data.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from polytask.config import ExperimentConfig, TaskConfig
from polytask.tasks import TaskSpec
from polytask.training.data import (
    Record,
    TaskData,
    TrainSource,
    batch_records,
    csv_parse_options,
    tokenize_records,
)

TOKENIZE_BATCH_ROWS = 512
# Reading and tokenizing reserve no CPU: Train's workers (and a sweep's concurrent trials) may
# hold every CPU of a small cluster, and a data task waiting for one would stall training forever.
# Their number is capped instead, else Ray Data starts dozens of them on the trainers' cores: at
# most DATA_TASKS read tasks and DATA_TASKS tokenize tasks at a time per task's dataset.
DATA_TASK_CPUS = 0
DATA_TASKS = 1
# Small blocks: each pass's first batch waits for the first block to be tokenized whole (Ray's
# default target is 128 MiB); read-ahead is capped too (see data_config)
BLOCK_BYTES = 1 << 20
READ_AHEAD_BYTES = 32 << 20


class Tokenize:
    """The map_batches function: a chunk of rows (a table, or JSON-encoded Records) → features.
    Holds the tokenizer itself, so workers never reload it from the encoder's files."""

    def __init__(self, task: TaskConfig, spec: TaskSpec, tokenizer: Any, max_length: int,
                 names: list[str] | None, where: str) -> None:
        self.task, self.spec, self.tokenizer = task, spec, tokenizer
        self.max_length, self.names, self.where = max_length, names, where

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        columns = batch.to_pydict()
        if "record" in columns:
            records = [Record(**json.loads(r)) for r in columns["record"]]
        else:
            records = batch_records(self.task, columns, self.names, self.where)
        return pa.Table.from_pylist(
            tokenize_records(records, self.spec, self.tokenizer, self.max_length)
        )


def read_source(source: TrainSource) -> Any:
    """The Ray Dataset of a train file, read by Ray Data's workers with the driver's parser."""
    import ray.data

    cpus = {"num_cpus": DATA_TASK_CPUS, "concurrency": DATA_TASKS}
    if source.fmt == "parquet":
        ds = ray.data.read_parquet(source.path, **cpus)
    elif source.fmt == "jsonl":
        ds = ray.data.read_json(source.path, lines=True, **cpus)
    else:
        options = {"parse_options": csv_parse_options(source.fmt)} if source.fmt == "tsv" else {}
        ds = ray.data.read_csv(source.path, **options, **cpus)
    return ds.limit(source.limit) if source.limit else ds


def train_datasets(
    cfg: ExperimentConfig, task_data: dict[str, TaskData], tokenizer: Any
) -> dict[str, Any]:
    """One tokenized Ray Dataset per task (lazy: nothing is read until a Train worker iterates).
    A split the driver parsed (CoNLL, JSON, hub) rides as JSON-encoded Records via from_items."""
    import ray.data
    from ray.data import TaskPoolStrategy

    out = {}
    for task in (t for t in cfg.tasks if t.name in task_data):
        td = task_data[task.name]
        if td.source is not None:
            ds, names, where = read_source(td.source), td.source.names, td.source.path
        else:
            rows = [{"record": json.dumps(asdict(r))} for r in td.splits["train"] or []]
            ds, names, where = ray.data.from_items(rows), None, str(Path(task.data.train or ""))
        ds = ds.map_batches(
            Tokenize(task, td.spec, tokenizer, cfg.encoder.max_length, names, where),
            batch_format="pyarrow",
            batch_size=TOKENIZE_BATCH_ROWS,
            num_cpus=DATA_TASK_CPUS,
            compute=TaskPoolStrategy(size=DATA_TASKS),
        )
        ds.context.target_max_block_size = BLOCK_BYTES
        out[task.name] = ds
    return out


def data_config() -> Any:
    """Split every task's dataset across the Train workers in a fixed order (preserve_order),
    so each rank's shard is the same on every run and exact resume holds. Read-ahead is capped
    at READ_AHEAD_BYTES of blocks: past that the data tasks wait for training to consume, so a
    large split costs the trainers no more CPU than a small one."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train import DataConfig

    limits = ExecutionResources(object_store_memory=READ_AHEAD_BYTES)
    return DataConfig(
        execution_options=ExecutionOptions(preserve_order=True, resource_limits=limits)
    )

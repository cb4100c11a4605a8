"""Tokenization of an experiment's splits, the one place it is done: every task checked and
tokenized on the driver (bad data fails before Ray starts), except the train splits that stream
(`data.streaming`), which Ray Data reads and tokenizes (`polytask.training.ingest`).

`tokenize_split` is what the Ray runs (`tokenize_experiment`), the plain loop
(`loop.build_features`), the compression tool and the quality benchmark all call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from polytask.config import ExperimentConfig
from polytask.tasks import TaskSpec
from polytask.training.data import TaskData, load_task_data, tokenize_records
from polytask.training.ingest import train_datasets

TaskFeatures = dict[str, list[dict[str, Any]]]  # task name → tokenized examples


def tokenize_split(
    task_data: dict[str, TaskData],
    split: str,
    tokenizer: Any,
    max_length: int,
    spec_of: Callable[[str], TaskSpec] | None = None,
) -> TaskFeatures:
    """`split` of every task that has it, tokenized; `spec_of(name)` gives the label order to
    encode with (default: the data's own spec; a trained model passes its manifest's)."""
    return {
        name: tokenize_records(
            td.splits[split], spec_of(name) if spec_of else td.spec, tokenizer, max_length
        )
        for name, td in task_data.items()
        if td.splits.get(split)
    }


@dataclass
class Features:
    """An experiment's tokenized splits (train: only the in-memory tasks') and the loaded data
    they came from."""

    specs: list[TaskSpec]
    task_data: dict[str, TaskData]
    tokenizer: Any
    train: TaskFeatures  # the in-memory tasks' train features
    validation: TaskFeatures
    test: TaskFeatures = field(default_factory=dict)

    @property
    def train_rows(self) -> dict[str, int]:
        return {name: td.train_rows for name, td in self.task_data.items()}

    @property
    def streamed_rows(self) -> dict[str, int]:
        """Row counts of the streamed train splits (the worker's task schedule needs them)."""
        return {name: td.train_rows for name, td in self.task_data.items() if td.streamed}

    def train_datasets(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """One lazy, tokenizing Ray Dataset per streamed task (call once Ray is up); {} when
        every task is in memory, so Ray Data never starts."""
        streamed = {name: td for name, td in self.task_data.items() if td.streamed}
        return train_datasets(cfg, streamed, self.tokenizer) if streamed else {}


def tokenize_experiment(cfg: ExperimentConfig) -> Features:
    """Check every task's data and tokenize it, test only where `data.test` is given; a train
    split that streams is left to Ray Data (scanned, not kept, where its format allows)."""
    task_data = load_task_data(cfg, streaming=True)  # DataError: before any Ray worker
    tokenizer = load_tokenizer(cfg)
    max_length = cfg.encoder.max_length
    in_memory = {name: td for name, td in task_data.items() if not td.streamed}
    return Features(
        [td.spec for td in task_data.values()],
        task_data,
        tokenizer,
        tokenize_split(in_memory, "train", tokenizer, max_length),
        tokenize_split(task_data, "validation", tokenizer, max_length),
        tokenize_split(task_data, "test", tokenizer, max_length),
    )


def load_tokenizer(cfg: ExperimentConfig) -> Any:
    """Only the tokenizer: the driver tokenizes once and never holds the encoder weights."""
    from transformers import AutoTokenizer

    from polytask.model.network import resolve_encoder_path
    from polytask.training.base import base_bundle

    base = base_bundle(cfg)  # a polytask model: its own tokenizer, saved beside its encoder
    tokenizer = AutoTokenizer.from_pretrained(
        str(base / "encoder") if base else resolve_encoder_path(cfg.encoder.name_or_path),
        revision=None if base else cfg.encoder.revision,
        trust_remote_code=cfg.encoder.trust_remote_code,
        use_fast=True,
    )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"encoder.name_or_path '{cfg.encoder.name_or_path}' has no fast tokenizer; polytask "
            "aligns NER labels with fast tokenizers' word ids; pick one with tokenizer.json"
        )
    return tokenizer

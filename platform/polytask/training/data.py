"""Task data: load examples, check labels, tokenize (with NER label alignment), shard, batch, mix.

Every example becomes a plain dict of int lists, so the same features travel through Ray's
object store, a DataLoader, or a unit test without conversion.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from polytask.config import DataConfig, ExperimentConfig, TaskConfig
from polytask.model.inputs import texts_and_pairs
from polytask.tasks import IGNORE_INDEX, KINDS, TaskSpec

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

SPLITS = ("train", "validation", "test")
_EXT_FORMAT = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".conll": "conll",
    ".bio": "conll",
    ".iob": "conll",
}


class DataError(ValueError):
    """Bad data: names the task, the file and row, and what to change."""


@dataclass
class Record:
    """One example as read from its source; `where` locates it for error messages."""

    text: str | None = None
    text_pair: str | None = None
    tokens: list[str] | None = None
    label: Any = None
    where: str = ""


# --- loading -----------------------------------------------------------------------------------


def data_format(data: DataConfig) -> str:
    """The source format, inferred from `hub` or the train file extension when set to auto."""
    if data.format != "auto":
        return data.format
    if data.hub:
        return "hub"
    suffix = Path(data.train).suffix.lower()
    if suffix not in _EXT_FORMAT:
        raise DataError(
            f"data.train '{data.train}': cannot tell the format from '{suffix or 'no extension'}'; "
            f"set data.format to one of hub, csv, tsv, jsonl, parquet, conll"
        )
    return _EXT_FORMAT[suffix]


def load_split(cfg: ExperimentConfig, task: TaskConfig, split: str) -> list[Record] | None:
    """Records of one split of one task (None when the split is not configured)."""
    records = iter_split(cfg, task, split)
    return None if records is None else list(records)


def iter_split(cfg: ExperimentConfig, task: TaskConfig, split: str) -> Iterator[Record] | None:
    """One split's records, read a chunk at a time where the format allows (see STREAMED), so
    scanning a large train split holds one chunk, not the file; None when not configured."""
    data = task.data
    source = getattr(data, split)
    if source is None:
        return None
    fmt = data_format(data)
    limit = data.max_samples if split == "train" else data.max_eval_samples
    if fmt == "conll":
        records: Iterator[Record] = iter(read_conll(_existing(cfg, task, split, source)))
    elif fmt == "hub":
        import datasets

        ds = datasets.load_dataset(data.hub, data.hub_config, split=source)
        records = iter(_rows_to_records(task, ds, f"{data.hub}[{source}]"))
    elif fmt in STREAMED:
        path = _existing(cfg, task, split, source)
        records = _table_records(task, fmt, path)
    else:
        path = _existing(cfg, task, split, source)
        records = iter(_rows_to_records(task, _load_table(fmt, path), str(path)))
    return itertools.islice(records, limit) if limit else records


def _existing(cfg: ExperimentConfig, task: TaskConfig, split: str, source: str) -> Path:
    path = cfg.resolve_path(source)
    if not path.is_file():
        raise DataError(
            f"tasks.{task.name}.data.{split}: file '{path}' not found; fix the path "
            f"(relative paths resolve against {cfg.base_dir})"
        )
    return path


def _load_table(fmt: str, path: Path) -> Any:
    """A JSON file (an array or lines) through `datasets`, which reads both layouts."""
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train")


# Formats read with pyarrow's streaming readers, on the driver (checks) and by Ray Data (training)
STREAMED = ("csv", "tsv", "jsonl", "parquet")
_CHUNK_BYTES = 1 << 20


def csv_parse_options(fmt: str) -> Any:
    """TSV is read without quoting (GLUE-style TSV quotes freely); CSV with pyarrow's defaults."""
    import pyarrow.csv as pacsv

    return pacsv.ParseOptions(delimiter="\t", quote_char=False) if fmt == "tsv" else None


def table_batches(fmt: str, path: Path) -> Iterator[Any]:
    """pyarrow record batches of a local table, one chunk at a time (memory: one chunk)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=8192)
        return
    if fmt == "jsonl":
        reader = pajson.open_json(path, read_options=pajson.ReadOptions(block_size=_CHUNK_BYTES))
    else:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=_CHUNK_BYTES),
            parse_options=csv_parse_options(fmt),
        )
    yield from reader


def class_names(fmt: str, path: Path, task: TaskConfig) -> list[str] | None:
    """Label names stored with a parquet file written by `datasets` (a ClassLabel column)."""
    if fmt != "parquet":
        return None
    import datasets
    import pyarrow.parquet as pq

    features = datasets.Features.from_arrow_schema(pq.read_schema(path))
    level = KINDS[task.kind].level
    return _class_names(features.get(task.data.tags_field if level == "token" else task.data.label_field))


def _table_records(task: TaskConfig, fmt: str, path: Path) -> Iterator[Record]:
    import pyarrow as pa

    names = class_names(fmt, path, task)
    start = 0
    batches = table_batches(fmt, path)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except pa.ArrowException as exc:  # malformed rows, a column whose type changes midway
            raise DataError(
                f"tasks.{task.name}: {path} after row {start}: cannot read it as {fmt}: {exc}; "
                "fix the file (or set data.format)"
            ) from exc
        yield from batch_records(task, batch.to_pydict(), names, str(path), start)
        start += batch.num_rows


def _required_fields(task: TaskConfig) -> list[str]:
    kind = KINDS[task.kind]
    d = task.data
    fields = [d.tokens_field, d.tags_field] if kind.level == "token" else [d.text_field]
    if task.pair:
        fields.append(d.text_pair_field)
    if kind.level == "sentence":
        fields.append(d.label_field)
    return fields


def _check_columns(task: TaskConfig, columns: list[str], where: str) -> None:
    missing = [f for f in _required_fields(task) if f not in columns]
    if missing:
        raise DataError(
            f"tasks.{task.name}: {where} has no column(s) {missing}; columns are "
            f"{columns}; set data.text_field / text_pair_field / label_field / "
            "tokens_field to match"
        )


def batch_records(
    task: TaskConfig, columns: dict[str, list], names: list[str] | None, where: str, start: int = 0
) -> list[Record]:
    """Records of a table chunk given as columns (row numbers count from `start`): the one
    row → Record rule for the driver's checks and the Ray Data workers' tokenization."""
    _check_columns(task, list(columns), where)
    kind = KINDS[task.kind]
    d = task.data
    label_col = d.tags_field if kind.level == "token" else d.label_field
    labels = columns.get(label_col, [])
    out = []
    for i, label in enumerate(labels):
        if names is not None:
            label = [names[v] for v in label] if isinstance(label, list) else names[label]
        if task.kind == "multilabel" and isinstance(label, str):
            label = [x for x in label.split(d.label_separator) if x]
        rec = Record(label=label, where=f"{where} row {start + i + 1}")
        if kind.level == "token":
            rec.tokens = [str(t) for t in columns[d.tokens_field][i]]
        else:
            rec.text = columns[d.text_field][i]
            rec.text_pair = columns[d.text_pair_field][i] if task.pair else None
        out.append(rec)
    return out


def _rows_to_records(task: TaskConfig, ds: Any, where: str) -> list[Record]:
    """Records of a `datasets` table (hub, JSON): its ClassLabel names turn ids into words."""
    _check_columns(task, ds.column_names, where)
    kind = KINDS[task.kind]
    label_col = task.data.tags_field if kind.level == "token" else task.data.label_field
    names = _class_names(ds.features.get(label_col))
    return batch_records(task, ds.to_dict(), names, where)


def _class_names(feature: Any) -> list[str] | None:
    """Names of a datasets ClassLabel (or a Sequence of them), so labels read as words."""
    inner = getattr(feature, "feature", feature)
    return list(inner.names) if hasattr(inner, "names") else None


def read_conll(path: Path) -> list[Record]:
    """CoNLL column file: token first, tag last, blank line between sentences, -DOCSTART- skipped."""
    records: list[Record] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 1
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        cols = line.split("\t") if "\t" in line else line.split()
        if not line.strip() or cols[0] == "-DOCSTART-":
            if tokens:
                records.append(Record(tokens=tokens, label=tags, where=f"{path} line {start}"))
            tokens, tags, start = [], [], lineno + 1
            continue
        if len(cols) < 2:
            raise DataError(f"{path} line {lineno}: expected 'token<TAB>tag', got {line!r}")
        tokens.append(cols[0])
        tags.append(cols[-1].strip())
    if tokens:
        records.append(Record(tokens=tokens, label=tags, where=f"{path} line {start}"))
    return records


# --- labels ------------------------------------------------------------------------------------


def _labels_of(rec: Record, kind: str) -> list[str]:
    if kind in ("token_classification", "multilabel"):
        return [str(x) for x in rec.label]
    return [str(rec.label)]


def resolve_spec(
    task: TaskConfig,
    splits: dict[str, list[Record] | None],
    train: Iterable[Record] | None = None,
) -> tuple[TaskSpec, int]:
    """The task's label set (given, or inferred from train) checked against every split, and the
    number of train rows. `train` (default: splits['train']) is read once, so a streamed split
    is checked without being held."""
    given = ["value"] if task.kind == "regression" else task.labels
    seen, rows = _scan(task, "train", splits["train"] if train is None else train, given)
    if not rows:
        raise DataError(f"tasks.{task.name}.data.train: no examples were read; check the file")
    labels = list(given) if given is not None else _order_labels(seen, task.kind)
    if task.kind != "regression":
        for split, records in splits.items():
            if split != "train":
                _scan(task, split, records or [], labels)
    if len(labels) < (1 if task.kind == "regression" else 2):
        raise DataError(f"tasks.{task.name}: train data has labels {labels}; need at least two")
    spec = TaskSpec(
        name=task.name,
        kind=task.kind,
        labels=labels,
        dropout=task.head.dropout,
        hidden_dim=task.head.hidden_dim,
        threshold=task.head.threshold,
        metric=task.metric,
        pair=task.pair,
    )
    return spec, rows


def _scan(
    task: TaskConfig, split: str, records: Iterable[Record], allowed: list[str] | None
) -> tuple[set[str], int]:
    """Labels seen and rows counted in one pass; with `allowed`, the first row outside it fails."""
    check = task.kind != "regression" and allowed is not None
    allowed_set = set(allowed or ())
    seen: set[str] = set()
    rows = 0
    for rec in records:
        rows += 1
        if task.kind == "regression":
            continue
        labels = _labels_of(rec, task.kind)
        bad = [lab for lab in labels if lab not in allowed_set] if check else []
        if bad:
            raise DataError(
                f"tasks.{task.name} ({split}): {rec.where}: label '{bad[0]}' is not in the "
                f"label set {allowed}; fix the row or add it to tasks.{task.name}.labels"
            )
        seen.update(labels)
    return seen, rows


def _order_labels(seen: set[str], kind: str) -> list[str]:
    """Stable label order: 'O' first for tags, then by entity type and B before I; else sorted."""
    if kind == "token_classification":
        return sorted(seen, key=lambda t: (t != "O", t.partition("-")[2], t.partition("-")[0]))
    return sorted(seen, key=lambda x: (len(x), x) if x.lstrip("-").isdigit() else (0, x))


@dataclass
class TrainSource:
    """A train split that Ray Data reads and tokenizes on the workers (never the driver's rows)."""

    fmt: str
    path: str
    limit: int | None
    names: list[str] | None  # ClassLabel names stored with the file, if any


@dataclass
class TaskData:
    """One task's resolved spec and raw records per split. `streamed`: Ray Data tokenizes the
    train split (see `streams`); with a `source` too, that split is left in its file
    (splits['train'] is None) and only its row count is known."""

    spec: TaskSpec
    splits: dict[str, list[Record] | None]
    train_rows: int = 0
    source: TrainSource | None = None
    streamed: bool = False


STREAM_AUTO_BYTES = 64 << 20  # data.streaming: auto streams a train file larger than this


def streams(cfg: ExperimentConfig, task: TaskConfig) -> bool:
    """data.streaming resolved: true/false as set; auto streams only a large local table file,
    so small data keeps the in-memory path (and never starts Ray Data)."""
    setting = task.data.streaming
    if setting != "auto":
        return bool(setting)
    if data_format(task.data) not in STREAMED:
        return False
    path = cfg.resolve_path(task.data.train)
    return path.is_file() and path.stat().st_size > STREAM_AUTO_BYTES


def load_task_data(cfg: ExperimentConfig, streaming: bool = False) -> dict[str, TaskData]:
    """Load and check every task before any training starts, so bad data fails fast.

    With `streaming`, a task whose train split streams (`streams`) is marked for Ray Data, and
    if its format is STREAMED the split is only scanned (labels checked, rows counted) a chunk
    at a time and kept as a TrainSource for Ray Data to read."""
    out = {}
    for task in cfg.tasks:
        streamed = streaming and streams(cfg, task)
        scanned = streamed and data_format(task.data) in STREAMED
        splits = {
            split: None if scanned and split == "train" else load_split(cfg, task, split)
            for split in SPLITS
        }
        train = iter_split(cfg, task, "train") if scanned else None
        spec, rows = resolve_spec(task, splits, train)
        source = None
        if scanned:
            fmt, path = data_format(task.data), cfg.resolve_path(task.data.train)
            source = TrainSource(fmt, str(path), task.data.max_samples, class_names(fmt, path, task))
        out[task.name] = TaskData(spec, splits, rows, source, streamed)
    return out


# --- tokenization ------------------------------------------------------------------------------


def tokenize_records(
    records: list[Record], spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[dict[str, Any]]:
    """Records → features (input_ids, attention_mask, [token_type_ids], labels), unpadded."""
    kind = spec.task_kind
    if kind.level == "token":
        enc = tokenizer(
            [r.tokens for r in records],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
        )
    else:
        texts, pairs = texts_and_pairs(records, spec.pair)
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    features = []
    for i, rec in enumerate(records):
        feat = {k: enc[k][i] for k in enc}
        if kind.level == "token":
            feat["labels"] = align_labels(enc.word_ids(i), [spec.labels.index(t) for t in rec.label])
        else:
            feat["labels"] = kind.encode_target(rec.label, spec)
        features.append(feat)
    return features


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Label the first sub-token of each word; other sub-tokens and specials get IGNORE_INDEX."""
    out, previous = [], None
    for wid in word_ids:
        out.append(word_labels[wid] if wid is not None and wid != previous else IGNORE_INDEX)
        previous = wid
    return out


def collate(
    features: list[dict[str, Any]], pad_token_id: int, token_labels: bool = False
) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest sequence (never to max_length); token labels pad with -100."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
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

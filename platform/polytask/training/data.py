"""Task data: load examples, check labels, tokenize (with NER label alignment); `batches` mixes them.

Every example becomes a plain dict of int lists, so the same features travel through Ray's
object store, a DataLoader, or a unit test without conversion.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polytask.config import DataConfig, ExperimentConfig, TaskConfig
from polytask.model.inputs import texts_and_pairs
from polytask.tasks import IGNORE_INDEX, KINDS, GenerationSpec, TaskSpec

if TYPE_CHECKING:
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
    return _class_names(features.get(label_column(task)))


def label_column(task: TaskConfig) -> str:
    """The column a task learns from: tags (token tasks), the target text (generation) or the label."""
    level = KINDS[task.kind].level
    d = task.data
    return {"token": d.tags_field, "sequence": d.target_field}.get(level, d.label_field)


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
    if kind.level != "token":
        fields.append(label_column(task))
    return fields


def _check_columns(task: TaskConfig, columns: list[str], where: str) -> None:
    missing = [f for f in _required_fields(task) if f not in columns]
    if missing:
        raise DataError(
            f"tasks.{task.name}: {where} has no column(s) {missing}; columns are "
            f"{columns}; set data.text_field / text_pair_field / label_field / "
            "target_field / tokens_field to match"
        )


def batch_records(
    task: TaskConfig, columns: dict[str, list], names: list[str] | None, where: str, start: int = 0
) -> list[Record]:
    """Records of a table chunk given as columns (row numbers count from `start`): the one
    row → Record rule for the driver's checks and the Ray Data workers' tokenization."""
    _check_columns(task, list(columns), where)
    kind = KINDS[task.kind]
    d = task.data
    labels = columns.get(label_column(task), [])
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
    names = _class_names(ds.features.get(label_column(task)))
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
    unlabelled = task.kind in ("regression", "generation")  # a number or a text: no label set
    given = {"regression": ["value"], "generation": []}.get(task.kind, task.labels)
    seen, rows = _scan(task, "train", splits["train"] if train is None else train, given)
    if not rows:
        raise DataError(f"tasks.{task.name}.data.train: no examples were read; check the file")
    labels = list(given) if given is not None else _order_labels(seen, task.kind)
    if task.kind != "regression":  # labels (or generation targets) checked in every split
        for split, records in splits.items():
            if split != "train":
                _scan(task, split, records or [], labels)
    if len(labels) < 2 and not unlabelled:
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
        generation=_generation_spec(task),
    )
    return spec, rows


def _generation_spec(task: TaskConfig) -> GenerationSpec | None:
    """A generation task's head.* decoder options and generation.* settings, as one spec."""
    if task.kind != "generation":
        return None
    head = task.head
    decoding = task.generation.model_dump() if task.generation else {}
    return GenerationSpec(
        decoder=head.decoder,
        decoder_layers=head.decoder_layers,
        decoder_init=head.decoder_init,
        decoder_layers_from=head.decoder_layers_from,
        new_lr_scale=head.new_lr_scale,
        tie_embeddings=head.tie_embeddings,
        label_smoothing=head.label_smoothing,
        **decoding,
    )


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
        if task.is_generation:
            if not isinstance(rec.label, str) or not rec.label.strip():
                raise DataError(
                    f"tasks.{task.name} ({split}): {rec.where}: the target text "
                    f"(column '{task.data.target_field}') is {rec.label!r}; give every row a "
                    "non-empty target, or drop the row"
                )
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
    if spec.is_generation:  # target token ids without specials, no longer than generated
        from polytask.model.generation import target_ids

        targets = target_ids(tokenizer, [r.label for r in records], spec.generation.max_new_tokens)
    features = []
    for i, rec in enumerate(records):
        feat = {k: enc[k][i] for k in enc}
        if kind.level == "token":
            feat["labels"] = align_labels(enc.word_ids(i), [spec.labels.index(t) for t in rec.label])
        elif spec.is_generation:
            feat["labels"] = targets[i]
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

"""Offline batch inference on Ray Data: score a file, folder or URI with a registered model.

Ray Data reads the input in blocks, a pool of scoring actors (each holding the whole bundle, like
the in-process `Predictor`) runs the encoder once per length-sorted sub-batch and every requested
head on its output, and the driver streams the scored blocks, in input order, into one output
file. Bad rows are answered with a reason instead of a score and written to an errors file; they
never stop the job. Both files are written beside their targets as `.NAME.partial-<pid>` and renamed
into place only when every row is scored (polytask.durable), so a failed or killed job leaves the
previous output as it was; the next job deletes the partials a dead one left.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polytask.batch_files import ErrorLog, OutputWriter
from polytask.durable import commit_file, partial_path, sweep_partials
from polytask.training import faults

FORMATS = ("jsonl", "csv", "tsv", "parquet")
OUTPUT_FORMATS = ("jsonl", "parquet")
ERROR_COLUMN = "__polytask_error"
LINE_COLUMN = "__polytask_line"
RAW_COLUMN = "__polytask_raw"
# The row as the driver writes it (a JSONL output line), or a bad row's input as JSON: built in the
# scoring actors, so the driver does no per-row JSON work and blocks hold plain strings.
RECORD_COLUMN = "__polytask_record"
# Rows per block the JSONL reader builds; Ray Data merges a read task's blocks up to its target
# block size, so the blocks the scorers get are cut by `read_input` (one scoring batch each).
JSONL_BLOCK_ROWS = 1024
# Reading is light next to scoring; read tasks ask for no CPU so that scoring actors holding every
# CPU of a node (2 actors on a 2-core laptop) can never starve the reads that feed them.
READ_CPUS = 0.0
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class BatchError(ValueError):
    """A batch job that cannot start: bad paths, formats, fields or tasks (never a bad row)."""


@dataclass
class BatchSpec:
    """What to score and where to write it; fields mirror `polytask predict --input` options."""

    model: str
    input: str
    output: str
    tasks: list[str] | None = None
    text_field: str = "text"
    text_pair_field: str | None = None
    input_format: str | None = None
    batch_size: int = 256
    sub_batch_size: int = 32
    workers: int = 2
    cpus_per_worker: float = 1.0
    errors: str | None = None

    @property
    def errors_path(self) -> str:
        return self.errors or f"{self.output}.errors.jsonl"


@dataclass
class BatchSummary:
    """What the job did, printed at the end and returned to callers."""

    rows: int = 0
    scored: int = 0
    failed: int = 0
    seconds: float = 0.0
    output: str = ""
    errors: str | None = None
    tasks: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "scored": self.scored,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows_per_s, 2),
            "output": self.output,
            "errors": self.errors,
            "tasks": self.tasks,
        }


def detect_format(path: str, given: str | None = None) -> str:
    """The input format from --input-format, else the file's (or a folder's files') suffix."""
    if given is not None:
        if given not in FORMATS:
            raise BatchError(f"--input-format '{given}': choose one of {', '.join(FORMATS)}")
        return given
    local = Path(path)
    if "://" not in path and local.is_dir():
        found = {_SUFFIXES[p.suffix] for p in local.rglob("*") if p.suffix in _SUFFIXES}
        if len(found) != 1:
            raise BatchError(
                f"--input {path}: a folder needs files of one format ({', '.join(_SUFFIXES)}); "
                f"found {sorted(found) or 'none'}; pass --input-format or one file"
            )
        return found.pop()
    suffix = Path(path.rstrip("/")).suffix.lower()
    if suffix not in _SUFFIXES:
        raise BatchError(
            f"--input {path}: cannot tell the format from '{suffix or '(no suffix)'}'; use "
            f".jsonl, .csv, .tsv or .parquet, or pass --input-format"
        )
    return _SUFFIXES[suffix]


def output_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise BatchError(f"--output {path}: write .jsonl or .parquet")


def _json_lines_datasource(paths: str) -> Any:
    """JSONL as raw lines with their line numbers; each line is parsed by the scorer, so a broken
    line fails only its own row (pandas/arrow JSON readers fail the whole file instead)."""
    from ray.data._internal.delegating_block_builder import DelegatingBlockBuilder
    from ray.data.datasource.file_based_datasource import FileBasedDatasource

    class JsonLines(FileBasedDatasource):
        def _read_stream(self, f: Any, path: str) -> Iterator[Any]:
            builder = DelegatingBlockBuilder()
            rows = 0
            # split on "\n" only: str.splitlines would also cut at U+2028 inside JSON strings
            for number, line in enumerate(f.readall().decode("utf-8", "replace").split("\n"), 1):
                if not line.strip():
                    continue
                builder.add({RAW_COLUMN: line, LINE_COLUMN: number})
                rows += 1
                if rows % JSONL_BLOCK_ROWS == 0:
                    yield builder.build()
                    builder = DelegatingBlockBuilder()
            if builder.num_rows():
                yield builder.build()

    return JsonLines(paths, file_extensions=["jsonl", "json", "ndjson"])


def read_input(spec: BatchSpec, rows: int | None = None) -> Any:
    """A Ray Dataset over the input; CSV/TSV columns are read as strings so no row fails to parse.

    With the row count known, the input is cut into blocks of at most one scoring batch, as many
    as a multiple of the workers so that the last round keeps every actor busy. Ray Data's own cut
    (a few blocks per file) gave each of 2 actors two 3,000-row tasks of a 12,000-row file: no
    scored row reached the driver before the end, and one actor idled while the other finished.
    """
    import ray.data

    fmt = detect_format(spec.input, spec.input_format)
    blocks = {}
    if rows:
        rounds = math.ceil(rows / (spec.batch_size * spec.workers))
        blocks["override_num_blocks"] = rounds * spec.workers
    if fmt == "jsonl":
        return ray.data.read_datasource(
            _json_lines_datasource(spec.input), num_cpus=READ_CPUS, **blocks
        )
    if fmt == "parquet":
        return ray.data.read_parquet(spec.input, num_cpus=READ_CPUS, **blocks)
    import pyarrow.csv as pacsv

    delimiter = "\t" if fmt == "tsv" else ","
    header = _csv_header(spec.input, delimiter)
    return ray.data.read_csv(
        spec.input,
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(header, "string")),
        file_extensions=[fmt],
        num_cpus=READ_CPUS,
        **blocks,
    )


def _csv_header(path: str, delimiter: str) -> list[str]:
    """Column names from the first file's header, so every column can be typed as string."""
    import pyarrow.csv as pacsv
    import pyarrow.fs as pafs

    fs, root = (
        pafs.FileSystem.from_uri(path)
        if "://" in path
        else (pafs.LocalFileSystem(), str(Path(path).resolve()))
    )
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.Directory:
        files = sorted(
            i.path
            for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if i.type == pafs.FileType.File and i.path.endswith((".csv", ".tsv"))
        )
        root = files[0]
    with fs.open_input_stream(root) as stream:
        reader = pacsv.open_csv(stream, parse_options=pacsv.ParseOptions(delimiter=delimiter))
        return list(reader.schema.names)


def set_threads(threads: int) -> None:
    """One process's share of the cores: torch's intra-op threads and, at one thread, no tokenizer
    thread pool either (it would spread each batch over every core, under the other actors)."""
    import torch

    torch.set_num_threads(threads)
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


class Scorer:
    """A Ray Data actor: loads the bundle once, then scores blocks; never raises on a bad row.

    It returns rows in the output's shape (JSONL lines, or Parquet columns with answers as JSON
    strings), so the driver only writes them in order.
    """

    def __init__(
        self,
        model: str,
        tasks: list[str],
        text_field: str,
        pair_field: str | None,
        sub_batch_size: int,
        output_format: str = "jsonl",
        threads: int = 1,
    ) -> None:
        set_threads(threads)
        from polytask.model.inference import Predictor
        from polytask.tracking.registry import resolve_bundle

        self.predictor = Predictor.from_bundle(str(resolve_bundle(model)))
        self.tasks = tasks
        self.text_field = text_field
        self.pair_field = pair_field
        self.sub_batch_size = sub_batch_size
        self.output_format = output_format

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = _rows(batch)
        inputs, errors = [], []
        for row in rows:
            item, error = self._input(row)
            inputs.append(item)
            errors.append(error)
        good = [i for i, e in enumerate(errors) if e is None]
        answers: list[dict[str, Any] | None] = [None] * len(rows)
        scored = score_sorted(
            self.predictor, [inputs[i] for i in good], self.tasks, self.sub_batch_size
        )
        for i, answer in zip(good, scored):
            answers[i] = answer
        columns = [c for c in _columns(rows) if c != LINE_COLUMN]
        result: dict[str, np.ndarray] = {}
        if LINE_COLUMN in batch:
            result[LINE_COLUMN] = batch[LINE_COLUMN]
        # "" (not None) for good rows: an all-null column would come back to the driver as NaN
        result[ERROR_COLUMN] = _array([e or "" for e in errors])
        records = []
        for row, answer in zip(rows, answers):
            if answer is None:  # a bad row: its input, for the errors file
                record = {name: _jsonable(row.get(name)) for name in columns}
            elif self.output_format == "jsonl":
                record = {name: row.get(name) for name in columns} | answer
            else:
                records.append("")
                continue
            records.append(json.dumps(record, ensure_ascii=False))
        result[RECORD_COLUMN] = _array(records)
        if self.output_format == "parquet":
            result.update({name: _array([row.get(name) for row in rows]) for name in columns})
            for task in self.tasks:
                result[task] = _array(
                    [None if a is None else json.dumps(a[task]) for a in answers]
                )
        return result

    def _input(self, row: dict[str, Any]) -> tuple[str | dict[str, str] | None, str | None]:
        """The model input of one row, or why there is none (the reason names the field)."""
        if RAW_COLUMN in row:
            try:
                parsed = json.loads(row.pop(RAW_COLUMN))
            except json.JSONDecodeError as exc:
                return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
            if not isinstance(parsed, dict):
                return None, f"a JSON line must be an object, got {type(parsed).__name__}"
            row.update(parsed)
        text = _text(row, self.text_field, "--text-field")
        if isinstance(text, _Bad):
            return None, text.reason
        if self.pair_field is None:
            return text, None
        pair = _text(row, self.pair_field, "--text-pair-field")
        if isinstance(pair, _Bad):
            return None, pair.reason
        return {"text": text, "text_pair": pair}, None


@dataclass
class _Bad:
    reason: str


def _text(row: dict[str, Any], name: str, option: str) -> str | _Bad:
    if (
        name not in row
        or row[name] is None
        or (isinstance(row[name], float) and math.isnan(row[name]))
    ):
        return _Bad(f"field '{name}' is missing or null (set {option} to the column holding text)")
    value = row[name]
    if not isinstance(value, str):
        return _Bad(f"field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        return _Bad(f"field '{name}' is empty")
    return value


def score_sorted(
    predictor: Any, inputs: list[Any], tasks: list[str], sub_batch_size: int
) -> list[dict[str, Any]]:
    """Predict in length-sorted sub-batches (each padded to its own longest input), answers in
    input order: sorting by length is what keeps padding waste low on mixed-length files."""
    order = sorted(range(len(inputs)), key=lambda i: _length(inputs[i]))
    answers: list[dict[str, Any]] = [{}] * len(inputs)
    sorted_answers = predictor.predict([inputs[i] for i in order], tasks, batch_size=sub_batch_size)
    for position, answer in zip(order, sorted_answers):
        answers[position] = answer
    return answers


def _length(item: str | dict[str, str]) -> int:
    return len(item) if isinstance(item, str) else len(item["text"]) + len(item["text_pair"])


def _rows(batch: dict[str, np.ndarray], keep: np.ndarray | None = None) -> list[dict[str, Any]]:
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    index = range(n) if keep is None else np.flatnonzero(keep)
    return [{k: _plain(batch[k][i]) for k in names} for i in index]


def _plain(value: Any) -> Any:
    """numpy scalars → Python values, so JSON output and type checks see plain types."""
    return value.item() if isinstance(value, np.generic) else value


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every column any row has, first-seen order (JSONL rows may differ in their keys)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(k for k in row if k not in (RAW_COLUMN,)))
    return list(seen)


def _array(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def start_ray() -> None:
    """Join the Ray cluster in RAY_ADDRESS (`ray job submit`), else start a local one for this job
    only: without a dashboard, whose processes would take CPU from the scorers and die with it."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)


def run_batch(
    spec: BatchSpec, progress: Callable[[int, int | None, float], None] | None = None
) -> BatchSummary:
    """Score `spec.input` into `spec.output` (one file, input order) and bad rows into the errors
    file; `progress(rows_done, rows_total_or_None, rows_per_s)` is called after every block."""
    import ray
    import ray.data

    from polytask.model.manifest import read_manifest
    from polytask.tracking.registry import client, resolve_bundle
    from polytask.tracking.uris import pin_model_uri

    out_fmt = output_format(spec.output)
    if "://" not in spec.input and not Path(spec.input).exists():
        raise BatchError(f"--input {spec.input}: no such file or folder")
    detect_format(spec.input, spec.input_format)
    specs = {s.name: s for s in read_manifest(resolve_bundle(spec.model)).tasks}
    # Every actor loads the version checked here, even if the alias moves during the job.
    model = pin_model_uri(spec.model, client)
    known = list(specs)
    paired = spec.text_pair_field is not None
    tasks = list(dict.fromkeys(spec.tasks)) if spec.tasks else [
        t for t in known if paired or not specs[t].pair
    ] or known
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise BatchError(
            f"--tasks: {', '.join(unknown)} not in {spec.model}; it has: {', '.join(known)}"
        )
    pair_tasks = [t for t in tasks if specs[t].pair]
    if pair_tasks and not paired:
        raise BatchError(
            f"--tasks: {', '.join(pair_tasks)} compare two texts; set --text-pair-field to the "
            "column holding the second text"
        )
    start_ray()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    total = _count_rows(spec)
    ds = read_input(spec, total)
    scored = ds.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "model": model,
            "tasks": tasks,
            "text_field": spec.text_field,
            "pair_field": spec.text_pair_field,
            "sub_batch_size": spec.sub_batch_size,
            "output_format": out_fmt,
            "threads": max(1, int(spec.cpus_per_worker)),
        },
        # Blocks were cut to at most one batch when the row count is known: one block is then one
        # task and one batch. An int here would make Ray Data merge two 250-row blocks into each
        # task (it bundles inputs up to batch_size rows), doubling the last round's imbalance.
        batch_size=None if total else spec.batch_size,
        batch_format="numpy",
        num_cpus=spec.cpus_per_worker,
        compute=ray.data.ActorPoolStrategy(size=spec.workers),
    )
    summary = BatchSummary(output=spec.output, tasks=tasks)
    start = time.perf_counter()
    Path(spec.output).parent.mkdir(parents=True, exist_ok=True)
    for target in (spec.output, spec.errors_path):
        sweep_partials(target)
    out_partial, errors_partial = partial_path(spec.output), partial_path(spec.errors_path)
    hold = faults.hold_batch(faults.from_env())
    with (
        OutputWriter(str(out_partial), out_fmt, tasks) as writer,
        ErrorLog(str(errors_partial)) as errors,
    ):
        for block, batch in enumerate(scored.iter_batches(batch_format="numpy", batch_size=None)):
            reasons = batch.pop(ERROR_COLUMN)
            lines = batch.pop(LINE_COLUMN, None)
            records = batch.pop(RECORD_COLUMN)
            bad = [i for i, reason in enumerate(reasons) if reason]
            for i in bad:
                line = None if lines is None else int(lines[i])
                errors.write(summary.rows + i + 1, line, reasons[i], json.loads(records[i]))
            good = np.ones(len(reasons), dtype=bool)
            good[bad] = False
            writer.write(records[good] if out_fmt == "jsonl" else _rows(batch, good))
            summary.rows += len(reasons)
            summary.failed += len(bad)
            summary.scored += len(reasons) - len(bad)
            if progress is not None:
                elapsed = time.perf_counter() - start
                progress(summary.rows, total, summary.rows / elapsed if elapsed > 0 else 0.0)
            if hold is not None:
                hold(block + 1, writer)
    # Only a run that scored every row publishes: the errors file first, the output last, each
    # by one rename; until then the previous output stands and this run's files are partials.
    summary.seconds = time.perf_counter() - start
    summary.errors = spec.errors_path if summary.failed else None
    if summary.failed:
        commit_file(errors_partial, spec.errors_path)
    else:
        errors_partial.unlink(missing_ok=True)
        Path(spec.errors_path).unlink(missing_ok=True)
    commit_file(out_partial, spec.output)
    return summary


def _count_rows(spec: BatchSpec) -> int | None:
    """Rows in a local input when that is cheap to know (for the ETA); None otherwise."""
    path = Path(spec.input)
    if "://" in spec.input or not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    fmt = detect_format(spec.input, spec.input_format)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return sum(
            pq.ParquetFile(f).metadata.num_rows for f in files if f.suffix in (".parquet", ".pq")
        )
    count = 0
    for f in files:
        with f.open("rb") as fh:
            lines = [line for line in fh if line.strip()]
        count += len(lines) - (1 if fmt in ("csv", "tsv") and lines else 0)
    return count


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)

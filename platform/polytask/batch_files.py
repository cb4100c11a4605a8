"""The files a batch job writes: its scored rows (JSONL or Parquet) and its errors file; batch.py
opens them on partial paths and renames them into place when the job is complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Self


class OutputWriter:
    """Scored rows → one JSONL file (lines made by the actors) or one Parquet file (answers as JSON
    strings)."""

    def __init__(self, path: str, fmt: str, tasks: list[str]) -> None:
        self.path, self.fmt, self.tasks = path, fmt, tasks
        self.buffer: list[dict[str, Any]] = []
        self.parquet: Any = None
        self.file: Any = None

    def __enter__(self) -> Self:
        if self.fmt == "jsonl":
            self.file = open(self.path, "w", encoding="utf-8")
        return self

    def flush(self) -> None:
        """Everything written so far onto disk (in the partial file), for the fault hooks."""
        if self.fmt == "jsonl":
            self.file.flush()
        else:
            self._flush()

    def write(self, rows: Any) -> None:
        """JSONL lines (strings) or Parquet rows (dicts), in input order."""
        if self.fmt == "jsonl":
            self.file.writelines(line + "\n" for line in rows)
            return
        self.buffer.extend(rows)
        if len(self.buffer) >= 4096:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buffer:
            return
        table = pa.Table.from_pylist(self.buffer)
        # a column that is all-null in the first block would otherwise be typed null forever
        table = table.cast(
            pa.schema(
                [f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema]
            )
        )
        if self.parquet is None:
            self.parquet = pq.ParquetWriter(self.path, table.schema)
        self.parquet.write_table(table.cast(self.parquet.schema))
        self.buffer = []

    def __exit__(self, *exc: object) -> None:
        if self.fmt == "jsonl":
            self.file.close()
            return
        self._flush()
        if self.parquet is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({t: pa.array([], pa.string()) for t in self.tasks}), self.path)
        else:
            self.parquet.close()


class ErrorLog:
    """One JSON line per bad row: its 1-based row number (and JSONL line), the reason, the row."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: Any = None

    def __enter__(self) -> Self:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w", encoding="utf-8")
        return self

    def write(self, row_number: int, line: int | None, reason: str, row: dict[str, Any]) -> None:
        record: dict[str, Any] = {"row": row_number, "error": reason}
        if line is not None:
            record["line"] = line
        record["input"] = row
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def __exit__(self, *exc: object) -> None:
        self.file.close()

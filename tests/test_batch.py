"""Batch inference on Ray Data (`polytask predict --input`): real local Ray, real files.

Answers must equal the in-process Predictor's, rows must come back in input order, and bad rows
must land in the errors file with their row number and reason without stopping the job.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from polytask.batch import BatchError, BatchSpec, run_batch
from polytask.cli import app
from polytask.model.inference import Predictor

TEXTS = [
    "alice flew to paris last week",
    "the movie was wonderful",
    "what a dreadful meal at the globex office",
    "bob smith from acme was kind",
    "honestly a boring game",
]


def _answers(bundle: Path, inputs: list, tasks: list[str] | None = None) -> list[dict]:
    return Predictor.from_bundle(str(bundle)).predict(inputs, tasks)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _close(got: object, want: object) -> None:
    """Same labels and spans; floats equal to 1e-5 (another process, same weights)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want)
        for key in want:
            _close(got[key], want[key])
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            _close(g, w)
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5)
    else:
        assert got == want


def test_jsonl_in_order_equal_to_in_process_and_bad_rows_reported(
    ray_local, trained_bundle: Path, tmp_path: Path
) -> None:
    rows = [{"id": i, "text": TEXTS[i % len(TEXTS)] + f" number {i}"} for i in range(300)]
    lines = [json.dumps(r) for r in rows]
    bad = {
        7: '{"id": "x1"}',  # no text field
        20: '{"id": "x2", "text": 42}',  # wrong type
        33: '{"id": "x3", "text": "   "}',  # blank text
        50: "{not json",  # broken line
        64: '["a", "list"]',  # not an object
    }
    for index, line in sorted(bad.items()):
        lines.insert(index, line)
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "out" / "scored.jsonl"

    import ray

    # as many one-CPU scorers as the cluster has free CPUs: reads must still be scheduled
    workers = int(ray.available_resources().get("CPU", 2))
    summary = run_batch(
        BatchSpec(
            model=str(trained_bundle), input=str(src), output=str(out), batch_size=64,
            workers=workers,
        )
    )

    assert (summary.rows, summary.failed, summary.scored) == (305, 5, 300)
    got = _read_jsonl(out)
    assert [r["id"] for r in got] == list(range(300))  # input order, input columns kept
    want = _answers(trained_bundle, [r["text"] for r in rows])
    for row, answer in zip(got, want):
        assert set(row) == {"id", "text", "sentiment", "ner"}
        _close({"sentiment": row["sentiment"], "ner": row["ner"]}, answer)
    errors = _read_jsonl(Path(summary.errors))
    assert [e["line"] for e in errors] == [i + 1 for i in sorted(bad)]
    assert [e["row"] for e in errors] == [i + 1 for i in sorted(bad)]
    reasons = [e["error"] for e in errors]
    assert "field 'text' is missing" in reasons[0]
    assert "must be a string, got int" in reasons[1]
    assert "is empty" in reasons[2]
    assert "not valid JSON" in reasons[3]
    assert "must be an object" in reasons[4]
    assert errors[1]["input"] == {"id": "x2", "text": 42}


def test_csv_pairs_and_parquet_output_with_task_subset(
    ray_local, trained_bundle: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in.csv"
    with src.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "other"])
        for i in range(40):
            writer.writerow([TEXTS[i % len(TEXTS)], str(i)])
        writer.writerow(["", "empty"])
    out = tmp_path / "scored.parquet"
    summary = run_batch(
        BatchSpec(
            model=str(trained_bundle),
            input=str(src),
            output=str(out),
            tasks=["sentiment"],
            text_field="review",
            batch_size=16,
            workers=1,  # parallel scoring is the JSONL test's; one scorer starts faster
        )
    )
    assert (summary.scored, summary.failed) == (40, 1)
    table = pq.read_table(out)
    assert table.column_names == ["review", "other", "sentiment"]
    assert table.column("other").to_pylist() == [str(i) for i in range(40)]
    want = _answers(trained_bundle, [TEXTS[i % len(TEXTS)] for i in range(40)], ["sentiment"])
    got = [json.loads(v) for v in table.column("sentiment").to_pylist()]
    _close(got, [w["sentiment"] for w in want])
    assert _read_jsonl(Path(summary.errors))[0]["row"] == 41


def test_parquet_folder_input_and_cli_summary_with_generated_text(
    ray_local, generation_bundle: Path, tmp_path: Path
) -> None:
    """A generation head answers {"text": ...} per row, as the in-process Predictor does."""
    folder = tmp_path / "parts"
    folder.mkdir()
    for part in range(2):
        texts = [f"{TEXTS[i % len(TEXTS)]} part {part}" for i in range(25)]
        pq.write_table(pa.table({"text": texts, "part": [part] * 25}), folder / f"p{part}.parquet")
    out = tmp_path / "scored.jsonl"
    result = CliRunner().invoke(
        app,
        ["predict", str(generation_bundle), "--input", str(folder), "--output", str(out),
         "--tasks", "entities", "--workers", "1"],
    )
    assert result.exit_code == 0, result.output
    assert '"scored": 50' in result.output and '"failed": 0' in result.output
    got = _read_jsonl(out)
    assert [r["part"] for r in got] == [0] * 25 + [1] * 25
    assert all(set(r) == {"text", "part", "entities"} for r in got)
    want = _answers(generation_bundle, [r["text"] for r in got], ["entities"])
    assert [r["entities"] for r in got] == [w["entities"] for w in want]
    assert all(isinstance(r["entities"]["text"], str) for r in got)
    assert not (tmp_path / "scored.jsonl.errors.jsonl").exists()


def test_bad_job_arguments_fail_before_scoring(trained_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("hello\n")
    with pytest.raises(BatchError, match="cannot tell the format"):
        run_batch(BatchSpec(str(trained_bundle), str(tmp_path / "in.txt"), str(tmp_path / "o.jsonl")))
    with pytest.raises(BatchError, match="write .jsonl or .parquet"):
        run_batch(BatchSpec(str(trained_bundle), str(tmp_path / "in.txt"), str(tmp_path / "o.csv")))
    (tmp_path / "in.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(BatchError, match="--tasks: nope not in"):
        run_batch(
            BatchSpec(str(trained_bundle), str(tmp_path / "in.jsonl"), str(tmp_path / "o.jsonl"),
                      tasks=["nope"])
        )
    with pytest.raises(BatchError, match="no such file"):
        run_batch(BatchSpec(str(trained_bundle), str(tmp_path / "gone.jsonl"), str(tmp_path / "o.jsonl")))

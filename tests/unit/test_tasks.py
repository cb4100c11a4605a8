"""Task kinds: one registry; each kind's loss, metrics and decoder behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polytask.tasks import KINDS, TaskSpec, build_head

NER = TaskSpec("ner", "token_classification", ["O", "B-person", "I-person", "B-location", "I-location"])


def _onehot(indices: list[int], n: int, scale: float = 5.0) -> np.ndarray:
    out = np.zeros((len(indices), n))
    out[np.arange(len(indices)), indices] = scale
    return out


def test_registry_has_the_six_kinds() -> None:
    assert list(KINDS) == [
        "classification", "multilabel", "token_classification", "pair_classification", "regression",
        "generation",
    ]
    for kind in KINDS.values():
        assert kind.primary_metric in kind.metric_names


def test_token_decode_joins_words_into_spans_with_char_offsets() -> None:
    text = "alice smith flew to new york"
    # tokens: [CLS] al ##ice smith flew to new york [SEP]; word ids from a fast tokenizer
    word_ids = [None, 0, 0, 1, 2, 3, 4, 5, None]
    spans = [(0, 5), (6, 11), (12, 16), (17, 19), (20, 23), (24, 28)]
    tags = [0, 1, 0, 2, 0, 0, 3, 4, 0]  # the 2nd sub-token of 'alice' says O: must be ignored
    out = KINDS["token_classification"].decode(
        _onehot(tags, 5), NER, text=text, word_ids=word_ids, word_spans=spans
    )
    ents = out["entities"]
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in ents] == [
        ("person", "alice smith", 0, 11),
        ("location", "new york", 20, 28),
    ]
    assert all(0 < e["score"] <= 1 for e in ents)
    assert text[ents[1]["start"] : ents[1]["end"]] == "new york"


def test_token_decode_i_without_b_starts_an_entity() -> None:
    out = KINDS["token_classification"].decode(
        _onehot([0, 4, 0], 5), NER, text="to lima", word_ids=[None, 1, None], word_spans=[(0, 2), (3, 7)]
    )
    assert [(e["type"], e["text"]) for e in out["entities"]] == [("location", "lima")]


def test_token_metrics_are_entity_level() -> None:
    gold = np.array([-100, 1, 2, 0, 3, -100])
    pred_right = _onehot([0, 1, 2, 0, 3, 0], 5)
    pred_half = _onehot([0, 1, 0, 0, 3, 0], 5)  # person span cut short: entity wrong
    m = KINDS["token_classification"].metrics([pred_right, pred_half], [gold, gold], NER)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)


def test_classification_metrics_and_decode() -> None:
    spec = TaskSpec("s", "classification", ["neg", "pos"])
    kind = KINDS["classification"]
    m = kind.metrics([np.array([2.0, 0.0]), np.array([0.0, 1.0]), np.array([0.0, 1.0])], [0, 1, 0], spec)
    assert m["accuracy"] == pytest.approx(2 / 3)
    out = kind.decode(np.array([0.0, 2.0]), spec)
    assert out["label"] == "pos"
    assert sum(out["probabilities"].values()) == pytest.approx(1.0)
    loss = kind.loss(torch.tensor([[0.0, 5.0]]), torch.tensor([1]))
    assert float(loss) < 0.01


def test_multilabel_threshold_and_micro_f1() -> None:
    spec = TaskSpec("topic", "multilabel", ["a", "b", "c"], threshold=0.5)
    kind = KINDS["multilabel"]
    assert kind.encode_target(["a", "c"], spec) == [1.0, 0.0, 1.0]
    assert kind.decode(np.array([3.0, -3.0, 0.5]), spec)["labels"] == ["a", "c"]
    m = kind.metrics([np.array([3.0, -3.0, 3.0])], [[1, 0, 1]], spec)
    assert m["micro_f1"] == 1.0


def test_regression_pearson_spearman() -> None:
    spec = TaskSpec("score", "regression", ["value"])
    kind = KINDS["regression"]
    preds = [np.array([x]) for x in (0.1, 0.4, 0.35, 0.8)]
    m = kind.metrics(preds, [0.0, 0.5, 0.4, 1.0], spec)
    assert m["pearson"] > 0.95 and m["spearman"] == pytest.approx(1.0)
    assert kind.decode(np.array([0.25]), spec) == {"value": 0.25}


def test_head_shapes_follow_spec() -> None:
    head = build_head(TaskSpec("t", "multilabel", ["a", "b", "c"], hidden_dim=8), hidden_size=16)
    assert head(torch.zeros(2, 16)).shape == (2, 3)
    assert build_head(TaskSpec("r", "regression", ["value"]), 16)(torch.zeros(4, 16)).shape == (4, 1)

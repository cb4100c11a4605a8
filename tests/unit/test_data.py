"""Data: loading formats, label checks, NER alignment, padding, the task sampler and sharding."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from polytask.model.network import load_encoder
from polytask.tasks import IGNORE_INDEX
from polytask.training.batches import TaskSampler, collate, shard_indices
from polytask.training.data import (
    DataError,
    align_labels,
    load_task_data,
    read_conll,
    tokenize_records,
)


def test_conll_reader_skips_docstart_and_splits_sentences(tmp_path: Path) -> None:
    path = tmp_path / "x.conll"
    path.write_text("-DOCSTART- O\n\nalice\tB-person\nruns\tO\n\nnew\tB-location\nyork\tI-location\n")
    records = read_conll(path)
    assert [r.tokens for r in records] == [["alice", "runs"], ["new", "york"]]
    assert records[1].label == ["B-location", "I-location"]


def test_labels_inferred_from_train_with_o_first(experiment) -> None:
    data = load_task_data(experiment())
    assert data["sentiment"].spec.labels == ["negative", "positive"]
    ner = data["ner"].spec.labels
    assert ner[0] == "O" and set(ner) == {
        "O", "B-person", "I-person", "B-location", "I-location", "B-organization", "I-organization"
    }


def test_label_outside_label_set_names_file_row_and_allowed(experiment, tmp_path: Path) -> None:
    bad = tmp_path / "val.jsonl"
    bad.write_text(json.dumps({"text": "ok", "label": "positive"}) + "\n"
                   + json.dumps({"text": "meh", "label": "neutral"}) + "\n")
    cfg = experiment()
    cfg.tasks[0].data.validation = str(bad)
    with pytest.raises(DataError) as err:
        load_task_data(cfg)
    msg = str(err.value)
    assert str(bad) in msg and "row 2" in msg and "'neutral'" in msg
    assert "['negative', 'positive']" in msg


def test_missing_file_is_a_clear_error(experiment) -> None:
    cfg = experiment()
    cfg.tasks[1].data.train = "does/not/exist.conll"
    with pytest.raises(DataError, match=r"tasks.ner.data.train: file .*exist.conll' not found"):
        load_task_data(cfg)


def test_tsv_and_csv_load_with_named_columns(experiment, tmp_path: Path) -> None:
    tsv = tmp_path / "t.tsv"
    tsv.write_text('sentence\tlabel\nit\'s "great" \t1\nbad one \t0\n')
    cfg = experiment()
    cfg.tasks[0].data.train = str(tsv)
    cfg.tasks[0].data.validation = None
    cfg.tasks[0].data.text_field = "sentence"
    data = load_task_data(cfg)
    assert data["sentiment"].spec.labels == ["0", "1"]
    assert data["sentiment"].splits["train"][0].text == 'it\'s "great" '
    cfg.tasks[0].data.text_field = "text"
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\]"):
        load_task_data(cfg)


def test_alignment_labels_first_subtoken_only(tiny_encoder: Path, experiment) -> None:
    _, tok = load_encoder(str(tiny_encoder))
    data = load_task_data(experiment())
    spec = data["ner"].spec
    records = data["ner"].splits["train"][:50]
    feats = tokenize_records(records, spec, tok, 64)
    split_words = 0
    for rec, feat in zip(records, feats):
        enc = tok(rec.tokens, is_split_into_words=True, truncation=True, max_length=64)
        word_ids = enc.word_ids()
        labelled = [i for i, lab in enumerate(feat["labels"]) if lab != IGNORE_INDEX]
        # exactly one labelled position per word, and it is the word's first sub-token
        assert [word_ids[i] for i in labelled] == list(range(len(rec.tokens)))
        assert all(word_ids[i - 1] != word_ids[i] for i in labelled)
        assert [spec.labels[feat["labels"][i]] for i in labelled] == rec.label
        split_words += sum(1 for w in range(len(rec.tokens)) if word_ids.count(w) > 1)
    assert split_words > 20, "the tiny vocab should split many words into sub-tokens"


def test_align_labels_unit() -> None:
    assert align_labels([None, 0, 0, 1, 2, 2, None], [3, 4, 5]) == [-100, 3, -100, 4, 5, -100, -100]


def test_collate_pads_to_longest_in_batch_not_max_length() -> None:
    feats = [
        {"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1], "labels": [-100, 1, -100]},
        {"input_ids": [2, 5, 6, 7, 3], "attention_mask": [1] * 5, "labels": [-100, 1, 0, 0, -100]},
    ]
    batch = collate(feats, pad_token_id=0, token_labels=True)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][0].tolist() == [2, 5, 3, 0, 0]
    assert batch["labels"][0].tolist() == [-100, 1, -100, -100, -100]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    sentence = collate([{"input_ids": [2, 3], "attention_mask": [1, 1], "labels": 1}], 0)
    assert sentence["labels"].tolist() == [1]


SIZES = {"big": 9000, "mid": 900, "small": 100}


@pytest.mark.parametrize(
    "strategy,expected",
    [
        ("proportional", {"big": 0.9, "mid": 0.09, "small": 0.01}),
        ("uniform", {"big": 1 / 3, "mid": 1 / 3, "small": 1 / 3}),
        ("temperature", {t: n**0.5 / sum(m**0.5 for m in SIZES.values()) for t, n in SIZES.items()}),
    ],
)
def test_sampler_frequencies_match_strategy(strategy: str, expected: dict[str, float]) -> None:
    sampler = TaskSampler(SIZES, strategy, temperature=2.0, seed=3, steps_per_epoch=20000)
    counts = Counter(sampler.schedule(0))
    for task, p in expected.items():
        assert counts[task] / 20000 == pytest.approx(p, abs=0.015)


def test_annealed_moves_from_temperature_to_proportional() -> None:
    sampler = TaskSampler(SIZES, "annealed", temperature=3.0, seed=0, epochs=3, steps_per_epoch=10)
    first, last = sampler.probabilities(0), sampler.probabilities(2)
    assert first["small"] == pytest.approx(100 ** (1 / 3) / sum(n ** (1 / 3) for n in SIZES.values()))
    assert last["small"] == pytest.approx(0.01)


def test_sampler_is_deterministic_and_resumes_from_state() -> None:
    a = TaskSampler(SIZES, "temperature", seed=11, steps_per_epoch=50)
    b = TaskSampler(SIZES, "temperature", seed=11, steps_per_epoch=50)
    assert a.schedule(0) == b.schedule(0)
    assert a.schedule(0) != a.schedule(1)
    it = iter(a)
    head = [next(it) for _ in range(20)]
    state = a.state_dict()
    rest = list(it)
    restored = TaskSampler(SIZES, "temperature", seed=11, steps_per_epoch=50)
    restored.load_state_dict(state)
    assert list(restored) == rest
    assert head + rest == b.schedule(0)


def test_ranks_get_disjoint_shards_covering_everything() -> None:
    shards = [set(shard_indices(103, r, 4, seed=5).tolist()) for r in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not shards[i] & shards[j]
    assert set().union(*shards) == set(range(103))
    assert not np.array_equal(shard_indices(103, 0, 4, 5, epoch=0), shard_indices(103, 0, 4, 5, epoch=1))

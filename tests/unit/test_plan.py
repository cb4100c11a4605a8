"""The request plan (model/plan.py) without Ray or torch: the one function the Ingress, the
Encoder and `Predictor` plan with, so its answers are what served and in-process predictions share."""

from __future__ import annotations

from polytask.model.plan import Call, default_tasks, encoder_needs, plan_requests, views_of
from polytask.tasks import TaskSpec

SPECS = {
    s.name: s
    for s in [
        TaskSpec("sentiment", "classification", ["neg", "pos"]),
        TaskSpec("ner", "token_classification", ["O", "B-PER", "I-PER"]),
        TaskSpec("nli", "classification", ["no", "yes"], pair=True),
        TaskSpec("summary", "generation", []),
    ]
}
PAIR = {"text": "a", "text_pair": "b"}


def test_default_tasks_take_pair_tasks_only_when_every_input_has_a_pair() -> None:
    assert default_tasks(SPECS, ["x", PAIR]) == ["sentiment", "ner", "summary"]
    assert default_tasks(SPECS, [PAIR, ("t", "p")]) == ["sentiment", "ner", "nli", "summary"]
    only_pairs = {"nli": SPECS["nli"]}
    assert default_tasks(only_pairs, ["x"]) == ["nli"]  # the missing pair is the caller's error


def test_encoder_needs_follow_the_head_level() -> None:
    assert encoder_needs(SPECS["sentiment"]) == (True, False)
    assert encoder_needs(SPECS["ner"]) == (False, True)
    assert encoder_needs(SPECS["summary"]) == (False, True)
    assert SPECS["summary"].is_generation and not SPECS["ner"].is_generation


def test_views_of_split_singles_from_pairs() -> None:
    assert views_of([None, "p", None]) == [(False, [0, 2]), (True, [1])]
    assert views_of(["p"]) == [(True, [0])]
    assert views_of([]) == []


def test_one_request_plans_a_view_per_kind_of_text_and_a_call_per_task() -> None:
    plan = plan_requests(SPECS, [([PAIR, {"text": "c", "text_pair": "d"}], ["nli", "sentiment", "nli"])])
    assert plan.tasks == [["nli", "sentiment"]]  # named once each, in the order asked
    single, pair = plan.views
    assert (single.pair, single.texts, single.pairs) == (False, ["a", "c"], None)
    assert (pair.pair, pair.texts, pair.pairs) == (True, ["a", "c"], ["b", "d"])
    assert single.pooled == [True, True] and single.tokens == [False, False]
    assert single.calls == [Call("sentiment", [(0, 0, 2)], None)]
    assert pair.calls == [Call("nli", [(0, 0, 2)], None)]


def test_a_batch_of_requests_shares_views_and_each_head_reads_only_its_requests_inputs() -> None:
    plan = plan_requests(
        SPECS,
        [(["r0a", "r0b"], ["sentiment"]), (["r1"], ["ner", "sentiment"]), ([("r2", "p2")], ["nli"])],
    )
    single, pair = plan.views
    assert single.texts == ["r0a", "r0b", "r1"]
    # needs per input: request 1 also wants token states, request 0 does not pay for them
    assert single.pooled == [True, True, True] and single.tokens == [False, False, True]
    sentiment, ner = single.calls
    assert sentiment == Call("sentiment", [(0, 0, 2), (1, 2, 1)], None)
    assert ner == Call("ner", [(1, 2, 1)], [2]) and single.texts_of(ner) == ["r1"]
    assert (pair.texts, pair.pairs, pair.calls) == (["r2"], ["p2"], [Call("nli", [(2, 0, 1)], None)])
    answers = plan.answers([["s0", "s1", "s2"], ["n2"], ["i0"]])
    assert answers == [
        [{"sentiment": "s0"}, {"sentiment": "s1"}],
        [{"ner": "n2", "sentiment": "s2"}],
        [{"nli": "i0"}],
    ]
    assert list(answers[1][0]) == ["ner", "sentiment"]  # the request's own task order


def test_default_tasks_apply_per_request_and_a_pair_sent_to_a_single_task_is_ignored() -> None:
    plan = plan_requests(SPECS, [(["x"], None), ([PAIR], ["summary"])])
    assert plan.tasks == [["sentiment", "ner", "summary"], ["summary"]]
    (single,) = plan.views
    assert single.texts == ["x", "a"] and single.pairs is None
    assert single.pooled == [True, False] and single.tokens == [True, True]
    assert [c.task for c in single.calls] == ["sentiment", "ner", "summary"]
    assert single.calls[0].positions == [0] and single.calls[2].positions is None

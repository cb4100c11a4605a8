"""Per-input checks and replica health without Ray: what the Ingress refuses or fixes before a
batch, how the Encoder blames a failed pass on one input, and when a replica reports unhealthy.
Over real HTTP, with other requests in flight, these are in test_serve_chaos.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from polytask.serve.args import ServeArgs
from polytask.serve.health import Health
from polytask.serve.validation import APIError, InputRejected, TextError, clean_text, prepare_inputs
from polytask.tasks import TaskSpec


@pytest.mark.parametrize(
    ("text", "code", "fragment"),
    [
        ("\ud800 hello", "invalid_text", "lone UTF-16 surrogate (\\ud800 at character 0)"),
        ("ok \udfff", "invalid_text", "at character 3"),
        ("\u200b\u200d\ufeff", "empty_text", "no visible characters"),
        ("\x00\x01", "empty_text", "no visible characters"),
        ("\u0301\u0302", "empty_text", "no visible characters"),
    ],
)
def test_texts_that_cannot_be_served_are_refused_with_the_fix(text, code, fragment):
    with pytest.raises(TextError) as caught:
        clean_text(text, "inputs[2]")
    assert caught.value.code == code
    assert str(caught.value).startswith("inputs[2] ") and fragment in str(caught.value)


def test_control_characters_become_spaces_so_offsets_stay_true():
    text = "alice\x00met\x1bbob\x7fin\x85oslo\tand\nlima\r"
    cleaned = clean_text(text, "inputs[0]")
    assert cleaned == "alice met bob in oslo\tand\nlima\r"
    assert len(cleaned) == len(text)
    for kept in ("café", "日本語", "\U0001f600 emoji", "\ue000 private use", "a\u200bb"):
        assert clean_text(kept, "inputs[0]") == kept


SPECS = {
    "sentiment": TaskSpec("sentiment", "classification", ["neg", "pos"]),
    "nli": TaskSpec("nli", "pair_classification", ["yes", "no"]),
}
ARGS = ServeArgs(model="m", max_inputs_per_request=8, max_chars_per_input=50, overflow="reject")


def test_prepare_inputs_names_the_bad_input_and_cleans_the_rest():
    from polytask.serve.schemas import PairInput

    assert prepare_inputs(SPECS, ARGS, ["fine", "nul\x00here"], ["sentiment"]) == [
        ("fine", None),
        ("nul here", None),
    ]
    with pytest.raises(APIError) as caught:
        prepare_inputs(SPECS, ARGS, ["fine", "also fine", "\ud83d bad"], ["sentiment"])
    assert (caught.value.status, caught.value.code) == (422, "invalid_text")
    assert caught.value.message.startswith("inputs[2] holds a lone UTF-16 surrogate")
    pair = PairInput(text="a text", text_pair="\u2060\u200c")
    with pytest.raises(APIError) as caught:
        prepare_inputs(SPECS, ARGS, [pair], ["nli"])
    assert caught.value.code == "empty_text" and "inputs[0].text_pair" in caught.value.message


def test_health_counts_only_the_replicas_own_failures():
    health = Health("Encoder", fail_after=2)

    def fail(exc: Exception, not_ours: tuple[type[BaseException], ...] = ()) -> None:
        with pytest.raises(type(exc)), health.watch(not_ours):
            raise exc

    fail(InputRejected(0, "bad"), (InputRejected,))
    fail(InputRejected(1, "bad"), (InputRejected,))
    health.check()  # bad inputs never count
    fail(RuntimeError("device lost"))
    health.check()  # one failure can be bad luck
    with health.watch():
        pass
    fail(RuntimeError("device lost"))
    health.check()  # a success in between reset the count
    fail(RuntimeError("device lost again"))
    with pytest.raises(RuntimeError, match="2 calls in a row failed .*device lost again"):
        health.check()

    hung = Health("head_ner", stuck_after_s=0.0)
    with hung.watch(), pytest.raises(RuntimeError, match="has run for over"):
        hung.check()
    hung.check()


def test_a_hung_call_stays_visible_while_other_calls_come_and_go():
    """A head's calls run side by side in a thread pool: one stuck call must fail the check even
    though later calls start and finish (a single shared start time lost it)."""
    import threading
    import time

    health = Health("head_ner", stuck_after_s=0.2)
    release = threading.Event()

    def stuck() -> None:
        with health.watch():
            release.wait(10)

    thread = threading.Thread(target=stuck)
    thread.start()
    try:
        time.sleep(0.3)
        for _ in range(3):
            with health.watch():
                pass  # quick calls that start after the stuck one and end before it
        with pytest.raises(RuntimeError, match=r"over 0.2 s .*1 running"):
            health.check()
    finally:
        release.set()
        thread.join()
    health.check()  # all calls done


def test_encoder_blames_the_input_the_tokenizer_refuses_and_stays_healthy(untrained_bundle):
    """A pass that fails on one input raises InputRejected with that input's index (the Ingress
    answers it as `inputs[i]`); a pass that fails with every input fine counts against the
    replica, and after three in a row `check_health` fails it."""
    from polytask.serve.encoder import Encoder

    encoder = Encoder.func_or_class(str(untrained_bundle))

    def encode(texts: list) -> dict:
        return asyncio.run(encoder.encode(texts, None, True, False))

    assert len(encode(["a fine text", "another"])["items"]) == 2
    for _ in range(4):
        with pytest.raises(InputRejected) as caught:
            encode(["a fine text", "another", "\ud800 lone surrogate"])  # past the Ingress check
        assert caught.value.index == 2
    encoder.check_health()

    class Broken:
        def __call__(self, *args, **kwargs):
            raise RuntimeError("CUDA error: device-side assert triggered")

        def __getattr__(self, name):
            return getattr(state.encoder, name)

    state = encoder.state
    encoder.state = SimpleNamespace(**{**vars(state), "encoder": Broken()})
    for _ in range(3):
        encoder.check_health()
        with pytest.raises(RuntimeError, match="device-side assert"):
            encode(["a fine text"])
    with pytest.raises(RuntimeError, match="Encoder: 3 calls in a row failed"):
        encoder.check_health()


def test_ingress_health_fails_while_a_batch_holds_a_slot_past_twice_the_deadline(
    untrained_bundle,
):
    """The Ingress's own probe: its batches are cancelled at the request deadline, so one still
    running at twice the deadline holds a batch slot for good (every later request would wait
    for a slot and time out while every model replica looks healthy)."""
    import time

    from polytask.model.manifest import read_manifest
    from polytask.serve.args import parse_args
    from polytask.serve.ingress import Ingress

    args = parse_args({"model": str(untrained_bundle), "request_timeout_s": 0.05})
    replica = Ingress.func_or_class  # Serve's ASGI wrapper around the class: async __init__
    ingress = replica.__new__(replica)
    asyncio.run(
        replica.__init__(
            ingress, None, {}, args, str(untrained_bundle), read_manifest(untrained_bundle)
        )
    )
    ingress.check_health()
    with ingress.health.timed():  # a batch whose downstream calls never came back
        time.sleep(0.15)
        with pytest.raises(RuntimeError, match=r"Ingress: a call has run for over 0.1 s"):
            ingress.check_health()
    ingress.check_health()

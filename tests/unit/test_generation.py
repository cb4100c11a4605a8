"""Generation tasks in-process: metrics, both decoder heads training, decoding caps and the step
callback, the bundle round trip and prediction (tiny random BERT and T5, built locally)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polytask.model.bundle import BundleError, load_bundle, load_head, save_bundle
from polytask.model.generation import (
    build_generation_head,
    generate,
    generate_text,
    pad_targets,
    resolve_decoder,
)
from polytask.model.inference import Predictor, encode_batch, pad_states, run_head
from polytask.model.network import build_model, load_encoder
from polytask.tasks import KINDS, GenerationSpec, TaskSpec

PAIRS = [  # targets: the entities (the tiny vocabulary has no ';')
    ("alice flew to paris last week", "alice and paris"),
    ("the movie was great", "none"),
    ("bob works for acme near oslo", "bob and acme and oslo"),
    ("we met dana in lima", "dana and lima"),
]


def _spec(**gen) -> TaskSpec:
    return TaskSpec("entities", "generation", [], dropout=0.0, generation=GenerationSpec(**gen))


def _train(encoder_dir: Path, steps: int, **gen):
    """A classification + generation model trained jointly on PAIRS for `steps` steps."""
    torch.manual_seed(0)
    encoder, tokenizer = load_encoder(str(encoder_dir))
    spec = resolve_decoder(_spec(**gen), encoder.config)
    cls = TaskSpec("sentiment", "classification", ["negative", "positive"])
    head = build_generation_head(spec, tokenizer, encoder, str(encoder_dir))
    model = build_model(encoder, [cls, spec], pooling="cls", heads={"entities": head})
    batch = dict(tokenizer([s for s, _ in PAIRS], padding=True, return_tensors="pt"))
    gen_batch = {**batch, "labels": pad_targets(head.target_ids([t for _, t in PAIRS], 32))}
    cls_batch = {**batch, "labels": torch.tensor([0, 1, 0, 1])}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        _, loss, weighted = model("entities", gen_batch)
        _, _, cls_weighted = model("sentiment", cls_batch)
        opt.zero_grad()
        (weighted + cls_weighted).backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), tokenizer, spec, losses


@pytest.fixture(scope="module")
def trained_t5(tiny_seq2seq: Path):
    return _train(tiny_seq2seq, 50, max_new_tokens=16)


def test_metrics_score_text_on_a_0_to_100_scale() -> None:
    kind = KINDS["generation"]
    refs = [t for _, t in PAIRS]
    perfect = kind.metrics(refs, refs, _spec())
    assert perfect == pytest.approx({"bleu": 100.0, "chrf": 100.0, "rouge_l": 100.0, "exact": 100.0})
    worse = kind.metrics(["alice and paris", "none", "bob and acme and lima", "dana"], refs, _spec())
    assert set(worse) == set(kind.metric_names) and all(0 < v < 100 for v in worse.values()), worse
    assert kind.decode("x y", _spec()) == {"text": "x y"}


def test_new_decoder_on_an_encoder_only_checkpoint_learns(tiny_encoder: Path) -> None:
    model, tokenizer, spec, losses = _train(tiny_encoder, 25, decoder_layers=1, max_new_tokens=16)
    head = model.heads["entities"]
    assert spec.generation.decoder == "new" and head.source == "new"
    assert head.decoder.config.add_cross_attention and head.decoder.config.num_hidden_layers == 1
    assert head.decoder.config.vocab_size == len(tokenizer)
    assert (head.start_id, head.eos_id) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    assert losses[-1] < 0.5 * losses[0]


def test_checkpoint_decoder_learns_and_holds_no_encoder_weights(trained_t5) -> None:
    model, _, spec, losses = trained_t5
    assert spec.generation.decoder == "checkpoint"
    assert losses[-1] < 0.3 * losses[0]
    head_params = {id(p) for p in model.heads["entities"].parameters()}
    assert not head_params & {id(p) for p in model.encoder.parameters()}
    assert not any(".encoder." in n for n, _ in model.heads["entities"].named_parameters())


def _states(model, tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model.encoder(**enc).last_hidden_state, enc["attention_mask"]


def test_generate_caps_rows_beams_and_on_step_stops_early(trained_t5) -> None:
    model, tokenizer, _, _ = trained_t5
    head = model.heads["entities"]
    states, mask = _states(model, tokenizer, [s for s, _ in PAIRS])
    free = generate(head, states, mask, max_new_tokens=16)
    assert len(free[0]) >= 3 and len(free[2]) >= 3  # the targets are 3+ words long
    assert generate_text(head, states, mask, max_new_tokens=16) == tokenizer.batch_decode(free)
    capped = generate(head, states, mask, max_new_tokens=[1, 16, 2, 16])
    assert [len(r) for r in capped] == [1, len(free[1]), 2, len(free[3])]
    assert capped[2] == free[2][:2]
    beams = generate(head, states, mask, max_new_tokens=[2, 16, 3, 16], num_beams=3, no_repeat_ngram_size=2)
    assert len(beams[0]) <= 2 and len(beams[2]) <= 3 and all(beams)
    calls = []

    def on_step(step, tokens, finished):
        calls.append((step, tokens, finished))
        return step < 1  # stop after the second step

    stopped = generate(head, states, mask, max_new_tokens=16, on_step=on_step)
    assert [c[0] for c in calls] == [0, 1]
    assert stopped == [r[:2] for r in free]
    assert calls[0][1] == [r[0] for r in free] and calls[0][2] == [False] * 4
    with pytest.raises(ValueError, match="greedy"):
        generate(head, states, mask, num_beams=2, on_step=on_step)
    with pytest.raises(ValueError, match="one per row"):
        generate(head, states, mask, max_new_tokens=[3, 3])


@pytest.fixture(scope="module")
def t5_bundle(trained_t5, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer, _, _ = trained_t5
    path = tmp_path_factory.mktemp("t5") / "bundle"
    save_bundle(model, tokenizer, path, max_length=32)
    return path


def test_bundle_round_trip_predicts_text_and_refuses_other_encoders(trained_t5, t5_bundle: Path) -> None:
    model, tokenizer, _, _ = trained_t5
    head_dir = t5_bundle / "heads" / "entities"
    assert sorted(p.name for p in head_dir.iterdir()) == ["head.json", "head.safetensors"]
    meta = json.loads((head_dir / "head.json").read_text())
    assert meta["decoder"]["source"] == "checkpoint" and meta["spec"]["generation"]["max_new_tokens"] == 16
    loaded, _, manifest = load_bundle(t5_bundle)
    assert type(loaded.encoder).__name__ == "T5Stack"  # the encoder reloads alone
    texts = [s for s, _ in PAIRS]
    answers = Predictor(loaded, tokenizer, 32).predict(texts)
    assert sum(a["entities"] == {"text": t} for a, (_, t) in zip(answers, PAIRS)) >= 2  # learnt
    assert set(answers[0]) == {"sentiment", "entities"}
    items = encode_batch(
        model.encoder, tokenizer, texts, None, max_length=32, pooling="cls", need_pooled=False, need_tokens=True
    )
    assert run_head(model.heads["entities"], manifest.task("entities"), items, texts) == [
        a["entities"] for a in answers
    ]
    states, mask = pad_states(items)
    assert mask.sum(1).tolist() == [len(i.tokens) for i in items] and states.shape[0] == 4
    with pytest.raises(BundleError, match="trained against encoder"):
        load_head(t5_bundle, "entities", "0" * 16)


def test_fsdp_wraps_a_generation_head_trains_and_generates(trained_t5, tmp_path: Path) -> None:
    """One-process FSDP (gloo, CPU): the decoder is its own unit inside the head's unit; a
    teacher-forced step, generation through the model's forward, and gathering the whole state
    all work, and generation matches the unwrapped model's."""
    import copy

    import torch.distributed as dist

    from polytask.training import sharding

    model, tokenizer, _, _ = trained_t5
    plain = copy.deepcopy(model)
    batch = dict(tokenizer([s for s, _ in PAIRS], padding=True, return_tensors="pt"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = sharding.wrap(copy.deepcopy(model), torch.device("cpu"))
        settings = {"max_new_tokens": 8}
        with torch.no_grad():
            ids, _, _ = wrapped("entities", batch, generate=settings)
        assert ids == plain("entities", batch, generate=settings)[0]
        wrapped.train()
        labels = pad_targets(plain.heads["entities"].target_ids([t for _, t in PAIRS], 16))
        _, loss, weighted = wrapped("entities", {**batch, "labels": labels})
        weighted.backward()
        assert loss.item() > 0
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
        state, _ = sharding.gather_state(wrapped, opt)
        assert state.keys() == plain.state_dict().keys()
    finally:
        dist.destroy_process_group()


def test_int8_compression_quantizes_the_encoder_and_keeps_the_decoder_fp32(t5_bundle: Path, tmp_path: Path) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from polytask.compression.compress import compress_bundle

    manifest = compress_bundle(t5_bundle, tmp_path / "int8", "int8")
    assert manifest.variant == "int8"
    source, int8 = t5_bundle / "heads/entities", tmp_path / "int8/heads/entities"
    assert (int8 / "head.safetensors").read_bytes() == (source / "head.safetensors").read_bytes()
    assert json.loads((int8 / "head.json").read_text())["encoder_fingerprint"] == manifest.fingerprint
    model, _, _ = load_bundle(tmp_path / "int8")
    assert any(isinstance(m, DynamicLinear) for m in model.encoder.modules())
    assert {p.dtype for p in model.heads["entities"].parameters()} == {torch.float32}
    texts = [s for s, _ in PAIRS]
    fp32 = Predictor.from_bundle(str(t5_bundle)).predict(texts, ["entities"])
    quantized = Predictor.from_bundle(str(tmp_path / "int8")).predict(texts, ["entities"])
    assert sum(a == b for a, b in zip(fp32, quantized)) >= 2, (fp32, quantized)


def test_training_state_resumes_with_the_decoders_tied_weights(tiny_encoder: Path, demo_data: Path, tmp_path: Path) -> None:
    """The plain loop with a new decoder (its LM head tied to its embeddings): a checkpoint's
    state loads into a fresh set-up exactly, ties intact, and training goes on from it."""
    from polytask.config import config_from_dict
    from polytask.demo import demo_experiment, write_generation_data
    from polytask.training.data import load_task_data
    from polytask.training.loop import build_features, fit, load_state, save_checkpoint, setup

    data = write_generation_data(tmp_path / "data", n_train=32, n_eval=8)
    raw = demo_experiment(demo_data, tiny_encoder, epochs=2, num_workers=1)
    raw["tasks"][1] = {
        "name": "entities",
        "kind": "generation",
        "data": {"train": str(data / "entities/train.jsonl"), "validation": str(data / "entities/validation.jsonl")},
        "head": {"decoder_layers": 1},
        "generation": {"max_new_tokens": 4},
    }
    raw["sampling"] = {"strategy": "uniform", "steps_per_epoch": 4}
    cfg = config_from_dict(raw)
    task_data = load_task_data(cfg)
    _, tokenizer = load_encoder(str(tiny_encoder))
    train_f, eval_f = build_features(cfg, task_data, tokenizer)
    assert all(len(f["labels"]) <= 4 for f in train_f["entities"])  # cut to max_new_tokens
    specs = [td.spec for td in task_data.values()]
    tr = setup(cfg, specs, train_f, eval_f)
    history = fit(tr, epochs=1)
    assert {"entities/bleu", "entities/chrf", "entities/rouge_l"} <= set(history[0])
    assert save_checkpoint(tr, tmp_path / "ckpt")
    resumed = setup(cfg, specs, train_f, eval_f)
    load_state(resumed, tmp_path / "ckpt" / "state")
    saved, loaded = tr.core.state_dict(), resumed.core.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    decoder = resumed.core.heads["entities"].decoder
    assert decoder.get_output_embeddings().weight is decoder.get_input_embeddings().weight
    assert fit(resumed)[-1]["epoch"] == 1


def test_config_rejects_what_each_kind_never_reads_naming_the_key() -> None:
    from polytask.config import ConfigError, config_from_dict

    def cfg(**task):
        data = {"train": "t.jsonl", **task.pop("data", {})}
        return {"encoder": {"name_or_path": "x"}, "tasks": [{"name": "t", "data": data, **task}]}

    ok = config_from_dict(cfg(
        kind="generation",
        data={"text_pair_field": "context", "target_field": "summary"},
        head={"decoder": "new", "decoder_layers": 3, "label_smoothing": 0.1},
        generation={"max_new_tokens": 20, "num_beams": 4, "no_repeat_ngram_size": 3},
    ))
    task = ok.tasks[0]
    assert task.pair and task.metric == "bleu" and task.generation.num_beams == 4
    assert config_from_dict(ok.model_dump()).tasks[0] == task  # dumped and reloaded: still valid

    with pytest.raises(ConfigError) as bad_generation:
        config_from_dict(cfg(
            kind="generation", labels=["a", "b"], head={"threshold": 0.3},
            data={"label_field": "y", "tags_field": "t"},
        ))
    lines = str(bad_generation.value)
    for key in ("tasks[0].labels", "tasks[0].head.threshold", "tasks[0].data.label_field", "tasks[0].data.tags_field"):
        assert key in lines and "generation tasks" in lines, key
    with pytest.raises(ConfigError) as bad_classification:
        config_from_dict(cfg(
            kind="classification", data={"target_field": "t"}, head={"decoder": "new"},
            generation={"max_new_tokens": 8},
        ))
    lines = str(bad_classification.value)
    for key in ("tasks[0].data.target_field", "tasks[0].head.decoder", "tasks[0].generation"):
        assert key in lines, key
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.head\.decoder: .*'checkpoint' or 'new'"):
        config_from_dict(cfg(kind="generation", head={"decoder": "bart"}))


def test_checkpoint_decoder_needs_an_encoder_decoder_checkpoint(tiny_encoder: Path) -> None:
    encoder, tokenizer = load_encoder(str(tiny_encoder))
    with pytest.raises(ValueError, match="head.decoder: checkpoint needs encoder.name_or_path to be an encoder-decoder"):
        build_generation_head(_spec(decoder="checkpoint"), tokenizer, encoder, str(tiny_encoder))


def test_rows_without_a_target_fail_naming_the_row_and_column(tmp_path: Path) -> None:
    from polytask.config import config_from_dict
    from polytask.training.data import DataError, load_task_data

    rows = [{"text": "a b", "target": "a"}, {"text": "c d", "target": "  "}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "u.jsonl").write_text(json.dumps({"text": "a", "summary": "b"}) + "\n")
    task = {"name": "g", "kind": "generation", "data": {"train": str(tmp_path / "t.jsonl")}}
    cfg = config_from_dict({"encoder": {"name_or_path": "x"}, "tasks": [task]})
    with pytest.raises(DataError, match=r"t\.jsonl row 2: the target text \(column 'target'\) is '  '"):
        load_task_data(cfg)
    cfg.tasks[0].data.train = str(tmp_path / "u.jsonl")
    with pytest.raises(DataError, match=r"no column\(s\) \['target'\].*target_field"):
        load_task_data(cfg)


def test_pyfunc_answers_text_for_a_generation_task(t5_bundle: Path) -> None:
    """The MLflow pyfunc (models-from-code entry) over the bundle, loaded as MLflow loads it."""
    from types import SimpleNamespace

    from polytask.tracking.pyfunc_model import PolytaskModel

    model = PolytaskModel()
    model.load_context(SimpleNamespace(artifacts={"bundle": str(t5_bundle)}))
    texts = [s for s, _ in PAIRS[:2]]
    answers = model.predict(None, texts, {"tasks": ["entities"]})
    assert answers == Predictor.from_bundle(str(t5_bundle)).predict(texts, ["entities"])
    assert all(set(a) == {"entities"} and isinstance(a["entities"]["text"], str) for a in answers)

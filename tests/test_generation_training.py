"""Training a generation decoder: warm-starting a new decoder from the encoder (BERT2BERT), the
learning rate of its fresh parameters, BART's `<s>` label convention, and the int8 decoder.
All on tiny random models built here; no data or weights from a hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polytask.config import OptimConfig
from polytask.model.generation import (
    build_generation_head,
    generate,
    pad_targets,
    resolve_decoder,
)
from polytask.model.network import build_model, load_encoder
from polytask.tasks import NEW_PARAMETERS_LR, GenerationSpec, TaskSpec
from polytask.training.loop import make_optimizer

COPY = [
    "the film is a joy",
    "a dull and tired story",
    "bob met alice in paris",
    "the acme deal failed",
    "dana loves the new phone",
    "an honest and moving film",
]


def _tiny_bert(path: Path, layers: int = 3) -> Path:
    """A random 3-layer BERT (so bottom and top layers differ) with the demo tokenizer."""
    from polytask.demo import write_tiny_encoder

    return write_tiny_encoder(path, hidden_size=32, layers=layers, vocab_size=150)


@pytest.fixture(scope="module")
def bert3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("bert3") / "enc")


def _head(encoder_dir: Path, **gen):
    encoder, tokenizer = load_encoder(str(encoder_dir))
    spec = resolve_decoder(TaskSpec("copy", "generation", [], generation=GenerationSpec(**gen)), encoder)
    return encoder, tokenizer, spec, build_generation_head(spec, tokenizer, encoder)


@pytest.mark.parametrize("take, first", [("bottom", 0), ("top", 1)])
def test_warm_start_copies_the_encoder_layers_and_adds_fresh_cross_attention(
    bert3: Path, take: str, first: int
) -> None:
    encoder, _, spec, head = _head(bert3, decoder_layers=2, decoder_layers_from=take, max_new_tokens=8)
    assert spec.generation.decoder_init == "encoder"  # resolved: a BERT encoder warm-starts
    enc, dec = encoder.state_dict(), head.decoder.state_dict()
    for i in range(2):
        for part in ("attention.self.query.weight", "attention.output.LayerNorm.bias",
                     "intermediate.dense.weight", "output.dense.bias", "output.LayerNorm.weight"):
            assert torch.equal(dec[f"bert.encoder.layer.{i}.{part}"], enc[f"encoder.layer.{first + i}.{part}"])
    assert torch.equal(dec["bert.embeddings.word_embeddings.weight"], enc["embeddings.word_embeddings.weight"])
    rows = enc["embeddings.position_embeddings.weight"].shape[0]  # the decoder allows more positions
    assert torch.equal(dec["bert.embeddings.position_embeddings.weight"][:rows], enc["embeddings.position_embeddings.weight"])
    # cross-attention exists, starts fresh (no encoder tensor equals it) and is what `new_parameters` names
    cross = [k for k in dec if ".crossattention." in k]
    assert len(cross) == 2 * 10
    for key in (k for k in cross if dec[k].dim() == 2):  # biases start at 0 and norms at 1 anyway
        assert not any(v.shape == dec[key].shape and torch.equal(v, dec[key]) for v in enc.values()), key
    assert {k for k in head.new_parameters if "crossattention" in k} == {k for k in cross}
    assert not any(".attention.self." in k or "embeddings" in k for k in head.new_parameters)
    assert head.decoder.get_output_embeddings().weight is head.decoder.get_input_embeddings().weight


def test_random_init_and_impossible_warm_starts_say_which_key_to_change(bert3: Path, tiny_seq2seq: Path) -> None:
    encoder, _, _, head = _head(bert3, decoder_layers=1, decoder_init="random")
    enc = encoder.state_dict()
    dec = head.decoder.state_dict()
    assert not torch.equal(dec["bert.encoder.layer.0.attention.self.query.weight"], enc["encoder.layer.0.attention.self.query.weight"])
    with pytest.raises(ValueError, match=r"head.decoder_layers is 4 .* 3 layers"):
        _head(bert3, decoder_layers=4, decoder_init="encoder")
    t5_encoder, t5_tok = load_encoder(str(tiny_seq2seq))
    spec = TaskSpec("copy", "generation", [], generation=GenerationSpec(decoder="new", decoder_init="encoder"))
    with pytest.raises(ValueError, match=r"head.decoder_init: random"):
        build_generation_head(spec, t5_tok, t5_encoder)
    auto = resolve_decoder(TaskSpec("copy", "generation", [], generation=GenerationSpec(decoder="new")), t5_encoder)
    assert auto.generation.decoder_init == "random"  # a T5 encoder has no BERT layers to copy


@pytest.mark.parametrize(("scale", "fresh_lr"), [(10.0, 1e-3), (None, NEW_PARAMETERS_LR)])
def test_fresh_decoder_parameters_get_their_own_learning_rate(
    bert3: Path, scale: float | None, fresh_lr: float
) -> None:
    """`new_lr_scale` × the head rate; unset, the fixed rate the learning curves chose (also
    when a config raises the head rate for its classifiers)."""
    encoder, _, spec, head = _head(bert3, decoder_layers=1, new_lr_scale=scale)
    model = build_model(encoder, [spec], pooling="cls", heads={"copy": head})
    opt = make_optimizer(model, OptimConfig(lr=1e-4))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["heads.copy.decoder.bert.encoder.layer.0.crossattention.self.query.weight"])] == pytest.approx(fresh_lr)
    assert lr_of[id(params["heads.copy.decoder.bert.encoder.layer.0.attention.self.query.weight"])] == pytest.approx(1e-4)
    assert lr_of[id(params["encoder.encoder.layer.0.attention.self.query.weight"])] == pytest.approx(1e-4)


def _copy_training(encoder_dir: Path, steps: int, **gen) -> tuple[list[str], list[str]]:
    torch.manual_seed(0)
    encoder, tokenizer, spec, head = _head(encoder_dir, max_new_tokens=24, **gen)
    model = build_model(encoder, [spec], pooling="cls", heads={"copy": head})
    batch = dict(tokenizer(COPY, padding=True, return_tensors="pt"))
    batch["labels"] = pad_targets(head.target_ids(COPY, 24))
    opt = make_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0))
    model.train()
    for _ in range(steps):
        _, _, weighted = model("copy", batch)
        opt.zero_grad()
        weighted.backward()
        opt.step()
    model.eval()
    ids, _, _ = model("copy", batch, generate={"max_new_tokens": 24})
    want = tokenizer.batch_decode(head.target_ids(COPY, 24), skip_special_tokens=True)
    return tokenizer.batch_decode(ids, skip_special_tokens=True), want


def test_a_warm_started_decoder_learns_to_copy_in_a_few_dozen_steps(tmp_path: Path) -> None:
    encoder_dir = _tiny_bert(tmp_path / "enc", layers=2)
    # one rate for the whole head: 3e-3 memorises these sentences
    got, want = _copy_training(
        encoder_dir, 80, decoder_layers=2, decoder_init="encoder", new_lr_scale=1.0
    )
    assert got == want


def test_bart_labels_keep_bos_after_the_decoder_start(tmp_path: Path) -> None:
    """BART was pretrained to write `</s> <s> text </s>`: the decoder's inputs start `</s> <s>`,
    its labels `<s> text </s>`, and generated answers come back without the `<s>`."""
    from transformers import BartConfig, BartForConditionalGeneration

    from polytask.demo import demo_tokenizer

    tokenizer = demo_tokenizer(150)
    bos, eos, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=64, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        decoder_start_token_id=eos, forced_bos_token_id=bos,
    )
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(tmp_path / "bart")
    tokenizer.save_pretrained(tmp_path / "bart")
    encoder, tok = load_encoder(str(tmp_path / "bart"))
    spec = resolve_decoder(TaskSpec("copy", "generation", [], generation=GenerationSpec(max_new_tokens=8)), encoder)
    head = build_generation_head(spec, tok, encoder, str(tmp_path / "bart"))
    assert spec.generation.decoder == "checkpoint" and head.label_prefix == [bos]
    assert (head.start_id, head.eos_id) == (eos, eos)

    seen: list[torch.Tensor] = []
    head.decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["decoder_input_ids"]), with_kwargs=True)
    batch = dict(tok(COPY[:2], padding=True, return_tensors="pt"))
    states = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = pad_targets(head.target_ids(COPY[:2], 16))
    logits, loss = head(states, batch["attention_mask"], labels=targets)
    assert seen[-1][:, :2].tolist() == [[eos, bos], [eos, bos]]
    row0 = targets[0][targets[0] != -100].tolist()
    assert seen[-1][0, 2 : 2 + len(row0)].tolist() == row0
    labels = torch.full((2, logits.shape[1]), -100)
    for i, row in enumerate(targets):
        ids = [bos] + row[row != -100].tolist() + [eos]
        labels[i, : len(ids)] = torch.tensor(ids)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # a decoder that writes <s> at every step: the first is the convention's and is cut off,
    # and the cap counts the tokens after it
    with torch.no_grad():
        head.decoder.final_logits_bias[0, bos] = 1e4
    out = generate(head, states.detach(), batch["attention_mask"], max_new_tokens=3)
    assert out == [[bos] * 3, [bos] * 3]


def test_int8_decoder_still_answers_and_its_linears_are_int8(generation_bundle: Path, tmp_path: Path) -> None:
    from torch import nn

    from polytask.compression.compress import compress_bundle
    from polytask.model.bundle import load_bundle

    _, tokenizer, _ = load_bundle(generation_bundle)
    out = tmp_path / "int8"
    manifest = compress_bundle(generation_bundle, out, "int8", decoder_int8=True)
    assert manifest.recipe[-1]["decoders"] == ["entities"]
    model, _, _ = load_bundle(out)
    decoder = model.heads["entities"].decoder
    kinds = {type(m).__name__ for m in decoder.modules()}
    assert "Int8Linear" in kinds and not any(type(m) is nn.Linear for m in decoder.modules())
    assert type(decoder.get_output_embeddings()).__name__ == "Int8Linear"
    batch = dict(tokenizer(COPY[:3], padding=True, return_tensors="pt"))
    ids, _, _ = model("entities", batch, generate={"max_new_tokens": 6, "min_new_tokens": 6})
    assert [len(r) for r in ids] == [6, 6, 6] and all(0 <= t < len(tokenizer) for r in ids for t in r)
    with pytest.raises(ValueError, match="--decoder-int8"):
        compress_bundle(generation_bundle, tmp_path / "p", "prune", decoder_int8=True)


def test_compress_eval_times_generation_end_to_end_and_reports_the_bleu_change(
    generation_bundle: Path, tiny_encoder: Path, demo_data: Path, tmp_path: Path
) -> None:
    from polytask.compression.compress import (
        compress_bundle,
        evaluate_compression,
        flat_report,
        format_report,
    )
    from polytask.config import config_from_dict
    from polytask.demo import demo_experiment, write_generation_data

    data = write_generation_data(tmp_path / "data", n_train=16, n_eval=8)
    raw = demo_experiment(demo_data, tiny_encoder, epochs=1, num_workers=1)
    raw["tasks"][1] = {
        "name": "entities",
        "kind": "generation",
        "data": {"train": str(data / "entities/train.jsonl"), "validation": str(data / "entities/validation.jsonl")},
        "generation": {"max_new_tokens": 6},
    }
    compress_bundle(generation_bundle, tmp_path / "int8", "int8", decoder_int8=True)
    report = evaluate_compression(generation_bundle, tmp_path / "int8", config_from_dict(raw), batch_size=4, repeats=1)
    for side in ("source", "compressed"):
        assert report[side]["generation_by_threads"].keys() == report[side]["seq_per_s_by_threads"].keys()
        for speed in report[side]["generation_by_threads"].values():
            assert speed["seq_per_s"] > 0 and speed["tokens_per_s"] > 0
    assert report["generation_speedup_by_threads"].keys() == report["speedup_by_threads"].keys()
    assert "entities/bleu" in report["delta"] and "sentiment/accuracy" in report["delta"]
    assert "generation seq/s (encoder + decoder)" in format_report(report)
    assert any(k.startswith("generation_speedup/threads_") for k in flat_report(report))

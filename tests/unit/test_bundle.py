"""Bundle: save → load gives identical outputs, no pickle anywhere, mismatched heads refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from polytask.model.bundle import (
    BundleError,
    load_bundle,
    load_encoder_part,
    load_head,
    save_bundle,
)
from polytask.model.inference import Predictor
from polytask.model.network import build_model, load_encoder
from polytask.tasks import TaskSpec

SPECS = [
    TaskSpec("sentiment", "classification", ["negative", "positive"]),
    TaskSpec("ner", "token_classification", ["O", "B-person", "I-person"]),
    TaskSpec("score", "regression", ["value"], hidden_dim=8),
]


def _model(encoder_dir: Path, seed: int = 0):
    torch.manual_seed(seed)
    encoder, tok = load_encoder(str(encoder_dir))
    return build_model(encoder, SPECS, "mean"), tok


def test_save_load_identical_outputs_and_layout(tiny_encoder: Path, tmp_path: Path) -> None:
    model, tok = _model(tiny_encoder)
    model.eval()
    save_bundle(model, tok, tmp_path / "b", max_length=32)
    files = sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert "polytask.json" in files and "encoder/model.safetensors" in files
    assert "heads/ner/head.safetensors" in files and "heads/score/head.json" in files
    for path in (tmp_path / "b").rglob("*"):
        if path.is_file():
            assert path.suffix not in (".bin", ".pt", ".pkl", ".pickle")
            if path.suffix == ".safetensors":
                with safe_open(path, "pt") as f:
                    assert list(f.keys())
            else:  # JSON and tokenizer text: neither a raw pickle nor a torch.save zip
                head = path.read_bytes()[:4]
                assert head[:1] != b"\x80" and head != b"PK\x03\x04", f"{path} looks pickled"
    loaded, _, manifest = load_bundle(tmp_path / "b")
    assert manifest.pooling == "mean" and [s.name for s in manifest.tasks] == ["sentiment", "ner", "score"]
    batch = tok(["alice flew to lima", "the movie was great"], padding=True, return_tensors="pt")
    with torch.no_grad():
        for task in ("sentiment", "ner", "score"):
            a, _, _ = model(task, dict(batch))
            b, _, _ = loaded(task, dict(batch))
            assert torch.equal(a, b)
    texts = ["grace moved to new york", "what a superb book"]
    assert Predictor(model, tok, 32).predict(texts) == Predictor.from_bundle(str(tmp_path / "b")).predict(texts)


def test_head_from_other_encoder_is_refused(tiny_encoder: Path, tmp_path: Path) -> None:
    model_a, tok = _model(tiny_encoder, seed=0)
    save_bundle(model_a, tok, tmp_path / "a", max_length=32)
    model_b, _ = _model(tiny_encoder, seed=0)
    with torch.no_grad():
        model_b.encoder.embeddings.word_embeddings.weight.add_(0.01)  # "fine-tuned" differently
    save_bundle(model_b, tok, tmp_path / "b", max_length=32)
    _, _, fingerprint_a = load_encoder_part(tmp_path / "a")
    _, spec = load_head(tmp_path / "a", "ner", fingerprint_a)
    assert spec.labels == ["O", "B-person", "I-person"]
    with pytest.raises(BundleError, match="trained against encoder .* but the loaded encoder is"):
        load_head(tmp_path / "b", "ner", fingerprint_a)
    shutil.copytree(tmp_path / "b" / "heads" / "ner", tmp_path / "a" / "heads" / "ner", dirs_exist_ok=True)
    with pytest.raises(BundleError, match="serve heads from the same bundle"):
        load_bundle(tmp_path / "a")


def test_unknown_head_and_not_a_bundle(tiny_encoder: Path, tmp_path: Path) -> None:
    model, tok = _model(tiny_encoder)
    save_bundle(model, tok, tmp_path / "b", max_length=32)
    with pytest.raises(BundleError, match=r"no head for task 'topic'; heads present: \['ner', 'score', 'sentiment'\]"):
        load_head(tmp_path / "b", "topic", None)
    with pytest.raises(BundleError, match="no polytask.json"):
        load_bundle(tmp_path)
    manifest = json.loads((tmp_path / "b" / "polytask.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "b" / "polytask.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(tmp_path / "b")

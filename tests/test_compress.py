"""Compression: int8 and pruned bundles load (in process, in a fresh process, over HTTP), agree
with their fp32 source, contain no pickle, and register as new versions beside the source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port
from polytask.compression.compress import compress_bundle, run_compress
from polytask.model.bundle import BundleError, load_bundle, load_encoder_part, read_manifest
from polytask.model.inference import Predictor
from polytask.model.pruning import layer_params

ROOT = Path(__file__).resolve().parents[1]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@pytest.fixture(scope="module")
def int8_bundle(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "bundle"
    compress_bundle(trained_bundle, out, "int8")
    return out


@pytest.fixture(scope="module")
def pruned_bundle(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "bundle"
    compress_bundle(trained_bundle, out, "prune", sparsity=0.3)
    return out


def _validation_inputs(demo_data: Path) -> list[str]:
    texts = [json.loads(line)["text"] for line in (demo_data / "sentiment/validation.jsonl").open()]
    sentences = (demo_data / "ner/validation.conll").read_text().split("\n\n")
    for block in sentences:
        words = [
            line.split("\t")[0]
            for line in block.splitlines()
            if line and not line.startswith("-DOCSTART-")
        ]
        if words:
            texts.append(" ".join(words))
    return texts


def _agreement(a: list[dict], b: list[dict]) -> dict[str, float]:
    """Share of inputs with the same sentiment label, and with exactly the same NER entities."""

    def spans(r: dict) -> list[tuple]:
        return [(e["type"], e["start"], e["end"]) for e in r["ner"]["entities"]]

    same_label = [x["sentiment"]["label"] == y["sentiment"]["label"] for x, y in zip(a, b)]
    same_tags = [spans(x) == spans(y) for x, y in zip(a, b)]
    return {"sentiment": sum(same_label) / len(a), "ner": sum(same_tags) / len(a)}


def _answers(results: list[dict]) -> list[tuple]:
    """Labels, entity spans, and probabilities/scores rounded to 4 places."""
    return [
        (
            r["sentiment"]["label"],
            round(max(r["sentiment"]["probabilities"].values()), 4),
            [
                (e["type"], e["start"], e["end"], e["text"], round(e["score"], 4))
                for e in r["ner"]["entities"]
            ],
        )
        for r in results
    ]


def _assert_no_pickle(bundle: Path) -> None:
    """Every file is safetensors that safe_open parses, or UTF-8 text; none is a pickle (b"\\x80"
    + protocol) or a torch.save zip. (A safetensors file may itself start with b"\\x80": its
    first 8 bytes are the little-endian header length, so it is checked by parsing instead.)"""
    from safetensors import safe_open

    files = [f for f in bundle.rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
        assert f.suffix not in PICKLE_SUFFIXES, f
        head = f.read_bytes()
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as st:
                assert list(st.keys()), f
            continue
        assert not head.startswith(b"\x80"), f"{f} starts with pickle magic"
        assert not head.startswith(b"PK\x03\x04"), f"{f} is a zip (torch.save format)"
        head.decode("utf-8")


def test_int8_bundle_agrees_with_fp32_and_holds_no_pickle(trained_bundle, int8_bundle, demo_data):
    manifest = read_manifest(int8_bundle)
    assert manifest.variant == "int8"
    assert manifest.recipe[-1]["method"] == "int8" and manifest.recipe[-1]["modules"]
    assert manifest.fingerprint != read_manifest(trained_bundle).fingerprint
    for head_json in (int8_bundle / "heads").glob("*/head.json"):
        assert json.loads(head_json.read_text())["encoder_fingerprint"] == manifest.fingerprint
    encoder, _, fingerprint = load_encoder_part(int8_bundle)
    assert fingerprint == manifest.fingerprint
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    quantized = [m for m in encoder.modules() if isinstance(m, DynamicLinear)]
    assert len(quantized) == len(manifest.recipe[-1]["modules"])
    _assert_no_pickle(int8_bundle)
    src_bytes = (trained_bundle / "encoder/model.safetensors").stat().st_size
    assert (int8_bundle / "encoder/model.safetensors").stat().st_size < src_bytes

    inputs = _validation_inputs(demo_data)
    fp32 = Predictor.from_bundle(str(trained_bundle)).predict(inputs)
    int8 = Predictor.from_bundle(str(int8_bundle)).predict(inputs)
    agreement = _agreement(fp32, int8)
    assert agreement["sentiment"] >= 0.9 and agreement["ner"] >= 0.9, agreement
    assert any(r["ner"]["entities"] for r in int8)


def test_int8_refuses_gpu_and_double_quantization(int8_bundle, tmp_path):
    with pytest.raises(BundleError, match="CPU only"):
        load_encoder_part(int8_bundle, device="cuda")
    with pytest.raises(ValueError, match="already int8"):
        compress_bundle(int8_bundle, tmp_path / "again", "int8")


def test_int8_activations_use_8_bits_where_the_cpu_sums_in_int32(int8_bundle):
    """On oneDNN with VNNI the loaded modules skip torch.ao's 7-bit activation range, and that
    halves the error against fp32; elsewhere they keep 7 bits (no int16 saturation)."""
    from polytask.model.int8 import _dynamic_linears, _torch_ao, _usable, full_range_activations

    encoder, _, _ = load_encoder_part(int8_bundle)
    modules = list(_dynamic_linears(encoder).values())
    engine = _usable(read_manifest(int8_bundle).recipe[-1]["engine"])
    assert modules and {m.full_range for m in modules} == {full_range_activations(engine)}
    if not modules[0].full_range:
        return
    torch.manual_seed(0)
    module = modules[0]
    linear = torch.nn.Linear(module.in_features, module.out_features)
    weight = linear.weight.detach()
    with _torch_ao(engine):
        module.set_weight_bias(
            torch.quantize_per_channel(
                weight,
                weight.abs().amax(1) / 127,
                torch.zeros(len(weight), dtype=torch.long),
                0,
                torch.qint8,
            ),
            linear.bias.detach(),
        )
    x = 3 * torch.randn(64, linear.in_features)
    with torch.inference_mode():
        want = linear(x)
        errors = {}
        for full in (True, False):
            module.full_range = full
            errors[full] = ((module(x) - want).norm() / want.norm()).item()
    assert errors[True] < 0.7 * errors[False], errors


def test_pruned_bundle_removes_the_requested_share_and_keeps_output_shapes(
    trained_bundle, pruned_bundle
):
    source, tokenizer, _ = load_bundle(trained_bundle)
    pruned, _, manifest = load_bundle(pruned_bundle)
    step = manifest.recipe[-1]
    assert manifest.variant == "pruned" and step["importance"] == "magnitude"
    before, after = layer_params(source.encoder), layer_params(pruned.encoder)
    assert (before, after) == (step["params_before"], step["params_after"])
    assert 1 - after / before == pytest.approx(0.3, abs=0.05)
    for layer, shape in zip(pruned.encoder.encoder.layer, step["layers"]):
        assert layer.intermediate.dense.out_features == shape["intermediate"]
        assert layer.attention.self.query.out_features == shape["heads"] * 8  # head size 32/4
    batch = tokenizer(
        ["alice flew to paris", "the movie was great fun"], padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        for task in ("sentiment", "ner"):
            want, _, _ = source(task, dict(batch))
            got, _, _ = pruned(task, dict(batch))
            assert got.shape == want.shape

    # The shapes come from the recipe: without it the same files do not load.
    data = json.loads((pruned_bundle / "polytask.json").read_text())
    data["encoder"]["recipe"] = []
    broken = pruned_bundle.with_name("no-recipe")
    import shutil

    shutil.copytree(pruned_bundle, broken)
    (broken / "polytask.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="mismatch"):
        load_bundle(broken)


def test_compressed_bundles_load_in_a_fresh_process(pruned_bundle, int8_bundle, tmp_path):
    """load_bundle from disk alone (pruned, and pruned then int8) gives the in-process answers."""
    both = tmp_path / "pruned-int8"
    manifest = compress_bundle(pruned_bundle, both, "int8")
    assert manifest.variant == "pruned+int8"
    assert [s["method"] for s in manifest.recipe] == ["prune", "int8"]
    texts = ["alice flew to paris last week", "what a dreadful meal"]
    script = (
        "import json, sys\n"
        "from polytask.model.inference import Predictor\n"
        "print(json.dumps([Predictor.from_bundle(p).predict(json.loads(sys.argv[1])) for p in sys.argv[2:]]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(texts), str(pruned_bundle), str(both)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    for path, got in zip((pruned_bundle, both), fresh):
        want = Predictor.from_bundle(str(path)).predict(texts)
        assert _answers(got) == _answers(want)


def test_gradient_pruning_with_recovery_steps(trained_bundle, experiment, tmp_path):
    cfg = experiment(sampling={"steps_per_epoch": 4})
    out = tmp_path / "pruned"
    manifest = compress_bundle(
        trained_bundle, out, "prune", sparsity=0.5, experiment=cfg, finetune_steps=4
    )
    step = manifest.recipe[-1]
    assert step["importance"] == "taylor" and step["finetune_steps"] == 4
    assert 1 - step["params_after"] / step["params_before"] == pytest.approx(0.5, abs=0.05)
    assert (out / "heads/ner/head.safetensors").read_bytes() != (
        trained_bundle / "heads/ner/head.safetensors"
    ).read_bytes(), "recovery training updates the heads too"
    model, _, _ = load_bundle(out)
    assert model.specs.keys() == {"sentiment", "ner"}


def test_compressed_version_is_registered_beside_the_source(
    trained_bundle, demo_data, tiny_encoder, mlflow_uri, tmp_path, monkeypatch
):
    """In the default store (SQLite under the polytask home, no MLFLOW_TRACKING_URI), as the CLI
    uses it: MLflow's global store is then elsewhere, and registering must not depend on it."""
    from mlflow import MlflowClient

    from polytask.demo import demo_experiment, write_yaml
    from polytask.tracking import registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = registry.tracking_uri()
    assert uri != mlflow_uri and uri.startswith("sqlite:///")
    client = MlflowClient(uri, uri)
    exp = registry.ensure_experiment(client, "polytask", uri)
    run = client.create_run(exp)
    source = registry.register_bundle(
        trained_bundle, "polytask-demo", run.info.run_id, 0.5, "always"
    )
    assert source["version"] == 1
    before = client.get_registered_model("polytask-demo").aliases
    yaml_path = write_yaml(demo_experiment(demo_data, tiny_encoder), tmp_path / "exp.yaml")

    summary = run_compress(
        "models:/polytask-demo@champion",
        "int8",
        eval_experiment=yaml_path,
        out=tmp_path / "int8",
        register=True,
    )
    reg = summary["registered"]
    assert (reg["version"], reg["source_version"]) == (2, 1)
    assert (
        client.get_registered_model("polytask-demo").aliases
        == before
        == {"champion": 1, "candidate": 1}
    )
    v1, v2 = (
        client.get_model_version("polytask-demo", "1"),
        client.get_model_version("polytask-demo", "2"),
    )
    assert v2.tags["polytask.compression"] == "int8" and v2.tags["polytask.source_version"] == "1"
    assert v2.tags["polytask.variant"] == "int8" and v2.tags["polytask.base_version"] == "1"
    assert "polytask.compression" not in v1.tags and v1.source == source["model_uri"]
    metrics = client.get_run(v2.run_id).data.metrics
    assert (
        metrics["compressed/sentiment/accuracy"]
        == summary["evaluation"]["compressed"]["metrics"]["sentiment"]["accuracy"]
    )
    assert {"speedup", "delta/ner/f1", "source/seq_per_s", "compressed/encoder_bytes"} <= set(
        metrics
    )
    assert metrics["compressed/encoder_bytes"] < metrics["source/encoder_bytes"]
    assert metrics["speedup"] == metrics["speedup/threads_1"] == pytest.approx(
        metrics["compressed/seq_per_s/threads_1"] / metrics["source/seq_per_s/threads_1"]
    )

    local = registry.resolve_bundle("models:/polytask-demo/2")
    assert read_manifest(local).variant == "int8"
    assert Predictor.from_bundle(str(local)).predict(["alice flew to paris"])[0].keys() == {
        "sentiment",
        "ner",
    }


def test_register_needs_a_registry_source(trained_bundle, tmp_path):
    with pytest.raises(ValueError, match="--no-register"):
        run_compress(str(trained_bundle), "int8", out=tmp_path / "x", register=True)
    summary = run_compress(
        str(trained_bundle), "prune", sparsity=0.2, out=tmp_path / "p", register=False
    )
    assert summary["variant"] == "pruned" and "registered" not in summary


def test_cpu_variant_serves_the_int8_version_over_http(
    trained_bundle, int8_bundle, mlflow_uri, ray_with_store
):
    """`cpu_variant: int8` turns `models:/NAME@champion` into the int8 version compressed from
    the champion, and the CPU Encoder deployment serves it (through bundle.load_encoder_part)."""
    import httpx
    from ray import serve

    from polytask.compression.compress import register_compressed
    from polytask.serve import run_server
    from polytask.tracking import registry

    c = registry.client()
    run = c.create_run(registry.ensure_experiment(c, "polytask", mlflow_uri))
    registry.register_bundle(trained_bundle, "polytask-demo", run.info.run_id, 0.5, "always")
    assert register_compressed(int8_bundle, "polytask-demo", 1)["version"] == 2
    port = free_port()
    texts = ["alice flew to paris last week with bob smith", "the hotel was dreadful"]
    try:  # ray_with_store: the replicas read this test's store
        url = run_server(
            "models:/polytask-demo@champion",
            config_path=ROOT / "serve_configs/local.yaml",
            port=port,
            blocking=False,
            cpu_variant="int8",
        )
        with httpx.Client(base_url=url, timeout=120) as client:
            response = client.post("/v1/predict", json={"inputs": texts})
            assert response.status_code == 200, response.text
            body = response.json()
    finally:
        serve.shutdown()
    want = Predictor.from_bundle(str(int8_bundle)).predict(texts)
    assert body["model"]["ref"] == "models:/polytask-demo/2"
    assert body["model"]["variant"] == "int8"
    assert body["model"]["fingerprint"] == read_manifest(int8_bundle).fingerprint
    assert _answers(body["results"]) == _answers(want)

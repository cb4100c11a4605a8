"""Compress a bundle for serving — int8 (model/int8.py) or structured pruning (prune.py) — measure
it against its source, and register it as a new model version next to the source.

A compressed bundle keeps the bundle layout; polytask.json's `encoder.recipe` lists the steps,
which `model/variants.py` replays at load time. Serving never imports this module.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from polytask.compression.prune import prune_encoder
from polytask.compression.timing import (
    encoder_throughput,
    generation_batches,
    generation_throughput,
    throughput_batches,
)
from polytask.durable import prepare_dir, swap_dir
from polytask.model.bundle import (
    MANIFEST,
    Manifest,
    load_bundle,
    load_encoder_part,
    read_manifest,
    write_head_weights,
)
from polytask.model.int8 import int8_state, quantize_encoder
from polytask.model.network import encoder_fingerprint, tensors_fingerprint
from polytask.model.variants import METHODS, WEIGHTS
from polytask.tracking.registry import VARIANT_OF_METHOD
from polytask.tracking.tags import (
    BASE_VERSION_TAG,
    COMPRESSION_TAG,
    OBJECTIVE_TAG,
    SOURCE_VERSION_TAG,
    VARIANT_TAG,
)

if TYPE_CHECKING:
    from polytask.config import ExperimentConfig
    from polytask.model.network import MultiTaskModel



# --- compressing -------------------------------------------------------------------------------


def compress_bundle(
    src_bundle: str | Path,
    out: str | Path,
    method: str,
    sparsity: float = 0.3,
    *,
    experiment: ExperimentConfig | None = None,
    finetune_steps: int = 0,
    skip: tuple[str, ...] = (),
    engine: str | None = None,
    decoder_int8: bool = False,
) -> Manifest:
    """Write a compressed copy of `src_bundle` to `out` and return its manifest.

    int8: every encoder nn.Linear (minus names containing a `skip` part) → dynamic int8, CPU;
    with `decoder_int8`, every generation head's decoder nn.Linear too (LM head included).
    prune: remove `sparsity` of the transformer-layer parameters as whole heads and FFN neurons,
    ranked by gradient importance on the experiment's train split when `experiment` is given
    (else weight magnitude), then optionally `finetune_steps` of recovery training.
    """
    src_bundle, out = Path(src_bundle), Path(out)
    if method not in METHODS:
        raise ValueError(f"--method '{method}': choose one of {', '.join(METHODS)}")
    if out.resolve() == src_bundle.resolve():
        raise ValueError(f"--out {out} is the source bundle; pick another directory")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ValueError(f"--out {out} exists and is not a bundle; pick an empty or new directory")
    manifest = read_manifest(src_bundle)
    if any(step["method"] == "int8" for step in manifest.recipe):
        raise ValueError(
            f"{src_bundle} is already int8; compress its fp32 (or pruned) source instead"
        )
    if decoder_int8 and method != "int8":
        raise ValueError("--decoder-int8 quantizes generation decoders with --method int8; add it")
    heads = None
    int8_heads: dict[str, dict[str, Any]] = {}
    if method == "int8":
        encoder, _, _ = load_encoder_part(src_bundle)
        quantized, step = quantize_encoder(encoder, skip, engine)
        state = int8_state(quantized)
        fingerprint = tensors_fingerprint(state)
        if decoder_int8:
            int8_heads = _int8_decoders(src_bundle, manifest, step["engine"])
            step["decoders"] = sorted(int8_heads)
    else:
        if finetune_steps and experiment is None:
            raise ValueError("--finetune-steps needs --eval EXPERIMENT.yaml (its train data)")
        model, tokenizer, _ = load_bundle(src_bundle)
        train = _features(experiment, manifest, tokenizer, "train") if experiment else None
        pad_id, batch_size = (
            tokenizer.pad_token_id,
            experiment.optim.batch_size if experiment else 0,
        )
        losses = _importance_losses(model, train, pad_id, batch_size) if train else None
        _, step = prune_encoder(model.encoder, sparsity, losses)
        model.zero_grad(set_to_none=True)
        if finetune_steps:
            _recover(model, train, experiment, pad_id, finetune_steps)
            step["finetune_steps"] = finetune_steps
            heads = dict(model.heads.items())
        state = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
        fingerprint = encoder_fingerprint(model.encoder)
    recipe = [*manifest.recipe, step]
    new = Manifest(
        tasks=manifest.tasks,
        fingerprint=fingerprint,
        pooling=manifest.pooling,
        max_length=manifest.max_length,
        source=manifest.source,
        variant="+".join(VARIANT_OF_METHOD[s["method"]] for s in recipe),
        extra={
            **manifest.extra,
            "compressed_from": {"fingerprint": manifest.fingerprint, "variant": manifest.variant},
        },
        recipe=recipe,
    )
    _write(src_bundle, out, new, state, heads, int8_heads)
    return new


def _int8_decoders(src: Path, manifest: Manifest, engine: str) -> dict[str, dict[str, Any]]:
    """{task: {"step": how to rebuild it, "state": its tensors}} for each generation head, its
    decoder's nn.Linear layers dynamic int8 (the encoder's scheme); refused when there is none."""
    from polytask.model.bundle import load_head

    out = {}
    for spec in manifest.tasks:
        if not spec.is_generation:
            continue
        head, _ = load_head(src, spec.name, None)
        decoder, step = quantize_encoder(head.decoder, (), engine)
        state = {f"decoder.{k}": v.clone() for k, v in int8_state(decoder).items()}  # untie the LM bias
        out[spec.name] = {"step": step, "state": state}
    if not out:
        raise ValueError(f"--decoder-int8: {src} has no generation task; leave the flag out")
    return out


def _write(
    src: Path,
    out: Path,
    manifest: Manifest,
    encoder_state: dict[str, torch.Tensor],
    heads: dict[str, nn.Module] | None,
    int8_heads: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Copy the source bundle, swap in the new encoder weights, re-stamp every head's expected
    fingerprint; `out` is replaced only once complete."""
    tmp = prepare_dir(out)
    shutil.copytree(
        src,
        tmp,
        ignore=shutil.ignore_patterns("model*.safetensors", "model.safetensors.index.json"),
    )
    save_file(encoder_state, tmp / "encoder" / WEIGHTS, metadata={"format": "pt"})
    for spec in manifest.tasks:
        head_dir = tmp / "heads" / spec.name
        meta = json.loads((head_dir / "head.json").read_text())
        meta["encoder_fingerprint"] = manifest.fingerprint
        if int8_heads and spec.name in int8_heads:
            meta["decoder"]["int8"] = int8_heads[spec.name]["step"]
            save_file(int8_heads[spec.name]["state"], head_dir / "head.safetensors", metadata={"format": "pt"})
        (head_dir / "head.json").write_text(json.dumps(meta, indent=2))
        if heads is not None:
            write_head_weights(heads[spec.name], head_dir)
    (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
    swap_dir(tmp, out)


def _features(
    cfg: ExperimentConfig, manifest: Manifest, tokenizer: Any, split: str
) -> dict[str, list[dict[str, Any]]]:
    """Tokenized features of one split for the tasks the bundle and the experiment share,
    labelled with the bundle's own label order."""
    from polytask.training.data import load_task_data
    from polytask.training.features import tokenize_split

    known = {s.name for s in manifest.tasks}
    shared = [t for t in cfg.task_names if t in known]
    if not shared:
        raise ValueError(
            f"the experiment's tasks {[t.name for t in cfg.tasks]} share none with the model's "
            f"{sorted(known)}; pass the experiment the model was trained with"
        )
    task_data = load_task_data(cfg)
    mine = {name: task_data[name] for name in shared}
    return tokenize_split(mine, split, tokenizer, manifest.max_length, spec_of=manifest.task)


def _importance_losses(
    model: MultiTaskModel,
    features: dict[str, list[dict[str, Any]]],
    pad_id: int,
    batch_size: int,
    batches: int = 16,
) -> Iterator[Callable[[], torch.Tensor]]:
    """Loss closures over up to `batches` train batches per task (train, not validation, so the
    evaluation afterwards is not scored on data that chose what to prune)."""
    from polytask.training.batches import eval_batches

    model.eval()  # no dropout: importance should reflect the deterministic network
    for task, feats in features.items():
        token = model.specs[task].task_kind.sequence_labels
        for _, batch in eval_batches(feats[: batches * batch_size], batch_size, pad_id, token):
            yield lambda task=task, batch=batch: model(task, batch)[1]


def _recover(
    model: MultiTaskModel,
    features: dict[str, list[dict[str, Any]]],
    cfg: ExperimentConfig,
    pad_id: int,
    steps: int,
) -> None:
    """A short recovery fine-tune of the pruned model (encoder and heads): one `fit` epoch of
    `steps` steps with the plain loop's own optimizer, schedule, sampler and step."""
    from polytask.model.network import LossWeighting
    from polytask.training.batches import TaskBatches, TaskSampler
    from polytask.training.loop import TrainState, fit, make_optimizer, make_scheduler

    model.weighting = LossWeighting(
        list(model.specs), "static", {t.name: t.weight for t in cfg.tasks}
    )
    o = cfg.optim
    sizes = {name: len(f) for name, f in features.items()}
    sampler = TaskSampler(
        sizes, cfg.sampling.strategy, cfg.sampling.temperature, o.seed, 1, steps, o.batch_size
    )
    token_tasks = {n for n in features if model.specs[n].task_kind.sequence_labels}
    batches = TaskBatches(features, token_tasks, o.batch_size, 0, 1, o.seed, pad_id)
    optimizer = make_optimizer(model, o)
    scheduler = make_scheduler(optimizer, steps, o.warmup_ratio)
    state = TrainState(
        cfg, model, model, None, optimizer, scheduler, sampler, batches, {}, torch.device("cpu")
    )
    fit(state, epochs=1, evaluate_each_epoch=False)
    model.eval()


# --- measuring ---------------------------------------------------------------------------------


def compare_bundles(
    bundles: dict[str, str | Path],
    cfg: ExperimentConfig,
    batch_size: int = 32,
    repeats: int = 3,
    threads: tuple[int, ...] = (),
) -> dict[str, dict[str, Any]]:
    """Per bundle: validation metrics, encoder seq/s (same length-sorted texts and batch size for
    all, passes interleaved), and bytes on disk. The first bundle's tokenizer tokenizes for all.

    With `threads`, throughput is measured once per torch thread count (`seq_per_s_by_threads`;
    `seq_per_s` is the first), since int8 and fp32 scale differently with threads.
    """
    from polytask.training.loop import evaluate

    loaded = {key: load_bundle(path) for key, path in bundles.items()}
    _, tokenizer, manifest = next(iter(loaded.values()))
    features = _features(cfg, manifest, tokenizer, "validation")
    if not features:
        raise ValueError("--eval: the experiment has no validation split for the model's tasks")
    batches = throughput_batches(features, tokenizer.pad_token_id, batch_size)
    encoders = {k: model.encoder for k, (model, _, _) in loaded.items()}
    gen_batches = generation_batches(manifest, features, tokenizer.pad_token_id, batch_size)
    previous = torch.get_num_threads()
    by_threads: dict[int, dict[str, float]] = {}
    gen_by_threads: dict[int, dict[str, dict[str, float]]] = {}
    try:
        for n in threads or (previous,):
            torch.set_num_threads(n)
            by_threads[n] = encoder_throughput(encoders, batches, repeats)
            if gen_batches:
                models = {k: model for k, (model, _, _) in loaded.items()}
                gen_by_threads[n] = generation_throughput(models, gen_batches, repeats)
    finally:
        torch.set_num_threads(previous)
    first = next(iter(by_threads.values()))
    return {
        key: {
            "variant": man.variant,
            "metrics": evaluate(model, features, batch_size, tokenizer.pad_token_id),
            "seq_per_s": first[key],
            "seq_per_s_by_threads": {n: speed[key] for n, speed in by_threads.items()},
            "sequences": sum(len(b["input_ids"]) for b in batches),
            "encoder_bytes": dir_bytes(Path(bundles[key]) / "encoder", "*.safetensors"),
            "bundle_bytes": dir_bytes(Path(bundles[key])),
            "layer_params": _layer_params_or_none(model.encoder),
            **(
                {"generation_by_threads": {n: speed[key] for n, speed in gen_by_threads.items()}}
                if gen_by_threads
                else {}
            ),
        }
        for key, (model, _, man) in loaded.items()
    }


def _layer_params_or_none(encoder: nn.Module) -> int | None:
    from polytask.model.pruning import layer_params

    try:
        return layer_params(encoder)
    except ValueError:
        return None


def evaluate_compression(
    src_bundle: str | Path,
    compressed: str | Path,
    cfg: ExperimentConfig,
    batch_size: int = 32,
    repeats: int = 3,
) -> dict[str, Any]:
    """Source vs compressed side by side (see compare_bundles), plus metric deltas, the
    throughput ratio and the encoder size ratio. Throughput is timed at 1 thread (a CPU Encoder
    replica with num_cpus: 1) and at this process's thread count; `speedup` is the 1-thread one."""
    threads = tuple(dict.fromkeys((1, torch.get_num_threads())))
    report: dict[str, Any] = compare_bundles(
        {"source": src_bundle, "compressed": compressed}, cfg, batch_size, repeats, threads
    )
    report["batch_size"] = batch_size
    src, cmp = report["source"]["seq_per_s_by_threads"], report["compressed"]["seq_per_s_by_threads"]
    report["speedup_by_threads"] = {n: cmp[n] / src[n] for n in threads}
    report["speedup"] = report["speedup_by_threads"][1]
    if "generation_by_threads" in report["source"]:
        src_gen, cmp_gen = report["source"]["generation_by_threads"], report["compressed"]["generation_by_threads"]
        report["generation_speedup_by_threads"] = {
            n: cmp_gen[n]["seq_per_s"] / src_gen[n]["seq_per_s"] for n in threads
        }
    report["size_ratio"] = report["compressed"]["encoder_bytes"] / report["source"]["encoder_bytes"]
    report["delta"] = metric_deltas(report["source"]["metrics"], report["compressed"]["metrics"])
    return report


def metric_deltas(
    source: dict[str, dict[str, float]], other: dict[str, dict[str, float]]
) -> dict[str, float]:
    """{'task/metric': other − source} for every numeric metric."""
    return {
        f"{task}/{name}": other[task][name] - value
        for task, values in source.items()
        for name, value in values.items()
        if isinstance(value, (int, float))
    }


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in Path(path).rglob(pattern) if f.is_file())


# --- registry ----------------------------------------------------------------------------------


def registered_version(model_uri: str, uri: str | None = None) -> tuple[str, str]:
    """(registered name, version) of a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI."""
    from polytask.tracking import registry
    from polytask.tracking.uris import AliasNotFound, parse_model_uri, pin_model_uri

    ref = parse_model_uri(model_uri)
    if not ref.registered or ref.rest:
        raise ValueError(
            f"model '{model_uri}': --register needs a models:/NAME/VERSION or models:/NAME@ALIAS "
            "source (the compressed bundle is registered next to it); pass --no-register"
        )
    try:
        pinned = parse_model_uri(pin_model_uri(model_uri, lambda: registry.client(uri)))
    except AliasNotFound as exc:
        raise ValueError(
            f"model '{model_uri}': {exc}; see `polytask registry list {ref.name}`"
        ) from exc
    return pinned.name, pinned.version


def register_compressed(
    bundle_dir: str | Path,
    name: str,
    source_version: str | int,
    report: dict[str, Any] | None = None,
    uri: str | None = None,
) -> dict[str, Any]:
    """Log the compressed bundle in a new run (with the evaluation, if any) and register it as
    a NEW version of `name`, tagged with its method and source; no alias is set or moved."""
    from polytask.tracking import registry
    from polytask.training.loop import objective

    uri = uri or registry.tracking_uri()
    c = registry.client(uri)
    source = c.get_model_version(name, str(source_version))
    manifest = read_manifest(bundle_dir)
    method = manifest.recipe[-1]["method"] if manifest.recipe else "none"
    experiment_id = (
        c.get_run(source.run_id).info.experiment_id
        if source.run_id
        else registry.ensure_experiment(c, "polytask", uri)
    )
    tags = {
        COMPRESSION_TAG: method,
        SOURCE_VERSION_TAG: str(source.version),
        BASE_VERSION_TAG: source.tags.get(BASE_VERSION_TAG, str(source.version)),
        VARIANT_TAG: manifest.variant,
    }
    run = c.create_run(
        experiment_id, run_name=f"{name}-v{source.version}-{manifest.variant}", tags=dict(tags)
    )
    run_id = run.info.run_id
    step = manifest.recipe[-1] if manifest.recipe else {}
    for key in ("sparsity", "importance", "engine", "scheme", "finetune_steps"):
        if key in step:
            c.log_param(run_id, key, step[key])
    c.log_param(run_id, "variant", manifest.variant)
    c.log_param(run_id, "source_model", f"models:/{name}/{source.version}")
    if report:
        for key, value in flat_report(report).items():
            c.log_metric(run_id, key, value)
        c.log_dict(run_id, report, "compression_report.json")
        specs = [s for s in manifest.tasks if s.name in report["compressed"]["metrics"]]
        tags[OBJECTIVE_TAG] = repr(
            float(objective(report["compressed"]["metrics"], specs))
        )
    model_uri = registry.log_bundle(bundle_dir, run_id, uri)
    c.set_terminated(run_id)
    mv = registry.create_version(name, model_uri, run_id, tags, uri)
    return {
        "name": name,
        "version": int(mv.version),
        "source_version": int(source.version),
        "run_id": run_id,
        "model_uri": f"models:/{name}/{mv.version}",
    }


def flat_report(report: dict[str, Any]) -> dict[str, float]:
    """The evaluation as MLflow metric names: source/…, compressed/…, delta/…, speedup."""
    out: dict[str, float] = {"speedup": report["speedup"], "size_ratio": report["size_ratio"]}
    for side in ("source", "compressed"):
        for task, values in report[side]["metrics"].items():
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    out[f"{side}/{task}/{key}"] = float(value)
        for key in ("seq_per_s", "encoder_bytes", "bundle_bytes"):
            out[f"{side}/{key}"] = float(report[side][key])
        for n, value in report[side]["seq_per_s_by_threads"].items():
            out[f"{side}/seq_per_s/threads_{n}"] = float(value)
        for n, speed in report[side].get("generation_by_threads", {}).items():
            for key, value in speed.items():
                out[f"{side}/generation_{key}/threads_{n}"] = float(value)
    out.update({f"speedup/threads_{n}": float(v) for n, v in report["speedup_by_threads"].items()})
    out.update(
        {f"generation_speedup/threads_{n}": float(v) for n, v in report.get("generation_speedup_by_threads", {}).items()}
    )
    out.update({f"delta/{k}": float(v) for k, v in report["delta"].items()})
    return out


# --- the CLI's entry ---------------------------------------------------------------------------


def run_compress(
    model_uri: str,
    method: str,
    sparsity: float = 0.3,
    eval_experiment: str | Path | None = None,
    out: str | Path | None = None,
    register: bool = True,
    console: Any = None,
    finetune_steps: int = 0,
    decoder_int8: bool = False,
) -> dict[str, Any]:
    """`polytask compress`: resolve → compress → (evaluate) → (register); returns a summary."""
    from polytask.config import default_home, load_config
    from polytask.tracking.places import check_paths, describe, output_place, refuse_scratch
    from polytask.tracking.registry import resolve_bundle, tracking_uri
    from polytask.tracking.uris import is_local_path

    say = console.print if console is not None else (lambda *a, **k: None)
    # Refused inside a Ray job's temporary working_dir copy, before any work.
    places = check_paths(tracking_uri()) if register or not is_local_path(model_uri) else []
    if register:  # fail before the slow part; pin an alias so source and tag name one version
        name, version = registered_version(model_uri)
        model_uri = f"models:/{name}/{version}"
    src = resolve_bundle(model_uri)
    cfg = load_config(eval_experiment) if eval_experiment else None
    if out is None:
        slug = "".join(
            ch if ch.isalnum() or ch in "-_." else "_" for ch in model_uri.split("://")[-1]
        )
        out = (
            default_home() / "compressed" / f"{slug.strip('_')}-{VARIANT_OF_METHOD.get(method, method)}"
        )
    bundle = output_place("bundle", str(Path(out).resolve()), "--out")
    if not register:  # unregistered, the bundle is the result (else the store keeps a copy)
        refuse_scratch([bundle])
    say(f"state of this compression\n{describe([*places, bundle])}", markup=False, highlight=False)
    say(f"compressing {model_uri} ({src}) with {method} …")
    manifest = compress_bundle(
        src, out, method, sparsity, experiment=cfg, finetune_steps=finetune_steps,
        decoder_int8=decoder_int8,
    )
    summary: dict[str, Any] = {
        "bundle": str(Path(out).resolve()),
        "method": method,
        "variant": manifest.variant,
        "fingerprint": manifest.fingerprint,
    }
    if manifest.recipe[-1]["method"] == "prune":
        step = manifest.recipe[-1]
        summary["layer_params"] = {"before": step["params_before"], "after": step["params_after"]}
    if cfg is not None:
        say("evaluating source vs compressed …")
        report = evaluate_compression(src, out, cfg)
        summary["evaluation"] = report
        say(format_report(report))
    if register:
        summary["registered"] = register_compressed(out, name, version, summary.get("evaluation"))
        say(
            f"registered {summary['registered']['model_uri']} (source v{version}; aliases untouched)"
        )
    say(f"wrote {summary['bundle']} ({manifest.variant})")
    return summary


def format_report(report: dict[str, Any]) -> str:
    """A markdown table: metrics, throughput and size of source vs compressed."""
    src, cmp = report["source"], report["compressed"]
    rows = [f"| | {src['variant']} | {cmp['variant']} | Δ |", "| --- | ---: | ---: | ---: |"]
    for task, values in src["metrics"].items():
        for key, value in values.items():
            if isinstance(value, (int, float)):
                new = cmp["metrics"][task][key]
                rows.append(f"| {task}/{key} | {value:.4f} | {new:.4f} | {new - value:+.4f} |")
    for n, ratio in report["speedup_by_threads"].items():
        before, after = src["seq_per_s_by_threads"][n], cmp["seq_per_s_by_threads"][n]
        rows.append(
            f"| encoder seq/s, {n} thread{'s' * (n > 1)} | {before:.1f} | {after:.1f} | ×{ratio:.2f} |"
        )
    for n, ratio in report.get("generation_speedup_by_threads", {}).items():
        before, after = src["generation_by_threads"][n], cmp["generation_by_threads"][n]
        rows.append(
            f"| generation seq/s (encoder + decoder), {n} thread{'s' * (n > 1)} | "
            f"{before['seq_per_s']:.2f} | {after['seq_per_s']:.2f} | ×{ratio:.2f} |"
        )
    rows.append(
        f"| encoder MB | {src['encoder_bytes'] / 1e6:.2f} | {cmp['encoder_bytes'] / 1e6:.2f} "
        f"| ×{report['size_ratio']:.2f} |"
    )
    return "\n".join(rows)

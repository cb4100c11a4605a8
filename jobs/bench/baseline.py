"""The baseline: what a user would build instead of polytask, one Hugging Face pipeline per
task (text-classification; token-classification with aggregation_strategy='first'), each its own
Serve deployment on its own route, with Serve batching, sharing the bundle's encoder weights."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from common import FAST_TEARDOWN, pick_tasks, quiet_transformers
from ray import serve


def export_hf_models(bundle: str | Path, out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The baseline's two single-task models: the bundle's encoder weights inside
    AutoModelFor{Sequence,Token}Classification with the bundle's linear heads copied into
    `classifier`. Only the sequence model adds BERT's pooler (one hidden×hidden dense)."""
    from safetensors.torch import load_file
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    from polytask.model.bundle import read_manifest

    quiet_transformers()
    bundle, out_dir = Path(bundle), Path(out_dir)
    manifest = read_manifest(bundle)
    sentiment, ner = pick_tasks(bundle)
    tokenizer = AutoTokenizer.from_pretrained(bundle / "encoder")
    exported = {}
    for task, auto, hf_task in (
        (sentiment, AutoModelForSequenceClassification, "text-classification"),
        (ner, AutoModelForTokenClassification, "token-classification"),
    ):
        labels = manifest.task(task).labels
        model = auto.from_pretrained(
            bundle / "encoder",
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
        )
        head = load_file(bundle / "heads" / task / "head.safetensors")
        linear = {k.split(".", 1)[1]: v for k, v in head.items() if k.startswith("1.")}
        copied = set(linear) == {"weight", "bias"} and len(head) == 2
        if copied:
            model.classifier.load_state_dict(linear)
        target = out_dir / task
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        exported[task] = {
            "path": str(target),
            "pipeline": hf_task,
            "head": "copied from bundle" if copied else "random (bundle head has a hidden layer)",
        }
    return exported


@serve.deployment
class PipelineDeployment:
    """What a user would deploy per task: a transformers pipeline, with Serve batching."""

    def __init__(
        self,
        model_dir: str,
        hf_task: str,
        threads: int,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        import torch
        from transformers import pipeline

        torch.set_num_threads(threads)
        extra = {"aggregation_strategy": "first"} if hf_task == "token-classification" else {}
        self.hf_task = hf_task
        self.pipe = pipeline(hf_task, model=model_dir, tokenizer=model_dir, device="cpu", **extra)
        self._predict.set_max_batch_size(max_batch_size)
        self._predict.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def __call__(self, request: Any) -> dict[str, Any]:
        body = await request.json()
        results = await asyncio.gather(*(self._predict(text) for text in body["inputs"]))
        return {"results": results}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _predict(self, texts: list[str]) -> list[Any]:
        return await asyncio.to_thread(self._run, texts)

    def _run(self, texts: list[str]) -> list[Any]:
        if self.hf_task == "text-classification":
            outs = self.pipe(texts, batch_size=len(texts), top_k=None)
            return [
                {
                    "label": o[0]["label"],
                    "probabilities": {d["label"]: float(d["score"]) for d in o},
                }
                for o in outs
            ]
        outs = self.pipe(texts, batch_size=len(texts))
        return [
            {
                "entities": [
                    {
                        "type": e["entity_group"],
                        "text": e["word"],
                        "start": int(e["start"]),
                        "end": int(e["end"]),
                        "score": float(e["score"]),
                    }
                    for e in ents
                ]
            }
            for ents in outs
        ]


def baseline_targets(exported: dict[str, dict[str, Any]], settings: Any) -> list[serve.RunTarget]:
    """One Serve app per task on route /<task>, 1 replica of `baseline_threads` torch threads."""
    return [
        serve.RunTarget(
            PipelineDeployment.options(
                name=f"pipeline_{task}",
                num_replicas=1,
                max_ongoing_requests=settings.max_ongoing_requests,
                ray_actor_options={"num_cpus": settings.baseline_threads},
                **FAST_TEARDOWN,
            ).bind(
                info["path"],
                info["pipeline"],
                settings.baseline_threads,
                settings.max_batch_size,
                settings.baseline_batch_wait_s,
            ),
            name=f"baseline_{task}",
            route_prefix=f"/{task}",
        )
        for task, info in exported.items()
    ]

"""The Serve floor: polytask's per-request topology with no model work.

HTTP → FastAPI Ingress (parses the body) → Encoder → the Encoder's response handed unresolved to
two Head deployments → JSON answer; one call per hop per request, as polytask did before it
batched across requests. What it answers is the most any per-request pipeline of this shape can
answer on this machine, whatever its model costs.

No `from __future__ import annotations` here: FastAPI must see the body model itself, not its
name, in a replica that cannot import this script's module.
"""

import asyncio
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle


class Body(BaseModel):
    inputs: list[str]
    tasks: list[str] | None = None


@serve.deployment(name="NoopEncoder")
class NoopEncoder:
    async def encode(self, texts: list[str]) -> dict[str, Any]:
        return {"items": [None] * len(texts)}


@serve.deployment
class NoopHead:
    async def predict(self, encoded: dict[str, Any], texts: list[str]) -> list[dict[str, Any]]:
        return [{"label": "x"} for _ in encoded["items"]]


api = FastAPI()


@serve.deployment(name="NoopIngress")
@serve.ingress(api)
class NoopIngress:
    def __init__(self, encoder: DeploymentHandle, heads: dict[str, DeploymentHandle]) -> None:
        self.encoder = encoder
        self.heads = heads

    @api.post("/v1/predict")
    async def predict(self, body: Body) -> dict[str, Any]:
        encoded = self.encoder.encode.remote(body.inputs)
        names = list(self.heads)
        outs = await asyncio.gather(
            *(self.heads[t].predict.remote(encoded, body.inputs) for t in names)
        )
        return {
            "results": [{t: out[i] for t, out in zip(names, outs)} for i in range(len(body.inputs))]
        }


def noop_app(tasks: list[str], options: dict[str, dict[str, Any]]) -> serve.Application:
    """The no-op app with the same deployment options as the polytask app it stands for."""
    encoder = NoopEncoder.options(**options.get("Encoder", {})).bind()
    heads = {
        t: NoopHead.options(name=f"noop_head_{t}", **options.get("head", {})).bind() for t in tasks
    }
    return NoopIngress.options(**options.get("Ingress", {})).bind(encoder, heads)

"""The in-process limit: the same model work as a served request (tokenize, encoder forward, both
heads, decoded answers) on length-sorted batches, with no HTTP and no Ray.

The best of one single-threaded process and one single-threaded process per core (what Serve's
one-thread-per-replica encoders can reach together), so a served system is compared with the
most this CPU does with the model.
"""

from __future__ import annotations

import itertools
import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np


def _load(bundle: str) -> tuple[Any, Any, Any]:
    import torch

    from polytask.model.bundle import load_bundle

    torch.set_num_threads(1)
    return load_bundle(bundle, "cpu")


def throughput(
    bundle_parts: tuple[Any, Any, Any],
    texts: list[str],
    tasks: list[str],
    batch_size: int,
    seconds: float,
    padding: str = "longest",
    heads: bool = True,
) -> dict[str, float]:
    """Inputs/s over batches cut from `texts` in the given order, visited in a seeded random
    order until `seconds` have passed; `heads=False`: encoder only, with the mean padded length
    (`padding="planned"`: each batch in the Encoder's planned passes, no padded length)."""
    import torch

    from polytask.model.inference import encode_batch, pass_overhead_tokens, run_head

    model, tokenizer, manifest = bundle_parts
    overhead = pass_overhead_tokens(model.encoder, manifest.max_length)
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    order = np.random.default_rng(0).permutation(len(batches))
    levels = {model.specs[t].task_kind.level for t in tasks}
    done, tokens = 0, 0
    start = time.perf_counter()
    with torch.inference_mode():
        for index in itertools.cycle(order):
            batch = batches[index]
            if heads or padding == "planned":  # what a served request runs (Predictor's path)
                items = encode_batch(
                    model.encoder,
                    tokenizer,
                    batch,
                    None,
                    max_length=manifest.max_length,
                    pooling=model.pooling,
                    need_pooled=heads and "sentence" in levels,
                    need_tokens=heads and "token" in levels,
                    overhead_tokens=overhead,
                )
                for task in tasks if heads else ():
                    run_head(model.heads[task], model.specs[task], items, batch)
            else:
                enc = tokenizer(
                    batch,
                    truncation=True,
                    max_length=manifest.max_length,
                    padding=padding,
                    return_tensors="pt",
                )
                model.encoder(**enc)
                tokens += int(enc["input_ids"].numel())
            done += len(batch)
            if time.perf_counter() - start >= seconds:
                break
    elapsed = time.perf_counter() - start
    return {"inputs_per_s": done / elapsed, "padded_tokens_per_input": tokens / done}


class ParallelLimit:
    """One single-threaded process per core, spawned once, each holding the bundle: they measure
    together (behind a barrier) whenever asked. The bench measures its limit before and after the
    served systems; spawning once halves the cost of the processes' torch and model start-up."""

    def __init__(self, bundle: str, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.barrier = ctx.Barrier(processes)  # kept: a child unpickles it after start() returns
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for _ in range(processes):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(bundle, self.barrier, there), daemon=True)
            proc.start()
            self.conns.append(here)
            self.procs.append(proc)
        for conn in self.conns:  # loaded: no start-up competes with a measurement
            if not conn.poll(600) or conn.recv() != "ready":
                raise RuntimeError("a limit process did not load the bundle in 600 s")

    def throughput(self, texts: list[str], tasks: list[str], batch_size: int, seconds: float) -> float:
        """Inputs/s of all the processes together, each running `throughput` over `texts`."""
        for conn in self.conns:
            conn.send((texts, tasks, batch_size, seconds))
        total = 0.0
        for conn in self.conns:
            if not conn.poll(600):
                raise TimeoutError("a limit process gave no result in 600 s")
            total += conn.recv()["inputs_per_s"]
        return total

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(timeout=60)


def _worker(bundle: str, barrier: Any, conn: Any) -> None:
    parts = _load(bundle)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        texts, tasks, batch_size, seconds = job
        throughput(parts, texts, tasks, batch_size, seconds / 4)
        barrier.wait()
        conn.send(throughput(parts, texts, tasks, batch_size, seconds))


def measure_limit(
    bundle: str | Path,
    texts: list[str],
    tasks: list[str],
    batch_size: int,
    seconds: float,
    parallel: ParallelLimit | None = None,
) -> dict[str, Any]:
    """The limit (best configuration: one process, or `parallel`'s processes together) and, on the
    same texts, dynamic padding in arrival order against padding to max_length (encoder only): how
    much a server loses to padding."""
    import torch

    previous = torch.get_num_threads()
    try:
        parts = _load(str(bundle))
        ordered = sorted(texts, key=len)
        throughput(parts, ordered, tasks, batch_size, seconds / 4)
        by_config = {
            f"1 process x 1 thread, batch {batch_size}": throughput(
                parts, ordered, tasks, batch_size, seconds
            )["inputs_per_s"]
        }
        if parallel is not None:
            by_config[f"{len(parallel.procs)} processes x 1 thread, batch {batch_size}"] = (
                parallel.throughput(ordered, tasks, batch_size, seconds)
            )
        best = max(by_config, key=by_config.__getitem__)
        sorted_enc = throughput(parts, ordered, tasks, batch_size, seconds, heads=False)
        arrival = throughput(parts, texts, tasks, batch_size, seconds, heads=False)
        planned = throughput(parts, texts, tasks, batch_size, seconds, "planned", heads=False)
        fixed = throughput(parts, texts, tasks, batch_size, seconds, "max_length", heads=False)
    finally:
        torch.set_num_threads(previous)
    return {
        "inputs_per_s": by_config[best],
        "config": best,
        "by_config": by_config,
        "batch_size": batch_size,
        "tasks": tasks,
        "what": "tokenize + encoder forward + every head + decoded answers, length-sorted "
        "batches cut into passes as the Encoder cuts them, each padded to its own longest "
        "input, torch.inference_mode, no HTTP and no Ray",
        "padding": {
            "max_length": parts[2].max_length,
            "sorted_dynamic": sorted_enc,
            "arrival_dynamic": arrival,
            "arrival_planned": planned,
            "planned_over_dynamic": planned["inputs_per_s"] / arrival["inputs_per_s"],
            "arrival_max_length": fixed,
            "dynamic_over_max_length": arrival["inputs_per_s"] / fixed["inputs_per_s"],
        },
    }

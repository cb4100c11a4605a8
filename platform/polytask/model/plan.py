"""A request's plan, in one pure function: which tasks each request runs, which text views the
encoder forwards (single texts, text pairs), what each input needs from the encoder (pooled
vector, token states), and which inputs each head reads.

The Ingress plans a batch of requests, `Predictor` one chunk of inputs, the Encoder splits its
calls by view: all with this module, so served and in-process answers cannot plan differently.
Kept free of torch and Ray so the HTTP layer and unit tests can use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from polytask.model.inputs import split_input
from polytask.tasks import TaskSpec


def default_tasks(specs: Mapping[str, TaskSpec], inputs: Sequence[Any]) -> list[str]:
    """Every task when none are named; pair tasks only when every input has a text_pair (a
    model of pair tasks alone runs them all, and the missing pair is then the caller's error)."""
    paired = all(split_input(item)[1] is not None for item in inputs)
    tasks = [name for name, spec in specs.items() if paired or not spec.pair]
    return tasks or list(specs)


def request_tasks(
    specs: Mapping[str, TaskSpec], inputs: Sequence[Any], named: Sequence[str] | None
) -> list[str]:
    """The tasks one request runs: those it names, each once in the order named, else the
    default rule's."""
    return list(dict.fromkeys(named)) if named else default_tasks(specs, inputs)


def encoder_needs(spec: TaskSpec) -> tuple[bool, bool]:
    """(pooled vector, token states): what `spec`'s head reads from the encoder."""
    level = spec.task_kind.level
    return level == "sentence", level in ("token", "sequence")


def views_of(pairs: Sequence[str | None]) -> list[tuple[bool, list[int]]]:
    """(pair view, positions) of the inputs sent without a second text, then of those sent with
    one: each view is tokenized and forwarded apart (a pair is one tokenizer input)."""
    out = []
    for pair_view in (False, True):
        positions = [i for i, pair in enumerate(pairs) if (pair is not None) == pair_view]
        if positions:
            out.append((pair_view, positions))
    return out


@dataclass(frozen=True)
class Call:
    """One head call: `task` on the view inputs at `positions` (None: every input of the view).
    `spans`: (request, first view position, count) of each request that asked for the task."""

    task: str
    spans: list[tuple[int, int, int]]
    positions: list[int] | None


@dataclass
class View:
    """One encoder forward: the texts of every request that asked for a task of this view (its
    second texts too for the pair view, a missing one as ""), each input's needs, and the calls."""

    pair: bool
    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    pooled: list[bool] = field(default_factory=list)
    tokens: list[bool] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)

    def texts_of(self, call: Call) -> list[str]:
        """The texts `call`'s head reads (token decoders map spans back onto them)."""
        if call.positions is None:
            return self.texts
        return [self.texts[i] for i in call.positions]


@dataclass
class Plan:
    """`tasks[r]`: the tasks of request r (named once each, in the order asked, or the default
    rule's); `sizes[r]`: its input count; `views`: the forwards to run, single texts first."""

    tasks: list[list[str]]
    sizes: list[int]
    views: list[View]

    @property
    def calls(self) -> list[Call]:
        """Every head call, view by view: the order `answers` takes their results in."""
        return [call for view in self.views for call in view.calls]

    def answers(self, per_call: Sequence[Sequence[Any]]) -> list[list[dict[str, Any]]]:
        """Per request, one {task: answer} per input (tasks in the request's order), from each
        call's answers (in `calls` order, one per input the call read)."""
        got: list[list[dict[str, Any]]] = [[{} for _ in range(n)] for n in self.sizes]
        for call, answers in zip(self.calls, per_call, strict=True):
            it = iter(answers)
            for r, _, n in call.spans:
                for i in range(n):
                    got[r][i][call.task] = next(it)
        return [
            [{t: answer[t] for t in tasks} for answer in got[r]]
            for r, tasks in enumerate(self.tasks)
        ]


def plan_requests(
    specs: Mapping[str, TaskSpec],
    requests: Sequence[tuple[Sequence[Any], Sequence[str] | None]],
) -> Plan:
    """The plan of `requests`, each (inputs, tasks or None for the default rule); inputs in any
    form `split_input` reads. Tasks must be known to `specs` (callers validate and answer an
    unknown task or a missing text_pair in their own words)."""
    tasks = [request_tasks(specs, inputs, named) for inputs, named in requests]
    split = [[split_input(item) for item in inputs] for inputs, _ in requests]
    views = []
    for pair_view in (False, True):
        view = View(pair_view, pairs=[] if pair_view else None)
        spans: dict[int, tuple[int, int]] = {}  # request → (first view position, count)
        order: dict[str, None] = {}  # the view's tasks, first asked first
        for r, items in enumerate(split):
            mine = [t for t in tasks[r] if specs[t].pair == pair_view]
            if not mine:
                continue
            needs = [encoder_needs(specs[t]) for t in mine]
            spans[r] = (len(view.texts), len(items))
            view.texts += [text for text, _ in items]
            if view.pairs is not None:
                view.pairs += [pair or "" for _, pair in items]
            view.pooled += [any(p for p, _ in needs)] * len(items)
            view.tokens += [any(t for _, t in needs)] * len(items)
            order.update(dict.fromkeys(mine))
        if not view.texts:
            continue
        for task in order:
            mine = [(r, *spans[r]) for r in spans if task in tasks[r]]
            positions = [i for _, start, n in mine for i in range(start, start + n)]
            view.calls.append(
                Call(task, mine, None if len(positions) == len(view.texts) else positions)
            )
        views.append(view)
    return Plan(tasks, [len(items) for items in split], views)

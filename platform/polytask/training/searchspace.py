"""Sweep search spaces written in YAML as `key.path: fn(args)` overlays on the base experiment.

Parsing and checking need neither ray nor torch (so `polytask validate` can reject a bad space);
`to_tune` turns the parsed space into Ray Tune domains when a sweep actually runs.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import yaml

from polytask.config import ConfigError, ExperimentConfig, apply_override, config_from_dict

FUNCTIONS = {
    "uniform": 2,
    "loguniform": 2,
    "randint": 2,
    "quniform": 3,
    "choice": 1,
    "grid": 1,
}
_CALL = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.DOTALL)


class SearchSpaceError(ValueError):
    """A search-space entry that cannot be sampled or would produce an invalid experiment."""


@dataclass(frozen=True)
class Dimension:
    """One swept key: the function name and its parsed arguments."""

    key: str
    fn: str
    args: tuple[Any, ...]

    def examples(self) -> list[Any]:
        """Values worth checking against the config schema: bounds, or every choice."""
        if self.fn in ("choice", "grid"):
            return list(self.args[0])
        return [self.args[0], self.args[1]]


def parse_dimension(key: str, spec: str) -> Dimension:
    where = f"tune.search_space.{key}"
    match = _CALL.match(str(spec))
    if not match or match.group(1) not in FUNCTIONS:
        raise SearchSpaceError(
            f"{where}: '{spec}' is not a search function; write one of "
            "uniform(a, b), loguniform(a, b), randint(a, b), quniform(a, b, q), choice([..]), grid([..])"
        )
    fn, inner = match.groups()
    try:
        args = tuple(_coerce(yaml.safe_load(f"[{inner}]")))
    except yaml.YAMLError as exc:
        raise SearchSpaceError(f"{where}: cannot parse the arguments of {fn}(): {exc}") from None
    if len(args) != FUNCTIONS[fn]:
        raise SearchSpaceError(f"{where}: {fn}() takes {FUNCTIONS[fn]} argument(s), got {len(args)}")
    if fn in ("choice", "grid"):
        if not isinstance(args[0], list) or not args[0]:
            raise SearchSpaceError(f"{where}: {fn}() needs a non-empty list, e.g. {fn}([16, 32])")
    else:
        low, high = args[0], args[1]
        if not all(isinstance(v, (int, float)) for v in args) or low >= high:
            raise SearchSpaceError(f"{where}: {fn}({low}, {high}) needs numbers with low < high")
        if fn == "loguniform" and low <= 0:
            raise SearchSpaceError(f"{where}: loguniform needs a positive lower bound, got {low}")
    return Dimension(key, fn, args)


def _coerce(value: Any) -> Any:
    """YAML 1.1 reads `1e-5` as text; sweep bounds and choices mean the number."""
    if isinstance(value, list):
        return [_coerce(v) for v in value]
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def parse_search_space(cfg: ExperimentConfig) -> list[Dimension]:
    """Every dimension parsed and checked: each example value must give a valid experiment."""
    if cfg.tune is None:
        return []
    dims = [parse_dimension(k, v) for k, v in cfg.tune.search_space.items()]
    if cfg.tune.weights == "simplex":
        swept = {d.key for d in dims}
        dims += [
            Dimension(f"tasks.{t}.weight", "uniform", (0.05, 1.0))
            for t in cfg.task_names
            if f"tasks.{t}.weight" not in swept
        ]
    base = cfg.model_dump(exclude={"tune"})
    for dim in dims:
        for value in dim.examples():
            try:
                with_values(base, {dim.key: value})
            except ConfigError as exc:
                detail = "; ".join(exc.problems)
                raise SearchSpaceError(f"tune.search_space.{dim.key}: value {value!r} → {detail}") from None
    if not dims:
        raise SearchSpaceError("tune.search_space: empty; sweep at least one key, e.g. optim.lr")
    return dims


def apply_trial(cfg: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The base config with one trial's sampled values; simplex weights are rescaled to sum to
    the number of tasks, so only their ratios are searched."""
    params = dict(params)
    if cfg.tune is not None and cfg.tune.weights == "simplex":
        keys = [f"tasks.{t}.weight" for t in cfg.task_names]
        total = sum(float(params[k]) for k in keys)
        for k in keys:
            params[k] = len(keys) * float(params[k]) / total
    return with_values(cfg.model_dump(), params)


def with_values(data: dict[str, Any], values: dict[str, Any]) -> ExperimentConfig:
    """Validate `data` with dotted keys set to raw values (no string round trip)."""
    data = copy.deepcopy(data)
    for key, value in values.items():
        apply_override(data, key, value)
    return config_from_dict(data)


def to_tune(dims: list[Dimension]) -> dict[str, Any]:
    """Ray Tune param_space (flat dotted keys) for the parsed dimensions."""
    from ray import tune

    makers = {
        "uniform": tune.uniform,
        "loguniform": tune.loguniform,
        "randint": tune.randint,
        "quniform": tune.quniform,
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return {d.key: makers[d.fn](*d.args) for d in dims}

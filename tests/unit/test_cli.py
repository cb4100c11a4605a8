"""The CLI fails politely: a user's mistake gives one `error: ...` on stderr naming what is wrong
and the fix, nothing on stdout, exit status 1 (2 for usage errors), and never a traceback.

Commands run in-process through typer's CliRunner (stdout and stderr kept apart); two run as a
real process to show the installed entry point behaves the same. None of them starts Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

import polytask
from polytask.cli import app, user_error
from polytask.demo import demo_experiment, write_yaml


def _invoke(*argv: str) -> Result:
    return CliRunner().invoke(app, list(argv), env={"COLUMNS": "200"})


def _user_error(result: Result, *fragments: str, code: int = 1) -> str:
    """Assert `result` is a polite failure and return its stderr."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    # An exception that escaped the CLI would be stored here instead of the exit.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    if code == 1:  # (Hugging Face's progress bars may come before it)
        assert result.stderr.count("error: ") == 1
        assert result.stderr.rstrip("\n").rsplit("\n", 1)[-1].startswith(("error: ", "  - "))
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    return result.stderr


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def test_version() -> None:
    result = _invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"polytask {polytask.__version__}\n"


def test_predict_on_a_missing_path() -> None:
    stderr = _user_error(
        _invoke("predict", "no/such/bundle", "hello"),
        "model 'no/such/bundle': not a bundle directory",
        "pass a bundle path or a models:/NAME@ALIAS URI",
    )
    assert stderr.count("\n") == 1, "one line"


def test_predict_unknown_task(untrained_bundle: Path) -> None:
    _user_error(
        _invoke("predict", str(untrained_bundle), "hello", "--task", "topic"),
        "unknown task 'topic'; this model has: sentiment, ner",
    )


def test_rich_markup_in_a_message_is_printed_as_typed() -> None:
    _user_error(_invoke("predict", "[bold]x[/bold]", "hello"), "model '[bold]x[/bold]'")


def test_compress_a_missing_bundle() -> None:
    _user_error(
        _invoke("compress", "no/such/bundle", "--method", "int8", "--no-register"),
        "model 'no/such/bundle': not a bundle directory",
    )


def test_compress_registering_a_bare_bundle(untrained_bundle: Path, mlflow_uri: str) -> None:
    _user_error(
        _invoke("compress", str(untrained_bundle), "--method", "int8"),
        "--register needs a models:/NAME/VERSION or models:/NAME@ALIAS source",
        "pass --no-register",
    )


def test_unknown_registered_models(mlflow_uri: str) -> None:
    """MLflow's own errors, with the command that shows what exists."""
    for argv, fragment in [
        (["compress", "models:/nope@champion", "--method", "int8"], "name=nope not found"),
        (["registry", "promote", "nope", "3"], "(name=nope, version=3) not found"),
        (["registry", "show", "models:/nope/3"], "(name=nope, version=3) not found"),
    ]:
        _user_error(_invoke(*argv), fragment, "polytask registry list")


def test_bad_choices_are_usage_errors_and_help_lists_them() -> None:
    stderr = _user_error(
        _invoke("compress", "bundle", "--method", "int9"), "--method", "'int8'", "'prune'", code=2
    )
    assert "'int9'" in stderr
    _user_error(_invoke("serve", "bundle", "--cpu-variant", "int7"), "pruned+int8", code=2)
    _user_error(_invoke("compress", "b", "--method", "prune", "--sparsity", "2"), "--sparsity", code=2)
    assert "int8|prune" in _invoke("compress", "--help").stdout
    assert "fp32|int8|pruned|pruned+int8" in _invoke("serve", "--help").stdout


def test_a_bad_search_space(no_ray, tmp_path: Path, demo_data: Path, tiny_encoder: Path) -> None:
    sweep = demo_experiment(
        demo_data, tiny_encoder, tune={"search_space": {"optim.lr": "loguniform(0, 1e-3)"}}
    )
    path = write_yaml(sweep, tmp_path / "sweep.yaml")
    for command in ("validate", "tune"):
        _user_error(
            _invoke(command, str(path)),
            "tune.search_space.optim.lr: loguniform needs a positive lower bound, got 0",
        )
    assert not _ray_started()


def test_an_experiment_with_problems(tmp_path: Path, demo_data: Path, tiny_encoder: Path) -> None:
    path = write_yaml(demo_experiment(demo_data, tiny_encoder), tmp_path / "exp.yaml")
    stderr = _user_error(
        _invoke("train", str(path), "--set", "optim.lrr=1"),
        f"error: {path} has 1 problem(s):\n  - optim.lrr: is not a known field; did you mean 'lr'?",
    )
    assert stderr.count("\n") == 2, "a header line and one line per problem"
    _user_error(_invoke("validate", str(tmp_path / "none.yaml")), "none.yaml: file not found")
    _user_error(_invoke("tune", str(path)), "no `tune` section; add tune.search_space")


def _slow_only_tokenizer(path: Path) -> Path:
    """A CTRL tokenizer directory: transformers has no fast version of it."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "ctrl"}))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CTRLTokenizer"}))
    (path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "<unk>": 3}))
    (path / "merges.txt").write_text("#version: 0.2\na b\n")
    return path


def test_an_encoder_without_a_fast_tokenizer(
    no_ray, tmp_path: Path, demo_data: Path, mlflow_uri: str
) -> None:
    encoder = _slow_only_tokenizer(tmp_path / "ctrl")
    path = write_yaml(demo_experiment(demo_data, encoder, num_workers=1), tmp_path / "exp.yaml")
    _user_error(
        _invoke("train", str(path)),
        f"encoder.name_or_path '{encoder}' has no fast tokenizer",
        "tokenizer.json",
    )
    assert not _ray_started()


def test_only_polytask_errors_lose_their_traceback(demo_data: Path, tiny_encoder: Path) -> None:
    """A ValueError from a dependency is a bug: it keeps its traceback."""
    from polytask.config import config_from_dict
    from polytask.training.searchspace import SearchSpaceError, parse_search_space

    try:
        float("not a number")
    except ValueError as exc:
        assert user_error(exc) is None
    try:
        json.loads("{")
    except ValueError as exc:
        assert user_error(exc) is None
    with pytest.raises(SearchSpaceError) as info:
        parse_search_space(
            config_from_dict(demo_experiment(demo_data, tiny_encoder, tune={"search_space": {}}))
        )
    assert user_error(info.value) == "tune.search_space: empty; sweep at least one key, e.g. optim.lr"
    assert user_error(FileNotFoundError("x.txt: missing")) == "x.txt: missing"


@pytest.mark.parametrize(
    ("argv", "code", "stdout", "stderr"),
    [
        (["--version"], 0, f"polytask {polytask.__version__}\n", ""),
        (
            ["predict", "no/such/bundle", "hi"],
            1,
            "",
            (
                "error: model 'no/such/bundle': not a bundle directory (no polytask.json); pass a "
                "bundle path or a models:/NAME@ALIAS URI\n"
            ),
        ),
    ],
)
def test_the_real_entry_point(argv: list[str], code: int, stdout: str, stderr: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "polytask.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (code, stdout, stderr)

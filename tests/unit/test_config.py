"""Experiment config: valid files load, every mistake is reported with its key path and a fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polytask.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]


def _base() -> dict:
    return {
        "encoder": {"name_or_path": "prajjwal1/bert-tiny"},
        "tasks": [
            {"name": "sentiment", "kind": "classification", "data": {"train": "a.csv"}},
            {"name": "ner", "kind": "token_classification", "data": {"train": "b.conll"}},
        ],
    }


def test_platform_is_a_source_root_not_a_package() -> None:
    assert not (ROOT / "platform" / "__init__.py").exists()
    import platform

    assert hasattr(platform, "python_version"), "stdlib platform must not be shadowed"


def test_defaults_fill_in() -> None:
    cfg = config_from_dict(_base())
    assert cfg.tasks[0].metric == "accuracy"
    assert cfg.tasks[1].metric == "f1"
    assert cfg.encoder.trust_remote_code is False
    assert cfg.encoder.pooling == "cls"
    assert cfg.sampling.strategy == "temperature"


def test_unknown_kind_lists_the_choices() -> None:
    data = _base()
    data["tasks"][1]["kind"] = "ner"
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert (
        "tasks[1].kind: 'ner' is not a task kind; choose one of classification, multilabel, "
        "token_classification, pair_classification, regression" in str(err.value)
    )


def test_every_problem_is_listed_at_once_with_hints() -> None:
    data = _base()
    data["optim"] = {"lrr": 1e-4, "epochs": "many"}
    data["encoder"]["pooling"] = "max"
    del data["tasks"][0]["data"]["train"]
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    msg = str(err.value)
    assert "optim.lrr: is not a known field; did you mean 'lr'?" in msg
    assert "optim.epochs:" in msg and "'many'" in msg
    assert "encoder.pooling:" in msg and "'cls' or 'mean'" in msg
    assert "tasks[0].data.train: is required" in msg
    assert len(err.value.problems) == 4


def test_settings_nothing_reads_are_rejected() -> None:
    """`serve:` was accepted and never read; serving takes its args from serve_configs/."""
    data = _base()
    data["serve"] = {"model": "models:/m@champion"}
    with pytest.raises(ConfigError, match="serve: is not a known field"):
        config_from_dict(data)


def test_metric_must_belong_to_the_kind() -> None:
    data = _base()
    data["tasks"][0]["metric"] = "f1"
    with pytest.raises(ConfigError, match=r"tasks\[0\]: .*metric 'f1' is not reported by kind"):
        config_from_dict(data)


def test_pair_task_needs_second_text_field() -> None:
    data = _base()
    data["tasks"][0]["kind"] = "pair_classification"
    with pytest.raises(ConfigError, match=r"tasks\[0\].data.text_pair_field: is required by pair"):
        config_from_dict(data)


@pytest.mark.parametrize("kind", ["classification", "multilabel", "regression"])
def test_every_sentence_kind_takes_a_pair(kind: str) -> None:
    data = _base()
    data["tasks"][0].update(kind=kind, metric=None)
    assert not config_from_dict(data).tasks[0].pair
    data["tasks"][0]["data"]["text_pair_field"] = "hypothesis"
    assert config_from_dict(data).tasks[0].pair


def test_fields_the_kind_never_reads_are_rejected_with_their_key_path() -> None:
    data = _base()
    data["tasks"][0]["data"].update(tokens_field="words", label_separator=",")
    data["tasks"][1]["data"].update(text_pair_field="hypothesis", label_field="y")
    data["optim"] = {"lrr": 1e-4}  # reported with them, not instead of them
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    problems = err.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "tasks[0].data.tokens_field",
        "tasks[0].data.label_separator",
        "tasks[1].data.text_pair_field",
        "tasks[1].data.label_field",
        "optim.lrr",
    ]
    assert "classification tasks read data.text_field" in problems[0] and "'words'" in problems[0]
    assert "only multilabel tasks split labels" in problems[1]
    assert "token_classification tasks read words and tags" in problems[2]
    assert all("remove it" in p for p in problems[:4])


def test_duplicate_task_names_rejected() -> None:
    data = _base()
    data["tasks"][1]["name"] = "sentiment"
    with pytest.raises(ConfigError, match="repeated: sentiment"):
        config_from_dict(data)


def test_set_overrides_parse_yaml_and_address_tasks_by_name(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_base()))
    cfg = load_config(path, ["optim.lr=3e-5", "tasks.ner.weight=2.5", "scaling.num_workers=2"])
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.task("ner").weight == 2.5
    assert cfg.scaling.num_workers == 2
    assert cfg.base_dir == str(tmp_path.resolve())


def test_bad_override_names_the_item(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_base()))
    with pytest.raises(ConfigError, match=r"tasks.topic: no such item; use an index or one of"):
        load_config(path, ["tasks.topic.weight=2"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["optim.lr"])


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_task_lookup_lists_known() -> None:
    cfg = config_from_dict(_base())
    with pytest.raises(KeyError, match="known tasks: sentiment, ner"):
        cfg.task("topic")


def test_validate_cli_does_not_import_torch_or_ray(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_base()))
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from polytask.cli import app\n"
        f"r = CliRunner().invoke(app, ['validate', r'{path}'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'ok' in r.output\n"
        "heavy = [m for m in ('torch', 'ray', 'mlflow', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_validate_cli_reports_problems(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from polytask.cli import app

    data = _base()
    data["tasks"][0]["kind"] = "sentiment"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 1  # a user error (2 is for command-line usage errors)
    assert "tasks[0].kind: 'sentiment' is not a task kind" in result.output


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_yaml_validates(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "polytask" in first, "start with the command that runs it"
    load_config(path)

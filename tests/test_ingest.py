"""Ray Data ingestion (`data.streaming`): small data stays on the in-memory path; a streamed train
split is checked and counted by the driver without keeping its rows, read and tokenized by Ray
Data, and handed to each rank as a disjoint, fixed shard; the task schedule stays in lockstep
across ranks, a restarted epoch sees the same batches, and a sweep whose trials hold every CPU
still gets its data."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from polytask.config import config_from_dict
from polytask.demo import demo_experiment

N_ROWS = 203  # odd: Ray's equal split drops one row for two ranks


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Path):
    """Two generated tasks: jsonl classification (read by Ray Data) and CoNLL NER (from_items)."""
    from polytask.demo import write_demo_data

    root = tmp_path_factory.mktemp("ingest")
    demo = write_demo_data(root / "demo", n_train=40, n_eval=10)
    train = root / "sentiment.jsonl"
    with train.open("w") as f:
        for i in range(N_ROWS):
            label = "positive" if i % 3 else "negative"
            code = "".join("aeinorstlu"[int(d)] for d in str(i))  # letters the vocab knows
            f.write(json.dumps({"text": f"{code} is {label}", "label": label}) + "\n")
    data = demo_experiment(
        demo, tiny_encoder, batch_size=8, sampling={"steps_per_epoch": 30}, registered_model=None
    )
    data["tasks"][0]["data"]["train"] = str(train)
    for task in data["tasks"]:
        task["data"]["streaming"] = True
    return config_from_dict(data)


def test_small_data_stays_in_memory_and_never_starts_ray_data(corpus, no_ray, monkeypatch) -> None:
    from polytask.training import data
    from polytask.training.features import tokenize_experiment

    cfg = corpus.model_copy(deep=True)
    for task in cfg.tasks:
        task.data.streaming = "auto"
    features = tokenize_experiment(cfg)
    assert not any(td.streamed for td in features.task_data.values())
    assert len(features.train["sentiment"]) == N_ROWS and features.streamed_rows == {}
    assert features.train_datasets(cfg) == {}  # no Ray Dataset: TorchTrainer gets none
    monkeypatch.setattr(data, "STREAM_AUTO_BYTES", 1000)  # the jsonl file is larger than this
    assert data.streams(cfg, cfg.tasks[0])
    assert not data.streams(cfg, cfg.tasks[1])  # auto never streams what the driver must parse


def test_streaming_accepts_only_auto_true_false(corpus) -> None:
    from polytask.config import ConfigError

    data = corpus.model_dump(mode="json")
    data["tasks"][0]["data"]["streaming"] = "sometimes"
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.data\.streaming: Input should be 'auto', True"):
        config_from_dict(data)


def test_driver_counts_and_checks_train_rows_without_keeping_them(corpus) -> None:
    from polytask.training.features import tokenize_experiment

    features = tokenize_experiment(corpus)
    sentiment = features.task_data["sentiment"]
    assert sentiment.splits["train"] is None and sentiment.source is not None
    assert features.streamed_rows["sentiment"] == N_ROWS
    assert sentiment.spec.labels == ["negative", "positive"]  # inferred by the streaming scan
    assert features.train == {}  # no tokenized train features on the driver


def test_bad_label_in_a_streamed_split_names_the_row(corpus, tmp_path: Path) -> None:
    from polytask.training.data import DataError, load_task_data

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "positive"}\n{"text": "b", "label": "meh"}\n')
    cfg = corpus.model_copy(deep=True)
    cfg.tasks[0].data.train = str(bad)
    cfg.tasks[0].labels = ["negative", "positive"]
    with pytest.raises(DataError, match=r"bad\.jsonl row 2: label 'meh' is not in the label set"):
        load_task_data(cfg, streaming=True)


def test_a_malformed_streamed_split_is_a_data_error(corpus, tmp_path: Path) -> None:
    from polytask.training.data import DataError, load_task_data

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\n{"text": broken\n')
    cfg = corpus.model_copy(deep=True)
    cfg.tasks[0].data.train = str(bad)
    with pytest.raises(DataError, match=r"tasks\.sentiment: .*bad\.jsonl .*cannot read it as jsonl"):
        load_task_data(cfg, streaming=True)


def _record_batches(config: dict) -> None:
    """A Train worker: two epochs of the sampler's steps over its shards, then epoch 1 again
    from fresh streams (what a resumed run does); every batch's rows go to a file per rank."""
    import ray.train

    from polytask.tasks import TaskSpec
    from polytask.training.batches import StreamBatches, TaskSampler

    rank = ray.train.get_context().get_world_rank()
    shards = {t: ray.train.get_dataset_shard(t) for t in config["rows"]}
    tokens = {s["name"] for s in config["specs"] if TaskSpec.from_dict(s).task_kind.level == "token"}

    def run(batches: StreamBatches, epoch: int) -> list:
        sampler = TaskSampler(
            {t: -(-n // 2) for t, n in config["rows"].items()}, "temperature", 2.0, 0,
            steps_per_epoch=30, batch_size=8,
        )
        sampler.epoch = epoch
        batches.start_epoch(epoch)
        return [(task, batches.next(task)["input_ids"].tolist()) for task in sampler]

    first = StreamBatches(shards, tokens, 8, seed=0, pad_token_id=0)
    seen = {"epochs": [run(first, 0), run(first, 1)]}
    seen["resumed"] = run(StreamBatches(shards, tokens, 8, seed=0, pad_token_id=0), 1)
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))


def test_ranks_stream_disjoint_fixed_shards_in_lockstep(corpus, ray_local, tmp_path: Path) -> None:
    import ray.cloudpickle
    import ray.data
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from polytask.training.features import tokenize_experiment
    from polytask.training.ingest import data_config

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests
    features = tokenize_experiment(corpus)
    datasets = features.train_datasets(corpus)
    free = ray_local.available_resources()["CPU"]
    assert all(isinstance(ds, ray.data.Dataset) for ds in datasets.values())
    TorchTrainer(
        _record_batches,
        train_loop_config={
            "rows": features.streamed_rows,
            "specs": [s.to_dict() for s in features.specs],
            "out": str(tmp_path),
        },
        # the two workers hold every free CPU: Ray Data's tasks (0 CPU, capped) must still run
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": free / 2}),
        datasets=datasets,
        dataset_config=data_config(),
    ).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        steps = [r["epochs"][epoch] for r in ranks]
        assert [t for t, _ in steps[0]] == [t for t, _ in steps[1]]  # same task at every step
        assert steps[0] != steps[1]  # but not the same rows
    assert {t for t, _ in ranks[0]["epochs"][0]} == {"sentiment", "ner"}
    for r in ranks:
        assert r["resumed"] == r["epochs"][1]  # a restarted epoch sees the very same batches
        assert r["epochs"][0] != r["epochs"][1]  # reshuffled per epoch
    passes = []
    for r in ranks:  # the first pass over each rank's sentiment shard: 203 // 2 rows, 13 batches
        batches = [b for t, b in r["epochs"][0] if t == "sentiment"][:13]
        rows = {tuple(x for x in row if x) for b in batches for row in b}
        assert sum(len(b) for b in batches) == N_ROWS // 2 == len(rows)
        passes.append(rows)
    assert not passes[0] & passes[1]  # disjoint shards
    assert len(passes[0] | passes[1]) == N_ROWS - 1  # covering all rows but the dropped one



def test_a_run_whose_workers_hold_every_cpu_still_streams(
    corpus, ray_with_store, tmp_path: Path
) -> None:
    """`polytask train` with one task streamed and one in memory, its worker holding every free
    CPU (as a 2-CPU sweep's two trials do): the capped 0-CPU data tasks still run."""
    from polytask.training.train import run_training

    free = ray_with_store.available_resources()["CPU"]
    data = corpus.model_dump(mode="json")
    data["tasks"][1]["data"]["streaming"] = False
    data["optim"]["epochs"], data["sampling"]["steps_per_epoch"] = 1, 3
    data["scaling"] = {"num_workers": 1, "resources_per_worker": {"CPU": free}}
    data["run"]["storage_path"] = str(tmp_path / "ray")
    cfg = config_from_dict(data)
    done: list = []
    run = threading.Thread(target=lambda: done.append(run_training(cfg)), daemon=True)
    run.start()
    run.join(timeout=120)
    assert done, "training did not finish in 120 s: data tasks starved of CPU"
    assert set(done[0].metrics) == {"sentiment", "ner"} and Path(done[0].bundle_path).is_dir()
    assert len(done[0].history) == 1 and done[0].history[0]["samples_per_s"] > 0

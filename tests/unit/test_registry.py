"""Model Registry on a real MLflow SQLite store: versions, aliases, promotion, URI resolution."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from conftest import free_port, new_store
from polytask.model.inference import Predictor
from polytask.tracking.registry import (
    artifact_location,
    client,
    ensure_experiment,
    list_versions,
    promote,
    register_bundle,
    resolve_bundle,
    tracking_uri,
    use_tracking_uri,
)

TEXTS = ["bob moved to lima", "the hotel was awful"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, _migrated_store):
    """One SQLite store for the module (a new MLflow db costs seconds); names differ per test."""
    root = tmp_path_factory.mktemp("registry_store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", new_store(_migrated_store, root))
        mp.setenv("POLYTASK_HOME", str(root / "home"))
        yield root


@pytest.fixture()
def run_id(store):
    c = client()
    return c.create_run(ensure_experiment(c, "polytask", tracking_uri())).info.run_id


def test_tracking_uri_defaults_to_sqlite_in_home(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("POLYTASK_HOME", str(tmp_path))
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert artifact_location(tracking_uri()) == (tmp_path / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None


def test_experiment_artifacts_live_beside_the_db(store):
    c = client()
    exp = c.get_experiment(ensure_experiment(c, "artifacts-here", tracking_uri()))
    assert exp.artifact_location == (store / "mlartifacts").as_uri()
    assert ensure_experiment(c, "artifacts-here", tracking_uri()) == exp.experiment_id


def test_worse_version_is_candidate_not_champion_until_promoted(trained_bundle, run_id):
    first = register_bundle(trained_bundle, "reg-demo", run_id, objective=0.6)
    assert (first["version"], first["aliases"]) == (1, ["candidate", "champion"])
    second = register_bundle(trained_bundle, "reg-demo", run_id, objective=0.4)
    assert (second["version"], second["aliases"]) == (2, ["candidate"])

    rows = {r["version"]: r for r in list_versions("reg-demo")}
    assert rows[1]["aliases"] == "champion" and rows[1]["objective"] == "0.6"
    assert rows[1]["variant"] == "fp32"
    assert rows[2]["aliases"] == "candidate" and rows[2]["run_id"] == run_id
    assert list_versions(None) == [
        {"name": "reg-demo", "versions": 2, "latest": 2, "aliases": "candidate→v2, champion→v1"}
    ]

    assert resolve_bundle("models:/reg-demo@champion") == resolve_bundle("models:/reg-demo/1")
    promote("reg-demo", 2, "champion")
    rows = {r["version"]: r for r in list_versions("reg-demo")}
    assert rows[1]["aliases"] == "" and rows[2]["aliases"] == "candidate, champion"
    assert resolve_bundle("models:/reg-demo@champion") == resolve_bundle("models:/reg-demo/2")
    assert resolve_bundle("models:/reg-demo/2") != resolve_bundle("models:/reg-demo/1")


def test_better_and_forced_versions_take_champion(trained_bundle, run_id):
    register_bundle(trained_bundle, "reg-rank", run_id, objective=0.5)
    better = register_bundle(trained_bundle, "reg-rank", run_id, objective=0.7)
    assert better["aliases"] == ["candidate", "champion"]
    forced = register_bundle(trained_bundle, "reg-rank", run_id, objective=0.1, promote="always")
    assert forced["aliases"] == ["candidate", "champion"]
    held = register_bundle(trained_bundle, "reg-rank", run_id, objective=0.9, promote="never")
    assert held["aliases"] == ["candidate"]
    c = client()
    assert int(c.get_model_version_by_alias("reg-rank", "champion").version) == forced["version"]
    assert c.get_model_version("reg-rank", str(better["version"])).tags["objective"] == "0.7"


def test_models_uri_resolves_to_the_aliased_bundle_and_pyfunc_agrees(trained_bundle, run_id):
    import mlflow

    register_bundle(trained_bundle, "reg-load", run_id, objective=0.5)
    path = resolve_bundle("models:/reg-load@champion")
    assert (path / "polytask.json").is_file() and (path / "encoder").is_dir()
    assert path == resolve_bundle("models:/reg-load/1")  # alias and version share one download
    by_run = resolve_bundle(f"runs:/{run_id}/model")  # MLflow 3: the run's logged model
    assert (by_run / "polytask.json").is_file()
    expected = Predictor.from_bundle(str(trained_bundle)).predict(TEXTS)
    assert Predictor.from_bundle(str(path)).predict(TEXTS) == expected

    with use_tracking_uri(tracking_uri()):
        model = mlflow.pyfunc.load_model("models:/reg-load@champion")
    assert model.predict(TEXTS) == expected
    assert model.predict(pd.DataFrame({"text": TEXTS})) == expected
    assert model.predict([{"text": t} for t in TEXTS]) == expected
    only = model.predict(TEXTS, params={"tasks": ["sentiment"]})
    assert [set(r) for r in only] == [{"sentiment"}, {"sentiment"}]
    with pytest.raises(ValueError, match="needs a 'text' column"):
        model.predict(pd.DataFrame({"sentence": TEXTS}))


def test_resolve_bundle_errors_name_the_fix(tmp_path, trained_bundle, run_id):
    assert resolve_bundle(str(trained_bundle)) == trained_bundle.resolve()
    with pytest.raises(FileNotFoundError, match="not a bundle directory"):
        resolve_bundle(str(tmp_path))
    register_bundle(trained_bundle, "reg-alias", run_id, objective=0.5, promote="never")
    with pytest.raises(FileNotFoundError, match="no version of 'reg-alias' has alias 'champion'"):
        resolve_bundle("models:/reg-alias@champion")


def test_default_home_store_works_without_env_and_leaves_cwd_clean(
    trained_bundle, monkeypatch, tmp_path
):
    """No $MLFLOW_TRACKING_URI (the CLI case): logging, registering and resolving all use the
    home SQLite store — nothing falls through to MLflow's own default in the cwd."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("POLYTASK_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    c = client()
    rid = c.create_run(ensure_experiment(c, "polytask", tracking_uri())).info.run_id
    out = register_bundle(trained_bundle, "home-demo", rid, objective=0.5)
    assert out["aliases"] == ["candidate", "champion"]
    assert (resolve_bundle("models:/home-demo@champion") / "polytask.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    assert "MLFLOW_TRACKING_URI" not in os.environ  # restored after the fluent calls


# ------------------------------------------------------------------ promotion rules
def _version(c, name, tmp_path, objective, tasks="ner,sentiment", definition=None):
    """A registered version carrying the tags register_bundle writes (no model logged: the
    decision reads only tags and aliases)."""
    from polytask.tracking import registry

    if not c.search_registered_models(filter_string=f"name = '{name}'"):
        c.create_registered_model(name)
    tags = {
        registry.OBJECTIVE_TAG: repr(float(objective)),
        registry.TASKS_TAG: tasks,
        registry.OBJECTIVE_DEF_TAG: definition or "mean(ner:f1,sentiment:accuracy)",
    }
    return str(c.create_model_version(name, source=str(tmp_path), tags=tags).version)


def _champion(c, name):
    version = c.get_registered_model(name).aliases.get("champion")
    return None if version is None else str(version)


def test_register_bundle_records_what_the_objective_means(trained_bundle, run_id):
    from polytask.tracking import registry

    out = register_bundle(trained_bundle, "reg-tags", run_id, objective=0.5)
    tags = client().get_model_version("reg-tags", "1").tags
    assert tags[registry.TASKS_TAG] == "ner,sentiment"
    assert tags[registry.OBJECTIVE_DEF_TAG] == "mean(ner:f1,sentiment:accuracy)"
    assert tags[registry.PROMOTION_TAG] == out["promotion"] == "promoted: first champion"


def test_promotion_compares_like_with_like_and_never_on_nan(store, tmp_path):
    from polytask.tracking.registry import settle_champion

    c = client()
    name = "reg-rules"
    nan = _version(c, name, tmp_path, float("nan"))
    won, why = settle_champion(c, name, nan, "if_better")
    assert not won and "objective is NaN" in why and _champion(c, name) is None

    first = _version(c, name, tmp_path, 0.5)
    assert settle_champion(c, name, first, "if_better") == (True, "promoted: first champion")
    other_tasks = _version(c, name, tmp_path, 0.9, tasks="ner,sentiment,topic")
    won, why = settle_champion(c, name, other_tasks, "if_better")
    assert not won and f"champion v{first} is not comparable" in why and "topic" in why
    other_def = _version(c, name, tmp_path, 0.9, definition="mean(ner:precision,sentiment:f1)")
    won, why = settle_champion(c, name, other_def, "if_better")
    assert not won and "not comparable" in why
    equal = _version(c, name, tmp_path, 0.5)
    assert settle_champion(c, name, equal, "if_better")[0] is False
    better = _version(c, name, tmp_path, 0.6)
    won, why = settle_champion(c, name, better, "if_better")
    assert won and "0.6 > champion" in why and _champion(c, name) == better
    assert settle_champion(c, name, nan, "always")[0] is True  # an explicit choice stands
    later = _version(c, name, tmp_path, 0.99)
    won, why = settle_champion(c, name, later, "if_better")  # a NaN champion cannot be beaten
    assert not won and "has no objective" in why and _champion(c, name) == nan
    assert c.get_model_version(name, later).tags["polytask.promotion"] == why


def test_an_unreadable_registry_never_promotes(store, tmp_path, monkeypatch):
    """A real MLflow client against a tracking server that is down (connection refused): the
    error must not read as "no champion"."""
    from polytask.tracking.registry import _version_by_alias, settle_champion

    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    down = client(f"http://127.0.0.1:{port}")
    won, why = settle_champion(down, "reg-down", "1", "if_better")
    assert not won and "the registry failed while deciding" in why
    assert "polytask registry promote reg-down 1" in why
    with pytest.raises(Exception):  # noqa: B017 - any error, as long as it is not None
        _version_by_alias(down, "reg-down", "champion")
    assert _version_by_alias(client(), "no-such-model", "champion") is None


def test_concurrent_promotions_leave_the_best_as_champion(store, tmp_path):
    """Six writers decide at once (threads released by one barrier, each with its own client):
    the lock serialises them, so the best ends as champion and no writer that lost the alias
    afterwards was ever told it was not compared against."""
    import random
    import threading

    from polytask.tracking.lock import is_lock_name
    from polytask.tracking.registry import settle_champion

    name = "reg-race"
    c = client()
    base = _version(c, name, tmp_path, 0.1)
    settle_champion(c, name, base, "if_better")
    objectives = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    random.Random(0).shuffle(objectives)
    versions = {_version(c, name, tmp_path, o): o for o in objectives}
    barrier = threading.Barrier(len(versions))
    outcome: dict[str, tuple[bool, str]] = {}

    def decide(version: str) -> None:
        own = client()
        barrier.wait()
        outcome[version] = settle_champion(own, name, version, "if_better")

    threads = [threading.Thread(target=decide, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(outcome) == len(versions)
    best = max(versions, key=versions.get)
    assert _champion(c, name) == best and outcome[best][0] is True
    for version, (won, why) in outcome.items():
        assert "registry failed" not in why, why
        if not won:  # it lost to a champion at least as good, named in the reason
            beaten_by = why.split("champion v")[1].split("'")[0]
            assert versions.get(beaten_by, 0.1) >= versions[version], why
    assert not [m for m in c.search_registered_models() if is_lock_name(m.name)]


def test_a_lock_left_by_a_dead_writer_is_broken(store, tmp_path, monkeypatch):
    import time

    from polytask.tracking import lock as locks
    from polytask.tracking import registry
    from polytask.tracking.tags import LOCK_LEASE_TAG

    c = client()
    name = "reg-stale"
    version = _version(c, name, tmp_path, 0.5)
    ended = {LOCK_LEASE_TAG: repr(time.time() - 1)}
    c.create_registered_model(locks.lock_name(name, 3), tags=ended)  # its writer died holding it
    monkeypatch.setattr(locks, "LOCK_SKEW_S", 0.0)
    assert registry.settle_champion(c, name, version, "if_better")[0] is True
    assert not [r for r in list_versions(None) if locks.is_lock_name(r["name"])]
    assert not [m for m in c.search_registered_models() if locks.is_lock_name(m.name)]


class SlowRegistry:
    """A real MLflow client whose every call takes `delay` s longer: a loaded tracking server
    (latency injected around the real store, nothing faked)."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def __getattr__(self, attr):
        import time

        value = getattr(self.inner, attr)
        if not callable(value):
            return value

        def slow(*args, **kwargs):
            time.sleep(self.delay)
            return value(*args, **kwargs)

        return slow


def test_two_writers_on_a_slow_registry_hold_the_lock_one_at_a_time(store, monkeypatch):
    """Each holder works for 1.6 leases; its renewed lease keeps the other waiting (a lock
    judged stale by its age alone was broken under a live holder)."""
    import threading
    import time

    from polytask.tracking import lock as locks

    monkeypatch.setattr(locks, "LOCK_LEASE_S", 1.0)
    name, holding, most, held_by = "reg-lease", [0], [0], []
    guard = threading.Lock()

    def writer(i: int) -> None:
        with locks.promotion_lock(SlowRegistry(client(), 0.05), name, timeout_s=20):
            with guard:
                holding[0] += 1
                most[0] = max(most[0], holding[0])
            held_by.append(i)
            time.sleep(1.6)
            with guard:
                holding[0] -= 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(held_by) == [0, 1] and most[0] == 1
    assert not [m for m in client().search_registered_models() if locks.is_lock_name(m.name)]


def test_release_leaves_another_writers_lock_alone(store):
    import time

    from polytask.tracking import lock as locks
    from polytask.tracking.tags import LOCK_LEASE_TAG, LOCK_OWNER_TAG

    c, name = client(), "reg-owner"
    with locks.promotion_lock(c, name) as lease:
        lease.check()  # held: no error
        newer = locks.lock_name(name, lease.generation + 1)  # broken and taken by another writer
        other = {LOCK_OWNER_TAG: "pid 7 on elsewhere", LOCK_LEASE_TAG: repr(time.time() + 60)}
        c.create_registered_model(newer, tags=other)
        with pytest.raises(locks.PromotionLockLost, match="pid 7 on elsewhere"):
            lease.check()  # so the alias is not moved
    assert c.get_registered_model(newer).tags[LOCK_OWNER_TAG] == "pid 7 on elsewhere"
    c.delete_registered_model(newer)
    c.delete_registered_model(locks.lock_name(name, 1))


class PausedRenewals(SlowRegistry):
    """A real client whose lease renewals hang once `paused` is set: a holder stopped (GC pause,
    a frozen VM) while another writer breaks its expired lease."""

    def __init__(self, inner) -> None:
        import threading

        super().__init__(inner, 0.0)
        self.paused = threading.Event()

    def set_registered_model_tag(self, *args, **kwargs):
        if self.paused.is_set():
            import time

            time.sleep(5)
        return self.inner.set_registered_model_tag(*args, **kwargs)


def test_a_holder_whose_lease_ran_out_cannot_move_the_alias(store, tmp_path, monkeypatch):
    """Fencing: the first writer stalls past its lease, the second breaks the lock and promotes;
    the first then finds its generation superseded (or its lease gone) and moves nothing, even
    after the second has released."""
    import time

    from polytask.tracking import lock as locks
    from polytask.tracking import registry

    monkeypatch.setattr(locks, "LOCK_LEASE_S", 1.0)
    monkeypatch.setattr(locks, "LOCK_SKEW_S", 0.2)
    c, name = client(), "reg-fenced"
    first_v, second_v = _version(c, name, tmp_path, 0.9), _version(c, name, tmp_path, 0.5)
    slow = PausedRenewals(client())
    with locks.promotion_lock(slow, name) as stalled:
        slow.paused.set()
        time.sleep(1.5)  # past its lease (and the skew margin): the lock may now be broken
        won, reason = registry.settle_champion(client(), name, second_v, "if_better")
        assert won and _champion(c, name) == second_v, reason
        with pytest.raises(locks.PromotionLockLost, match="no longer held"):
            stalled.check()
        assert _champion(c, name) == second_v
    assert not [m for m in c.search_registered_models() if locks.is_lock_name(m.name)]
    assert first_v != second_v


def test_any_writers_expired_lock_is_broken_without_deleting_it(store, tmp_path, monkeypatch):
    """A lock this writer may not delete (another MLflow user's) is broken by the next
    generation; deleting superseded generations is best effort."""
    import time

    from polytask.tracking import lock as locks
    from polytask.tracking import registry
    from polytask.tracking.tags import LOCK_LEASE_TAG, LOCK_OWNER_TAG

    c, name = client(), "reg-admins"
    version = _version(c, name, tmp_path, 0.5)
    admins = locks.lock_name(name, 4)
    c.create_registered_model(
        admins, tags={LOCK_OWNER_TAG: "admin, killed", LOCK_LEASE_TAG: repr(time.time() - 60)}
    )

    class NoDelete(SlowRegistry):
        def delete_registered_model(self, model_name):
            if model_name == admins:
                from mlflow.exceptions import MlflowException

                raise MlflowException("Permission denied", error_code="PERMISSION_DENIED")
            return self.inner.delete_registered_model(model_name)

    won, reason = registry.settle_champion(NoDelete(client(), 0.0), name, version, "if_better")
    assert won, reason
    assert [m.name for m in c.search_registered_models() if locks.is_lock_name(m.name)] == [admins]
    c.delete_registered_model(admins)


def test_a_writer_whose_clock_is_off_the_servers_refuses_the_lock(store):
    from polytask.tracking import lock as locks

    class SkewedServer(SlowRegistry):
        def create_registered_model(self, *args, **kwargs):
            created = self.inner.create_registered_model(*args, **kwargs)
            created._creation_time += 60_000  # the server's clock is a minute ahead of ours
            return created

    with (
        pytest.raises(locks.PromotionClockSkew, match=r"(59|60)\.\d s off the MLflow server"),
        locks.promotion_lock(SkewedServer(client(), 0.0), "reg-skew"),
    ):
        pytest.fail("a writer with a skewed clock must not hold the lock")
    assert not [m for m in client().search_registered_models() if locks.is_lock_name(m.name)]


def test_a_writer_that_gives_up_waiting_says_so_in_the_promotion_tag(store, tmp_path, monkeypatch):
    import time

    from polytask.tracking import lock as locks
    from polytask.tracking import registry
    from polytask.tracking.tags import LOCK_LEASE_TAG, LOCK_OWNER_TAG

    c, name = client(), "reg-waiter"
    version = _version(c, name, tmp_path, 0.5)
    held = {LOCK_OWNER_TAG: "pid 9 on busy-host", LOCK_LEASE_TAG: repr(time.time() + 60)}
    c.create_registered_model(locks.lock_name(name, 1), tags=held)
    monkeypatch.setattr(locks, "LOCK_WAIT_S", 0.3)
    won, reason = registry.settle_champion(c, name, version, "if_better")
    assert won is False and _champion(c, name) is None
    tag = c.get_model_version(name, version).tags[registry.PROMOTION_TAG]
    assert tag == reason
    assert "gave up" in tag and "pid 9 on busy-host" in tag
    assert f"polytask registry promote {name} {version}" in tag


# ------------------------------------------------------------------ download cache
def test_cache_is_keyed_verified_and_safe_for_concurrent_replicas(
    trained_bundle, run_id, monkeypatch, tmp_path
):
    import hashlib
    import json
    import threading

    from polytask.tracking.registry import CACHE_DIGEST_FILE

    register_bundle(trained_bundle, "reg-cache", run_id, objective=0.5)
    monkeypatch.setenv("POLYTASK_HOME", str(tmp_path / "node"))  # an empty cache
    barrier = threading.Barrier(6)
    paths: list = []

    def replica() -> None:
        barrier.wait()
        paths.append(resolve_bundle("models:/reg-cache@champion"))

    threads = [threading.Thread(target=replica) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(paths) == 6 and len(set(paths)) == 1
    bundle = paths[0]
    store_dir = (
        tmp_path / "node" / "models" / hashlib.sha256(tracking_uri().encode()).hexdigest()[:16]
    )
    entries = [p.name for p in store_dir.iterdir() if p.is_dir()]
    assert entries == ["models__reg-cache_1"], entries  # version, not alias; no partial left
    record = json.loads((store_dir / entries[0] / CACHE_DIGEST_FILE).read_text())
    assert record["uri"] == "models:/reg-cache/1" and record["store"] == tracking_uri()

    weights = next(bundle.rglob("*.safetensors"))
    good = weights.read_bytes()
    weights.write_bytes(good[:-64] + b"\0" * 64)  # a corrupted (e.g. truncated-write) entry
    assert resolve_bundle("models:/reg-cache/1") == bundle
    assert weights.read_bytes() == good  # downloaded again, since it no longer verified
    assert [p.name for p in store_dir.iterdir() if p.is_dir()] == entries


def test_downloads_killed_halfway_leave_no_partial_behind(trained_bundle, run_id):
    """A replica killed mid-download leaves `<entry>.<random>.partial`; the next download of any
    version deletes every such directory whose entry nobody is downloading, and only those."""
    import fcntl
    import hashlib

    from polytask.config import default_home

    register_bundle(trained_bundle, "reg-partial", run_id, objective=0.5)
    resolve_bundle("models:/reg-partial/1")
    root = default_home() / "models" / hashlib.sha256(tracking_uri().encode()).hexdigest()[:16]
    dead = [root / "models__reg-partial_1.0badf00d.partial", root / "models__gone_3.1234abcd.stale"]
    busy = root / "models__busy_2.cafebabe.partial"
    for folder in (*dead, busy):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half a file")
    with open(root / "models__busy_2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another replica is downloading that one right now
        resolve_bundle("models:/reg-partial/1")
        assert [d for d in dead if d.exists()] == [] and busy.is_dir()
    resolve_bundle("models:/reg-partial/1")
    assert not busy.exists()


def test_the_digest_checked_comes_from_the_registry_and_is_hashed_once_per_node(
    trained_bundle, run_id, monkeypatch, tmp_path
):
    """Weights swapped in the shared cache together with anything stored inside the entry are
    still caught (the expected digest is the version's tag); a node hashes an unchanged entry
    once, and a new node (its own marker folder) hashes it again."""
    import json

    from polytask.tracking import integrity, registry
    from polytask.tracking.tags import BUNDLE_DIGEST_TAG

    register_bundle(trained_bundle, "reg-digest", run_id, objective=0.5)
    tag = client().get_model_version("reg-digest", "1").tags[BUNDLE_DIGEST_TAG]
    assert tag == integrity.bundle_digest(trained_bundle)
    monkeypatch.setenv("POLYTASK_NODE_DIR", str(tmp_path / "node-a"))
    bundle = resolve_bundle("models:/reg-digest/1")
    hashed: list = []
    real = registry.bundle_digest
    monkeypatch.setattr(registry, "bundle_digest", lambda f: hashed.append(f) or real(f))
    assert resolve_bundle("models:/reg-digest/1") == bundle and hashed == []  # marker, no hash
    monkeypatch.setenv("POLYTASK_NODE_DIR", str(tmp_path / "node-b"))
    assert resolve_bundle("models:/reg-digest/1") == bundle and len(hashed) == 1
    assert resolve_bundle("models:/reg-digest/1") == bundle and len(hashed) == 1

    weights = next(bundle.rglob("*.safetensors"))
    good = weights.read_bytes()
    weights.write_bytes(good[:-64] + b"\1" * 64)  # a RayJob swaps the weights and the record
    entry = next(p for p in bundle.parents if (p / registry.CACHE_DIGEST_FILE).is_file())
    record = json.loads((entry / registry.CACHE_DIGEST_FILE).read_text())
    (entry / registry.CACHE_DIGEST_FILE).write_text(json.dumps({**record, "sha256": "forged"}))
    assert resolve_bundle("models:/reg-digest/1") == bundle
    assert weights.read_bytes() == good  # downloaded again: it failed the registry's digest


def test_a_download_that_differs_from_the_registry_digest_is_refused(trained_bundle, run_id):
    from polytask.tracking.tags import BUNDLE_DIGEST_TAG

    register_bundle(trained_bundle, "reg-forged", run_id, objective=0.5)
    c = client()
    c.set_model_version_tag("reg-forged", "1", BUNDLE_DIGEST_TAG, "0" * 64)
    with pytest.raises(ValueError, match=f"registry says {'0' * 64}"):
        resolve_bundle("models:/reg-forged/1")


def test_a_cache_lock_wait_is_bounded_and_names_the_lock(trained_bundle, run_id, monkeypatch):
    import fcntl
    import hashlib

    from polytask.config import default_home
    from polytask.tracking.integrity import CacheLockTimeout

    register_bundle(trained_bundle, "reg-hung", run_id, objective=0.5)
    root = default_home() / "models" / hashlib.sha256(tracking_uri().encode()).hexdigest()[:16]
    root.mkdir(parents=True, exist_ok=True)
    lock = root / "models__reg-hung_1.lock"
    monkeypatch.setenv("POLYTASK_CACHE_LOCK_WAIT_S", "0.3")
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a download hung while holding it
        with pytest.raises(CacheLockTimeout, match=f"{lock}.*delete {lock}"):
            resolve_bundle("models:/reg-hung/1")
    assert resolve_bundle("models:/reg-hung/1").is_dir()


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_bundle_path_leading_out_of_the_model_is_refused(tmp_path, trained_bundle, how):
    """An MLmodel (or a link in the download) must not make a replica load files from outside
    the verified cache entry."""
    import shutil

    import yaml

    from polytask.tracking.integrity import bundle_in

    outside = tmp_path / "elsewhere"
    shutil.copytree(trained_bundle, outside)
    model = tmp_path / "entry"
    model.mkdir()
    rel = {"dotdot": "../elsewhere", "absolute": str(outside), "symlink": "artifacts/bundle"}[how]
    if how == "symlink":
        (model / "artifacts").mkdir()
        (model / "artifacts" / "bundle").symlink_to(outside)
    flavor = {"python_function": {"artifacts": {"bundle": {"path": rel}}}}
    (model / "MLmodel").write_text(yaml.safe_dump({"flavors": flavor}))
    with pytest.raises(ValueError, match="outside the model's directory"):
        bundle_in(model)
    shutil.copytree(trained_bundle, model / "inside")  # the same bundle within the entry loads
    (model / "MLmodel").write_text(
        yaml.safe_dump(
            {"flavors": {"python_function": {"artifacts": {"bundle": {"path": "inside"}}}}}
        )
    )
    if how == "symlink":
        (model / "artifacts" / "bundle").unlink()
    assert bundle_in(model) == (model / "inside").resolve()


def test_a_pinned_version_in_the_cache_loads_without_importing_mlflow(trained_bundle, run_id):
    """What every replica after a node's first does with the version the builder pinned: finds it
    in the cache without MLflow (about 1.5 s of imports per replica start). An alias still asks
    the registry which version it names."""
    import subprocess
    import sys

    register_bundle(trained_bundle, "reg-warm", run_id, objective=0.5)
    cached = resolve_bundle("models:/reg-warm/1")  # the node's first replica downloads it
    code = (
        "import sys\n"
        "from polytask.tracking.registry import resolve_bundle\n"
        "print(resolve_bundle(sys.argv[1]), 'mlflow' in sys.modules)"
    )

    def in_a_fresh_process(uri: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code, uri], check=False, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert in_a_fresh_process("models:/reg-warm/1") == f"{cached} False"
    assert in_a_fresh_process("models:/reg-warm@champion") == f"{cached} True"


def test_model_references_parse_into_their_parts():
    from polytask.tracking.uris import parse_model_uri

    alias = parse_model_uri("models:/reg@champion")
    assert (alias.kind, alias.name, alias.alias, alias.rest, alias.registered) == (
        "alias",
        "reg",
        "champion",
        "",
        True,
    )
    version = parse_model_uri("models:/reg/12/sub/dir")
    assert (version.kind, version.name, version.version, version.rest) == (
        "version",
        "reg",
        "12",
        "/sub/dir",
    )
    run = parse_model_uri("runs:/abc123/model")
    assert (run.kind, run.run_id, run.rest, run.registered) == ("run", "abc123", "model", False)
    assert parse_model_uri("bundles/b1").kind == "path"
    assert parse_model_uri("models:/m-0123abcd").kind == "other"
    assert parse_model_uri("models:/reg/latest").kind == "other"


def test_one_pinning_for_registry_compress_and_serve(trained_bundle, run_id):
    """An alias pins to the version it names now, the same way in all three callers."""
    from polytask.compression.compress import registered_version
    from polytask.serve.args import ServeArgsError
    from polytask.serve.refs import pin_model_uri as serve_pin
    from polytask.tracking.uris import AliasNotFound, pin_model_uri

    register_bundle(trained_bundle, "reg-pin", run_id, objective=0.5)
    register_bundle(trained_bundle, "reg-pin", run_id, objective=0.9)
    assert pin_model_uri("models:/reg-pin@champion", client) == "models:/reg-pin/2"
    assert pin_model_uri("models:/reg-pin@champion/x", client) == "models:/reg-pin/2/x"
    assert pin_model_uri("models:/reg-pin/1", client) == "models:/reg-pin/1"
    assert pin_model_uri(str(trained_bundle), client) == str(trained_bundle.resolve())
    assert serve_pin("models:/reg-pin@candidate") == "models:/reg-pin/2"
    assert registered_version("models:/reg-pin@champion") == ("reg-pin", "2")
    assert registered_version("models:/reg-pin/1") == ("reg-pin", "1")
    with pytest.raises(AliasNotFound, match="'reg-pin' has no alias 'gold'"):
        pin_model_uri("models:/reg-pin@gold", client)
    with pytest.raises(ServeArgsError, match="has no alias 'gold'.*polytask registry promote"):
        serve_pin("models:/reg-pin@gold")
    with pytest.raises(ValueError, match="has no alias 'gold'.*polytask registry list reg-pin"):
        registered_version("models:/reg-pin@gold")
    with pytest.raises(ValueError, match="--register needs a models:/NAME/VERSION"):
        registered_version(str(trained_bundle))

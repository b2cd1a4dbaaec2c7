"""MLflow tracking: parallel writers on one sqlite store, idempotent sync, resume, failure modes."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from maskconnect.tracking import (
    RUN_DIR_TAG,
    RUN_FILE,
    Tracker,
    TrackingWarning,
    default_tracking_uri,
    ensure_store,
    flatten_params,
    log_report,
    sync_run_dir,
)
from maskconnect.tracking import store as tracking_store

mlflow = pytest.importorskip("mlflow")

N_JOBS = 8

JOB = textwrap.dedent(
    """
    import sys, warnings
    from pathlib import Path
    from maskconnect.tracking import Tracker, TrackingWarning

    run_dir, uri, i = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text('{"top1": %d}' % i)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = Tracker(run_dir, experiment="maskconnect/test/parallel", run_name=f"job{i}", uri=uri)
        t.start({"seed": i, "model": {"depth": 29, "width": 8}}, {"seed": i, "device": "cpu"})
        for epoch in range(1, 4):
            t.log_epoch({"epoch": epoch, "phase": "joint", "lr": 0.1, "train_loss": 1.0 / epoch,
                         "test_top1": 10.0 * epoch + i, "mask_entropy": ""}, step=epoch)
        t.finish({"top1": 30.0 + i, "epochs": 3, "status": "complete"}, [run_dir / "metrics.json"])
    bad = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    if bad or t.failed or t.run_id is None:
        print("FAILED", bad, file=sys.stderr)
        sys.exit(3)
    print(t.run_id)
    """
)


def _env() -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _client(uri):
    return mlflow.MlflowClient(tracking_uri=uri)


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _all_runs(client):
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, max_results=1000)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One shared sqlite store for the single-process tests."""
    root = tmp_path_factory.mktemp("store")
    return ensure_store(f"sqlite:///{root}/mlflow.db")


def test_eight_parallel_jobs_on_a_fresh_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/results/mlflow.db"  # fresh: the jobs race on creating it
    dirs = [tmp_path / "runs" / f"job{i}" for i in range(N_JOBS)]
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", JOB, str(d), uri, str(i)], cwd=tmp_path,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i, d in enumerate(dirs)]
    outs = [p.communicate(timeout=180) for p in procs]
    elapsed = time.monotonic() - t0
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    ids = [out.strip().splitlines()[-1] for out, _ in outs]
    assert len(set(ids)) == N_JOBS
    print(f"{N_JOBS} parallel jobs: {elapsed:.1f} s")

    client = _client(uri)
    exp = client.get_experiment_by_name("maskconnect/test/parallel")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert sorted(r.info.run_id for r in runs) == sorted(ids)
    for r in runs:
        i = int(r.info.run_name[3:])
        assert r.info.status == "FINISHED"
        assert r.data.params["seed"] == str(i) and r.data.params["model.depth"] == "29"
        assert r.data.tags["seed"] == str(i) and r.data.tags["device"] == "cpu"
        assert r.data.tags[RUN_DIR_TAG] == str(dirs[i].resolve())
        assert "torch_version" in r.data.tags
        for key in ("lr", "train_loss", "test_top1"):
            assert _steps(client, r.info.run_id, key) == [1, 2, 3]
        assert "phase" not in r.data.metrics and "mask_entropy" not in r.data.metrics
        assert [m.value for m in client.get_metric_history(r.info.run_id, "top1")] == [30.0 + i]
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["metrics.json"]
        record = json.loads((dirs[i] / RUN_FILE).read_text())
        assert record["run_id"] == r.info.run_id and record["tracking_uri"] == uri
    # artifacts sit next to the database, never in ./mlruns
    assert not (tmp_path / "mlruns").exists()
    assert (tmp_path / "results" / "mlartifacts").is_dir()


def _fake_run_dir(root: Path, epochs: int = 3) -> Path:
    run_dir = root / "results" / "runs" / "demo" / "digits" / "29-8-8" / "learned-K4" / "seed0"
    run_dir.mkdir(parents=True)
    config = {"dataset": "digits", "arch": "29,8,8", "connectivity": "learned", "fan_in": 4,
              "seed": 0, "epochs": epochs, "lr": 0.1, "device": "cpu", "note": "x" * 7000}
    (run_dir / "config.json").write_text(json.dumps(config))
    cols = ["epoch", "phase", "lr", "mask_lr", "train_loss", "train_top1", "test_loss",
            "test_top1", "test_top5", "mask_entropy", "mask_changed", "epoch_time_s"]
    with (run_dir / "history.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for e in range(1, epochs + 1):
            w.writerow([e, "joint" if e < epochs else "finetune", 0.1, 0.01 if e < epochs else "",
                        2.0 / e, 30 * e, 1.5 / e, 25 * e, 60 + e, 1.2 / e, 3 - e, 0.5])
    metrics = {"status": "complete", "dataset": "digits", "arch": "29,8,8", "depth": 29,
               "width": 8, "cardinality": 8, "connectivity": "learned", "fan_in": 4, "seed": 0,
               "top1": 75.0, "top5": 93.0, "best_top1": 75.5, "best_top5": 93.5,
               "test_loss": 0.5, "params_train": 1000, "params_test": 900, "masks": 64,
               "flops": 123456, "epochs": epochs, "wall_time_s": 12.5, "device": "cpu",
               "config": config, "versions": {"torch": "2.5.1", "maskconnect": "0.1.0"},
               "git_commit": None}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "masks.json").write_text(json.dumps({"cardinality": 8, "fan_in": 4, "masks": []}))
    return run_dir


def test_sync_run_dir_is_idempotent(tmp_path, store):
    run_dir = _fake_run_dir(tmp_path)
    client = _client(store)
    before = {r.info.run_id for r in _all_runs(client)}
    run_id = sync_run_dir(run_dir, uri=store)
    assert sync_run_dir(run_dir, uri=store) == run_id
    (run_dir / RUN_FILE).unlink()  # found again by its run_dir tag
    assert sync_run_dir(run_dir, uri=store) == run_id
    assert json.loads((run_dir / RUN_FILE).read_text())["runs"][store]["run_id"] == run_id

    new = [r for r in _all_runs(client) if r.info.run_id not in before]
    assert [r.info.run_id for r in new] == [run_id]
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "maskconnect/digits/demo"
    assert run.info.run_name == "digits/29-8-8/learned-K4/seed0"
    assert run.info.status == "FINISHED"
    assert run.data.params["fan_in"] == "4" and len(run.data.params["note"]) == 6000
    assert run.data.tags["torch_version"] == "2.5.1" and run.data.tags["device"] == "cpu"
    assert run.data.tags["seed"] == "0" and "git_commit" not in run.data.tags
    for key in ("lr", "train_loss", "test_top1", "test_top5", "mask_entropy", "mask_changed"):
        assert _steps(client, run_id, key) == [1, 2, 3], key
    assert _steps(client, run_id, "mask_lr") == [1, 2]  # empty cell in the last row
    for key in ("top1", "best_top1", "flops", "wall_time_s"):
        assert _steps(client, run_id, key) == [3], key
    assert _steps(client, run_id, "test_loss") == [1, 2, 3]  # final value shares the last step
    assert "seed" not in run.data.metrics and "epochs" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id)} == {
        "config.json", "history.csv", "metrics.json", "masks.json"}


def test_resumed_tracker_continues_the_same_run(tmp_path, store):
    run_dir = tmp_path / "run"
    kw = dict(experiment="maskconnect/test/resume", run_name="r", uri=store)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        first = Tracker(run_dir, **kw)
        first.start({"seed": 1, "epochs": 3}, {"seed": 1, "device": "cpu"})
        for e in (1, 2):
            first.log_epoch({"epoch": e, "train_loss": 1.0 / e}, step=e)
        # "crash": no finish(); the resumed run repeats epoch 2 and goes on
        second = Tracker(run_dir, **kw)
        second.start({"seed": 1, "epochs": 3, "resumed": True}, {"seed": 1, "device": "cpu"})
        assert second.run_id == first.run_id
        for e in (2, 3):
            second.log_epoch({"epoch": e, "train_loss": 1.0 / e}, step=e)
        second.finish({"top1": 50.0, "epochs": 3}, [])
    client = _client(store)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["resumed"] == "True"
    assert _steps(client, first.run_id, "train_loss") == [1, 2, 3]
    assert _steps(client, first.run_id, "top1") == [3]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # a later sync of the directory finds the same run and duplicates nothing
    (run_dir / "config.json").write_text(json.dumps({"seed": 1, "epochs": 3}))
    assert sync_run_dir(run_dir, uri=store) == first.run_id
    assert _steps(client, first.run_id, "train_loss") == [1, 2, 3]
    # resume=False starts afresh
    third = Tracker(run_dir, resume=False, **kw)
    third.start({"seed": 1}, {})
    assert third.run_id not in (None, first.run_id)


def _closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("kind", ["sqlite-under-a-file", "http-closed-port"])
def test_unusable_store_never_raises_and_warns_once(tmp_path, monkeypatch, kind):
    if kind == "http-closed-port":
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        uri = _closed_port_uri()
    else:
        (tmp_path / "afile").write_text("not a directory")
        uri = f"sqlite:///{tmp_path}/afile/mlflow.db"
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = Tracker(run_dir, experiment="x", run_name="r", uri=uri, retries=2, backoff=0.01)
        t.start({"a": 1}, {"seed": 0})
        for e in (1, 2):
            t.log_epoch({"loss": 1.0}, step=e)
        t.finish({"top1": 1.0}, [tmp_path / "missing.json"], status="FAILED")
    ours = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "training goes on" in str(ours[0].message)
    assert t.failed and t.run_id is None
    assert not (run_dir / RUN_FILE).exists()
    assert time.monotonic() - t0 < 15


def test_without_mlflow_tracking_is_a_noop_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    monkeypatch.setattr(tracking_store, "_MISSING_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("a", "b"):
            t = Tracker(tmp_path / name, experiment="x", run_name=name, uri="sqlite:///x.db")
            t.start({"a": 1}, {})
            t.log_epoch({"loss": 1.0}, step=1)
            t.finish({}, [])
            assert t.run_id is None
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_disabled_tracker_does_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = Tracker(tmp_path / "run", experiment="x", run_name="r", enabled=False)
        t.start({"a": 1}, {})
        t.log_epoch({"loss": 1.0}, step=1)
        t.finish({"top1": 1.0}, [])
    assert t.run_id is None and not (tmp_path / "run").exists()


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert default_tracking_uri() == "http://tracking.example:5000"
    assert default_tracking_uri(tmp_path) == "http://tracking.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/results/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path}/results/mlflow.db"
    assert "mlruns" not in default_tracking_uri()


def test_flatten_params(tmp_path, store):
    flat = flatten_params({"a": 1, "b": {"c": [1, 2], "d": None, "e": {}}, "f": "y" * 7000,
                           "g h": True})
    assert flat == {"a": "1", "b.c": "[1,2]", "b.d": "None", "b.e": "{}", "f": "y" * 7000,
                    "g h": "True"}
    # an over-long value is MLflow's to truncate (MLFLOW_TRUNCATE_LONG_VALUES): logged, it is 6000 characters
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        t = Tracker(tmp_path / "run", experiment="maskconnect/test/flatten", run_name="f", uri=store)
        t.start({"f": "y" * 7000}, {})
    assert _client(store).get_run(t.run_id).data.params["f"] == "y" * 6000


def test_batches_beyond_mlflow_request_limits_are_logged_whole(tmp_path, store):
    # one log_batch call each: MLflow splits params/tags (100 a request) and metrics (1000) itself
    params = {f"p{i}": i for i in range(250)}
    row = {f"m{i}": float(i) for i in range(1200)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        t = Tracker(tmp_path / "run", experiment="maskconnect/test/batches", run_name="b", uri=store)
        t.start(params, {f"t{i}": i for i in range(150)})
        t.log_epoch(row, step=1)
        t.finish({}, [])
    run = _client(store).get_run(t.run_id)
    assert {k: run.data.params[k] for k in params} == {k: str(v) for k, v in params.items()}
    assert all(run.data.tags[f"t{i}"] == str(i) for i in range(150))
    assert {k: run.data.metrics[k] for k in row} == row


def test_retry_backs_off_on_locked_database_and_not_on_permanent_errors():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)
        return "ok"

    assert tracking_store.retry(flaky, retries=5, backoff=0.001) == "ok" and len(calls) == 3

    def bad():
        calls.append(1)
        raise MlflowException("bad key", error_code=INVALID_PARAMETER_VALUE)

    calls.clear()
    with pytest.raises(MlflowException):
        tracking_store.retry(bad, retries=5, backoff=0.001)
    assert len(calls) == 1


class _LockedStore:
    """A sqlite store that stays locked, on a fake clock: every call waits ``wait`` seconds (MLflow's busy
    wait) and fails with "database is locked", the one error maskconnect retries; sleeps advance the clock."""

    def __init__(self, wait: float):
        self.now, self.wait, self.calls = 0.0, wait, 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def client(self, uri):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

        self.calls += 1
        self.now += self.wait
        raise MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)


BUDGET_S = 30.0  # docs/run_format.md, "Tracking (MLflow)": each run has one budget of 30 s


def test_a_store_that_stays_locked_costs_a_run_its_30_s_budget_and_no_more(tmp_path, monkeypatch):
    """A run (and ``track init``) gives up on a locked store once the documented 30 s are spent: failed calls
    and the sleeps between retries count, and a call that starts inside the budget may end past it."""
    monkeypatch.delenv("MASKCONNECT_TRACKING_BUDGET_S", raising=False)
    locked = _LockedStore(wait=4.0)
    monkeypatch.setattr(tracking_store, "time", locked)   # store.retry's clock and sleeps
    monkeypatch.setattr(tracking_store, "client", locked.client)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # many retries allowed: only the budget can stop them
    t = Tracker(tmp_path / "run", experiment="maskconnect/test/locked", run_name="r", uri=uri, retries=1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.start({"seed": 0}, {})
        spent, calls = locked.now, locked.calls
        for epoch in (1, 2, 3):
            t.log_epoch({"epoch": epoch, "test_top1": 50.0}, step=epoch)
        t.finish({"top1": 50.0, "status": "complete"}, [])
    print(f"locked store: gave up after {calls} calls and {spent:.1f} fake seconds")
    assert t.failed and calls >= 3                                     # retried, then gave up
    assert BUDGET_S / 2 <= spent <= BUDGET_S + locked.wait             # the budget, used and not overrun
    assert locked.calls == calls and locked.now == spent                # nothing more for the rest of the run
    warned = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(warned) == 1 and "database is locked" in warned[0] and "maskconnect track sync" in warned[0]

    locked.now, locked.calls = 0.0, 0
    with pytest.raises(tracking_store.MaskConnectError, match="database is locked"):
        ensure_store(uri)                                 # `maskconnect track init`
    assert locked.calls >= 3 and locked.now <= BUDGET_S + locked.wait


@pytest.mark.parametrize("name", ["plain", "John's report"])
def test_log_report_finds_its_run_again_whatever_the_folder_is_called(tmp_path, store, name):
    """`track log-report` twice on one folder is one MLflow run, also when the folder's name holds a
    quote (the search filter cannot quote it)."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "REPORT.md").write_text("# report\n")
    (folder / "summary.json").write_text(json.dumps({"claims": {"reproduced": 1}}))
    first = log_report(folder, uri=store, experiment="reports-test")
    (folder / "REPORT.md").write_text("# report, again\n")
    second = log_report(folder, uri=store, experiment="reports-test")
    assert first == second
    client = _client(store)
    exp = client.get_experiment_by_name("reports-test")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id]) if r.info.run_name == f"report {name}"] == [first]


def test_numeric_items_keep_numbers_and_nan_and_leave_out_infinities_and_non_numbers():
    import math

    import numpy as np
    import torch

    from maskconnect.tracking.values import numeric_items

    got = numeric_items({"a": 1, "b": float("inf"), "c": "nan", "d": "x", "e": torch.tensor([1.0, 2.0]),
                         "f": np.float32(0.5), "g": torch.tensor(2.0), "h": "-inf", "i": None, "j": " 3 "})
    assert set(got) == {"a", "c", "f", "g", "j"}
    assert got["a"] == 1.0 and math.isnan(got["c"]) and got["f"] == 0.5 and got["g"] == 2.0 and got["j"] == 3.0


def test_a_store_is_created_without_its_lock_where_the_lock_cannot_be_taken(tmp_path, monkeypatch):
    """The lock around creating a sqlite store is a flock on a file beside it; where it cannot be taken
    (ENOLCK on some network file systems) the store is still created, unlocked, and no lock file stays."""
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    uri = ensure_store(f"sqlite:///{tmp_path}/mlflow.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]
    assert _client(uri).search_experiments()

"""Faults around a run: each bad case (concurrent writers, broken checkpoints, bad grids, bad output paths, a full disk, a dead tracking store), run as a user would run it.

Each test asserts the exit code, that the message names the field or the file, that no traceback is
printed, and that nothing is lost or mixed. The concurrent cases start real processes
(``python -m maskconnect train``), not threads. Read-only mounts and a full disk are real file systems:
a tmpfs mounted in a private mount namespace (``unshare -m``, or ``unshare -U -r -m`` without root);
those tests are skipped where the kernel allows neither, and fail there under
MASKCONNECT_REQUIRE_NAMESPACES=1 (.ci/run sets it: CI cannot go green by skipping them).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from maskconnect.cli import main
from maskconnect.training.config import identity_of
from maskconnect.training.schedule import RECIPES

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# a tiny model: about 2 s per epoch on one core
TINY = ["--dataset", "digits", "--arch", "11,2,4", "--stage-width", "16", "--progress", "none", "--device", "cpu"]
LEARNED = [*TINY, "--connectivity", "learned", "--fan-in", "2", "--recipe", "smoke"]  # masks frozen at the first LR drop


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, **extra}


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "maskconnect", *map(str, args)]


def _run(cmd: list, *, timeout: float = 300, env: dict | None = None, cwd: Path = ROOT):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=env or _env(), cwd=cwd)


def _cli(*args, **kw):
    return _run(_cmd(*args), **kw)


def _popen(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or _env(), cwd=ROOT)


def _clean(proc, code: int) -> str:
    """Assert the exit code and that no traceback was printed; returns stderr."""
    err = proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}:\n{err[-3000:]}"
    assert "Traceback" not in err and "Traceback" not in (proc.stdout or ""), err[-3000:]
    return err


def _files(run: Path) -> dict[str, bytes]:
    """The run's files and their bytes (a stale ``.lock`` left by a killed process is not the run's)."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file() and p.name != ".lock"}


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def _wait_for_lock(run: Path, pid: int, proc: subprocess.Popen, timeout: float = 120) -> dict:
    """Wait until process ``pid`` holds the lock of ``run``; returns the lock's record."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            record = json.loads((run / ".lock").read_text())
            if record.get("pid") == pid:
                return record
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{pid} never locked {run}")


def _one_run(run: Path) -> dict:
    """Assert that every file of ``run`` describes one and the same run; returns its config."""
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert identity_of(metrics["config"]) == identity_of(config)
    assert identity_of(ck["config"]) == identity_of(config)
    assert metrics["epochs"] == config["epochs"] == ck["epoch"] == len(_history(run))
    assert metrics["connectivity"] == config["connectivity"]
    assert (run / "masks.json").exists() == (config["connectivity"] != "full")
    return config


# ---- mount namespaces: read-only file systems and a full disk -------------------------------------

def _ns(mounts: str, cmd: list) -> list[str]:
    """``cmd`` run after the shell commands ``mounts``, in a private mount namespace."""
    base = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-U", "-r", "-m"]
    return [*base, "sh", "-c", f"{mounts} && exec \"$@\"", "sh", *map(str, cmd)]


@functools.lru_cache(maxsize=1)
def _ns_unavailable() -> str | None:
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return "needs util-linux unshare (Linux)"
    probe = Path(f"/tmp/maskconnect-ns-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        r = subprocess.run(_ns(f"mount -t tmpfs -o ro,size=64k tmpfs {probe}", ["true"]), capture_output=True,
                           text=True, timeout=30)
    finally:
        probe.rmdir()
    return None if r.returncode == 0 else f"cannot mount a tmpfs in a mount namespace: {r.stderr.strip()}"


REQUIRE_NS = "MASKCONNECT_REQUIRE_NAMESPACES"  # set to 1 by .ci/run: no mount namespaces is a failure, not a skip


def namespaces_unavailable(reason: str) -> None:
    """Skip, or fail when CI requires mount namespaces (``MASKCONNECT_REQUIRE_NAMESPACES=1``)."""
    if os.environ.get(REQUIRE_NS) == "1":
        pytest.fail(f"{REQUIRE_NS}=1 (CI) but a read-only or full file system cannot be mounted here: {reason} "
                    f"(off CI, {REQUIRE_NS}=0 lets these tests skip)", pytrace=False)
    pytest.skip(f"mount namespaces unavailable: {reason}")


@pytest.fixture
def mount_namespaces():
    reason = _ns_unavailable()
    if reason is not None:
        namespaces_unavailable(reason)


needs_ns = pytest.mark.usefixtures("mount_namespaces")


def _ro(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    return f"mount -t tmpfs -o ro,size=64k tmpfs {path}"


# ---- 1. one writer per run directory ------------------------------------------------------------------

def test_two_different_trainings_into_one_out_one_finishes_the_other_names_it(tmp_path):
    out = tmp_path / "run"
    learned = [*LEARNED, "--epochs", "3", "--no-track", "--out", out]
    full = [*TINY, "--epochs", "2", "--no-track", "--out", out]
    a = _popen("train", *learned)
    holder = _wait_for_lock(out, a.pid, a)
    b = _cli("train", *full)                         # while the learned run trains
    err = _clean(b, 2)
    assert f"{out} is in use by another command" in err
    assert f"pid {a.pid}" in err and f"host {platform.node()}" in err
    assert "maskconnect train" in err and "--connectivity learned" in err and holder["command"] in err
    _, a_err = a.communicate(timeout=300)
    assert a.returncode == 0, a_err[-3000:]
    config = _one_run(out)                           # the directory describes the learned run only
    assert config["connectivity"] == "learned" and config["epochs"] == 3
    assert not (out / ".lock").exists()              # released (and removed) by its holder
    before = _files(out)
    rerun = _clean(_cli("train", *full), 2)          # the loser's command again
    assert "holds a different run" in rerun and "already complete" not in rerun
    assert _files(out) == before


def test_two_identical_commands_at_once_train_and_log_once(tmp_path):
    pytest.importorskip("mlflow")
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert _cli("track", "init", "--tracking-uri", uri).returncode == 0
    args = ["train", *TINY, "--epochs", "2", "--out", out, "--tracking-uri", uri, "--experiment", "twice"]
    procs = [_popen(*args), _popen(*args)]                 # started at once
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    loser = next(((p, e) for p, _, e in results if p.returncode != 0), None)
    winner = next(p for p, _, _ in results if p.returncode == 0)
    if codes == [0, 0]:   # the second started after the first finished: a no-op rerun
        assert any("already complete" in e for _, _, e in results)
    else:
        assert codes == [0, 2], [e[-2000:] for _, _, e in results]
        assert "Traceback" not in loser[1]
        assert "is in use by another command" in loser[1] and f"pid {winner.pid}" in loser[1]
    _one_run(out)
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("twice").experiment_id])
    assert len(runs) == 1
    for key in ("test_top1", "train_loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, key)) == [1, 2], key


def test_a_lock_left_by_a_killed_process_never_blocks(tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY, "--epochs", "2", "--no-track", "--out", out]
    a = _popen(*args)
    _wait_for_lock(out, a.pid, a)
    os.kill(a.pid, signal.SIGKILL)
    a.communicate(timeout=60)
    assert (out / ".lock").exists()          # left behind, holding the dead process's name
    rerun = _cli(*args)
    _clean(rerun, 0)
    _one_run(out)
    # the train_hooks kill (os._exit right after epoch 1's checkpoint): the rerun resumes
    out2 = tmp_path / "killed"
    killed = _run([sys.executable, ROOT / "tests" / "train_hooks.py", "--kill-after", "1", "--", *TINY, "--epochs", "2",
                   "--no-track", "--out", out2])
    assert killed.returncode == 137 and (out2 / ".lock").exists()
    resumed = _clean(_cli("train", *TINY, "--epochs", "2", "--no-track", "--out", out2), 0)
    assert "resuming after epoch 1/2" in resumed


# ---- 2. checkpoints that survive corruption ------------------------------------------------------------

def _truncate(path: Path, size: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_truncated_latest_checkpoint_resumes_from_the_previous_one_bit_identical(tmp_path, same_threads):
    args = [*LEARNED, "--epochs", "3", "--seed", "3", "--no-track"]
    ref = tmp_path / "ref"
    assert main(["train", *args, "--out", str(ref)]) == 0   # in this process, on same_threads' one thread
    out = tmp_path / "run"
    env = _env(**same_threads)                               # the killed and the resumed run: one thread too
    killed = _run([sys.executable, ROOT / "tests" / "train_hooks.py", "--kill-after", "2", "--", *args, "--out", out],
                  env=env)
    assert killed.returncode == 137
    assert torch.load(out / "checkpoint.prev.pt", weights_only=True)["epoch"] == 1
    _truncate(out / "checkpoint.pt")
    err = _clean(_cli("train", *args, "--out", out, env=env), 0)
    assert "checkpoint.pt: RuntimeError" in err and "resuming from checkpoint.prev.pt (epoch 1) instead" in err
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, out))
    assert a["device"] == b["device"] and "1 threads" in a["device"]   # the pin took: "cpu (<processor>, 1 threads)"
    for key in ("top1", "top5", "test_loss", "best_top1", "params_test"):
        assert a[key] == b[key], key
    assert json.loads((ref / "masks.json").read_text()) == json.loads((out / "masks.json").read_text())
    _one_run(out)


def test_no_readable_checkpoint_exits_2_naming_it_and_replace_completes_the_run(tmp_path):
    args = [*TINY, "--epochs", "2", "--no-track"]
    out = tmp_path / "run"
    killed = _run([sys.executable, ROOT / "tests" / "train_hooks.py", "--kill-after", "2", "--", *args, "--out", out])
    assert killed.returncode == 137
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        _truncate(out / name)
    before = _files(out)
    for extra in ([], []):   # twice: the refusal changes nothing
        err = _clean(_cli("train", *args, "--out", out, *extra), 2)
        assert f"cannot resume {out}" in err and "checkpoint.pt: RuntimeError" in err
        assert "checkpoint.prev.pt: RuntimeError" in err and "--replace" in err
        assert _files(out) == before
    err = _clean(_cli("train", *args, "--out", out, "--replace"), 0)   # the way forward
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and f"moved the previous run in {out} to {aside[0]}" in err
    assert _files(aside[0]) == before                                  # moved, not deleted
    _one_run(out)


def test_finished_run_with_an_unreadable_checkpoint_is_named_not_complete(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY, "--connectivity", "random", "--fan-in", "2", "--epochs", "1", "--no-track", "--out", str(out)]
    assert main(args) == 0
    good = _files(out)
    _truncate(out / "checkpoint.pt")
    capsys.readouterr()
    t0 = time.monotonic()
    assert main(["evaluate", "--run", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'checkpoint.pt'} cannot be loaded" in err and time.monotonic() - t0 < 30
    assert not (out / "eval.json").exists()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already complete" not in err and f"{out / 'checkpoint.pt'} cannot be loaded" in err and "--replace" in err
    # the pruned model too
    (out / "checkpoint.pt").write_bytes(good["checkpoint.pt"])
    _truncate(out / "pruned.pt")
    assert main(["evaluate", "--run", str(out), "--device", "cpu"]) == 2
    assert f"{out / 'pruned.pt'} cannot be loaded" in capsys.readouterr().err
    assert main(args) == 2
    assert f"{out / 'pruned.pt'} cannot be loaded" in capsys.readouterr().err
    assert main([*args, "--replace"]) == 0
    assert main(["evaluate", "--run", str(out), "--device", "cpu"]) == 0


def test_an_unreadable_metrics_json_is_rebuilt_from_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY, "--epochs", "1", "--no-track", "--out", str(out)]
    assert main(args) == 0
    good = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text('{"status": "compl')
    capsys.readouterr()
    assert main(args) == 0
    assert "metrics.json is unreadable" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["top1"] == good["top1"]


# ---- 3. grids checked before any job -----------------------------------------------------------------

BAD_OVERRIDES = {
    "epocs: 3": ["train.epocs", "did you mean 'epochs'"],
    'epochs: "three"': ["train.epochs='three'", "invalid int value"],
    "epochs: -5": ["train.epochs=-5", "a positive integer"],
    "freeze_epoch: 99": ["train.freeze_epoch=99", f"an epoch in 0..epochs={RECIPES['demo']['epochs']}"],
}


def _grid(tmp_path: Path, override: str) -> Path:
    path = tmp_path / "badgrid.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: badgrid
        defaults:
          dataset: digits
          seeds: [0]
          recipe: demo
          train:
            {override}
        entries:
          - arch: "20,4,8"
            connectivity: full
          - arch: "20,4,8"
            connectivity: learned
            fan_ins: [2]
        """))
    return path


@pytest.mark.parametrize("override", sorted(BAD_OVERRIDES))
def test_grid_check_refuses_a_bad_train_override_naming_file_entry_and_key(override, tmp_path, capsys):
    path = _grid(tmp_path, override)
    assert main(["grid", "check", "--grid", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "grid 'badgrid' entry 1 (digits 20,4,8 full)" in err and f"(file {path})" in err
    for word in BAD_OVERRIDES[override]:
        assert word in err, (word, err)


# What a grid entry (or the pipeline) sets for each of its runs, and the entry's field that sets it: as a
# train: override it would give every run of the entry the same value (`train: {seed: 7}` under seeds
# [0, 1] makes two run directories hold one run), so each is refused.
ENTRY_OWN_KEYS = {"seed: 7": "'seeds'", "dataset: cifar10": "'dataset'", 'arch: "11,2,4"': "'arch'",
                  "connectivity: random": "'connectivity'", "fan_in: 1": "'fan_ins'", "recipe: smoke": "'recipe'",
                  "device: cuda": "'device'", "experiment: other": "the pipeline", "out: elsewhere": "the pipeline"}


@pytest.mark.parametrize("override", sorted(ENTRY_OWN_KEYS))
def test_grid_check_refuses_an_entrys_own_key_as_a_train_override(override, tmp_path, capsys):
    path = _grid(tmp_path, override)
    path.write_text(path.read_text().replace("seeds: [0]", "seeds: [0, 1]"))
    key = override.split(":")[0]
    assert main(["grid", "check", "--grid", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "grid 'badgrid' entry 1 (digits 20,4,8 full)" in err and f"(file {path})" in err
    assert f"train.{key}=" in err and "not a train: override" in err and ENTRY_OWN_KEYS[override] in err, err


def test_snakemake_dry_run_refuses_a_bad_train_override(tmp_path):
    from test_pipeline import fresh_checkout, snakemake

    checkout = fresh_checkout(tmp_path / "checkout")
    for override, words in BAD_OVERRIDES.items():
        path = _grid(checkout, override)
        proc = snakemake(["-n", "--config", f"grid={path.name}"], checkout)
        assert proc.returncode != 0 and "Job stats" not in proc.stdout
        for word in ["entry 1", "badgrid.yaml", *words]:
            assert word in proc.stdout, (word, proc.stdout[-3000:])


def test_grid_checks_stay_torch_free_and_use_the_training_rules():
    """The Snakefile imports the grid loader: checking a grid's overrides must not import torch. The
    rule names the torch-free config checks are those of mask_rules.MASK_RULES."""
    code = ("import sys; from maskconnect.experiments import load_grid; load_grid('paper'); load_grid('demo'); "
            "print('torch' in sys.modules)")
    assert _run([sys.executable, "-c", code]).stdout.strip() == "False"
    from maskconnect.training.config import MASK_RULE_NAMES
    from maskconnect.mask_rules import MASK_RULES

    assert MASK_RULE_NAMES == tuple(MASK_RULES)


def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text('name: dup\ndefaults:\n  dataset: digits\n  seeds: [0]\n  train:\n    epochs: 3\n    epochs: 4\n'
                    'entries:\n  - arch: "20,4,8"\n    connectivity: full\n')
    assert main(["grid", "check", "--grid", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'epochs' is given on line 6 and again on line 7" in err


# ---- 4. output paths checked before any work ---------------------------------------------------------

# ImageNet from a folder that does not exist: if the data were loaded first, its error would show
NO_DATA = ["--dataset", "imagenet", "--arch", "50,4,32", "--data-dir", "/nonexistent/imagenet", "--no-track",
           "--device", "cpu"]


def test_out_under_a_file_exits_2_before_any_data_is_loaded(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = _clean(_cli("train", *NO_DATA, "--out", afile / "sub"), 2)
    assert f"--out {afile / 'sub'}: {afile} is a file, not a directory" in err
    assert "imagenet" not in err.lower().replace(str(afile).lower(), "")
    assert afile.read_text() == "x"


@needs_ns
def test_out_on_a_read_only_mount_exits_2_before_any_data_is_loaded(tmp_path):
    ro = tmp_path / "ro"
    proc = _run(_ns(_ro(ro), _cmd("train", *NO_DATA, "--out", ro / "run")))
    err = _clean(proc, 2)
    assert f"{ro / 'run'}: cannot create the directory (Read-only file system)" in err
    assert "/nonexistent" not in err


@pytest.mark.parametrize("args,words", [
    (["--out", ""], ["invalid out=''", "--out DIR"]),
    (["--out", "OUT", "--set", "out=elsewhere"], ["invalid set='out=elsewhere'", "--out DIR"]),
])
def test_empty_out_and_set_out_are_refused(args, words, tmp_path, capsys):
    args = [str(tmp_path / "r") if a == "OUT" else a for a in args]
    assert main(["train", *TINY, "--no-track", *args]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "elsewhere").exists()


def test_replace_of_the_current_directory_is_refused(tmp_path):
    assert main(["train", *TINY, "--epochs", "1", "--no-track", "--out", str(tmp_path)]) == 0
    before = _files(tmp_path)
    err = _clean(_cli("train", *TINY, "--epochs", "2", "--no-track", "--out", ".", "--replace", cwd=tmp_path), 2)
    assert "--replace cannot move --out . aside: it is the current directory" in err
    assert _files(tmp_path) == before


def test_evaluate_out_is_checked_before_evaluating(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--no-track", "--out", str(run)]) == 0
    (tmp_path / "afile").write_text("x")
    for bad, words in ((Path("/proc/x.json"), ["--out /proc/x.json: cannot write in /proc"]),
                       (tmp_path / "afile" / "x.json", [f"{tmp_path / 'afile'} is a file, not a directory"]),
                       (run, ["is a directory"])):
        t0 = time.monotonic()
        proc = _cli("evaluate", "--run", run, "--device", "cpu", "--out", bad, timeout=120)
        err = _clean(proc, 2)
        for word in words:
            assert word in err
        assert "test_top1" not in proc.stdout and not (run / "eval.json").exists()
        print(f"evaluate --out {bad}: refused in {time.monotonic() - t0:.1f} s")


@needs_ns
def test_disk_full_mid_run_is_one_line_and_the_rerun_completes(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    # 250 KiB: room for config.json, history.csv and one 150 KB checkpoint, not for a second one
    driver = textwrap.dedent(f"""\
        import json, os, subprocess, sys, torch
        cmd = {_cmd("train", *LEARNED, "--epochs", "3", "--no-track", "--out", out)!r}
        first = subprocess.run(cmd, capture_output=True, text=True)
        state = {{"rc": first.returncode, "stderr": first.stderr,
                 "files": sorted(os.listdir({str(out)!r})),
                 "epoch": torch.load({str(out / 'checkpoint.pt')!r}, weights_only=True)["epoch"]}}
        subprocess.run(["mount", "-o", "remount,size=16m", {str(disk)!r}], check=True)
        second = subprocess.run(cmd, capture_output=True, text=True)
        state.update(rc2=second.returncode, stderr2=second.stderr,
                     metrics=json.load(open({str(out / 'metrics.json')!r})))
        print(json.dumps(state))
        """)
    proc = _run(_ns(f"mount -t tmpfs -o size=250k tmpfs {disk}", [sys.executable, "-c", driver]), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state["rc"] == 1, state["stderr"][-3000:]
    lines = [line for line in state["stderr"].splitlines() if line.strip()]
    assert "Traceback" not in state["stderr"]
    assert lines[-1].startswith(f"maskconnect train: error: cannot write {out / 'checkpoint.pt'}: No space left on device")
    assert not [f for f in state["files"] if f.endswith(".tmp")]     # nothing half-written
    assert state["epoch"] == 1                                       # the last good checkpoint is intact
    assert state["rc2"] == 0, state["stderr2"][-3000:]
    assert "resuming after epoch 1/3" in state["stderr2"] and state["metrics"]["epochs"] == 3


# ---- 5. a tracking store that cannot be written costs seconds ----------------------------------------

@needs_ns
def test_read_only_sqlite_store_costs_seconds_and_one_warning(tmp_path):
    pytest.importorskip("mlflow")
    store = tmp_path / "store"
    uri = f"sqlite:///{store}/mlflow.db"
    args = ["train", *TINY, "--epochs", "2"]
    t0 = time.monotonic()
    _clean(_cli(*args, "--no-track", "--out", tmp_path / "untracked"), 0)
    untracked = time.monotonic() - t0
    t0 = time.monotonic()
    proc = _run(_ns(_ro(store), _cmd(*args, "--out", tmp_path / "tracked", "--tracking-uri", uri)))
    tracked = time.monotonic() - t0
    err = _clean(proc, 0)
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1, err
    assert "Read-only file system" in warnings[0]
    assert f"maskconnect track sync {tmp_path / 'tracked'} --tracking-uri {uri}" in warnings[0]
    _one_run(tmp_path / "tracked")
    print(f"2-epoch digits run: --no-track {untracked:.1f} s, read-only sqlite store {tracked:.1f} s")
    assert tracked - untracked < 30   # the run's tracking failure budget (docs/run_format.md, "Tracking (MLflow)")
    for action in (["init"], ["sync", tmp_path / "tracked"]):
        t0 = time.monotonic()
        proc = _run(_ns(_ro(store), _cmd("track", *action, "--tracking-uri", uri)))
        err = _clean(proc, 1).strip()
        assert len(err.splitlines()) == 1 and uri in err and "Read-only file system" in err
        assert time.monotonic() - t0 < 30


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_track_sync_and_init_with_the_server_down_fail_in_one_line(tmp_path):
    pytest.importorskip("mlflow")
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--no-track", "--out", str(run)]) == 0
    uri = _closed_port()
    for action in (["sync", run], ["init"]):
        t0 = time.monotonic()
        err = _clean(_cli("track", *action, "--tracking-uri", uri, timeout=120), 1).strip()
        assert len(err.splitlines()) == 1, err
        assert f"MLflow store {uri} is not usable" in err and "Connection refused" in err
        assert time.monotonic() - t0 < 30


# ---- 6. flags that do nothing --------------------------------------------------------------------------

def test_mask_flags_on_a_fixed_full_run_are_ignored_without_changing_its_identity(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--no-track", "--out", str(out)]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "1", "--no-track", "--out", str(out), "--mask-rule", "clip",
                 "--mask-lr", "5"]) == 0
    err = capsys.readouterr().err
    assert "mask_lr=5.0, mask_rule='clip' only affect learned runs: ignored" in err and "already complete" in err
    assert _files(out) == before
    # a bad value is still refused
    assert main(["train", *TINY, "--epochs", "1", "--no-track", "--out", str(out), "--mask-rule", "nope"]) == 2
    assert "invalid mask_rule='nope'" in capsys.readouterr().err


# ---- 7. names, links, data and settings that cannot be used: one line, the right exit code -----------

def _one_error_line(err: str) -> str:
    """The one ``error:`` line of ``err`` (notes and warnings may come before it)."""
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def learned_k1(tmp_path_factory) -> Path:
    """A finished learned run (K=1, smoke recipe: masks frozen after epoch 1) whose pruning removes branches."""
    run = tmp_path_factory.mktemp("learned") / "run"
    proc = _cli("train", *TINY, "--connectivity", "learned", "--fan-in", "1", "--recipe", "smoke", "--no-track",
                "--out", run)
    _clean(proc, 0)
    return run


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


LONG = "n" * 300


@pytest.mark.parametrize("place", ["train --out", "evaluate --run", "evaluate --out", "preflight --out", "report --out"])
def test_a_name_longer_than_255_bytes_is_one_line_exit_2(place, tmp_path):
    long = tmp_path / "x" / LONG
    command = {"train --out": ["train", *TINY, "--no-track", "--out", long],
               "evaluate --run": ["evaluate", "--run", long, "--device", "cpu"],
               "evaluate --out": ["evaluate", "--run", tmp_path, "--device", "cpu", "--out", long],
               "preflight --out": ["preflight", "--grid", "demo", "--device", "cpu", "--out", long],
               "report --out": ["report", "--results", tmp_path, "--out", long]}[place]
    err = _clean(_cli(*command, timeout=120), 2).strip()
    assert len(err.splitlines()) == 1, err
    flag = place.split()[1]
    assert f"{flag} {long}: " in err or f"invalid out='{long}'" in err
    assert "has 300 bytes" in err and "at most 255" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_a_broken_symbolic_link_as_out_is_named_as_one(kind, tmp_path):
    link = tmp_path / "run"
    link.symlink_to(link if kind == "loop" else tmp_path / "nowhere")
    err = _clean(_cli("train", *TINY, "--epochs", "1", "--no-track", "--out", link), 2).strip()
    assert len(err.splitlines()) == 1 and "is a file" not in err
    assert {"loop": f"--out {link} is a symbolic link that loops",
            "dangling": f"--out {link} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist"}[kind] in err
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def _imagenet(root: Path) -> Path:
    """A tiny ImageFolder tree: two classes of three 48x40 JPEGs in train/ and val/."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=g).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.JPEG")
    return root


def test_a_corrupt_imagenet_image_is_found_by_prepare_data_and_named_by_the_loader(tmp_path):
    root = _imagenet(tmp_path / "imagenet")
    bad = root / "train" / "a" / "bad.JPEG"
    bad.write_bytes(b"not a jpeg")                                      # a damaged header
    good = (root / "val" / "b" / "0.JPEG").read_bytes()
    cut = root / "val" / "b" / "cut.JPEG"
    cut.write_bytes(good[: len(good) // 2])                             # a header, half the data
    marker = tmp_path / "m.json"
    proc = _cli("prepare-data", "--dataset", "imagenet", "--data-dir", root, "--marker", marker)
    line = _one_error_line(_clean(proc, 2))
    assert f"1 of 14 images in {root} cannot be read (header check), e.g. {bad}" in line
    assert proc.stdout.splitlines() == [f"{bad}\tUnidentifiedImageError: cannot identify image file {str(bad)!r}"]
    assert not marker.exists()
    proc = _cli("prepare-data", "--dataset", "imagenet", "--data-dir", root, "--check-images", "full")
    assert "2 of 14 images" in _one_error_line(_clean(proc, 2))
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == [str(bad), str(cut)]
    # training meets it: one line naming the file, from a DataLoader worker as from the main process
    for workers in ("0", "1"):
        out = tmp_path / f"run{workers}"
        proc = _cli("train", "--dataset", "imagenet", "--data-dir", root, "--arch", "50,1,2", "--stage-width", "8",
                    "--epochs", "1", "--batch-size", "4", "--workers", workers, "--no-track", "--device", "cpu",
                    "--progress", "none", "--out", out)
        err = _clean(proc, 2).strip()
        assert len(err.splitlines()) == 1, err
        assert f"imagenet: cannot read image {bad} (UnidentifiedImageError: " in err and "--check-images full" in err


def test_evaluate_rebuilds_a_missing_pruned_model_from_the_frozen_masks_and_says_so(learned_k1, tmp_path):
    run = _copy_run(learned_k1, tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["params_test"] < metrics["params_train"]            # pruning removes branches here
    _clean(_cli("evaluate", "--run", run, "--device", "cpu"), 0)
    with_file = json.loads((run / "eval.json").read_text())
    (run / "pruned.pt").unlink()
    err = _clean(_cli("evaluate", "--run", run, "--device", "cpu"), 0)
    assert f"{run / 'pruned.pt'} is missing: the pruned model is rebuilt from the frozen masks" in err
    rebuilt = json.loads((run / "eval.json").read_text())
    assert rebuilt["params_test"] == metrics["params_test"] < rebuilt["params_train"]
    assert rebuilt["pruned_from"].startswith("checkpoint.pt") and with_file["pruned_from"] == "pruned.pt"
    for key in ("pruned", "params_test", "flops_test", "branches_per_module"):
        assert rebuilt[key] == with_file[key], key
    assert "warning" not in err
    # a params_test that differs from the run's record is never reported without saying so
    (run / "metrics.json").write_text(json.dumps({**metrics, "params_test": metrics["params_test"] + 1}))
    err = _clean(_cli("evaluate", "--run", run, "--device", "cpu"), 0)
    assert (f"warning: params_test={metrics['params_test']} evaluated here, {metrics['params_test'] + 1} in "
            f"{run / 'metrics.json'}") in err


def test_evaluate_names_a_config_json_edited_after_training(learned_k1, tmp_path):
    run = _copy_run(learned_k1, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "arch": "20,2,4"}))
    err = _clean(_cli("evaluate", "--run", run, "--device", "cpu"), 2).strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"maskconnect evaluate: error: {run / 'config.json'} is not the config "
                          f"{run / 'checkpoint.pt'} was trained with (arch='20,2,4' in config.json, '11,2,4' in checkpoint.pt)")
    assert not (run / "eval.json").exists()


def test_a_zero_byte_checkpoint_is_named_in_the_suites_words(learned_k1, tmp_path):
    run = _copy_run(learned_k1, tmp_path / "run")
    (run / "checkpoint.pt").write_bytes(b"")
    empty = "an empty file (0 bytes)"
    for command in (["evaluate", "--run", run, "--device", "cpu"],
                    ["train", *TINY, "--connectivity", "learned", "--fan-in", "1", "--recipe", "smoke", "--no-track",
                     "--out", run]):
        err = _clean(_cli(*command), 2).strip()
        assert len(err.splitlines()) == 1, err
        assert f"{run / 'checkpoint.pt'} cannot be loaded ({empty}" in err and "torch.save" not in err, err
    (run / "metrics.json").unlink()                                    # an unfinished run: resume
    (run / "checkpoint.prev.pt").write_bytes(b"")
    err = _clean(_cli(*command), 2)
    assert f"checkpoint.pt: {empty}" in err and f"checkpoint.prev.pt: {empty}" in err and "torch.save" not in err


def test_corrupt_cifar_files_are_named_by_their_checksum_not_by_the_download(tmp_path):
    data = tmp_path / "data"
    (data / "cifar-10-batches-py").mkdir(parents=True)
    (data / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"damaged")
    closed = _closed_port()  # the retried download fails at once, as without a network
    env = _env(http_proxy=closed, https_proxy=closed, HTTP_PROXY=closed, HTTPS_PROXY=closed)
    for command in (["prepare-data", "--dataset", "cifar10", "--data-dir", data],
                    ["train", "--dataset", "cifar10", "--arch", "11,2,4", "--data-dir", data, "--no-track",
                     "--device", "cpu", "--out", tmp_path / "run"]):
        err = _clean(_cli(*command, env=env), 2).strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"maskconnect {command[0]}: error: cifar10: cifar-10-batches-py/data_batch_1 in {data} "
                              "fail their md5 check (damaged or incomplete); downloading them again failed"), err
    assert (data / "cifar-10-batches-py" / "data_batch_1").read_bytes() == b"damaged"   # nothing deleted


def test_a_field_given_by_its_option_and_by_set_is_refused(tmp_path):
    for args, words in ((["--epochs", "2", "--set", "epochs=3"], "invalid set='epochs=3': epochs is also given by its option (--epochs 2)"),
                        (["--seed", "0", "--set", "seed=1"], "invalid set='seed=1': seed is also given by its option (--seed 0)")):
        err = _clean(_cli("train", *TINY, "--no-track", "--out", tmp_path / "run", *args), 2).strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert not (tmp_path / "run").exists()
    _clean(_cli("train", *TINY, "--no-track", "--out", tmp_path / "run", "--set", "epochs=1"), 0)  # alone, it is used
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 1


def test_a_bad_option_value_is_one_line_naming_what_is_allowed(tmp_path):
    for args, words in ((["--milestones", "5,x"], "argument --milestones: expected epochs separated by commas, e.g. 150,225, got '5,x'"),
                        (["--epochs", "x"], "argument --epochs: invalid int value: 'x'")):
        err = _clean(_cli("train", *TINY, "--no-track", "--out", tmp_path / "run", *args), 2).strip()
        assert len(err.splitlines()) == 1 and words in err and "usage:" not in err, err


def test_a_batch_larger_than_the_training_set_names_the_lr_scaling_and_a_rerun_is_not_refused(tmp_path):
    out = tmp_path / "run"
    err = _clean(_cli("train", *TINY, "--epochs", "1", "--no-track", "--batch-size", "1000000000", "--out", out), 2)
    line = _one_error_line(err)
    assert "loss became nan in epoch 1; no checkpoint was written" in line
    assert "--lr 0.1 is meant for a batch of 64: 0.1 x 1000000000 / 64 = 1.56e+06" in line
    assert "The batch (1000000000) is larger than the 1442 training images" in line
    assert "warning: --batch-size 1000000000 is larger than the 1442 training images" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]   # no epoch was trained
    err = _clean(_cli("train", *TINY, "--epochs", "1", "--no-track", "--out", out), 0)   # another batch: trains
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and f"moved the previous run in {out} to {aside[0]} (it held a different run that never " \
                               "finished an epoch)" in err
    assert json.loads((aside[0] / "config.json").read_text())["batch_size"] == 1000000000    # moved, not deleted
    _one_run(out)
    # a run that finished an epoch is still refused
    err = _clean(_cli("train", *TINY, "--epochs", "1", "--no-track", "--batch-size", "32", "--out", out), 2)
    assert "holds a different run (batch_size=64 there, 32 here" in err


def test_a_garbage_tracking_uri_is_named_as_the_bad_input(tmp_path):
    pytest.importorskip("mlflow")
    env = _env(MLFLOW_TRACKING_URI="garbage://x")
    err = _clean(_cli("track", "init", env=env), 2).strip()
    assert err == ("maskconnect track: error: invalid MLFLOW_TRACKING_URI='garbage://x': an MLflow tracking URI "
                   "(sqlite:///PATH, http(s)://HOST:PORT, postgresql://..., mysql://..., mssql://..., databricks, "
                   "file:PATH); 'garbage' is not a scheme MLflow knows")
    err = _clean(_cli("train", *TINY, "--epochs", "1", "--out", tmp_path / "run", env=env), 0)
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "invalid MLFLOW_TRACKING_URI='garbage://x'" in warnings[0], err
    assert "Model registry" not in err


def test_a_sqlite_store_under_a_missing_folder_is_refused_not_created(tmp_path):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/typo/dir/mlflow.db"
    err = _clean(_cli("track", "init", "--tracking-uri", uri), 2).strip()
    assert err == (f"maskconnect track: error: invalid tracking_uri='{uri}': a sqlite store in an existing folder: "
                   f"{tmp_path / 'typo'} does not exist (create it first if the path is meant)")
    err = _clean(_cli("train", *TINY, "--epochs", "1", "--out", tmp_path / "run", "--tracking-uri", uri), 0)
    assert f"MLflow tracking of {tmp_path / 'run'} is off: invalid tracking_uri='{uri}'" in err
    assert not (tmp_path / "typo").exists()
    # the store's own folder is created where its parent exists (a fresh results/)
    _clean(_cli("track", "init", "--tracking-uri", f"sqlite:///{tmp_path}/results/mlflow.db"), 0)
    assert (tmp_path / "results" / "mlflow.db").is_file()


def test_creating_a_sqlite_store_leaves_no_lock_file_behind(tmp_path):
    pytest.importorskip("mlflow")
    import hashlib
    import tempfile

    db = tmp_path / "store" / "mlflow.db"
    _clean(_cli("track", "init", "--tracking-uri", f"sqlite:///{db}"), 0)
    assert db.is_file() and sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]
    digest = hashlib.sha1(str(db).encode()).hexdigest()[:16]
    assert not (Path(tempfile.gettempdir()) / f"maskconnect-mlflow-{digest}.lock").exists()


def test_a_marker_under_a_file_is_bad_input(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = _clean(_cli("prepare-data", "--dataset", "digits", "--marker", afile / "m.json"), 2).strip()
    assert err == f"maskconnect prepare-data: error: --marker {afile / 'm.json'}: {afile} is a file, not a directory"
    assert afile.read_text() == "x"


def test_report_says_when_no_run_is_found_and_refuses_an_unknown_grid(tmp_path):
    pytest.importorskip("pandas")
    results = tmp_path / "results"
    (results / "runs" / "demo").mkdir(parents=True)
    proc = _cli("report", "--results", results, "--out", tmp_path / "report")
    err = _clean(proc, 0).strip()
    assert err == f"maskconnect report: warning: no complete run (metrics.json) found under {results / 'runs'}: the report has no numbers"
    assert (tmp_path / "report" / "REPORT.md").exists()
    err = _clean(_cli("report", "--results", results, "--out", tmp_path / "report2", "--grid", "nosuch"), 2).strip()
    assert err == (f"maskconnect report: error: invalid grid='nosuch': a grid with run directories under {results} (demo)")
    assert not (tmp_path / "report2").exists()


def test_report_out_that_cannot_be_written_is_refused_first(learned_k1, tmp_path):
    pytest.importorskip("pandas")
    results = tmp_path / "results"
    _copy_run(learned_k1, results / "runs" / "g" / "digits" / "11-2-4" / "learned-K1" / "seed0")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, words in ((afile, f"--out {afile} is a file, not a folder"),
                       (afile / "report", f"--out {afile / 'report'} lies under {afile}, which is a file, not a folder")):
        t0 = time.monotonic()
        err = _clean(_cli("report", "--results", results, "--out", out), 2).strip()
        assert err == f"maskconnect report: error: {words}"
        print(f"report --out {out}: refused in {time.monotonic() - t0:.1f} s")
    assert afile.read_text() == "x"


@needs_ns
def test_report_out_on_a_read_only_mount_is_refused_first(learned_k1, tmp_path):
    pytest.importorskip("pandas")
    results = tmp_path / "results"
    _copy_run(learned_k1, results / "runs" / "g" / "digits" / "11-2-4" / "learned-K1" / "seed0")
    ro = tmp_path / "ro"
    err = _clean(_run(_ns(_ro(ro), _cmd("report", "--results", results, "--out", ro / "report"))), 2).strip()
    assert err == f"maskconnect report: error: --out {ro / 'report'}: cannot write in it (Read-only file system)"


def test_snakemake_config_errors_are_one_line_naming_key_value_and_what_is_allowed(tmp_path):
    from maskconnect.experiments import available_grids
    from test_pipeline import fresh_checkout, snakemake

    checkout = fresh_checkout(tmp_path / "checkout")
    for config, words in ((["gird=demo"], "invalid gird='demo': not a key of the pipeline's configuration (did you mean 'grid'?); the keys are grid, preflight"),
                          (["preflight=maybe"], "invalid preflight='maybe': auto (the default, for grids whose runs go to a GPU), true or false"),
                          (["grid="], "invalid grid='': a packaged grid name (")):
        proc = snakemake(["-n", "--config", *config], checkout)
        assert proc.returncode == 2, proc.stdout[-3000:]
        errors = [line for line in proc.stdout.splitlines() if "error" in line.lower()]
        assert errors == [line for line in errors if line.startswith("maskconnect pipeline: error: ")] and len(errors) == 1, proc.stdout
        assert words in errors[0], proc.stdout
        assert "Traceback" not in proc.stdout and "Failed validating" not in proc.stdout and "Job stats" not in proc.stdout
        if config == ["grid="]:  # what is allowed: every packaged grid, no other, or a grid file
            named = errors[0].split("a packaged grid name (", 1)[1].split(")", 1)[0].split(", ")
            assert sorted(named) == available_grids() and "or the path of a grid file" in errors[0]


# ---- 8. CI cannot skip the mount-namespace tests -------------------------------------------------------

@pytest.mark.parametrize("required", ["1", "0", None])
def test_missing_mount_namespaces_fail_when_ci_requires_them(required, monkeypatch):
    """What the tests on a read-only or full file system do where no mount namespace can be made: fail
    under CI, skip otherwise; and each of them asks for the namespaces through that fixture."""
    if required is None:
        monkeypatch.delenv(REQUIRE_NS, raising=False)
    else:
        monkeypatch.setenv(REQUIRE_NS, required)
    outcome = pytest.fail.Exception if required == "1" else pytest.skip.Exception
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception), match="no unshare here") as caught:
        namespaces_unavailable("no unshare here")
    assert caught.type is outcome   # (a skip that escaped pytest.raises would skip this test, not fail it)
    for test in (test_out_on_a_read_only_mount_exits_2_before_any_data_is_loaded,
                 test_disk_full_mid_run_is_one_line_and_the_rerun_completes,
                 test_read_only_sqlite_store_costs_seconds_and_one_warning):
        marks = getattr(test, "pytestmark", [])
        assert any(m.name == "usefixtures" and "mount_namespaces" in m.args for m in marks), test.__name__

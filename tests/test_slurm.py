"""profiles/slurm on a real SLURM cluster (single node, started by the test; see slurm_cluster.py).

A fresh copy of the project runs a 4-run digits grid through `snakemake --workflow-profile
profiles/slurm` (the SLURM executor plugin, status by squeue: there is no slurmdbd). The node has
two partitions, `cpu` and `gpu` (2 fake gres GPUs). While it runs:

- one training job is cancelled with scancel after it checkpointed (a preempted or killed job);
- one training job, with a 1-minute time limit in the grid, is frozen (SIGSTOP) after it
  checkpointed, so that SLURM kills it at its limit (TIMEOUT) however fast this machine is.

Snakemake resubmits both; they resume from their checkpoints (the epochs done are kept, not trained
again) and the workflow ends with exit 0. Every job's partition, GPU request, time limit and state
is read back from slurmctld (`scontrol show job`): CPU runs' jobs ran on `cpu`, the GPU run's on
`gpu` with one GPU (gpu-slot kept to it), and the retry of the timed-out job had twice the limit.

Needs root and the Debian packages (.ci/run installs them); skipped otherwise, except under CI:
with MASKCONNECT_REQUIRE_SLURM=1 (.ci/run sets it) a cluster that cannot start fails the test.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import slurm_cluster
from maskconnect import experiments as G
from test_pipeline import BIN, fresh_checkout, tool_env

pytestmark = pytest.mark.slow

GRID_FILE = "slurm-grid.yaml"
EPOCHS = 6
# A CPU run and a GPU run (fake GPU: it trains on the CPU; masked, so evaluation prunes) of 2
# epochs; the scancel victim; the time-limit victim (runtime: 1 minute). The victims are Fixed-Full
# runs: masked ones take several times longer per epoch on a CPU, and the pipeline is the same.
SLURM_GRID = f"""\
name: slurm
description: SLURM test grid (digits); a CPU run, a GPU run, a run cancelled and a run timed out
defaults: {{dataset: digits, seeds: [0], recipe: smoke, device: cpu, gpus: 0, threads: 1, runtime: 10}}
entries:
  - {{arch: "20,4,8", connectivity: full}}
  - {{arch: "20,4,8", connectivity: random, fan_ins: [2], device: auto, gpus: 1}}
  - {{arch: "20,4,8", connectivity: full, seeds: [1], train: {{epochs: {EPOCHS}}}}}
  - {{arch: "20,4,8", connectivity: full, seeds: [2], runtime: 1, train: {{epochs: {EPOCHS}}}}}
"""


REQUIRE = "MASKCONNECT_REQUIRE_SLURM"  # set to 1 by .ci/run: no cluster is a failure, not a skip


def cluster_unavailable(reason: str) -> None:
    """Skip, or fail when CI requires the cluster (``MASKCONNECT_REQUIRE_SLURM=1``)."""
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{REQUIRE}=1 (CI) but the SLURM cluster cannot run here: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.skip_reason()
    if reason:
        cluster_unavailable(reason)
    # not under pytest's temp dir: that is private to root, and munged runs as user munge
    c = slurm_cluster.SlurmCluster(Path(tempfile.mkdtemp(prefix="maskconnect-slurm-")))
    start = time.monotonic()
    try:
        c.start()
    except Exception:  # an error (not a skip) whether or not CI requires the cluster
        c.stop()
        raise
    print(f"SLURM cluster up in {time.monotonic() - start:.1f} s")
    yield c
    start = time.monotonic()
    c.stop()
    print(f"SLURM cluster stopped in {time.monotonic() - start:.1f} s")
    shutil.rmtree(c.root, ignore_errors=True)


def _history(run_dir: Path) -> list[dict]:
    try:
        with open(run_dir / "history.csv", newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error):
        return []


def _train_process(run_dir: str):
    """The `maskconnect train --out run_dir` process (inside its SLURM job), or None."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "train" in cmd and "--out" in cmd and run_dir in cmd and not any("snakemake" in c for c in cmd):
            try:
                return p, p.environ().get("SLURM_JOB_ID")
            except psutil.Error:  # it just ended
                return None
    return None


def _untimed(rows):
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


def _comment(rule: str, run) -> str:
    """The comment the SLURM executor gives a job: rule_<rule>_wildcards_<grid>_<run id, / as _>."""
    return f"rule_{rule}_wildcards_{run.grid}_{run.run_id.replace('/', '_')}"


@pytest.fixture(scope="module")
def workflow(cluster, tmp_path_factory):
    root = fresh_checkout(tmp_path_factory.mktemp("slurm-wf"))
    (root / GRID_FILE).write_text(SLURM_GRID)
    runs = G.load_grid(str(root / GRID_FILE)).runs
    full, gpu, cancelled, timed = runs
    assert gpu.gpus == 1 and timed.runtime == 1 and cancelled.train
    env = cluster.env(tool_env(root))
    env.update({"MASKCONNECT_SLURM_PARTITION": slurm_cluster.GPU_PARTITION,
                "MASKCONNECT_SLURM_CPU_PARTITION": slurm_cluster.CPU_PARTITION})
    env.pop("MASKCONNECT_SLURM_ACCOUNT", None)
    cmd = [BIN / "snakemake", "--workflow-profile", "profiles/slurm", "--config", f"grid={GRID_FILE}",
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
           "--slurm-no-account", "--latency-wait", "5"]
    log = open(root / "snakemake.out", "w")
    start = time.monotonic()
    sm = subprocess.Popen([str(c) for c in cmd], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
    log.close()
    events = {}
    try:
        deadline = start + 420
        while sm.poll() is None:
            assert time.monotonic() < deadline, "the SLURM workflow did not finish in 7 min"
            for name, run in (("cancelled", cancelled), ("timed", timed)):
                if name in events:
                    continue
                done = _history(root / run.run_dir)
                if len(done) < 2:  # >= 1 epoch checkpointed (history.csv is written just before)
                    continue
                found = _train_process(run.run_dir)
                if found is None:
                    continue
                proc, job = found
                assert job, "the training process does not run in a SLURM job"
                if name == "cancelled":
                    subprocess.run(["scancel", job], env=cluster.env(), check=True)
                else:
                    proc.send_signal(signal.SIGSTOP)  # frozen: SLURM kills it at its 1-minute limit
                time.sleep(0.5)  # (an epoch may end between the read and the signal)
                events[name] = {"job": job, "history": _history(root / run.run_dir), "t": time.monotonic() - start}
            time.sleep(0.1)
    finally:
        if sm.poll() is None:
            os.killpg(sm.pid, signal.SIGTERM)
            sm.wait(timeout=60)
    wall = time.monotonic() - start
    out = (root / "snakemake.out").read_text()
    assert sm.returncode == 0, f"{out[-6000:]}\n{cluster.logs()}"
    print(f"SLURM workflow: {wall:.0f} s; cancelled at {events['cancelled']['t']:.0f} s, "
          f"frozen at {events['timed']['t']:.0f} s")
    return {"root": root, "runs": runs, "events": events, "jobs": cluster.jobs(), "out": out, "wall": wall}


def _jobs_of(wf, rule, run) -> list[dict]:
    return sorted((j for j in wf["jobs"] if j.get("Comment", "").strip() == _comment(rule, run)),
                  key=lambda j: int(j["JobId"]))


def test_workflow_completes_every_run(workflow):
    root = workflow["root"]
    for r in workflow["runs"]:
        d = root / r.run_dir
        assert json.loads((d / "metrics.json").read_text())["status"] == "complete"
        assert (d / "eval.json").is_file()
    assert (root / G.tables_dir("slurm") / "REPORT.md").is_file()


def test_cpu_jobs_on_the_cpu_partition_gpu_jobs_on_the_gpu_partition(workflow):
    root = workflow["root"]
    for r in workflow["runs"]:
        for rule in ("train", "evaluate"):
            jobs = _jobs_of(workflow, rule, r)
            assert jobs, (rule, r.run_id, [j.get("Comment") for j in workflow["jobs"]])
            for j in jobs:
                want = slurm_cluster.GPU_PARTITION if r.gpus else slurm_cluster.CPU_PARTITION
                assert j["Partition"] == want, (rule, r.run_id, j)
                gres = j.get("TresPerJob", "") + j.get("JOB_GRES", "")
                assert ("gpu:1" in gres) == bool(r.gpus), (rule, r.run_id, gres)
                assert j["NumCPUs"] == str(r.threads)
    gpu_run = next(r for r in workflow["runs"] if r.gpus)
    (job,) = _jobs_of(workflow, "train", gpu_run)
    log = (root / G.log_file("slurm", "train", gpu_run.run_id)).read_text()
    # gpu-slot ran the job on the GPU SLURM allocated to it
    assert "maskconnect gpu-slot: CUDA_VISIBLE_DEVICES=" in log and f"(SLURM job {job['JobId']})" in log, log[:2000]


def _assert_resumed(workflow, run, first_state: str):
    root, ev = workflow["root"], workflow["events"]
    name = "cancelled" if first_state == "CANCELLED" else "timed"
    jobs = _jobs_of(workflow, "train", run)
    assert [j["JobState"] for j in jobs] == [first_state, "COMPLETED"], jobs
    assert jobs[0]["JobId"] == ev[name]["job"]
    history = _history(root / run.run_dir)
    assert [int(h["epoch"]) for h in history] == list(range(1, EPOCHS + 1))
    before = ev[name]["history"]
    assert 2 <= len(before) < EPOCHS
    # the epochs done before the kill were kept, not trained again (the last row may have been
    # re-run: history.csv is written just before the checkpoint)
    assert history[:len(before) - 1] == before[:len(before) - 1]
    assert _untimed(history[:len(before)]) == _untimed(before)
    attempts = (root / G.log_file("slurm", "train", run.run_id).replace(".log", ".attempts.log")).read_text()
    assert "resuming after epoch" in attempts  # the second attempt's output follows the first's
    assert attempts.index(f"epoch 1/") < attempts.index("resuming after epoch"), attempts[:3000]
    last = (root / G.log_file("slurm", "train", run.run_id)).read_text()
    assert "resuming after epoch" in last
    return jobs


def test_cancelled_job_is_resubmitted_and_resumes(workflow):
    run = workflow["runs"][2]
    _assert_resumed(workflow, run, "CANCELLED")


def test_timed_out_job_is_resubmitted_with_a_longer_limit_and_resumes(workflow):
    run = workflow["runs"][3]
    jobs = _assert_resumed(workflow, run, "TIMEOUT")
    assert [j["TimeLimit"] for j in jobs] == ["00:01:00", "00:02:00"]  # runtime x attempt
    ran = jobs[0]["RunTime"]
    print(f"timed-out attempt ran {ran} (limit 00:01:00)")
    assert "00:01:00" <= ran < "00:03:00", ran  # killed at its limit (slurmctld checks every ~30 s)


@pytest.mark.parametrize("required", ["1", "0", None])
def test_missing_cluster_fails_when_ci_requires_it(required, monkeypatch):
    """What the cluster fixture does when the cluster cannot start: fail under CI, skip otherwise."""
    if required is None:
        monkeypatch.delenv(REQUIRE, raising=False)
    else:
        monkeypatch.setenv(REQUIRE, required)
    outcome = pytest.fail.Exception if required == "1" else pytest.skip.Exception
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception), match="no slurmctld here") as caught:
        cluster_unavailable("no slurmctld here")
    assert caught.type is outcome   # (a skip that escaped pytest.raises would skip this test, not fail it)

"""The workflows end to end, each in a fresh copy of the project, on a 3-run CI grid (digits, CPU).

The CI grid goes through the same rules and stages as every grid: Snakemake builds everything,
a second run does nothing, a changed training setting re-runs only what depends on it, a training
job killed mid-run resumes from its checkpoint, the MLflow UI serves every run, and `dvc repro`
rebuilds from scratch, then does nothing, then re-runs only the changed run's stages, and `dvc exp run
-S` with a recipe key trains the runs that read it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from maskconnect import experiments as G
from test_pipeline import BIN, dvc, fresh_checkout, job_counts, run, snakemake, tool_env

pytestmark = pytest.mark.slow

CI_GRID = """\
name: ci
description: CI grid, one run each of Fixed-Full, Fixed-Random and Learned on digits
defaults:
  dataset: digits
  seeds: [0]
  recipe: smoke
  device: cpu
  gpus: 0
  threads: 1
  train: {epochs: 2}
entries:
  - arch: "20,4,8"
    connectivity: full
  - arch: "20,4,8"
    connectivity: random
    fan_ins: [2]
  - arch: "20,4,8"
    connectivity: learned
    fan_ins: [2]
"""
GRID_FILE = "ci-grid.yaml"
RANDOM_ENTRY = """\
  - arch: "20,4,8"
    connectivity: random
    fan_ins: [2]
"""
assert RANDOM_ENTRY in CI_GRID


def _write_grid(root: Path, text: str = CI_GRID) -> list:
    (root / GRID_FILE).write_text(text)
    return G.load_grid(str(root / GRID_FILE)).runs


def _change_full_epochs(root: Path, epochs: int) -> None:
    text = (root / GRID_FILE).read_text()
    text = text.replace("    connectivity: full\n", f"    connectivity: full\n    train: {{epochs: {epochs}}}\n", 1)
    (root / GRID_FILE).write_text(text)


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _mtimes(root: Path, runs, name: str) -> dict:
    return {r.run_id: (root / r.run_dir / name).stat().st_mtime_ns for r in runs}


# ---- Snakemake ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A fresh checkout after `snakemake --cores 2 --config grid=ci-grid.yaml`."""
    root = fresh_checkout(tmp_path_factory.mktemp("snakemake"))
    runs = _write_grid(root)
    start = time.monotonic()
    proc = snakemake(["--cores", "2", "--config", f"grid={GRID_FILE}"], root)
    assert proc.returncode == 0, proc.stdout[-8000:]
    print(f"CI grid: {len(runs)} runs, snakemake took {time.monotonic() - start:.0f} s")
    return root, runs, proc.stdout


def test_snakemake_builds_everything(built):
    root, runs, out = built
    counts = job_counts(out)
    assert counts["train"] == counts["evaluate"] == len(runs)
    for r in runs:
        d = root / r.run_dir
        for name in ("config.json", "history.csv", "checkpoint.pt", "metrics.json", "eval.json"):
            assert (d / name).is_file(), d / name
        if r.connectivity != "full":
            assert (d / "masks.json").is_file() and (d / "pruned.pt").is_file()
        assert json.loads((d / "metrics.json").read_text())["status"] == "complete"
        ev = json.loads((d / "eval.json").read_text())
        assert {"params_train", "params_test", "flops"} <= set(ev)
        assert (root / G.log_file("ci", "train", r.run_id)).is_file()
        assert (root / G.benchmark_file("ci", r.run_id)).is_file()
    metrics = json.loads((root / G.metrics_file("ci")).read_text())
    assert metrics["runs_complete"] == len(runs) and not metrics["missing"]
    tables = root / G.tables_dir("ci")
    assert (tables / "REPORT.md").is_file()
    assert list(tables.rglob("*.md")) and list(tables.rglob("*.png"))
    assert (root / G.expected_file("ci")).read_text().split() == [r.run_id for r in runs]
    for marker in (G.tracking_marker(), G.sync_marker("ci"), G.report_marker("ci")):
        assert (root / marker).is_file()


def test_second_run_does_nothing(built):
    root, runs, _ = built
    proc = snakemake(["-n", "--config", f"grid={GRID_FILE}"], root, check=True)
    assert "Nothing to be done" in proc.stdout, proc.stdout[-3000:]
    assert not job_counts(proc.stdout)


def test_snakemake_report_holds_the_report_tables_and_figures(built):
    """`snakemake --report report.zip` (as the README says) carries REPORT.md, the tables (Markdown and
    LaTeX), the K-effect, curves and mask-dynamics figures, under the grid's category."""
    import zipfile

    root, runs, _ = built
    snakemake(["--report", "report.zip", "--config", f"grid={GRID_FILE}"], root, check=True)
    with zipfile.ZipFile(root / "report.zip") as z:
        names = z.namelist()
        html = "\n".join(z.read(n).decode("utf-8", "replace") for n in names if n.endswith((".html", ".js")))
    base = {Path(n).name for n in names}
    for expected in ("REPORT.md", "table_digits.md", "table_digits.tex", "fanin_digits_20-4-8.png",
                     "curves_digits_20-4-8.png", "mask_dynamics_digits_20-4-8.png"):
        assert expected in base, (expected, sorted(base)[:40])
    for caption in ("digits: K-effect", "digits: mask dynamics", "digits: tables", "all datasets: claims report",
                    "test top-1 (%) against the fan-in K"):
        assert caption in html, caption


def test_dvc_metrics_show_fits_a_terminal_and_plots_overlay_the_seeds(built):
    """After the pipeline, `dvc metrics show` prints one row per configuration and a handful of columns,
    and `dvc plots show` renders the overlaid curves and the K-effect (dvc.yaml generated from the grid)."""
    root, runs, _ = built
    run([BIN / "maskconnect", "grid", "dvc", "--grid", GRID_FILE, "--out", "dvc.yaml"], root, check=True)
    shown = dvc(["metrics", "show"], root, check=True).stdout
    lines = [ln for ln in shown.splitlines() if ln.strip()]
    header = lines[0].split()
    # (one seed per configuration here: no interval, and DVC leaves out a column of nulls)
    assert {"Path", "n", "params_test_M", "params_train_M", "top1"} <= set(header) <= {
        "Path", "ci95", "n", "params_test_M", "params_train_M", "top1"}, shown
    assert len(lines) == 1 + 3  # one row per configuration
    as_json = json.loads(dvc(["metrics", "show", "--json"], root, check=True).stdout)
    assert "top1" in json.dumps(as_json)
    out = root / "plots"
    dvc(["plots", "show", "--json", "-o", str(out)], root, check=True)
    shown = dvc(["plots", "show", "--json"], root, check=True).stdout
    data = json.loads(shown)
    plots = data.get("data", data) if isinstance(data, dict) else data
    ids = set(plots) if isinstance(plots, dict) else set()
    curves = [i for i in ids if "/curves/" in i]
    assert len(curves) == 3 and any("/k-effect/" in i for i in ids), sorted(ids)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_mlflow_ui_shows_every_run_with_its_metrics(built):
    """The UI, started as the README says (bound to loopback), serves every run of the grid."""
    root, runs, _ = built
    port = _free_port()
    ui = subprocess.Popen([BIN / "mlflow", "ui", "--backend-store-uri", "sqlite:///results/mlflow.db",
                           "--host", "127.0.0.1", "--port", str(port)], cwd=root, env=tool_env(root),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert ui.poll() is None, "mlflow ui exited"
            assert time.monotonic() < deadline, "mlflow ui did not start"
            time.sleep(1)
        exps = _api(port, "experiments/search", {"max_results": 1000}).get("experiments", [])
        by_name = {e["name"]: e["experiment_id"] for e in exps}
        assert "maskconnect/digits/ci" in by_name, sorted(by_name)
        found = _api(port, "runs/search", {"experiment_ids": [by_name["maskconnect/digits/ci"]], "max_results": 1000})
        tagged, tag_sets = {}, {}
        for r in found.get("runs", []):
            tags = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
            tagged[tags.get("maskconnect.run_dir", "")] = {m["key"]: m["value"] for m in r["data"].get("metrics", [])}
            tag_sets[tags.get("maskconnect.run_dir", "")] = tags
        for run_ in runs:
            key = str((root / run_.run_dir).resolve())
            assert key in tagged, (key, sorted(tagged))
            metrics = json.loads((root / run_.run_dir / "metrics.json").read_text())
            assert tagged[key]["top1"] == pytest.approx(metrics["top1"])
            assert "test_top1" in tagged[key]  # the per-epoch history too
            # the tags the README tells users to filter by
            t = tag_sets[key]
            assert (t["grid"], t["dataset"], t["arch"], t["connectivity"], t["K"]) == (
                "ci", "digits", run_.arch, run_.connectivity, str(run_.fan_in)), t
        learned = _api(port, "runs/search", {"experiment_ids": [by_name["maskconnect/digits/ci"]],
                                              "filter": "tags.connectivity = 'learned' and tags.K = '2'"})
        assert len(learned.get("runs", [])) == 1
        assert "maskconnect/reports" in by_name  # the report's summary was logged
        reports = _api(port, "runs/search", {"experiment_ids": [by_name["maskconnect/reports"]]}).get("runs", [])
        report = next(r for r in reports if r["info"]["run_name"] == "report ci")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/artifacts/list?run_id="
                                    f"{report['info']['run_id']}", timeout=30) as resp:
            listed = {f["path"] for f in json.loads(resp.read()).get("files", [])}
        assert {"REPORT.md", "figures", "tables"} <= listed, listed
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def test_changed_training_setting_reruns_only_what_depends_on_it(built):
    root, runs, _ = built
    before = _mtimes(root, runs, "metrics.json")
    _change_full_epochs(root, 3)
    dry = snakemake(["-n", "--config", f"grid={GRID_FILE}"], root, check=True)
    counts = job_counts(dry.stdout)
    assert counts == {"train": 1, "evaluate": 1, "aggregate": 1, "report": 1, "tracking_sync": 1,
                      "tracking_report": 1, "all": 1}, dry.stdout[-4000:]
    snakemake(["--cores", "2", "--config", f"grid={GRID_FILE}"], root, check=True)
    after = _mtimes(root, runs, "metrics.json")
    full = next(r for r in runs if r.connectivity == "full")
    assert [rid for rid in before if before[rid] != after[rid]] == [full.run_id]
    assert len(_history(root / full.run_dir)) == 3
    assert list((root / full.run_dir).parent.glob("seed0.replaced-*"))  # the old run was moved aside, not lost
    assert "Nothing to be done" in snakemake(["-n", "--config", f"grid={GRID_FILE}"], root, check=True).stdout


def test_recipe_and_report_code_changes_rerun_what_reads_them(built):
    """On the jobs Snakemake really ran: a changed value of the CI grid's recipe that only learned runs
    read reruns the learned run's jobs alone; an edit of a report module reruns no training."""
    root, runs, _ = built
    recipes = root / "src/maskconnect/recipes.yaml"
    text = recipes.read_text()
    smoke = text.index("\nsmoke:")
    learned = next(r for r in runs if r.connectivity == "learned")
    try:
        recipes.write_text(text[:smoke] + text[smoke:].replace("  mask_lr: null\n", "  mask_lr: 0.5\n", 1))
        dry = snakemake(["-n", "--config", f"grid={GRID_FILE}"], root, check=True).stdout
        assert job_counts(dry) == {"train": 1, "evaluate": 1, "aggregate": 1, "report": 1, "tracking_sync": 1,
                                   "tracking_report": 1, "all": 1}, dry[-4000:]
        assert f"wildcards: grid=ci, run={learned.run_id}" in dry
    finally:
        recipes.write_text(text)
    stats = root / "src/maskconnect/report/stats.py"
    text = stats.read_text()
    try:
        stats.write_text(text.replace('"""', '"""A docstring edit. ', 1))
        dry = snakemake(["-n", "--config", f"grid={GRID_FILE}"], root, check=True).stdout
        assert job_counts(dry) == {"aggregate": 1, "report": 1, "tracking_report": 1, "all": 1}, dry[-4000:]
    finally:
        stats.write_text(text)
    assert "Nothing to be done" in snakemake(["-n", "--config", f"grid={GRID_FILE}"], root, check=True).stdout


ONE_RUN_GRID = """\
name: ci
defaults: {dataset: digits, seeds: [0], recipe: smoke, device: cpu, threads: 1}
entries:
  - {arch: "20,4,8", connectivity: full, train: {epochs: 8}}
"""


def _train_processes(parent: int) -> list[int]:
    import psutil

    try:
        kids = psutil.Process(parent).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in kids:
        try:
            if "train" in p.cmdline() and any("maskconnect" in c for c in p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def test_killed_training_job_resumes_from_its_checkpoint(tmp_path):
    root = fresh_checkout(tmp_path / "kill")
    (run_,) = _write_grid(root, ONE_RUN_GRID)
    run_dir = root / run_.run_dir
    sm = subprocess.Popen([BIN / "snakemake", "--cores", "2", "--config", f"grid={GRID_FILE}"], cwd=root,
                          env=tool_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "history.csv").exists() and len(_history(run_dir)) >= 2):
            assert sm.poll() is None, sm.stdout.read()[-4000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pids = _train_processes(sm.pid)
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # the job dies mid-training (OOM killer, node failure, ...)
        done_before = _history(run_dir)
        out = sm.communicate(timeout=300)[0]
    finally:
        if sm.poll() is None:
            os.killpg(sm.pid, signal.SIGKILL)
    assert sm.returncode != 0, out[-3000:]
    assert not (run_dir / "metrics.json").exists() and (run_dir / "checkpoint.pt").exists()
    assert 2 <= len(done_before) < 8
    import torch

    checkpointed = torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"]

    proc = snakemake(["--cores", "2", "--config", f"grid={GRID_FILE}"], root, check=True)  # restart
    history = _history(run_dir)
    assert [int(h["epoch"]) for h in history] == list(range(1, 9))
    # the checkpointed epochs were kept, not trained again (same rows, same timings); history.csv is
    # written just before the checkpoint, so a kill in between leaves one more row, which is re-run
    # with identical results (only its timing differs)
    assert checkpointed >= len(done_before) - 1
    assert history[:checkpointed] == done_before[:checkpointed]
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]  # noqa: E731
    assert untimed(history[:len(done_before)]) == untimed(done_before)
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 8
    assert not list(run_dir.parent.glob("seed0.replaced-*"))
    assert job_counts(proc.stdout)["train"] == 1


# ---- DVC ----------------------------------------------------------------------------------------------

def _ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_dvc_repro_builds_then_does_nothing_then_only_what_changed(tmp_path):
    root = fresh_checkout(tmp_path / "dvc")
    # the CI grid less its Fixed-Random run (Snakemake covers it; this keeps the test short)
    runs = _write_grid(root, CI_GRID.replace(RANDOM_ENTRY, ""))
    assert [r.connectivity for r in runs] == ["full", "learned"]
    run([BIN / "maskconnect", "grid", "dvc", "--grid", GRID_FILE, "--out", "dvc.yaml"], root, check=True)
    stages = set(G.dvc_stages(G.load_grid(str(root / GRID_FILE))))
    run(["git", "add", "-A"], root, check=True)  # `dvc exp run` (below) runs on a commit
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "checkout"], root, check=True)

    first = dvc(["repro"], root, check=True)
    assert _ran_stages(first.stdout) == stages
    for r in runs:
        assert (root / r.run_dir / "metrics.json").is_file() and (root / r.run_dir / "eval.json").is_file()
    assert (root / G.tables_dir("ci") / "REPORT.md").is_file()
    assert (root / "dvc.lock").is_file()

    again = dvc(["repro"], root, check=True)
    assert not _ran_stages(again.stdout), again.stdout
    assert "up to date" in dvc(["status"], root, check=True).stdout
    shown = dvc(["metrics", "show", "--json"], root, check=True).stdout
    assert "top1" in shown

    before = _mtimes(root, runs, "metrics.json")
    _change_full_epochs(root, 3)
    run([BIN / "maskconnect", "grid", "dvc", "--grid", GRID_FILE, "--out", "dvc.yaml"], root, check=True)
    full = next(r for r in runs if r.connectivity == "full")
    status = dvc(["status"], root, check=True).stdout
    assert f"train-{full.slug}:" in status and "entries.0.train" in status, status
    assert not [r for r in runs if r is not full and f"train-{r.slug}:" in status], status
    third = dvc(["repro"], root, check=True)
    assert _ran_stages(third.stdout) == {f"train-{full.slug}", f"evaluate-{full.slug}", "aggregate-ci", "report-ci",
                                         "tracking_sync-ci", "tracking_report-ci"}, third.stdout[-4000:]
    after = _mtimes(root, runs, "metrics.json")
    assert [rid for rid in before if before[rid] != after[rid]] == [full.run_id]
    assert not _ran_stages(dvc(["repro"], root, check=True).stdout)

    # an experiment with another value of a recipe key (one only learned runs read) trains the learned run again
    learned = next(r for r in runs if r.connectivity == "learned")
    exp = dvc(["exp", "run", "-S", "src/maskconnect/recipes.yaml:smoke.mask_lr=0.5"], root, check=True)
    assert _ran_stages(exp.stdout) == {f"train-{learned.slug}", f"evaluate-{learned.slug}", "aggregate-ci", "report-ci",
                                       "tracking_sync-ci", "tracking_report-ci"}, exp.stdout[-4000:]
    assert json.loads((root / learned.run_dir / "config.json").read_text())["mask_lr"] == 0.5
    assert _mtimes(root, runs, "metrics.json")[full.run_id] == after[full.run_id]
    diff = dvc(["params", "diff"], root, check=True).stdout
    assert re.search(r"src/maskconnect/recipes\.yaml\s+smoke\.mask_lr\s+(-|None)\s+0\.5", diff), diff

"""Which code made a result: each run records the git commit and tree state of the code that trained its
epochs (a run resumed under other code records both), a finished run trained by other code is trained
again when the pipeline reruns it, and the report names the commits of every table and warns, in
REPORT.md and on the command line, when a table mixes commits or includes runs from a dirty tree."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maskconnect import provenance
from maskconnect.cli.report import add_report_arguments, run_report

ROOT = Path(__file__).resolve().parents[1]
A, B = "a" * 40, "b" * 40


def _run_dir(root: Path, conn: str, k: int, seed: int, code_history: list[dict], top1: float) -> Path:
    """A finished digits {20,4,8} run as docs/run_format.md lays it out (metrics.json only)."""
    d = root / "runs" / "g" / "digits" / "20-4-8" / f"{conn}-K{k}" / f"seed{seed}"
    d.mkdir(parents=True)
    last = code_history[-1]
    (d / "metrics.json").write_text(json.dumps({
        "status": "complete", "dataset": "digits", "family": "resnext", "arch": "20,4,8", "depth": 20, "width": 4,
        "cardinality": 8, "connectivity": conn, "fan_in": k, "seed": seed, "top1": top1, "top5": 99.0,
        "best_top1": top1, "best_top5": 99.0, "test_loss": 0.3, "params_train": 1000, "params_test": 900, "masks": 0,
        "flops": 1, "epochs": 2, "wall_time_s": 1.0, "device": "cpu", "config": {}, "versions": {},
        "git_commit": last["git_commit"], "git_dirty": last["git_dirty"], "code_history": code_history}))
    return d


def _code(commit: str, dirty: bool, first: int, last: int) -> dict:
    return {"git_commit": commit, "git_dirty": dirty, "code_digest": commit[:1] * 64, "epochs": [first, last]}


def _report(results: Path, out: Path, capsys) -> tuple[str, str, str]:
    """`maskconnect report --grid g`: (REPORT.md, the digits table's Markdown, stderr)."""
    parser = add_report_arguments(argparse.ArgumentParser())
    assert run_report(parser.parse_args(["--results", str(results), "--out", str(out), "--grid", "g"])) == 0
    return ((out / "REPORT.md").read_text(), (out / "tables" / "table_digits.md").read_text(), capsys.readouterr().err)


def test_a_table_of_runs_from_two_commits_says_so(tmp_path, capsys):
    for seed in range(3):
        _run_dir(tmp_path / "one", "full", 8, seed, [_code(A, False, 1, 2)], 90.0 + seed)
    report, table, err = _report(tmp_path / "one", tmp_path / "out1", capsys)
    assert f"Code: commit {A[:12]} (3 runs); clean tree." in table and "Warning" not in table
    assert f"- grid `g`: commit {A[:12]} (3 runs); clean tree." in report and "Warning" not in report
    assert "warning" not in err

    # the same table once a run resumed under commit B with uncommitted changes joins it
    mixed = tmp_path / "mixed"
    for seed in range(3):
        _run_dir(mixed, "full", 8, seed, [_code(A, False, 1, 2)], 90.0 + seed)
    _run_dir(mixed, "learned", 2, 0, [_code(A, False, 1, 1), _code(B, True, 2, 2)], 91.0)
    report, table, err = _report(mixed, tmp_path / "out2", capsys)
    want = (f"Code: commits {A[:12]} (4 runs), {B[:12]} (1 run); 1 run with uncommitted changes. Warning: this table "
            f"mixes runs of 2 commits ({A[:12]}, {B[:12]}) and includes 1 run trained from a tree with uncommitted changes.")
    assert want in table
    assert (f"- **Warning:** table `table_digits` of grid `g` mixes runs of 2 commits ({A[:12]}, {B[:12]})"
            in report.split("How to read this report")[0])  # at the top, before the method
    assert want in report  # and under the table
    assert f"warning: table table_digits of grid g mixes runs of 2 commits ({A[:12]}, {B[:12]})" in err
    runs_csv = (tmp_path / "out2" / "runs.csv").read_text()
    assert f"{A} {B}" in runs_csv  # the resumed run lists both, in training order


def test_records_from_before_the_provenance_fields_read_as_unknown(tmp_path, capsys):
    d = _run_dir(tmp_path / "old", "full", 8, 0, [_code(A, False, 1, 2)], 90.0)
    m = json.loads((d / "metrics.json").read_text())
    del m["git_dirty"], m["code_history"]
    (d / "metrics.json").write_text(json.dumps(m))
    _run_dir(tmp_path / "old", "full", 8, 1, [_code(A, False, 1, 2)], 91.0)
    _, table, err = _report(tmp_path / "old", tmp_path / "out", capsys)
    assert f"Code: commit {A[:12]} (2 runs); tree state not recorded for 1." in table and "Warning" not in table
    assert "warning" not in err


# ---- a real run resumed under other code -----------------------------------------------------------------

def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line)


@pytest.mark.slow
def test_a_run_resumed_under_other_code_records_both_and_is_retrained_when_its_code_changes(tmp_path, capsys):
    """A run killed after epoch 1 under commit A and resumed under commit B records both; the report of it
    says its table mixes two commits. Once the training code changes again (uncommitted), a rerun says
    the run was trained by other code, and with --replace (what the pipelines pass) trains it again."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "A")
    commit_a = _git(repo, "rev-parse", "HEAD")
    env = {**os.environ, "PYTHONPATH": str(repo / "src")}
    out = repo / "results" / "runs" / "g" / "digits" / "11-2-4" / "learned-K2" / "seed0"
    args = ["--dataset", "digits", "--arch", "11,2,4", "--stage-width", "8", "--connectivity", "learned", "--fan-in", "2",
            "--recipe", "smoke", "--no-track", "--progress", "lines", "--out", str(out)]

    def train(*extra: str, hooks: list[str] = ()) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "tests" / "train_hooks.py"), *hooks, "--"] if hooks else [
            sys.executable, "-m", "maskconnect", "train"]
        return subprocess.run([*cmd, *args, *extra], cwd=repo, env=env, capture_output=True, text=True, timeout=600)

    assert train(hooks=["--kill-after", "1"]).returncode == 137
    _append(repo / "src/maskconnect/training/loop.py", "# commit B\n")
    _git(repo, "commit", "-qam", "B")
    commit_b = _git(repo, "rev-parse", "HEAD")
    resumed = train("--replace")
    assert resumed.returncode == 0 and "resuming after epoch 1/2" in resumed.stderr, resumed.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    history = m["code_history"]
    assert [(h["git_commit"], h["git_dirty"], h["epochs"]) for h in history] == [(commit_a, False, [1, 1]),
                                                                                (commit_b, False, [2, 2])]
    assert history[0]["code_digest"] != history[1]["code_digest"] == provenance.code_digest("train", repo / "src/maskconnect")
    assert (m["git_commit"], m["git_dirty"]) == (commit_b, False)

    report, _, err = _report(repo / "results", tmp_path / "tables", capsys)  # the report reads metrics.json alone
    both = ", ".join(c[:12] for c in sorted((commit_a, commit_b)))   # as many runs each: listed by hash
    assert f"mixes runs of 2 commits ({both})" in err
    assert f"- **Warning:** table `table_digits` of grid `g` mixes runs of 2 commits ({both})" in report

    # the training code changes (uncommitted): the finished run was made by other code
    _append(repo / "src/maskconnect/models/resnext.py", "# uncommitted\n")
    mtime = (out / "metrics.json").stat().st_mtime_ns
    again = train()
    assert again.returncode == 0 and "already complete" in again.stderr and "trained by other code" in again.stderr
    assert (out / "metrics.json").stat().st_mtime_ns == mtime
    retrained = train("--replace")
    assert retrained.returncode == 0 and "it was trained by other code" in retrained.stderr, retrained.stderr[-2000:]
    assert list(out.parent.glob("seed0.replaced-*"))  # the old run moved aside, not lost
    m = json.loads((out / "metrics.json").read_text())
    assert [(h["git_commit"], h["git_dirty"], h["epochs"]) for h in m["code_history"]] == [(commit_b, True, [1, 2])]
    assert (m["git_commit"], m["git_dirty"]) == (commit_b, True)

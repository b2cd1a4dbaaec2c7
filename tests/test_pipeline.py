"""The experiment grids and the workflows that read them (Snakemake, DVC): fast checks.

Run counts per grid, the one run-id function, bad grid files rejected with the entry named (by the
loader and by Snakemake before any job), `snakemake --lint`, the conda env files, dvc.yaml equal to
the one generated from the grid, and Snakemake jobs running the very commands of the DVC stages.
End-to-end runs are in test_pipeline_e2e.py (marked slow).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from maskconnect import experiments as G
from maskconnect.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# ResNeXt: 64 + 36 + 9; ResNet: Table 1 36 + Fig. 2 64 (K = 1..17 without Table 1's K = 10, 4 seeds), ResNet-50 2
PAPER_COUNTS = {"cifar100": 64, "cifar10": 36, "imagenet": 9, "cifar100-resnet": 100, "imagenet-resnet": 2, "paper": 211}
DEMO_RUNS = 18
DEMO_RESNET_RUNS = 9
SMOKE_RUNS = 3


# ---- helpers (also used by test_pipeline_e2e.py) ------------------------------------------------------

# What a fresh clone holds that the workflows need (the package comes along for the grids).
PROJECT_FILES = ["Snakefile", "dvc.yaml", ".dvcignore", ".gitignore", "pyproject.toml"]
PROJECT_DIRS = ["pipelines", "profiles", "src"]


def tool_env(root: Path) -> dict:
    """Environment for the tools: this venv's bin first, the checkout's package first, no outside MLflow."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(root / "src")
    env.pop("MLFLOW_TRACKING_URI", None)
    env["MASKCONNECT_GPU_LOCK_DIR"] = str(root / ".gpu-locks")
    return env


def fresh_checkout(dest: Path) -> Path:
    """Copy the project's sources to ``dest`` as a clone would have them, with git and DVC."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in PROJECT_FILES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    (dest / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy2(ROOT / ".dvc" / name, dest / ".dvc" / name)
    run(["git", "init", "-q"], dest, check=True)
    return dest


def run(cmd: list, cwd: Path, *, check: bool = False, timeout: float = 900, env: dict | None = None):
    """Run a tool in ``cwd``; stdout and stderr merged into ``.stdout``."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or tool_env(cwd), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


def snakemake(args: list, cwd: Path, **kw):
    return run([BIN / "snakemake", *args], cwd, **kw)


def dvc(args: list, cwd: Path, **kw):
    return run([BIN / "dvc", *args], cwd, **kw)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake (dry) run: rule -> jobs."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^job\s+count\s*$", line.strip()):
            for row in lines[i + 2:]:
                m = re.match(r"^(\w+)\s+(\d+)$", row.strip())
                if not m:
                    break
                if m.group(1) != "total":
                    counts[m.group(1)] = int(m.group(2))
            break
    return counts


def shell_commands(output: str) -> list[str]:
    """The shell commands of a `snakemake -n -p` output, without their log redirections."""
    cmds = []
    for line in output.splitlines():
        if line.startswith("Shell command: ") and not line.endswith(": None"):
            cmd = line[len("Shell command: "):].strip()
            cmd = re.sub(r"\s+>\s*\S+\s+2>&1$", "", cmd)  # > {log} 2>&1
            cmd = re.sub(r"\s+2>&1\s+\|\s+tee -a \S+\s+>\s*\S+$", "", cmd)  # 2>&1 | tee -a {attempts} > {log}
            cmd = re.sub(r"\s+2>\s*\S+$", "", cmd)        # ... > {output} 2> {log}
            cmds.append(cmd)
    return cmds


# ---- the grids --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,count", [*PAPER_COUNTS.items(), ("demo", DEMO_RUNS), ("demo-resnet", DEMO_RESNET_RUNS),
                                        ("smoke", SMOKE_RUNS)])
def test_grid_run_counts(name, count):
    grid = G.load_grid(name)
    assert len(grid.runs) == count
    assert len({r.run_dir for r in grid.runs}) == count  # every run has its own directory


def test_every_packaged_grid_loads():
    assert set(G.available_grids()) >= {"demo", "demo-resnet", "smoke", "cifar100", "cifar10", "imagenet",
                                        "cifar100-resnet", "imagenet-resnet", "paper"}
    for name in G.available_grids():
        G.load_grid(name)


def test_paper_grids_match_the_paper():
    c100 = G.load_grid("cifar100")
    configs = {(r.arch, r.connectivity, r.fan_in) for r in c100.runs}
    table2 = {(a, c, k) for a in ("29,8,8", "29,64,8") for c, k in (("full", 8), ("learned", 1), ("learned", 4), ("random", 4))}
    fig3 = {("20,4,8", "learned", k) for k in range(1, 8)} | {("20,4,8", "full", 8)}
    assert configs == table2 | fig3
    assert {r.seed for r in c100.runs} == {0, 1, 2, 3}
    c10 = G.load_grid("cifar10")
    assert {(r.arch, r.connectivity, r.fan_in) for r in c10.runs} == {
        (a, c, k) for a in ("20,4,8", "29,8,8", "29,64,8") for c, k in (("full", 8), ("learned", 4), ("random", 4))}
    inet = G.load_grid("imagenet")
    assert {(r.arch, r.connectivity, r.fan_in) for r in inet.runs} == {
        (a, c, k) for a, C in (("50,4,32", 32), ("101,4,32", 32), ("101,4,64", 64))
        for c, k in (("full", C), ("learned", C // 2), ("random", C // 2))}
    assert all(r.gpus >= 1 and r.device == "cuda" for g in (c100, c10, inet) for r in g.runs)
    assert {r.recipe for r in c100.runs + c10.runs} == {"paper"} and {r.recipe for r in inet.runs} == {"paper-imagenet"}


def _paper_rows(source: str) -> set[tuple[str, str, int]]:
    """(model, connectivity, K) of one source of the shipped paper CSV, read with the csv module."""
    with resources.files("maskconnect").joinpath("paper/reference_results.csv").open() as f:
        return {(r["model"], r["connectivity"], int(r["fan_in"])) for r in csv.DictReader(f)
                if r["source"] == source and r["metric"] == "top1"}


def test_resnet_grids_are_the_papers_table1_fig2_and_resnet50():
    """cifar100-resnet trains exactly Table 1's and Fig. 2's configurations, imagenet-resnet ResNet-50's
    (the paper's rows, read from its CSV), every one with the paper's recipe on a GPU."""
    c100 = G.load_grid("cifar100-resnet")
    configs = {(r.arch, r.connectivity, r.fan_in) for r in c100.runs}
    assert configs == _paper_rows("eccv-table1") | _paper_rows("eccv-fig2")
    assert len(_paper_rows("eccv-table1")) == 9 and {k for _, _, k in _paper_rows("eccv-fig2")} == set(range(1, 18))
    assert {r.seed for r in c100.runs} == {0, 1, 2, 3} and {r.recipe for r in c100.runs} == {"paper"}
    inet = G.load_grid("imagenet-resnet")
    assert {(r.arch, r.connectivity, r.fan_in) for r in inet.runs} == {
        (m, c, k) for m, c, k in _paper_rows("eccv-text") if m == "resnet50"}
    assert {r.recipe for r in inet.runs} == {"paper-imagenet"}
    assert all(r.gpus >= 1 and r.device == "cuda" for g in (c100, inet) for r in g.runs)


def test_paper_is_the_union_and_keeps_each_grids_directories():
    paper = G.load_grid("paper")
    assert paper.parts == ["cifar100", "cifar10", "imagenet", "cifar100-resnet", "imagenet-resnet"]
    union = [r.run_dir for p in paper.parts for r in G.load_grid(p).runs]
    assert [r.run_dir for r in paper.runs] == union


def test_demo_grid_has_every_result_kind():
    demo = G.load_grid("demo")
    assert {r.dataset for r in demo.runs} == {"digits"} and {r.device for r in demo.runs} == {"cpu"}
    assert all(r.gpus == 0 for r in demo.runs)
    k = {c: sorted({r.fan_in for r in demo.runs if r.connectivity == c}) for c in ("full", "random", "learned")}
    assert k["full"] == [8] and len(k["random"]) >= 2 and len(k["learned"]) >= 3  # a fan-in sweep
    assert {r.seed for r in demo.runs} == {0, 1, 2}


def test_the_demo_grid_runs_the_demo_recipe_as_it_is():
    """The demo's schedule has one home, the demo recipe: the grid sets no schedule field, and each of its
    runs resolves to the recipe's epochs, LR drops, mask LR and freeze epoch (what `maskconnect train`
    runs by default)."""
    from maskconnect.training.config import TrainConfig, config_from_args
    from maskconnect.training.options import add_train_arguments

    schedule = {"epochs", "batch_size", "lr", "lr_reference_batch", "momentum", "weight_decay", "milestones",
                "gamma", "mask_lr", "mask_momentum", "mask_rule", "freeze_epoch"}
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    # `maskconnect train` without --recipe runs the demo recipe (the option has no default of its own:
    # TrainConfig's applies, so that an option given twice, by itself and by --set, is told from a default)
    bare = config_from_args(parser.parse_args(["--dataset", "digits", "--arch", "20,4,8", "--out", "x"]))
    assert bare.resolved().recipe == "demo" and TrainConfig.__dataclass_fields__["recipe"].default == "demo"
    for run in G.load_grid("demo").runs:
        assert run.recipe == "demo" and not schedule & dict(run.train).keys(), run.run_id
        c = config_from_args(parser.parse_args([*run.train_args(), "--out", "x"])).resolved()
        assert (c.epochs, c.milestones, c.freeze_epoch, c.mask_lr) == (18, [9, 14], 10, 2.0), run.run_id


def test_run_id_and_run_dir_are_the_one_spelling():
    assert G.run_id("cifar100", "29,8,8", "learned", 4, 0) == "cifar100/29-8-8/learned-K4/seed0"
    assert G.run_id("cifar10", (29, 64, 8), "full", 8, 3) == "cifar10/29-64-8/full-K8/seed3"
    run = next(r for r in G.load_grid("cifar100").runs if r.connectivity == "learned" and r.fan_in == 4)
    assert run.run_dir == f"results/runs/cifar100/{run.run_id}"
    assert G.run_dir("cifar100", {"dataset": "cifar100", "arch": "29,8,8", "connectivity": "random",
                                  "fan_in": 4, "seed": 1}) == "results/runs/cifar100/cifar100/29-8-8/random-K4/seed1"
    assert re.fullmatch(G.RUN_ID_REGEX, run.run_id)
    # the run id's one parser reads back what run_id writes
    assert G.parse_run_id(run.run_id) == {"dataset": run.dataset, "arch": run.arch, "connectivity": run.connectivity,
                                          "fan_in": run.fan_in, "seed": run.seed}
    from maskconnect.report import document, tables  # the report spells missing runs the same way

    assert tables.run_id is G.run_id and document.run_id is G.run_id
    assert tables.run_id("cifar100", "29,8,8", "learned", 4, 0) == G.run_id("cifar100", "29,8,8", "learned", 4, 0)


def test_train_command_of_a_run():
    run = next(r for r in G.load_grid("demo").runs if r.connectivity == "learned" and r.fan_in == 4 and r.seed == 1)
    cmd = G.train_command(run)
    assert cmd.startswith("maskconnect train --dataset digits --arch 20,4,8 --connectivity learned --fan-in 4 --seed 1 --recipe demo")
    assert f"--out {run.run_dir} " in cmd
    gpu = G.load_grid("cifar100").runs[0]
    assert G.train_command(gpu).startswith("maskconnect gpu-slot --gpus 1 -- maskconnect train ")
    inet = G.load_grid("imagenet").runs[0]
    assert G.train_command(inet).startswith(
        f"maskconnect gpu-slot --gpus {inet.gpus} -- torchrun --standalone --nproc-per-node {inet.gpus} -m maskconnect train ")
    full = G.load_grid("smoke").runs[0]
    assert "--fan-in" not in G.train_command(full)  # full uses K = C


def test_train_arguments_parse_with_the_real_cli():
    from maskconnect.cli import build_parser

    for name in ("demo", "cifar100", "imagenet"):
        for run in G.load_grid(name).runs[:3]:
            args = build_parser().parse_args(["train", *run.train_args(), "--out", run.run_dir, "--replace"])
            assert (args.dataset, args.connectivity, args.seed) == (run.dataset, run.connectivity, run.seed)


# ---- bad grid files ---------------------------------------------------------------------------------

BAD_GRIDS = {
    "unknown dataset": ("""\
name: bad
defaults: {seeds: [0], recipe: smoke, device: cpu}
entries:
  - {dataset: digits, arch: "20,4,8", connectivity: full}
  - {dataset: cifar1000, arch: "29,8,8", connectivity: learned, fan_ins: [4]}
""", ["entry 2", "cifar1000", "dataset"]),
    "K > C": ("""\
name: bad
defaults: {dataset: cifar100, seeds: [0, 1]}
entries:
  - {arch: "29,8,8", connectivity: full}
  - {arch: "29,8,8", connectivity: random, fan_ins: [4]}
  - {arch: "29,8,8", connectivity: learned, fan_ins: [4, 9]}
""", ["entry 3", "29,8,8 learned", "fan_in=9", "C=8"]),
    "missing seeds": ("""\
name: bad
defaults: {dataset: digits}
entries:
  - {arch: "20,4,8", connectivity: full, seeds: [0]}
  - {arch: "20,4,8", connectivity: learned, fan_ins: [2]}
""", ["entry 2", "seeds"]),
    "empty seeds": ("""\
name: bad
entries:
  - {dataset: digits, arch: "20,4,8", connectivity: full, seeds: []}
""", ["entry 1", "seeds"]),
    "typo in a field": ("""\
name: bad
entries:
  - {dataset: digits, arch: "20,4,8", connectivity: learned, fanins: [2], seeds: [0]}
""", ["entry 1", "fanins"]),
    "random without K": ("""\
name: bad
entries:
  - {dataset: digits, arch: "20,4,8", connectivity: random, seeds: [0]}
""", ["entry 1", "fan_ins"]),
    "bad depth": ("""\
name: bad
entries:
  - {dataset: cifar10, arch: "21,4,8", connectivity: full, seeds: [0]}
""", ["entry 1", "depth=21"]),
    "run twice": ("""\
name: bad
defaults: {dataset: digits, seeds: [0]}
entries:
  - {arch: "20,4,8", connectivity: learned, fan_ins: [2, 4]}
  - {arch: "20,4,8", connectivity: learned, fan_ins: [4]}
""", ["entry 2", "learned-K4", "entry 1"]),
}


@pytest.mark.parametrize("case", sorted(BAD_GRIDS))
def test_loader_rejects_bad_grid_naming_the_entry(case, tmp_path):
    text, words = BAD_GRIDS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        G.load_grid(str(path))
    message = str(info.value)
    assert message.startswith("grid 'bad' ")
    for word in words:
        assert word in message, (word, message)


def test_unknown_grid_name_lists_the_grids():
    with pytest.raises(ConfigError, match="demo.*smoke|one of"):
        G.load_grid("nosuchgrid")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A fresh copy of the project (no results), shared by the read-only workflow checks."""
    return fresh_checkout(tmp_path_factory.mktemp("checkout"))


@pytest.mark.parametrize("case", ["unknown dataset", "K > C", "missing seeds"])
def test_snakemake_rejects_bad_grid_before_any_job(case, checkout):
    text, words = BAD_GRIDS[case]
    path = checkout / f"bad-{case.replace(' ', '_').replace('>', 'gt')}.yaml"
    path.write_text(text)
    proc = snakemake(["--cores", "1", "--config", f"grid={path.name}"], checkout)  # a real run, not -n
    assert proc.returncode != 0
    for word in words:
        assert word in proc.stdout, (word, proc.stdout[-3000:])
    assert "Job stats" not in proc.stdout
    assert not (checkout / "results").exists() and not (checkout / "data").exists()


def test_snakemake_rejects_bad_config(checkout):
    proc = snakemake(["-n", "--config", "gird=demo"], checkout)
    assert proc.returncode != 0 and "gird" in proc.stdout


# ---- Snakemake ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,count", [*PAPER_COUNTS.items(), ("demo", DEMO_RUNS), ("demo-resnet", DEMO_RESNET_RUNS),
                                        ("smoke", SMOKE_RUNS)])
def test_snakemake_dry_run_counts_train_jobs(name, count, checkout):
    proc = snakemake(["-n", "--config", f"grid={name}"], checkout)
    assert proc.returncode == 0, proc.stdout[-3000:]
    counts = job_counts(proc.stdout)
    assert counts["train"] == count
    assert counts.get("preflight", 0) == (1 if name in PAPER_COUNTS else 0)  # GPU grids check the device first
    assert counts["evaluate"] == count
    parts = len(G.load_grid(name).parts)
    assert counts["report"] == counts["aggregate"] == counts["tracking_sync"] == counts["tracking_report"] == parts
    assert counts["tracking_init"] == 1


def test_default_grid_is_demo(checkout):
    counts = job_counts(snakemake(["-n"], checkout, check=True).stdout)
    assert counts["train"] == DEMO_RUNS


def test_snakemake_lint_is_clean(checkout):
    for name in ("demo", "paper"):
        proc = snakemake(["--lint", "--config", f"grid={name}"], checkout)
        assert proc.returncode == 0, proc.stdout[-3000:]


def test_tracking_store_is_created_before_training(checkout):
    """Every training job depends on the MLflow store's marker (no migration race between jobs)."""
    proc = snakemake(["-n", "--config", "grid=smoke"], checkout, check=True)
    blocks = proc.stdout.split("\n\n")
    train = [b for b in blocks if re.search(r"^(local)?rule train:", b, re.M)]
    assert len(train) == SMOKE_RUNS
    assert all(G.tracking_marker() in b.split("input:")[1].splitlines()[0] for b in train)


@pytest.mark.parametrize("name", ["smoke", "paper"])
def test_snakemake_jobs_run_the_dvc_stage_commands(name, checkout):
    """Each Snakemake job's shell command is the command of a DVC stage for the same grid."""
    proc = snakemake(["-n", "-p", "--config", f"grid={name}"], checkout, check=True)
    ours = sorted(shell_commands(proc.stdout))
    theirs = sorted(stage["cmd"] for stage in G.dvc_stages(G.load_grid(name)).values())
    assert ours == theirs


# ---- profiles -----------------------------------------------------------------------------------------

def _parse_profile(path: Path, env: dict | None = None) -> dict:
    from snakemake.profiles import ProfileConfigFileParser

    old = dict(os.environ)
    try:
        os.environ.update(env or {})
        with open(path) as stream:
            return dict(ProfileConfigFileParser().parse(stream))
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_default_profile_limits_gpu_jobs_to_the_gpus_present(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # no CUDA_VISIBLE_DEVICES: the GPUs nvidia-smi lists (a fake one listing two), or none without it
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    (fake / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    assert _parse_profile(ROOT / "profiles/default/config.yaml")["resources"] == ["gpu=2"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert _parse_profile(ROOT / "profiles/default/config.yaml")["resources"] == ["gpu=0"]
    prof = _parse_profile(ROOT / "profiles/default/config.yaml", {"CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert prof["resources"] == ["gpu=3"]
    prof = _parse_profile(ROOT / "profiles/default/config.yaml", {"CUDA_VISIBLE_DEVICES": "-1"})
    assert prof["resources"] == ["gpu=0"]


def test_slurm_profile():
    prof = _parse_profile(ROOT / "profiles/slurm/config.yaml",
                          {"MASKCONNECT_SLURM_PARTITION": "a100", "MASKCONNECT_SLURM_ACCOUNT": "proj"})
    assert prof["executor"] == "slurm"
    assert "slurm_account=proj" in prof["default-resources"]
    # the partition is chosen per job by the rules (maskconnect.slurm), not one for all jobs
    assert not any(r.startswith("slurm_partition") for r in prof["default-resources"])
    assert "resources" not in prof  # SLURM, not a local count, decides how many GPU jobs run
    prof = _parse_profile(ROOT / "profiles/slurm/config.yaml", {"MASKCONNECT_SLURM_PARTITION": "gpu"})
    assert not any(r.startswith("slurm_account") for r in prof["default-resources"])
    import importlib.util

    assert importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None


def test_gpu_jobs_declare_gpu_resources(checkout):
    # (Snakemake shows a job's resources capped at the global limit, which is 0 without GPUs.)
    proc = snakemake(["-n", "--config", "grid=imagenet", "--resources", "gpu=8"], checkout, check=True)
    blocks = [b for b in proc.stdout.split("\n\n") if re.search(r"^(local)?rule (train|evaluate):", b, re.M)]
    train = [b for b in blocks if "rule train:" in b]
    assert train and all("gpu=8" in b for b in train)
    assert all("gpu=1" in b for b in blocks if "rule evaluate:" in b)


def test_jobs_take_runtime_memory_and_partition_from_the_grid(checkout):
    """Training and evaluation jobs carry their run's time limit and memory from the grid, and go to the
    GPU partition only when they ask for GPUs (profiles/slurm; maskconnect.slurm)."""
    env = tool_env(checkout)
    env.update(MASKCONNECT_SLURM_PARTITION="a100", MASKCONNECT_SLURM_CPU_PARTITION="cpux")
    for grid, extra, want in [("imagenet", ["--resources", "gpu=8"], ["runtime=4320", "mem_mb=256000", "slurm_partition=a100"]),
                              ("smoke", [], ["runtime=10", "mem_mb=4000", "slurm_partition=cpux"])]:
        proc = snakemake(["-n", "--config", f"grid={grid}", *extra], checkout, check=True, env=env)
        blocks = [b for b in proc.stdout.split("\n\n") if re.search(r"^rule (train|evaluate):", b, re.M)]
        assert len(blocks) == 2 * len(G.load_grid(grid).runs)
        for b in blocks:
            assert all(w in b for w in want), (grid, b)


# ---- conda environments -------------------------------------------------------------------------------

ENV_FILES = sorted((ROOT / "pipelines" / "envs").glob("*.yaml"))


def test_rules_use_the_env_files():
    used = set()
    for smk in (ROOT / "pipelines" / "rules").glob("*.smk"):
        used |= set(re.findall(r'"(\.\./envs/[^"]+\.yaml)"', smk.read_text()))
    assert ENV_FILES and used
    for rel in used:
        assert (ROOT / "pipelines" / "rules" / rel).resolve() in [p.resolve() for p in ENV_FILES]


# The env files' contents (versions agree with requirements/constraints.txt, paths) are tested in test_envs.py.


# ---- DVC ----------------------------------------------------------------------------------------------

def test_dvc_yaml_is_generated_from_the_default_grid(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert (ROOT / "dvc.yaml").read_text() == G.dvc_yaml(G.DEFAULT_GRID), \
        "dvc.yaml is stale: run `maskconnect grid dvc --grid demo > dvc.yaml`"


def test_dvc_yaml_declares_params_metrics_plots():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    demo = G.load_grid("demo")
    train = {k: v for k, v in stages.items() if k.startswith("train-")}
    assert len(train) == DEMO_RUNS
    for run in demo.runs:
        st = train[f"train-{run.slug}"]
        assert st["cmd"] == G.train_command(run)
        assert list(st["params"][0]) == ["src/maskconnect/grids/demo.yaml"]
        assert f"entries.{run.entry - 1}.connectivity" in st["params"][0]["src/maskconnect/grids/demo.yaml"]
        # per-run files are persisted outputs; the grid's compact summary is the metric (what DVC shows)
        assert st["outs"] == [{f"{run.run_dir}/metrics.json": {"cache": False, "persist": True}},
                              {f"{run.run_dir}/history.csv": {"cache": False, "persist": True}}]
    assert len([k for k in stages if k.startswith("evaluate-")]) == DEMO_RUNS
    report = stages["report-demo"]
    assert report["outs"] == [{"paper_tables/demo": {"cache": False}}]  # committed tables: not in the DVC cache
    assert {"results/metrics/demo.json": {"cache": False}} in stages["aggregate-demo"]["outs"]
    assert stages["aggregate-demo"]["metrics"][0] == {"results/metrics/demo/digits-20-4-8-full-K8.json": {"cache": False}}


def test_dvc_stage_list(checkout):
    proc = dvc(["stage", "list"], checkout, check=True)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert len([n for n in names if n.startswith("train-")]) == DEMO_RUNS
    assert {"tracking_init", "prepare_data-digits", "aggregate-demo", "report-demo"} <= set(names)


def test_dvc_yaml_for_the_paper_grid(tmp_path, monkeypatch):
    """`maskconnect grid dvc --grid paper` gives a valid pipeline with 211 training stages."""
    root = fresh_checkout(tmp_path / "c")
    proc = run([BIN / "maskconnect", "grid", "dvc", "--grid", "paper", "--out", "dvc.yaml"], root, check=True)
    assert proc.returncode == 0
    names = [ln.split()[0] for ln in dvc(["stage", "list"], root, check=True).stdout.splitlines() if ln.strip()]
    assert len([n for n in names if n.startswith("train-")]) == PAPER_COUNTS["paper"]
    assert {f"report-{p}" for p in G.load_grid("paper").parts} <= set(names)


def test_dvc_is_initialised_without_remote():
    config = (ROOT / ".dvc" / "config").read_text()
    assert "autostage = false" in config and "analytics = false" in config
    assert "remote" not in config


# ---- what DVC shows ----------------------------------------------------------------------------------

def test_dvc_metrics_are_one_compact_file_per_configuration_and_per_run_files_are_outputs():
    grid = G.load_grid("demo")
    stages = G.dvc_stages(grid)
    declared = [next(iter(m)) for s in stages.values() for m in s.get("metrics", [])]
    configs = sorted({G.config_of(r.run_id) for r in grid.runs})
    assert sorted(declared) == sorted(G.config_metrics_file("demo", c) for c in configs) and len(declared) == 6
    for run in grid.runs:  # per-run files stay outputs (persisted across re-runs), not metrics
        outs = [next(iter(o)) for o in stages[f"train-{run.slug}"]["outs"]]
        assert outs == [f"{run.run_dir}/metrics.json", f"{run.run_dir}/history.csv"]
        assert "metrics" not in stages[f"evaluate-{run.slug}"] and "plots" not in stages[f"train-{run.slug}"]
    # the committed demo summary: `dvc metrics show` prints a Path column and these five, one row per file
    for c in configs:
        m = json.loads((ROOT / G.config_metrics_file("demo", c)).read_text())
        assert set(m) == {"top1", "ci95", "n", "params_train_M", "params_test_M"} and m["n"] == 3, (c, m)


def test_dvc_plots_overlay_the_runs_of_each_configuration_and_the_k_effect():
    grid = G.load_grid("demo")
    plots = {k: v for p in G.dvc_plots(grid) for k, v in p.items()}
    curves = {k: v for k, v in plots.items() if "/curves/" in k}
    assert len(curves) == 6
    for plot in curves.values():
        assert plot["x"] == "epoch" and len(plot["y"]) == 3 and set(plot["y"].values()) == {"test_top1"}
    keffect = plots["demo/k-effect/digits-20-4-8"]
    assert keffect["x"] == "K" and list(keffect["y"]) == [
        G.keffect_file("demo", "digits", "20,4,8", c) for c in ("learned", "random", "full")]
    agg = G.dvc_stages(grid)["aggregate-demo"]
    assert set(keffect["y"]) <= {next(iter(o)) for o in agg["outs"]}  # the aggregate stage writes them
    text = (ROOT / "dvc.yaml").read_text()
    assert yaml.safe_load(text)["plots"] == G.dvc_plots(grid)


def _demo_runs(root: Path, skip=lambda r: False) -> dict[str, float]:
    """A metrics.json (and, for seed 0, an eval.json) in every run directory of the demo grid under
    ``root`` (the working folder), with top-1s that give non-round means and intervals."""
    grid = G.load_grid("demo")
    top1 = {0: 90.0, 1: 92.125, 2: 97.3}
    made = {}
    for r in grid.runs:
        if skip(r):
            continue
        d = root / r.run_dir
        d.mkdir(parents=True)
        value = top1[r.seed] + (r.fan_in or 8) / 3
        (d / "metrics.json").write_text(json.dumps({
            "status": "complete", "dataset": "digits", "arch": "20,4,8", "connectivity": r.connectivity,
            "fan_in": r.fan_in, "seed": r.seed, "top1": value, "top5": 99.0, "best_top1": value,
            "params_train": 273_123, "params_test": 200_000 + 7 * r.seed, "flops": 5_000_000, "epochs": 18,
            "wall_time_s": 30.0 + r.seed, "stage_width": 32}))
        if r.seed == 0:
            (d / "eval.json").write_text(json.dumps({"model": {"test_top1": value}, "pruned": {"test_top1": value - 1},
                                                     "params_train": 273_123, "params_test": 200_000,
                                                     "flops_test": 4_000_000}))
        made[r.run_id] = value
    return made


def test_compact_summary_values(tmp_path, monkeypatch):
    """Mean, 95% Student-t half-width (scipy, computed here), n and parameters per configuration, from
    the run directories through grid collect; the K-effect CSVs list each K's mean; a configuration with
    no complete run is written with n = 0."""
    from scipy import stats

    from maskconnect.report.aggregate import collect
    from maskconnect.report.compact import write_summary

    monkeypatch.chdir(tmp_path)
    top1 = _demo_runs(tmp_path, skip=lambda r: r.connectivity == "random" and r.fan_in == 4)  # not complete yet
    grid = G.load_grid("demo")
    collected = collect(grid)
    assert collected["runs_complete"] == 15 and len(collected["missing"]) == 3
    run = collected["runs"]["digits/20-4-8/learned-K2/seed0"]
    assert run["eval_top1"] == top1["digits/20-4-8/learned-K2/seed0"] and run["pruned_top1"] == run["eval_top1"] - 1
    assert run["flops_test"] == 4_000_000 and collected["runs"]["digits/20-4-8/learned-K2/seed1"]["pruned_top1"] is None
    write_summary(grid, "demo", collected, tmp_path / "summary")
    m = json.loads((tmp_path / "summary" / "digits-20-4-8-learned-K2.json").read_text())
    values = [top1[f"digits/20-4-8/learned-K2/seed{s}"] for s in (0, 1, 2)]
    half = stats.t.ppf(0.975, 2) * stats.tstd(values) / 3 ** 0.5
    params_test = (200_000 + 200_007 + 200_014) / 3  # seed 0's from eval.json
    assert m == {"top1": round(sum(values) / 3, 3), "ci95": round(half, 3), "n": 3, "params_train_M": 0.2731,
                 "params_test_M": round(params_test / 1e6, 4)}
    assert json.loads((tmp_path / "summary" / "digits-20-4-8-random-K4.json").read_text())["n"] == 0
    rows = (tmp_path / "summary" / "keffect-digits-20-4-8-learned.csv").read_text().splitlines()
    assert rows[0] == "K,top1,ci95,n" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "4"]
    assert rows[2] == f"2,{m['top1']},{m['ci95']},3"
    random_rows = (tmp_path / "summary" / "keffect-digits-20-4-8-random.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in random_rows] == ["2"]


def test_dvc_metrics_k_effect_csvs_and_tables_agree_to_the_last_digit(tmp_path, monkeypatch):
    """One summary: the DVC metrics files and the K-effect CSVs of grid collect, and the report's
    summary.csv and tables, made from the same demo run directories, show the same numbers."""
    from maskconnect.cli import main
    from maskconnect.report import build_report

    monkeypatch.chdir(tmp_path)
    _demo_runs(tmp_path)
    assert main(["grid", "collect", "--grid", "demo", "--out", "m.json", "--summary-dir", "summary"]) == 0
    build_report(tmp_path / "results", tmp_path / "report", grid="demo")
    with open(tmp_path / "report" / "summary.csv", newline="") as f:
        summary = {(r["connectivity"], int(r["fan_in"])): r for r in csv.DictReader(f)}
    markdown = "\n".join(p.read_text() for p in (tmp_path / "report" / "tables").rglob("*.md"))
    checked = 0
    for path in sorted((tmp_path / "summary").glob("digits-20-4-8-*.json")):
        conn, k = path.stem.rsplit("-", 2)[1:]
        dvc, row = json.loads(path.read_text()), summary[(conn, int(k[1:]))]
        assert dvc["top1"] == round(float(row["top1_mean"]), 3) and dvc["n"] == int(row["n"])
        assert dvc["ci95"] == round(float(row["top1_ci95"]), 3)
        assert dvc["params_test_M"] == round(float(row["params_test_M"]), 4)
        with open(tmp_path / "summary" / f"keffect-digits-20-4-8-{conn}.csv", newline="") as f:
            series = {int(r["K"]): r for r in csv.DictReader(f)}
        assert series[int(k[1:])] == {"K": k[1:], "top1": str(dvc["top1"]), "ci95": str(dvc["ci95"]), "n": str(dvc["n"])}
        assert f"{float(row['top1_mean']):.2f} ± {float(row['top1_ci95']):.2f}" in markdown
        checked += 1
    assert checked == 6

"""What each pipeline step depends on (pipelines/README.md, "What each step depends on"): the recipes in
their one file, the recipe keys and the code each step declares, and what Snakemake and DVC rerun when
one of them changes.

The workflow checks run on the demo grid (18 runs) in a fresh copy of the project whose outputs are
faked: every output of every step is written as an empty file, then `snakemake --touch --forceall`
records the jobs' params as if they had run and `dvc commit --force` records the stages' deps and
params. No training; `snakemake -n` and `dvc status` then say what a change reruns.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import yaml

from maskconnect import experiments as G
from maskconnect import provenance
from maskconnect.errors import ConfigError
from maskconnect.training import schedule
from maskconnect.training.config import TrainConfig
from test_pipeline import DEMO_RUNS, ROOT, dvc, fresh_checkout, job_counts, run, snakemake

RECIPES_FILE = "src/maskconnect/recipes.yaml"
MASK_KEYS = {"mask_lr", "mask_rule", "settle_epochs"}   # what recipes.yaml says learned runs alone read


# ---- the recipes' one home --------------------------------------------------------------------------

def test_the_recipes_are_the_shipped_file():
    assert G.recipes_file() == RECIPES_FILE and schedule.RECIPES_PATH == ROOT / RECIPES_FILE
    assert schedule.RECIPES == yaml.safe_load((ROOT / RECIPES_FILE).read_text())
    assert {"paper", "paper-imagenet", "demo", "smoke"} <= set(schedule.RECIPES)
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "recipes.yaml" in package_data["maskconnect"]  # installed beside schedule.py's package


@pytest.mark.parametrize("edit,words", [
    (lambda r: r["demo"].pop("settle_epochs"), ["recipes.demo", "missing: ['settle_epochs']"]),
    (lambda r: r["smoke"].update(mask_lrr=1.0), ["recipes.smoke", "unknown: ['mask_lrr']"]),
    (lambda r: r["paper"].update(milestone_fracs=[0.5, 1.5]), ["recipes.paper.milestone_fracs", "(0, 1)"]),
    (lambda r: r["demo"].update(settle_epochs=-1), ["recipes.demo.settle_epochs", "integer >= 0"]),
])
def test_a_bad_recipes_file_is_refused_naming_the_recipe_and_key(edit, words, tmp_path):
    recipes = yaml.safe_load((ROOT / RECIPES_FILE).read_text())
    edit(recipes)
    path = tmp_path / "recipes.yaml"
    path.write_text(yaml.safe_dump(recipes))
    with pytest.raises(ConfigError) as info:
        schedule.load_recipes(path)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# A value for each recipe key that changes what the key decides for every recipe of the grids (e.g.
# milestone_fracs [0.9] moves the smoke recipe's only drop past its 2 epochs, the demo's to epoch 16).
CHANGED = {"epochs": lambda v: v + 1, "batch_size": lambda v: v * 2, "lr": lambda v: v * 2,
           "momentum": lambda v: v / 2, "weight_decay": lambda v: v * 2, "milestone_fracs": lambda v: [0.9],
           "mask_rule": lambda v: "clip", "mask_lr": lambda v: 0.5 if v is None else v * 2,
           "settle_epochs": lambda v: v + 1}


def test_a_run_declares_exactly_the_recipe_keys_that_change_it(monkeypatch):
    """For every run of every packaged grid (and runs that override recipe values), the recipe keys it
    declares (TrainConfig.recipe_keys: DVC params) are exactly those whose change changes its identity
    (Snakemake's param): a Fixed-Full run declares no mask key, a run that sets its own epochs not
    epochs."""
    assert set(CHANGED) == set(schedule.RECIPE_KEYS)
    configs = {}
    for name in G.available_grids():
        for r in G.load_grid(name).runs:
            cfg = G.train_config(r)
            configs.setdefault((r.recipe, r.connectivity, r.train), cfg)
    base = dict(dataset="digits", arch="20,4,8", connectivity="learned", fan_in=2, recipe="demo")
    for extra in ({"epochs": 4}, {"batch_size": 32}, {"batch_size": 32, "lr": 0.2}, {"freeze_epoch": 3, "mask_lr": 1.0},
                  {"milestones": [2], "mask_rule": "clip"}):
        configs[("demo", "learned", tuple(extra))] = TrainConfig(**base, **extra)
    assert len(configs) > 15
    for (recipe, conn, _), cfg in configs.items():
        declared = set(cfg.recipe_keys())
        before = cfg.resolved().identity()
        changing = set()
        for key in schedule.RECIPE_KEYS:
            with monkeypatch.context() as m:
                m.setitem(schedule.RECIPES[recipe], key, CHANGED[key](schedule.RECIPES[recipe][key]))
                if cfg.resolved().identity() != before:
                    changing.add(key)
        assert declared == changing, (recipe, conn, cfg)
        if conn != "learned":
            assert not declared & MASK_KEYS and {"epochs", "lr"} <= declared


def test_dvc_stages_declare_recipe_keys_and_code_and_snakemake_gets_the_same_facts():
    grid = G.load_grid("demo")
    stages = G.dvc_stages(grid)
    train_code = {f"src/maskconnect/{p}" for p in ("specs.py", "connectivity.py", "mask_rules.py", "models", "kernels",
                                                   "data", "training")}
    for r in grid.runs:
        st = stages[f"train-{r.slug}"]
        recipe_keys = next(p[RECIPES_FILE] for p in st["params"] if RECIPES_FILE in p)
        assert recipe_keys == G.recipe_params(r) == [f"demo.{k}" for k in G.train_config(r).recipe_keys()]
        assert ("demo.mask_lr" in recipe_keys) == (r.connectivity == "learned")
        assert train_code <= set(st["deps"]) and train_code <= set(stages[f"evaluate-{r.slug}"]["deps"])
        assert not any("report" in d for d in st["deps"])
    assert "src/maskconnect/report" in stages["report-demo"]["deps"] and "src/maskconnect/report" in stages["aggregate-demo"]["deps"]
    assert not train_code & set(stages["report-demo"]["deps"])
    assert train_code <= set(G.dvc_stages(G.load_grid("cifar100"))["preflight"]["deps"])  # it proves that code's step
    # the code parts exist (a missing one would make DVC fail and the digest raise)
    for step, parts in provenance.STEP_CODE.items():
        assert all((provenance.PACKAGE_DIR / p).exists() for p in parts), step
        assert G.code_deps(step) == [f"src/maskconnect/{p}" for p in parts]
    # the Snakefile's params: the identity digest (equal configs, equal digests), the code digests
    learned = [r for r in grid.runs if r.connectivity == "learned"]
    assert len({G.config_digest(r) for r in grid.runs}) == DEMO_RUNS
    assert G.config_digest(learned[0]) == G.config_digest(learned[0])
    assert len({G.code_digest(s) for s in ("train", "aggregate", "report")}) == 3


def test_code_digest_is_of_content_not_of_caches_or_times(tmp_path):
    import shutil

    pkg = tmp_path / "maskconnect"
    shutil.copytree(provenance.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = {s: provenance.code_digest(s, pkg) for s in provenance.STEP_CODE}
    assert before["train"] == provenance.code_digest("train")  # the path of the package is not part of it
    (pkg / "report" / "__pycache__").mkdir()
    (pkg / "report" / "__pycache__" / "stats.cpython-311.pyc").write_bytes(b"\0cache")
    (pkg / "models" / "resnext.py").touch()
    assert {s: provenance.code_digest(s, pkg) for s in provenance.STEP_CODE} == before
    text = (pkg / "report" / "stats.py").read_text()
    (pkg / "report" / "stats.py").write_text(text.replace("e", "E", 1))  # in its docstring; the same size
    after = {s: provenance.code_digest(s, pkg) for s in provenance.STEP_CODE}
    assert after["train"] == before["train"] and after["evaluate"] == before["evaluate"]
    assert after["report"] != before["report"] and after["aggregate"] != before["aggregate"]


# ---- what the workflows rerun (demo grid, outputs faked) ------------------------------------------------

def fake_outputs(root: Path, grid: G.Grid) -> None:
    """Every output of every step of ``grid`` (DVC's outs and metrics, a superset of Snakemake's), empty."""
    tables = {G.tables_dir(p) for p in grid.parts}
    for stage in G.dvc_stages(grid).values():
        for item in stage.get("outs", []) + stage.get("metrics", []):
            path = root / next(iter(item))
            if next(iter(item)) in tables:
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n")


@pytest.fixture(scope="module")
def faked_demo(tmp_path_factory):
    """A fresh checkout (one git commit) of the demo grid whose steps both tools take as done."""
    root = fresh_checkout(tmp_path_factory.mktemp("faked"))
    run(["git", "add", "-A"], root, check=True)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "checkout"], root, check=True)
    fake_outputs(root, G.load_grid("demo"))
    snakemake(["--touch", "--forceall", "--cores", "1"], root, check=True)
    dvc(["commit", "--force"], root, check=True)
    assert "Nothing to be done" in snakemake(["-n"], root, check=True).stdout
    assert "up to date" in dvc(["status"], root, check=True).stdout
    return root


@contextlib.contextmanager
def edited(path: Path, old: str, new: str):
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))
    try:
        yield
    finally:
        path.write_text(text)


def _jobs(output: str, rule: str) -> set[str]:
    """The runs (wildcard ``run``) of a `snakemake -n` output's jobs of ``rule``."""
    return {m.group(1) for block in output.split("\n\n") if re.search(rf"^(local)?rule {rule}:", block, re.M)
            for m in [re.search(r"wildcards: grid=\w+, run=(\S+)", block)] if m}


def _dvc_changed(root: Path) -> set[str]:
    out = dvc(["status"], root, check=True).stdout
    return {line.rstrip(":") for line in out.splitlines() if re.match(r"^[\w-]+:$", line)}


@pytest.mark.slow
def test_a_changed_mask_lr_reruns_the_learned_runs_only(faked_demo):
    """The issue's check: the demo recipe's mask_lr changes; `snakemake -n` lists the 9 learned runs' jobs
    and what depends on them, no Fixed-Full or Fixed-Random job; `dvc status` the same 9 training stages;
    `dvc params diff` the change."""
    root = faked_demo
    learned = {r.run_id for r in G.load_grid("demo").runs if r.connectivity == "learned"}
    assert len(learned) == 9
    with edited(root / RECIPES_FILE, "  mask_lr: 2.0\n", "  mask_lr: 1.5\n"):
        dry = snakemake(["-n"], root, check=True).stdout
        assert _jobs(dry, "train") == learned and _jobs(dry, "evaluate") == learned, dry[-3000:]
        assert job_counts(dry) == {"train": 9, "evaluate": 9, "aggregate": 1, "report": 1, "tracking_sync": 1,
                                   "tracking_report": 1, "all": 1}
        assert _dvc_changed(root) == {f"train-{rid.replace('/', '-')}" for rid in learned}
        diff = dvc(["params", "diff"], root, check=True).stdout
        assert re.search(r"src/maskconnect/recipes\.yaml\s+demo\.mask_lr\s+2\.0\s+1\.5", diff), diff
    assert "Nothing to be done" in snakemake(["-n"], root, check=True).stdout


@pytest.mark.slow
def test_a_report_module_edit_reruns_no_training_and_a_model_edit_every_run(faked_demo):
    root = faked_demo
    stats = root / "src/maskconnect/report/stats.py"
    with edited(stats, '"""', '"""A docstring edit. '):
        dry = snakemake(["-n"], root, check=True).stdout
        assert job_counts(dry) == {"aggregate": 1, "report": 1, "tracking_report": 1, "all": 1}, dry[-3000:]
        assert _dvc_changed(root) == {"aggregate-demo", "report-demo"}
    # Python's caches written into the package by an import are no change of its code
    cache = root / "src/maskconnect/report/__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "stats.cpython-311.pyc").write_bytes(b"\0")
    assert not job_counts(snakemake(["-n"], root, check=True).stdout)
    assert not _dvc_changed(root)
    with edited(root / "src/maskconnect/models/resnext.py", '"""', '"""A docstring edit. '):
        dry = snakemake(["-n"], root, check=True).stdout
        assert job_counts(dry)["train"] == job_counts(dry)["evaluate"] == DEMO_RUNS
        assert {s for s in _dvc_changed(root) if s.startswith("train-")} == {f"train-{r.slug}" for r in G.load_grid("demo").runs}

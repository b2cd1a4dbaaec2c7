"""Experiment grids: the one definition of which runs a pipeline trains, and where they live.

A grid is a YAML file in ``maskconnect/grids/`` (package data), validated by
``schemas/grid.schema.json`` and then by meaning (dataset known, {D,w,C} valid for it, 1 <= K <= C,
seeds given, no run twice). Each entry lists a model, a connectivity kind, fan-ins K and seeds; the
grid expands into one :class:`Run` per (entry, K, seed). ``paper`` is the union of other grids
(``include:``); its runs keep their own grid's directories.

Both workflow engines read this module, never restate it:

* the Snakefile imports it (``from maskconnect.grid import load_grid, ...``) to compute its targets;
* ``dvc.yaml`` is generated from it (``maskconnect grid dvc --grid demo > dvc.yaml``), and a test
  checks that the committed file equals the generated one.

A run's name and its paths come from two functions only: :func:`run_id` and :func:`run_dir`. The
command of every pipeline step is built here too (``*_command``), so a Snakemake job and its DVC
stage run the same command line.

This module imports neither torch nor the workflow engines (the Snakefile and profiles import it).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

from .errors import ConfigError

GRIDS_DIR = Path(__file__).with_name("grids")
SCHEMA_PATH = Path(__file__).with_name("schemas") / "grid.schema.json"
DEFAULT_GRID = "demo"

# Output layout (relative to the project root, where snakemake / dvc run).
RESULTS = "results"
RUNS_ROOT = f"{RESULTS}/runs"
TABLES = "paper_tables"
DATA_DIR = "data"

# Entry fields and their defaults (schemas/grid.schema.json documents each).
SETTINGS_DEFAULTS = {"recipe": "demo", "device": "auto", "gpus": 0, "threads": 1, "runtime": None, "mem_mb": None}

# Training overrides with their own `maskconnect train` option; any other key goes through --set.
TRAIN_OPTIONS = {
    "epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "lr_reference_batch": "--lr-reference-batch",
    "momentum": "--momentum", "weight_decay": "--weight-decay", "milestones": "--milestones",
    "freeze_epoch": "--freeze-epoch", "mask_lr": "--mask-lr", "mask_init": "--mask-init", "mask_rule": "--mask-rule",
    "stage_width": "--stage-width", "workers": "--workers", "amp": "--amp",
}


# ---- names and paths: one home each -------------------------------------------------------------

def run_id(dataset: str, arch, connectivity: str, fan_in: int, seed: int) -> str:
    """The name of a run, e.g. ``cifar100/29-8-8/learned-K4/seed0`` (docs/run_format.md).

    ``arch`` is "D,w,C" (or a (D, w, C) tuple); ``fan_in`` of a ``full`` run is C.
    """
    from .specs import parse_arch

    d, w, c = parse_arch(arch)
    return f"{dataset}/{d}-{w}-{c}/{connectivity}-K{int(fan_in)}/seed{int(seed)}"


def run_dir(grid, entry) -> str:
    """``results/runs/<grid>/<run_id>``. ``grid`` is a grid name (or a :class:`Grid`); ``entry`` is a
    :class:`Run` or a mapping with dataset, arch, connectivity, fan_in and seed."""
    name = grid.name if isinstance(grid, Grid) else str(grid)
    if isinstance(entry, Run):
        rid = entry.run_id
    else:
        rid = run_id(entry["dataset"], entry["arch"], entry["connectivity"], entry["fan_in"], entry["seed"])
    return f"{RUNS_ROOT}/{name}/{rid}"


def data_marker(dataset: str) -> str:
    """Written by ``maskconnect prepare-data`` once a dataset is ready."""
    return f"{DATA_DIR}/{dataset}.prepared.json"


def tracking_marker() -> str:
    """Written once the MLflow store exists (before any training job starts)."""
    return f"{RESULTS}/tracking/store.txt"


def sync_marker(grid: str) -> str:
    return f"{RESULTS}/tracking/{grid}.synced.txt"


def report_marker(grid: str) -> str:
    return f"{RESULTS}/tracking/{grid}.report.txt"


def metrics_file(grid: str) -> str:
    """The grid's aggregated metrics (``maskconnect grid collect``): one JSON, committed."""
    return f"{RESULTS}/metrics/{grid}.json"


def expected_file(grid: str) -> str:
    """The grid's run ids, one per line (the report lists the missing ones)."""
    return f"{RESULTS}/metrics/{grid}.runs.txt"


def summary_dir(grid: str) -> str:
    """The grid's compact results (``grid collect --summary-dir``): one small metrics file per
    configuration (DVC's metrics: ``dvc metrics show`` prints one row each) and the K-effect series."""
    return f"{RESULTS}/metrics/{grid}"


def config_of(run_id_text: str) -> str:
    """The configuration of a run id: the run id less its seed (``digits/20-4-8/learned-K2``)."""
    return run_id_text.rsplit("/", 1)[0]


def config_metrics_file(grid: str, config: str) -> str:
    """A configuration's compact metrics: top-1 mean, 95% CI half-width, n, parameters train/test."""
    return f"{summary_dir(grid)}/{config.replace('/', '-')}.json"


def keffect_file(grid: str, dataset: str, arch: str, connectivity: str) -> str:
    """Top-1 against the fan-in K of one model and connectivity (CSV: K, top1, ci95, n)."""
    return f"{summary_dir(grid)}/keffect-{dataset}-{arch.replace(',', '-')}-{connectivity}.csv"


def keffect_series(runs: Iterable["Run"]) -> dict[tuple[str, str], list[str]]:
    """(dataset, arch) -> the connectivities whose top-1 against K is drawn (Learned and Fixed-Random,
    with Fixed-Full as the K = C point), for the models of ``runs`` trained at more than one K."""
    ks: dict[tuple[str, str], set] = {}
    kinds: dict[tuple[str, str], set] = {}
    for r in runs:
        ks.setdefault((r.dataset, r.arch), set()).add(r.fan_in)
        kinds.setdefault((r.dataset, r.arch), set()).add(r.connectivity)
    order = ("learned", "random", "full")
    return {key: [c for c in order if c in kinds[key]] for key in ks if len(ks[key]) > 1}


def tables_dir(grid: str) -> str:
    return f"{TABLES}/{grid}"


def log_file(grid: str, step: str, name: str | None = None) -> str:
    return f"{RESULTS}/logs/{grid}/{step}" + (f"/{name}.log" if name else ".log")


def preflight_record(grid: str) -> str:
    """``maskconnect preflight``'s record for a grid; the training jobs of a GPU grid wait for it."""
    return f"{RESULTS}/preflight/{grid}/preflight.json"


def benchmark_file(grid: str, rid: str) -> str:
    return f"{RESULTS}/benchmarks/{grid}/{rid}.tsv"


# Wildcard patterns for Snakemake, built from the same functions (run ids contain '/').
RUN_DIR_PATTERN = f"{RUNS_ROOT}/{{grid}}/{{run}}"
RUN_ID_REGEX = r"[^/]+/[0-9]+-[0-9]+-[0-9]+/(?:full|random|learned)-K[0-9]+/seed[0-9]+"


# ---- runs and grids --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One training run of a grid: a model, its connectivity and fan-in, a seed, how to train it."""

    grid: str           # the grid that defines it (its directory lives under results/runs/<grid>)
    entry: int          # 1-based index of its entry in that grid's file
    label: str
    dataset: str
    arch: str           # "D,w,C"
    connectivity: str
    fan_in: int         # K (C for full)
    seed: int
    recipe: str = "demo"
    device: str = "auto"
    gpus: int = 0
    threads: int = 1
    runtime: int | None = None
    mem_mb: int | None = None
    train: tuple = ()   # ((key, value), ...) recipe overrides, sorted
    source: str = ""    # the grid file

    @property
    def run_id(self) -> str:
        return run_id(self.dataset, self.arch, self.connectivity, self.fan_in, self.seed)

    @property
    def run_dir(self) -> str:
        return run_dir(self.grid, self)

    @property
    def slug(self) -> str:
        """The run id as one name without slashes (DVC stage keys, log names)."""
        return self.run_id.replace("/", "-")

    @property
    def experiment(self) -> str:
        """MLflow experiment: ``maskconnect/<dataset>/<grid>`` (as ``maskconnect track sync`` names it)."""
        return f"maskconnect/{self.dataset}/{self.grid}"

    def train_args(self) -> list[str]:
        """Options of ``maskconnect train`` for this run, except ``--out``."""
        args = ["--dataset", self.dataset, "--arch", self.arch, "--connectivity", self.connectivity]
        if self.connectivity != "full":
            args += ["--fan-in", str(self.fan_in)]
        args += ["--seed", str(self.seed), "--recipe", self.recipe]
        for key, value in self.train:
            text = _cli_value(value)
            if key in TRAIN_OPTIONS:
                args += [TRAIN_OPTIONS[key], text]
            else:
                args += ["--set", f"{key}={json.dumps(value)}"]
        args += ["--device", self.device, "--experiment", self.experiment]
        return args


def _cli_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass
class Grid:
    """A validated, expanded grid. ``parts`` are the grids whose runs it holds (itself, or the
    grids it includes); each part has its own results, metrics and report."""

    name: str
    path: Path
    description: str
    runs: list[Run]
    parts: list[str] = field(default_factory=list)
    ref: str = ""   # how to name it on a command line: the packaged name, or the file's path

    def runs_of(self, part: str) -> list[Run]:
        return [r for r in self.runs if r.grid == part]

    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r.dataset for r in self.runs))


def available_grids() -> list[str]:
    """Names of the packaged grids."""
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def grid_path(grid: str | Path) -> Path:
    """The file of a grid: a packaged name (``demo``) or a path to a YAML file."""
    text = str(grid)
    if text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        path = Path(text)
        if not path.is_file():
            raise ConfigError("grid", text, "an existing grid file (YAML), or one of " + ", ".join(available_grids()))
        return path
    path = GRIDS_DIR / f"{text}.yaml"
    if not path.is_file():
        raise ConfigError("grid", text, "one of " + ", ".join(available_grids()) + ", or a path to a grid file (YAML)")
    return path


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _entry_name(name: str, index: int, entry) -> str:
    """``grid 'cifar100' entry 3 (29,8,8 learned)``: how messages name an entry (1-based)."""
    what = ""
    if isinstance(entry, Mapping):
        bits = [str(entry[k]) for k in ("dataset", "arch", "connectivity") if isinstance(entry.get(k), (str, int))]
        what = f" ({' '.join(bits)})" if bits else ""
    return f"grid {name!r} entry {index}{what}"


def _schema_errors(data, name: str, path: Path) -> None:
    import jsonschema

    errors = sorted(_validator().iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        return
    # a failing "$ref" leaves its properties unevaluated, so "unevaluatedProperties" also fires on the
    # parent; the real cause (e.g. an enum deeper down) is the message to show
    causes = [e for e in errors if e.validator != "unevaluatedProperties"]
    err = jsonschema.exceptions.best_match(causes or errors)
    loc = list(err.absolute_path)
    if len(loc) >= 2 and loc[0] == "entries" and isinstance(loc[1], int):
        where = _entry_name(name, loc[1] + 1, data["entries"][loc[1]])
        loc = loc[2:]
    elif loc and loc[0] == "defaults":
        where, loc = f"grid {name!r} defaults", loc[1:]
    else:
        where = f"grid {name!r}"
    fld = ".".join(map(str, loc)) if loc else None
    raise _GridError(where, fld, err.instance if loc else None, f"{err.message} (schema {SCHEMA_PATH.name}; file {path})")


class _GridError(ConfigError):
    """A :class:`ConfigError` whose message starts with the grid entry it is about and ends with the grid
    file, e.g. ``grid 'cifar100' entry 3 (cifar100 29,8,8 learned): invalid fan_in=9: ... (file grids/x.yaml)``."""

    def __init__(self, where: str, fld: str | None, value, allowed: str, path: Path | str | None = None):
        super().__init__(fld or "entry", value, allowed)
        self.where = where
        text = f"invalid {fld}={value!r}: {allowed}" if fld else allowed
        if path is not None and str(path) not in text:
            text += f" (file {path})"
        self.args = (f"{where}: {text}",)

    def __str__(self) -> str:
        return self.args[0]


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, again: int):
        self.key, self.first, self.again = key, first, again


@lru_cache(maxsize=1)
def _loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last value)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise _DuplicateKey(key, first, key_node.start_mark.line + 1)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


def _read_yaml(path: Path):
    import yaml

    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_loader())  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as e:
        raise ConfigError("grid", str(path), f"each key once in a mapping: {e.key!r} is given on line {e.first} "
                                             f"and again on line {e.again}") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError("grid", str(path), f"a readable YAML file ({e})") from None


# keys of an entry that its train: overrides may not set: the entry (or the pipeline) sets them
_ENTRY_KEYS = {"dataset": "dataset", "arch": "arch", "connectivity": "connectivity", "fan_in": "fan_ins",
               "seed": "seeds", "recipe": "recipe", "device": "device", "experiment": None, "out": None}


class _ArgumentError(Exception):
    pass


@lru_cache(maxsize=1)
def _train_parser():
    """The parser of ``maskconnect train`` itself, raising instead of exiting: a grid's overrides become
    the command line a pipeline job runs, and are checked by the same rules."""
    import argparse

    from .cli import train as train_cli

    sub = argparse.ArgumentParser(prog="maskconnect").add_subparsers()
    train_cli.register(sub)
    parser = sub.choices["train"]

    def error(message):
        raise _ArgumentError(message)

    parser.error = error
    return parser


def _check_train(where: str, path: Path, run: "Run", overrides: Mapping) -> None:
    """Check a run's ``train:`` overrides as ``maskconnect train`` would, before any job: known keys, the
    command line's types, then every rule of ``TrainConfig.resolved`` (ranges, epochs vs milestones and
    freeze_epoch, ...). Torch-free (the Snakefile imports this module)."""
    import difflib
    from dataclasses import fields

    from .config import TrainConfig, config_from_args

    names = {f.name for f in fields(TrainConfig)}
    for key, value in overrides.items():
        if key in _ENTRY_KEYS:
            home = _ENTRY_KEYS[key]
            raise _GridError(where, f"train.{key}", value,
                             f"not a train: override (the entry's {home!r} sets it)" if home else
                             "not a train: override (the pipeline sets it)", path)
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names - set(_ENTRY_KEYS)), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _GridError(where, f"train.{key}", value, f"a training field{hint}: "
                             + ", ".join(sorted(names - set(_ENTRY_KEYS))), path)
    flags = {flag: key for key, flag in TRAIN_OPTIONS.items()}
    try:
        args = _train_parser().parse_args([*run.train_args(), "--out", run.run_dir])
        config_from_args(args).resolved()
    except _ArgumentError as e:
        message = str(e)
        key = next((k for f, k in flags.items() if message.startswith(f"argument {f}:")), None)
        fld = f"train.{key}" if key in overrides else key
        raise _GridError(where, fld, overrides.get(key), f"{message} (as `maskconnect train` reads it)", path) from None
    except ConfigError as e:
        if e.field in overrides:
            raise _GridError(where, f"train.{e.field}", overrides[e.field], e.allowed, path) from None
        raise _GridError(where, e.field, e.value, e.allowed, path) from None


def _expand(name: str, path: Path, data: Mapping) -> list[Run]:
    from .specs import DATASET_LAYOUTS, make_spec

    defaults = dict(data.get("defaults") or {})
    runs: list[Run] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(data["entries"], start=1):
        e = {**SETTINGS_DEFAULTS, **defaults, **raw}
        e["train"] = {**(defaults.get("train") or {}), **(raw.get("train") or {})}
        where = _entry_name(name, i, e)
        dataset = e.get("dataset")
        if dataset not in DATASET_LAYOUTS:
            raise _GridError(where, "dataset", dataset, "one of " + ", ".join(DATASET_LAYOUTS)
                             + " (in the entry or the grid's defaults)", path)
        seeds = e.get("seeds")
        if not seeds:
            raise _GridError(where, "seeds", seeds, "a non-empty list of distinct seeds (in the entry or the grid's defaults)", path)
        conn = e["connectivity"]
        c = int(e["arch"].split(",")[2])
        fan_ins = e.get("fan_ins")
        if conn == "full":
            if fan_ins not in (None, [c]):
                raise _GridError(where, "fan_ins", fan_ins, f"omitted for connectivity 'full' (it uses K = C = {c})", path)
            fan_ins = [c]
        elif not fan_ins:
            raise _GridError(where, "fan_ins", fan_ins, f"a list of fan-ins K with 1 <= K <= C for connectivity {conn!r}", path)
        if e["gpus"] and e["device"] == "cpu":
            raise _GridError(where, "device", "cpu", f"cuda or auto for a job with gpus={e['gpus']}", path)
        if e["device"] == "cuda" and not e["gpus"]:
            raise _GridError(where, "gpus", e["gpus"], "at least 1 for device 'cuda' (the GPU a job reserves)", path)
        for k in fan_ins:
            try:
                make_spec(e["arch"], connectivity=conn, fan_in=k, dataset=dataset)
            except ConfigError as err:
                raise _GridError(where, err.field, err.value, err.allowed, path) from None
            for seed in seeds:
                run = Run(grid=name, entry=i, label=str(e.get("label") or ""), dataset=dataset, arch=e["arch"],
                          connectivity=conn, fan_in=int(k), seed=int(seed), recipe=e["recipe"], device=e["device"],
                          gpus=int(e["gpus"]), threads=int(e["threads"]), runtime=e.get("runtime"),
                          mem_mb=e.get("mem_mb"), train=tuple(sorted(e["train"].items())), source=str(path))
                if run.run_id in seen:
                    raise _GridError(where, "run", run.run_id, f"each run once in a grid; entry {seen[run.run_id]} has it too", path)
                _check_train(where, path, run, e["train"])
                seen[run.run_id] = i
                runs.append(run)
    return runs


def load_grid(grid: str | Path = DEFAULT_GRID, *, _stack: tuple = ()) -> Grid:
    """Load, validate and expand a grid (a packaged name or a path). Raises :class:`ConfigError`
    naming the grid entry and the field on any problem, before anything runs."""
    path = grid_path(grid)
    data = _read_yaml(path)
    label = data.get("name") if isinstance(data, Mapping) and isinstance(data.get("name"), str) else path.stem
    if not isinstance(data, Mapping):
        raise _GridError(f"grid {label!r}", "grid", str(path), "a YAML mapping with 'name' and 'entries'", path)
    _schema_errors(data, label, path)
    name = data["name"]
    ref = name if path.resolve() == (GRIDS_DIR / f"{name}.yaml").resolve() else str(path)
    if "include" in data:
        runs, parts = [], []
        for part in data["include"]:
            if part in _stack or part == name:
                raise _GridError(f"grid {name!r}", "include", part, "grids that do not include themselves", path)
            try:
                sub = load_grid(part, _stack=_stack + (name,))
            except _GridError:
                raise
            except ConfigError as err:
                raise _GridError(f"grid {name!r} include", "include", part, err.allowed, path) from None
            for p in sub.parts:
                if p not in parts:
                    parts.append(p)
                    runs += sub.runs_of(p)
        return Grid(name=name, path=path, description=data.get("description", ""), runs=runs, parts=parts, ref=ref)
    runs = _expand(name, path, data)
    return Grid(name=name, path=path, description=data.get("description", ""), runs=runs, parts=[name], ref=ref)


# ---- pipeline commands: the same text for a Snakemake job and its DVC stage ---------------------------

def launcher(gpus: int) -> str:
    """What a GPU job's command starts with: a free GPU slot (``maskconnect gpu-slot``), and for
    more than one GPU torchrun with one process per GPU. Empty for CPU jobs."""
    if gpus <= 0:
        return ""
    if gpus == 1:
        return "maskconnect gpu-slot --gpus 1 -- "
    return f"maskconnect gpu-slot --gpus {gpus} -- torchrun --standalone --nproc-per-node {gpus} -m "


def _join(args: Iterable[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def prepare_command(dataset: str) -> str:
    return f"maskconnect prepare-data --dataset {dataset} --marker {data_marker(dataset)}"


def tracking_init_command() -> str:
    # (DVC does not create an output's folder; the mkdir goes once `track init` writes a --marker)
    return f"mkdir -p {Path(tracking_marker()).parent.as_posix()} && maskconnect track init > {tracking_marker()}"


def needs_preflight(grid: "Grid", setting: str | bool = "auto") -> bool:
    """Whether the pipeline runs ``maskconnect preflight`` before the grid's training jobs: ``auto``
    (the default) for a grid whose runs go to a GPU, ``true``/``false`` to force it."""
    if isinstance(setting, bool):
        return setting
    if setting not in ("auto", "true", "false"):
        raise ConfigError("preflight", setting, "auto (GPU grids), true or false")
    if setting != "auto":
        return setting == "true"
    return any(r.gpus > 0 or r.device.startswith("cuda") for r in grid.runs)


def preflight_command(grid: "Grid") -> str:
    """The preflight job: one GPU (a GPU grid), the grid's checks, its record."""
    gpus = 1 if any(r.gpus > 0 for r in grid.runs) else 0
    out = Path(preflight_record(grid.name)).parent.as_posix()
    return f"{launcher(gpus)}maskconnect preflight --grid {grid.ref} --out {out}"


def train_command(run: Run) -> str:
    # --replace: when a grid's training settings change, the old run is moved aside, not mixed in.
    return (f"{launcher(run.gpus)}maskconnect train {_join(run.train_args())} --out {run.run_dir} "
            "--replace --progress lines")


def evaluate_command(run: Run) -> str:
    return f"{launcher(min(run.gpus, 1))}maskconnect evaluate --run {run.run_dir} --device {run.device}"


def aggregate_command(grid: Grid, part: str) -> str:
    return (f"maskconnect grid collect --grid {_grid_ref(grid, part)} "
            f"--out {metrics_file(part)} --expected-out {expected_file(part)} --summary-dir {summary_dir(part)}")


def report_command(part: str) -> str:
    return (f"maskconnect report --results {RESULTS} --out {tables_dir(part)} --grid {part} "
            f"--expected {expected_file(part)}")


def tracking_sync_command(grid: Grid, part: str) -> str:
    dirs = " ".join(r.run_dir for r in grid.runs_of(part))
    return f"mkdir -p {Path(sync_marker(part)).parent.as_posix()} && maskconnect track sync {dirs} > {sync_marker(part)}"


def tracking_report_command(part: str) -> str:
    return f"maskconnect track log-report --report-dir {tables_dir(part)} --marker {report_marker(part)}"


def _grid_ref(grid: Grid, part: str) -> str:
    return grid.ref if part == grid.name else part


# ---- dvc.yaml, generated from the grid ---------------------------------------------------------------

# Entry fields that change what a run computes (and so its `maskconnect train` command); a DVC train
# stage declares them as params of the grid file, so `dvc params diff` shows what changed.
RUN_PARAM_KEYS = ("dataset", "arch", "connectivity", "recipe", "device", "gpus", "train")
DVC_HEADER = """\
# Generated from the grid {name!r} ({source}) by
#     maskconnect grid dvc --grid {ref} > dvc.yaml
# Do not edit: change the grid file and regenerate. tests/test_pipeline.py checks that this file
# equals the generated one. Each stage runs the command of the Snakemake rule of the same name
# (pipelines/rules/*.smk); stage names are <rule>-<run id with '-' for '/'>.
"""


def _project_path(path: Path) -> str:
    """``path`` relative to the project root (the current directory) if it lies inside, else as is."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _param_keys(run: Run, data: Mapping) -> list[str]:
    defaults = data.get("defaults") or {}
    entry = data["entries"][run.entry - 1]
    return ([f"defaults.{k}" for k in RUN_PARAM_KEYS if k in defaults]
            + [f"entries.{run.entry - 1}.{k}" for k in RUN_PARAM_KEYS if k in entry])


def dvc_stages(grid: Grid) -> dict:
    """The ``stages:`` of dvc.yaml for ``grid``: the Snakemake DAG with one stage per job."""
    nocache = {"cache": False}
    stages: dict = {}
    for ds in grid.datasets():
        stages[f"prepare_data-{ds}"] = {"cmd": prepare_command(ds), "outs": [{data_marker(ds): dict(nocache)}]}
    stages["tracking_init"] = {"cmd": tracking_init_command(), "outs": [{tracking_marker(): dict(nocache)}]}
    preflight = needs_preflight(grid)
    if preflight:  # a failed check (exit 1) stops `dvc repro` before any training stage
        stages["preflight"] = {"cmd": preflight_command(grid), "deps": [_project_path(grid.path)],
                               "outs": [{preflight_record(grid.name): dict(nocache)}]}
    files = {}
    for part in grid.parts:
        runs = grid.runs_of(part)
        if runs:
            files[part] = _read_yaml(Path(runs[0].source))
        for run in runs:
            source = _project_path(Path(run.source))
            stages[f"train-{run.slug}"] = {
                "cmd": train_command(run),
                "deps": [data_marker(run.dataset), tracking_marker()] + ([preflight_record(grid.name)] if preflight else []),
                "params": [{source: _param_keys(run, files[part])}],
                # persist: a stage that runs again resumes or skips the run (`maskconnect train` decides).
                # Per-run files are outputs; the grid's compact summary is the metric, and the
                # top-level plots overlay the runs (dvc_plots)
                "outs": [{f"{run.run_dir}/{name}": {"cache": False, "persist": True}}
                         for name in ("metrics.json", "history.csv")],
            }
        for run in runs:
            stages[f"evaluate-{run.slug}"] = {
                "cmd": evaluate_command(run),
                "deps": [f"{run.run_dir}/metrics.json"],
                "outs": [{f"{run.run_dir}/eval.json": dict(nocache)}],
            }
    for part in grid.parts:
        runs = grid.runs_of(part)
        results = [f"{r.run_dir}/{f}" for r in runs for f in ("metrics.json", "eval.json")]
        stages[f"aggregate-{part}"] = {
            "cmd": aggregate_command(grid, part),
            "deps": results,
            "metrics": [{config_metrics_file(part, c): dict(nocache)}
                        for c in dict.fromkeys(config_of(r.run_id) for r in runs)],
            "outs": [{f: dict(nocache)} for f in (metrics_file(part), expected_file(part), *_keffect_files(part, runs))],
        }
        stages[f"report-{part}"] = {
            "cmd": report_command(part),
            "deps": [metrics_file(part), expected_file(part)],
            "outs": [{tables_dir(part): dict(nocache)}],
        }
        stages[f"tracking_sync-{part}"] = {
            "cmd": tracking_sync_command(grid, part),
            "deps": [f"{r.run_dir}/metrics.json" for r in runs] + [tracking_marker()],
            "outs": [{sync_marker(part): dict(nocache)}],
        }
        stages[f"tracking_report-{part}"] = {
            "cmd": tracking_report_command(part),
            "deps": [tables_dir(part), sync_marker(part)],
            "outs": [{report_marker(part): dict(nocache)}],
        }
    return stages


def _keffect_files(part: str, runs: list[Run]) -> list[str]:
    return [keffect_file(part, ds, arch, c) for (ds, arch), kinds in keffect_series(runs).items() for c in kinds]


def dvc_plots(grid: Grid) -> list[dict]:
    """The top-level ``plots:`` of dvc.yaml: per configuration, its runs' test top-1 against the epoch
    overlaid (one line per seed); per model trained at several K, top-1 against K for Learned and
    Fixed-Random (Fixed-Full at K = C)."""
    plots = []
    for part in grid.parts:
        runs = grid.runs_of(part)
        configs: dict[str, list[Run]] = {}
        for r in runs:
            configs.setdefault(config_of(r.run_id), []).append(r)
        for config, members in configs.items():
            plots.append({f"{part}/curves/{config.replace('/', '-')}": {
                "title": f"{part}: {config}, test top-1 (%) per epoch, one line per seed",
                "template": "linear", "x": "epoch", "x_label": "epoch", "y_label": "test top-1 (%)",
                "y": {f"{r.run_dir}/history.csv": "test_top1" for r in members}}})
        for (ds, arch), kinds in keffect_series(runs).items():
            plots.append({f"{part}/k-effect/{ds}-{arch.replace(',', '-')}": {
                "title": f"{part}: {ds} {{{arch}}}, top-1 (%) against the fan-in K (mean over seeds)",
                "template": "linear", "x": "K", "x_label": "fan-in K", "y_label": "test top-1 (%), mean",
                "y": {keffect_file(part, ds, arch, c): "top1" for c in kinds}}})
    return plots


def dvc_yaml(grid: Grid | str = DEFAULT_GRID) -> str:
    """The text of dvc.yaml for ``grid`` (``maskconnect grid dvc``)."""
    import yaml

    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    header = DVC_HEADER.format(name=grid.name, source=_project_path(grid.path), ref=grid.ref)
    body = yaml.safe_dump({"stages": dvc_stages(grid), "plots": dvc_plots(grid)}, sort_keys=False, width=1000,
                          default_flow_style=False)
    return header + body


# ---- aggregate: one metrics file per grid ------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if isinstance(v, (int, float))]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
    return mean, std


def collect(grid: Grid | str, part: str | None = None) -> dict:
    """The grid's results in one JSON object (``maskconnect grid collect``; DVC ``metrics:``).

    ``runs``: per run, the final top-1/top-5 (metrics.json), the pruned model's top-1 and the
    parameters and FLOPs before and after pruning (eval.json). ``configs``: per configuration
    (dataset, model, connectivity, K), the number of seeds and the mean, sample std and best of
    top-1. ``missing``: runs of the grid with no complete metrics.json.
    """
    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    part = part or (grid.parts[0] if len(grid.parts) == 1 else grid.name)
    runs = grid.runs if part == grid.name else grid.runs_of(part)
    per_run, missing, groups = {}, [], {}
    for run in runs:
        m = _read_json(Path(run.run_dir) / "metrics.json")
        if not isinstance(m, dict) or m.get("status", "complete") != "complete":
            missing.append(run.run_id)
            continue
        ev = _read_json(Path(run.run_dir) / "eval.json") or {}
        row = {k: m.get(k) for k in ("top1", "top5", "best_top1", "params_train", "params_test", "flops",
                                     "epochs", "wall_time_s")}
        if ev:  # eval.json: "model" and "pruned" hold test_top1, test_top5, test_loss
            row["eval_top1"] = (ev.get("model") or {}).get("test_top1")
            row["pruned_top1"] = (ev.get("pruned") or ev.get("model") or {}).get("test_top1")
            row["flops_test"] = ev.get("flops_test")
            for k in ("params_train", "params_test", "flops"):
                if ev.get(k) is not None:
                    row[k] = ev[k]
        per_run[run.run_id] = row
        config = run.run_id.rsplit("/", 1)[0]
        groups.setdefault(config, []).append(row)
    configs = {}
    for config, rows in groups.items():
        mean, std = _mean_std([r["top1"] for r in rows])
        top1 = [r["top1"] for r in rows if isinstance(r.get("top1"), (int, float))]
        configs[config] = {"seeds": len(rows), "top1_mean": mean, "top1_std": std,
                           "top1_best": max(top1) if top1 else None,
                           "params_train": rows[0].get("params_train"), "params_test": _mean_std(
                               [r.get("params_test") for r in rows])[0],
                           "flops": rows[0].get("flops")}
    return {"grid": part, "runs_expected": len(runs), "runs_complete": len(per_run), "missing": missing,
            "configs": configs, "runs": per_run}

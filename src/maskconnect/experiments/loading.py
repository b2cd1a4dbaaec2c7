"""Loading a grid file: read the YAML, validate it by ``schemas/grid.schema.json`` and then by meaning
(dataset known, the architecture valid for it, its connectivity and K allowed, seeds given, no run twice, ``train:`` overrides as
``maskconnect train`` reads them), and expand it into a :class:`~.grid.Grid`.

Every problem is a :class:`ConfigError` naming the grid entry and the field, before anything runs.
Imports neither torch nor the workflow engines (the Snakefile and profiles import it).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from ..errors import ConfigError
from .grid import DEFAULT_GRID, GRIDS_DIR, SCHEMA_PATH, SETTINGS_DEFAULTS, TRAIN_OPTIONS, Grid, Run, grid_path


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


def read_yaml(path: Path):
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

    from ..training.options import add_train_arguments

    parser = argparse.ArgumentParser(prog="maskconnect train")
    add_train_arguments(parser)

    def error(message):
        raise _ArgumentError(message)

    parser.error = error
    return parser


def train_config(run: "Run"):
    """The :class:`~maskconnect.training.config.TrainConfig` that the run's job builds: its
    ``maskconnect train`` command line read by that command's own parser (not resolved yet)."""
    from ..training.config import config_from_args

    return config_from_args(_train_parser().parse_args([*run.train_args(), "--out", run.run_dir]))


def _check_train(where: str, path: Path, run: "Run", overrides: Mapping) -> None:
    """Check a run's ``train:`` overrides as ``maskconnect train`` would, before any job: known keys, the
    command line's types, then every rule of ``TrainConfig.resolved`` (ranges, epochs vs milestones and
    freeze_epoch, ...). Torch-free (the Snakefile imports this module)."""
    import difflib
    from dataclasses import fields

    from ..training.config import TrainConfig

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
        train_config(run).resolved()
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
    from ..specs import DATASET_LAYOUTS, baseline_of, make_spec

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
        try:
            baseline, base_k = baseline_of(e["arch"])
        except ConfigError as err:
            raise _GridError(where, "arch", e["arch"], err.allowed, path) from None
        fan_ins = e.get("fan_ins")
        if conn == baseline:
            if fan_ins not in (None, [base_k]):
                raise _GridError(where, "fan_ins", fan_ins, f"omitted for connectivity {conn!r} (it uses K = {base_k})", path)
            fan_ins = [base_k]
        elif not fan_ins:
            raise _GridError(where, "fan_ins", fan_ins, f"a list of fan-ins K for connectivity {conn!r}", path)
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
    data = read_yaml(path)
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

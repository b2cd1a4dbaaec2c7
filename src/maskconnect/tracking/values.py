"""What goes into MLflow: a config as params, the numbers of a row as metrics, tags. mlflow-free.

Keys are made valid MLflow names here (MLflow refuses an invalid or over-long key, it does not fix
one). Values are MLflow's to clean: it truncates over-long param and tag values
(``MLFLOW_TRUNCATE_LONG_VALUES``) and stores NaN metrics.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable, Mapping

MAX_KEY_LENGTH = 250  # MLflow's MAX_ENTITY_KEY_LENGTH
_KEY_BAD_CHARS = re.compile(r"[^\w\-. /:]")
# metrics.json values that identify the run rather than measure it (they are params already)
_NOT_METRICS = frozenset({"seed", "depth", "width", "cardinality", "fan_in", "epochs"})


def key(name: Any) -> str:
    """``name`` as a valid MLflow key."""
    k = _KEY_BAD_CHARS.sub("_", str(name)).strip().lstrip("/")
    k = re.sub(r"/{2,}", "/", k).replace("..", "__")
    return (k or "_")[:MAX_KEY_LENGTH]


def _stringify(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)):
        try:
            return json.dumps(v, default=str, separators=(",", ":"))
        except (TypeError, ValueError):
            return str(v)
    return str(v)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a (nested) config into MLflow params: ``{"a.b": "value"}``, values stringified (lists and
    dicts as compact JSON)."""
    out: dict[str, str] = {}

    def walk(d: Mapping[str, Any], pre: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping) and v:
                walk(v, f"{pre}{k}.")
            else:
                out[key(f"{pre}{k}")] = _stringify(v)

    walk(config, prefix)
    return out


def number(v: Any) -> float | None:
    """A float for a numeric value (numbers, numpy/torch scalars, numeric strings), else None."""
    try:
        return float(v)
    except (TypeError, ValueError):  # ValueError also for a tensor or array of several elements
        return None


def numeric_items(row: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, float]:
    """The numeric values of ``row`` under valid keys, infinite ones left out (MLflow would store them
    as +-1.8e308, which flattens every chart they are in; NaN is kept, MLflow marks it)."""
    skip = set(skip)
    return {key(k): x for k, v in row.items()
            if k not in skip and (x := number(v)) is not None and not math.isinf(x)}


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric top-level values of a metrics.json record that measure the run."""
    return numeric_items(metrics, skip=_NOT_METRICS)


def version_tags(commit: str | None, versions: Mapping[str, Any]) -> dict[str, Any]:
    """The tags of a run's git commit and ``versions`` (as in metrics.json, provenance.versions)."""
    return {"git_commit": commit, "mlflow.source.git.commit": commit, "torch_version": versions.get("torch"),
            "maskconnect_version": versions.get("maskconnect"), "python_version": versions.get("python")}


def clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {key(k): _stringify(v) for k, v in tags.items() if v is not None}


def run_tags(config: Mapping[str, Any], experiment: str | None = None) -> dict[str, str]:
    """The tags a training run is filtered by in the MLflow UI: ``grid`` (from the experiment
    ``maskconnect/<dataset>/<grid>`` the pipeline names), ``dataset``, ``arch``, ``connectivity``
    and ``K`` (also ``fan_in``, its older name)."""
    experiment = experiment or config.get("experiment") or ""
    parts = str(experiment).split("/")
    k = config.get("fan_in")
    tags = {"dataset": config.get("dataset"), "arch": config.get("arch"), "connectivity": config.get("connectivity"),
            "K": None if k is None else str(k), "fan_in": None if k is None else str(k),
            "grid": parts[2] if len(parts) == 3 and parts[0] == "maskconnect" else None}
    return {name: str(v) for name, v in tags.items() if v is not None}

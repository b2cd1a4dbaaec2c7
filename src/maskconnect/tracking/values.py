"""What goes into MLflow: a config as params, the numbers of a row as metrics, tags.

Keys are made valid MLflow names here (MLflow refuses an invalid or over-long key); over-long param
and tag values are MLflow's to truncate (``MLFLOW_TRUNCATE_LONG_VALUES``, on by default: params at
6,000 characters, tags at 8,000). mlflow-free.
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
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, dict)):
        try:
            return json.dumps(v, default=str, separators=(",", ":"))
        except (TypeError, ValueError):
            return str(v)
    if hasattr(v, "item") and not isinstance(v, (int, float, bool)):
        try:
            return str(v.item())
        except Exception:
            pass
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
    """A finite-or-NaN float for a numeric value (numbers, numpy/torch scalars, numeric strings), else None."""
    if hasattr(v, "item") and not isinstance(v, (int, float, str)):
        try:
            v = v.item()
        except Exception:  # not a scalar
            return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip():
        try:
            return float(v)
        except ValueError:
            return None
    return None


def numeric_items(row: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, float]:
    """The numeric (not infinite) values of ``row`` under valid keys."""
    skip = set(skip)
    out = {}
    for k, v in row.items():
        x = None if k in skip else number(v)
        if x is not None and not math.isinf(x):
            out[key(k)] = x
    return out


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric top-level values of a metrics.json record that measure the run."""
    return numeric_items(metrics, skip=_NOT_METRICS)


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

"""Which MLflow run mirrors a run directory, and what it already holds.

``run_dir/mlflow_run.json`` (written atomically) records the MLflow run of the directory::

    {"run_id": "...", "experiment_id": "...", "experiment": "maskconnect/digits/demo",
     "tracking_uri": "sqlite:////.../results/mlflow.db", "run_name": "...",
     "runs": {"<tracking uri>": {"run_id": "...", "experiment_id": "...", "experiment": "..."}}}

The top-level fields name the store the run was last trained against; ``runs`` holds one entry per
store the directory was tracked in or synced to. Without the file, a run is found by its
``maskconnect.run_dir`` tag. Params already on a run and (key, step) metric points already logged are
not logged again, so a resumed run or a second sync duplicates nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..io import atomic_write_json
from .store import log

RUN_FILE = "mlflow_run.json"
RUN_DIR_TAG = "maskconnect.run_dir"


def run_dir_key(run_dir: Path | str) -> str:
    return str(Path(run_dir).expanduser().resolve())


def read_run_file(run_dir: Path) -> dict:
    try:
        data = json.loads((run_dir / RUN_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def run_entry(record: dict, uri: str) -> dict | None:
    """The run ``record`` (an mlflow_run.json) names for the store ``uri``."""
    entry = (record.get("runs") or {}).get(uri)
    if isinstance(entry, dict) and entry.get("run_id"):
        return entry
    if record.get("tracking_uri") == uri and record.get("run_id"):
        return record
    return None


def write_run_file(run_dir: Path, uri: str, entry: dict, *, primary: bool) -> None:
    record = read_run_file(run_dir)
    record.setdefault("runs", {})
    record["runs"][uri] = {k: entry[k] for k in ("run_id", "experiment_id", "experiment")}
    if primary or not record.get("run_id"):
        record.update(entry, tracking_uri=uri)
    record = {**{k: v for k, v in record.items() if k != "runs"}, "runs": record["runs"]}
    atomic_write_json(run_dir / RUN_FILE, record)


def existing_run(client, run_id: str | None):
    """The run ``run_id`` if it exists and is not deleted, else None."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return None if run.info.lifecycle_stage == "deleted" else run


def find_run_by_tag(client, value: str, tag: str = RUN_DIR_TAG, exp_ids: list[str] | None = None):
    """The newest active run tagged ``tag == value`` (default: the run directory's tag) in ``exp_ids``
    (default: every active experiment)."""
    from mlflow.entities import ViewType
    from mlflow.utils import get_results_from_paginated_fn

    if exp_ids is None:
        exp_ids = [e.experiment_id for e in get_results_from_paginated_fn(
            lambda n, token: client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=n, page_token=token), 1000)]
    best = None
    for i in range(0, len(exp_ids), 100):
        chunk = exp_ids[i:i + 100]
        if "'" not in value and "\\" not in value:
            runs = client.search_runs(chunk, filter_string=f"tags.`{tag}` = '{value}'",
                                      run_view_type=ViewType.ACTIVE_ONLY, max_results=1,
                                      order_by=["attributes.start_time DESC"])
        else:  # a value the filter syntax cannot quote: filter here
            runs = [r for r in client.search_runs(chunk, run_view_type=ViewType.ACTIVE_ONLY, max_results=50000)
                    if r.data.tags.get(tag) == value]
        for r in runs:
            if best is None or (r.info.start_time or 0) > (best.info.start_time or 0):
                best = r
    return best


def metric_steps(client, run) -> dict[str, set[int]]:
    """``{key: {steps already logged}}`` for every metric of ``run``."""
    return {k: {m.step for m in client.get_metric_history(run.info.run_id, k)} for k in run.data.metrics}


def new_params(run, params: Mapping[str, str]) -> dict[str, str]:
    """The params not yet on ``run`` (MLflow params are immutable: changed values are skipped)."""
    have = run.data.params
    changed = [k for k, v in params.items() if k in have and have[k] != v]
    if changed:
        log.info("MLflow run %s keeps its earlier values of params %s", run.info.run_id, ", ".join(sorted(changed)[:10]))
    return {k: v for k, v in params.items() if k not in have}


def metric_points(values: Mapping[str, float], step: int, steps: dict[str, set[int]], timestamp_ms: int) -> list:
    """Metric entities for the (key, step) points not yet logged; records them in ``steps``."""
    from mlflow.entities import Metric

    out = []
    for k, v in values.items():
        seen = steps.setdefault(k, set())
        if step not in seen:
            seen.add(step)
            out.append(Metric(k, v, timestamp_ms, step))
    return out


def final_step(metrics: Mapping[str, Any], last_step: int | None) -> int:
    """The step of a run's final metrics: its epochs (else the last step logged)."""
    epochs = metrics.get("epochs")
    if isinstance(epochs, int) and not isinstance(epochs, bool):
        return epochs
    return last_step if last_step is not None else 0


def log_batch(client, run_id: str, *, params: Mapping[str, str] | None = None, metrics: list | None = None,
              tags: Mapping[str, str] | None = None) -> None:
    """One ``log_batch`` call (MLflow splits it into requests within its own limits)."""
    from mlflow.entities import Param, RunTag

    client.log_batch(run_id, metrics=list(metrics or []), params=[Param(k, v) for k, v in (params or {}).items()],
                     tags=[RunTag(k, v) for k, v in (tags or {}).items()])

"""Mirroring after the fact: a run directory into MLflow (``maskconnect track sync``), a report folder
as one MLflow run (``maskconnect track log-report``). Both are idempotent."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

from ..errors import MaskConnectError, RunDirError
from . import runs, store
from .values import clean_tags, final_metrics, flatten_params, number, numeric_items, run_tags, version_tags

SYNC_ARTIFACTS = ("config.json", "history.csv", "metrics.json", "masks.json")
REPORT_TAG = "maskconnect.report_dir"


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object")
    return data


def _read_history(path: Path) -> list[tuple[int, dict[str, float]]]:
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=1):
            epoch = number(row.get("epoch"))
            step = int(epoch) if epoch is not None and not math.isnan(epoch) else i
            rows.append((step, numeric_items(row, skip=("epoch",))))
    return rows


def _defaults(run_dir: Path, config: Mapping[str, Any]) -> tuple[str, str]:
    """The experiment and run name of ``.../runs/<grid>/<rest>``: ``maskconnect/<dataset>/<grid>`` and
    ``<rest>`` (elsewhere ``maskconnect/<dataset>`` and the directory's name)."""
    parts = run_dir.parts
    after = list(parts[len(parts) - parts[::-1].index("runs"):]) if "runs" in parts else []
    dataset = [str(config["dataset"])] if config.get("dataset") else []
    grid = after[:1] if len(after) > 1 else []
    return "/".join(["maskconnect", *dataset, *grid]), "/".join(after[1:]) or run_dir.name


def _mtime_ms(path: Path) -> int | None:
    try:
        return int(path.stat().st_mtime * 1000)
    except OSError:
        return None


def sync_run_dir(run_dir: Path | str, *, uri: str | None = None, experiment: str | None = None) -> str:
    """Mirror a run directory into MLflow, idempotently; returns the MLflow run id.

    Logs config.json as params, history.csv rows (step = epoch) and metrics.json (step = epochs) as
    metrics, tags, and the files ``SYNC_ARTIFACTS``. The run is the one ``mlflow_run.json`` names for
    this store, else the newest run tagged with this directory, else a new one in ``experiment``
    (default ``maskconnect/<dataset>/<grid>``). Raises on failure, within the failure budget.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    config = _read_json(run_dir / "config.json")
    if config is None:
        raise RunDirError(f"{run_dir} has no config.json: not a run directory")
    if not store.have_mlflow():
        raise MaskConnectError("mlflow is not installed (pip install 'maskconnect[track]')")
    uri = store.normalise_uri(uri)
    metrics = _read_json(run_dir / "metrics.json")
    history = _read_history(run_dir / "history.csv")
    record = runs.read_run_file(run_dir)
    run_key = runs.run_dir_key(run_dir)
    entry = runs.run_entry(record, uri)
    default_experiment, default_run_name = _defaults(run_dir, config)
    experiment = experiment or (entry or {}).get("experiment") or default_experiment
    run_name = (entry or {}).get("run_name") or record.get("run_name") or default_run_name

    m = metrics or {}
    tags = clean_tags({
        **version_tags(m.get("git_commit"), m.get("versions") or {}),
        "device": m.get("device") or config.get("device"), "seed": m.get("seed", config.get("seed")),
        "maskconnect.status": m.get("status", "incomplete"), runs.RUN_DIR_TAG: run_key, **run_tags(config, experiment),
    })
    params = flatten_params(config)
    final = final_metrics(metrics) if metrics else {}
    final_step = runs.final_step(m, history[-1][0] if history else None)
    artifacts = [run_dir / n for n in SYNC_ARTIFACTS if (run_dir / n).is_file()]
    now = int(time.time() * 1000)

    def go() -> str:
        client = store.client(uri)
        run = runs.existing_run(client, entry and entry.get("run_id")) or runs.find_run_by_tag(client, run_key)
        created = run is None
        if created:
            exp_id = store.experiment_id(client, uri, experiment)
            run = client.create_run(exp_id, run_name=run_name, tags=tags, start_time=_mtime_ms(run_dir / "config.json"))
        run_id = run.info.run_id
        steps = runs.metric_steps(client, run)
        points = []
        for step, values in history:
            points += runs.metric_points(values, step, steps, now)
        if final:
            points += runs.metric_points(final, final_step, steps, now)
        runs.log_batch(client, run_id, params=runs.new_params(run, params), tags=tags, metrics=points)
        for f in artifacts:
            client.log_artifact(run_id, str(f))
        if metrics is not None and metrics.get("status", "complete") == "complete":
            if run.info.status != "FINISHED":  # a run just created is RUNNING
                client.set_terminated(run_id, status="FINISHED", end_time=_mtime_ms(run_dir / "metrics.json"))
        elif created:
            client.set_terminated(run_id, status="KILLED")  # incomplete directory
        exp_name = experiment if created else client.get_experiment(run.info.experiment_id).name
        runs.write_run_file(run_dir, uri, {"run_id": run_id, "experiment_id": run.info.experiment_id,
                                           "experiment": exp_name, "run_name": run_name}, primary=False)
        return run_id

    return store.retry(go, budget=store.Budget(), http=store.is_http(uri))


def log_report(report_dir: Path | str, *, uri: str | None = None, experiment: str = "maskconnect/reports") -> str:
    """Log a report folder (tables, figures, REPORT.md) as the artifacts of one MLflow run, found
    again by its folder on the next call (idempotent: artifacts are overwritten, not duplicated).
    Numeric values of ``summary.json`` in the folder, if present, are logged as metrics."""
    report_dir = Path(report_dir).resolve()
    if not report_dir.is_dir():
        raise RunDirError(f"report folder {report_dir} does not exist; run `maskconnect report` first")
    uri = store.ensure_store(uri)  # raises without mlflow
    client = store.client(uri)
    exp_id = store.experiment_id(client, uri, experiment)
    found = runs.find_run_by_tag(client, str(report_dir), REPORT_TAG, [exp_id])
    run_id = found.info.run_id if found else client.create_run(
        exp_id, run_name=f"report {report_dir.name}", tags={REPORT_TAG: str(report_dir)}).info.run_id
    summary = report_dir / "summary.json"
    if summary.exists():
        points = runs.metric_points(numeric_items(json.loads(summary.read_text())), 0, {}, int(time.time() * 1000))
        if points:
            runs.log_batch(client, run_id, metrics=points)
    client.log_artifacts(run_id, str(report_dir))
    client.set_terminated(run_id, "FINISHED")
    return run_id

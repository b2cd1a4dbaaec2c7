"""The MLflow mirror of a run while it trains (:class:`Tracker`).

It never raises into the training loop. Without mlflow it is a no-op with one
:class:`~.store.TrackingWarning` per process. When a call fails for good, or the run's budget
(:class:`~.store.Budget`) is spent, it emits ONE warning naming ``maskconnect track sync`` and turns
itself off for the rest of the run. A Tracker on a directory that was tracked before (a resumed run)
continues the MLflow run recorded in ``mlflow_run.json``, unless ``resume=False``.
"""

from __future__ import annotations

import functools
import platform
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import ConfigError
from . import runs, store
from .values import clean_tags, final_metrics, flatten_params, numeric_items, version_tags


def _env_tags() -> dict[str, Any]:
    from ..provenance import git_commit, versions

    return {**version_tags(git_commit(), versions()), "host": platform.node() or None}


def _never_raises(method: Callable) -> Callable:
    """Turn any error in a Tracker method (preparation included) into the one warning."""

    @functools.wraps(method)
    def wrapper(self: "Tracker", *args, **kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as e:
            self._fail(method.__name__, e)

    return wrapper


class Tracker:
    """MLflow mirror of one training run. ``retries``/``backoff``: those of a locked sqlite store
    (:func:`~.store.retry`); ``budget_s``: the run's failure budget (default ``TRACKING_BUDGET_S``)."""

    def __init__(self, run_dir: Path | str, *, experiment: str, run_name: str,
                 uri: str | None = None, enabled: bool = True, resume: bool = True,
                 retries: int = 5, backoff: float = 0.5, budget_s: float | None = None):
        self.run_dir = Path(run_dir)
        self.experiment = experiment
        self.run_name = run_name
        self.uri = store.normalise_uri(uri) if enabled else (uri or "")
        self.enabled = enabled
        self.resume = resume
        self.retries = retries
        self.backoff = backoff
        self.budget = store.Budget(budget_s)
        self.run_id: str | None = None
        self.failed = False
        self._warned = False
        self._steps: dict[str, set[int]] = {}
        self._last_step: int | None = None

    @property
    def active(self) -> bool:
        """True while calls reach MLflow (enabled, mlflow present, no failure so far)."""
        return self.enabled and not self.failed

    def _guard(self, what: str, fn: Callable[[], Any], *, needs_run: bool = True) -> None:
        if not self.active or (needs_run and self.run_id is None):
            return
        if self.budget.left() <= 0:
            self._fail(what, TimeoutError(f"the run's tracking budget of {self.budget.total:g} s is spent"))
            return
        try:
            store.retry(fn, retries=self.retries, backoff=self.backoff, budget=self.budget, http=store.is_http(self.uri))
        except Exception as e:  # never into training
            self._fail(what, e)

    def _fail(self, what: str, e: BaseException) -> None:
        self.failed = True
        if not self._warned and isinstance(e, ConfigError):  # the URI itself: name it as the bad input
            self._warned = True
            store.warn(f"MLflow tracking of {self.run_dir} is off: {e}; training goes on. Once the URI is "
                       f"fixed, catch up with: maskconnect track sync {shlex.quote(str(self.run_dir))} --tracking-uri URI")
        if not self._warned:
            self._warned = True
            at = "" if self.uri == store.normalise_uri(None) else f" --tracking-uri {shlex.quote(self.uri)}"
            store.warn(f"MLflow tracking of {self.run_dir} is off after {what} failed "
                       f"({type(e).__name__}: {store.short(e)}); training goes on. Once the store works, catch up with: "
                       f"maskconnect track sync {shlex.quote(str(self.run_dir))}{at}")

    @_never_raises
    def start(self, params: Mapping[str, Any], tags: Mapping[str, Any]) -> None:
        """Create the MLflow run (or continue the one recorded in ``run_dir/mlflow_run.json``),
        log the flattened ``params`` and the tags (caller's plus git commit, versions, run dir)."""
        if not self.active:
            return
        if not store.have_mlflow():
            self.failed = True
            store.warn_missing_once()
            return
        flat = flatten_params(params or {})
        all_tags = clean_tags({**_env_tags(), **dict(tags or {}), runs.RUN_DIR_TAG: runs.run_dir_key(self.run_dir)})

        def go() -> None:
            client = store.client(self.uri)
            run = runs.existing_run(client, self.run_id)  # a retry after create_run succeeded
            if run is None and self.resume:
                entry = runs.run_entry(runs.read_run_file(self.run_dir), self.uri)
                run = runs.existing_run(client, entry and entry.get("run_id"))
            if run is None:
                exp_id = store.experiment_id(client, self.uri, self.experiment)
                run = client.create_run(exp_id, run_name=self.run_name, tags=all_tags)
            else:
                client.update_run(run.info.run_id, status="RUNNING")
            self._steps = runs.metric_steps(client, run)
            self.run_id = run.info.run_id
            self._last_step = max((max(s) for s in self._steps.values() if s), default=None)
            runs.write_run_file(self.run_dir, self.uri, {
                "run_id": self.run_id, "experiment_id": run.info.experiment_id,
                "experiment": self.experiment, "run_name": self.run_name}, primary=True)
            runs.log_batch(client, self.run_id, params=runs.new_params(run, flat), tags=all_tags)

        self._guard("start", go, needs_run=False)

    @_never_raises
    def log_epoch(self, row: Mapping[str, Any], step: int) -> None:
        """Log the numeric values of a history row at ``step`` (the epoch); points already logged
        for a (key, step) are skipped, so a resumed run does not duplicate them."""
        if not self.active or self.run_id is None:
            return
        step = int(step)
        self._last_step = step if self._last_step is None else max(self._last_step, step)
        points = runs.metric_points(numeric_items(row, skip=("epoch",)), step, self._steps, int(time.time() * 1000))
        if points:
            self._guard(f"log_epoch(step={step})", lambda: runs.log_batch(store.client(self.uri), self.run_id, metrics=points))

    @_never_raises
    def finish(self, metrics: Mapping[str, Any], artifacts: Iterable[Path | str] = (),
               status: str = "FINISHED") -> None:
        """Log the final numeric ``metrics`` (at the last epoch), upload ``artifacts`` (missing files
        are skipped) and end the run with ``status`` (FINISHED, FAILED or KILLED)."""
        if not self.active or self.run_id is None:
            return
        metrics = dict(metrics or {})
        step = runs.final_step(metrics, self._last_step)
        points = runs.metric_points(final_metrics(metrics), step, self._steps, int(time.time() * 1000))
        if points:
            self._guard("finish (metrics)", lambda: runs.log_batch(store.client(self.uri), self.run_id, metrics=points))
        for f in [Path(a) for a in artifacts if Path(a).is_file()]:
            self._guard(f"finish (artifact {f.name})", lambda f=f: store.client(self.uri).log_artifact(self.run_id, str(f)))
        self._guard("finish (status)", lambda: store.client(self.uri).set_terminated(self.run_id, status=status))

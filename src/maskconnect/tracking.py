"""MLflow tracking for training runs: an optional mirror of the run directory.

The run directory (``docs/run_format.md``) is the source of truth; MLflow only mirrors it. Hence:

* ``mlflow`` is imported lazily, inside functions. Where it is not installed, :class:`Tracker` is a
  no-op that emits one :class:`TrackingWarning` per process.
* :class:`Tracker` never raises into the training loop, and a store that cannot be written costs a run
  seconds, not minutes: one retry budget per run (``TRACKING_BUDGET_S``, 30 s: the time of failed
  calls and the sleeps between them), no retries wrapped around retries. MLflow retries what it knows
  how to retry, with its own settings: HTTP requests (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
  ``..._BACKOFF_FACTOR``, ``..._TIMEOUT``, bounded here unless the user set them) and sqlite's busy
  wait (MLflow's ``PRAGMA busy_timeout`` of 20 s). This module retries only a sqlite 'database is
  locked' that outlived that wait, within the budget. A sqlite store that cannot be written (a
  read-only directory or file system, a file that is not a database) is found before MLflow is asked
  (MLflow would retry creating its engine for 100 s), in milliseconds. When a call fails, the tracker
  emits ONE :class:`TrackingWarning` naming ``maskconnect track sync`` and turns itself off for the rest
  of the run. :func:`sync_run_dir` repairs the mirror afterwards.
* :func:`sync_run_dir` is idempotent: it finds the run of a directory (``mlflow_run.json`` or the
  ``maskconnect.run_dir`` tag), logs only params that are missing and only metric points whose
  ``(key, step)`` is not already present, and re-uploads artifacts (which overwrites them).

The default store is ``sqlite:///<project>/results/mlflow.db`` (never the ``./mlruns`` file
store); experiments created here keep their artifacts next to the database, in
``results/mlartifacts/<experiment>``. A fresh sqlite store is created under an inter-process file
lock, so parallel jobs do not race on MLflow's schema migration.

``run_dir/mlflow_run.json`` (written atomically) records the MLflow run of the directory::

    {"run_id": "...", "experiment_id": "...", "experiment": "maskconnect/digits/demo",
     "tracking_uri": "sqlite:////.../results/mlflow.db", "run_name": "...",
     "runs": {"<tracking uri>": {"run_id": "...", "experiment_id": "...", "experiment": "..."}}}

The top-level fields name the store the run was last trained against; ``runs`` holds one entry per
store the directory was tracked in or synced to. A second :class:`Tracker` on the same directory
(a resumed training run) continues the recorded MLflow run. A training run that restarts a
directory from scratch should delete ``mlflow_run.json`` or pass ``resume=False``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from .errors import MaskConnectError, RunDirError, TrackingError
from .io import atomic_write_json

__all__ = [
    "RUN_DIR_TAG",
    "RUN_FILE",
    "TRACKING_BUDGET_S",
    "Tracker",
    "TrackingError",
    "TrackingWarning",
    "default_tracking_uri",
    "ensure_store",
    "flatten_params",
    "git_commit",
    "sync_run_dir",
]

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
RUN_DIR_TAG = "maskconnect.run_dir"
ARTIFACT_DIR = "mlartifacts"  # next to a sqlite store
SYNC_ARTIFACTS = ("config.json", "history.csv", "metrics.json", "masks.json")
# metrics.json values that identify the run rather than measure it (they are params already)
_NOT_METRICS = frozenset({"seed", "depth", "width", "cardinality", "fan_in", "epochs"})
_KEY_BAD_CHARS = re.compile(r"[^\w\-. /:]")


class TrackingWarning(RuntimeWarning):
    """MLflow tracking is unavailable or failed; training goes on without it."""


# --------------------------------------------------------------------------------------------
# lazy mlflow
# --------------------------------------------------------------------------------------------

_MISSING_WARNED = False
_READY_URIS: set[str] = set()
_READY_LOCK = threading.Lock()


def _have_mlflow() -> bool:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


def _warn(message: str) -> None:
    log.debug("%s", message)
    warnings.warn(message, TrackingWarning, stacklevel=3)


def _warn_missing_once() -> None:
    global _MISSING_WARNED
    if not _MISSING_WARNED:
        _MISSING_WARNED = True
        _warn("mlflow is not installed: MLflow tracking is off "
              "(install it with `pip install 'maskconnect[track]'`)")


# --------------------------------------------------------------------------------------------
# URIs and the store
# --------------------------------------------------------------------------------------------

def default_tracking_uri(project_root: Path | str | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/results/mlflow.db``.

    ``root`` is ``project_root`` or the current working directory (made absolute).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    root = Path(project_root) if project_root is not None else Path.cwd()
    return f"sqlite:///{(root.absolute() / 'results' / 'mlflow.db').as_posix()}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(os.path.abspath(rest))


def _normalise_uri(uri: str | None) -> str:
    uri = uri or default_tracking_uri()
    path = _sqlite_path(uri)
    if path is not None:
        query = uri.split("?", 1)[1] if "?" in uri else ""
        uri = f"sqlite:///{path.as_posix()}" + (f"?{query}" if query else "")
    return uri


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _tame_http_retries(uri: str) -> None:
    # MLflow's own HTTP retries default to 7 tries with backoff factor 2 and a 120 s timeout (minutes
    # against a dead server). They are the only retries of an HTTP store; bound them so that one call
    # costs at most about 3 x 5 s + 2 s (a server that does not answer), unless the user chose values.
    if _is_http(uri):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def _check_sqlite_store(uri: str) -> None:
    """Raise :class:`TrackingError` when the sqlite store of ``uri`` cannot be written: its folder is not
    a writable directory, or the database file is not a writable sqlite database. Milliseconds, and
    before MLflow, whose engine creation retries such a store for about 100 s."""
    import sqlite3

    path = _sqlite_path(uri)
    if path is None:
        return
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TrackingError(f"MLflow store {uri} cannot be used: {parent} is a file, not a directory")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".maskconnect-probe-", dir=path.parent)  # sqlite writes journals here
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise TrackingError(f"MLflow store {uri} cannot be written: {path.parent} is not writable "
                            f"({e.strerror or e})") from None
    if not path.exists():
        return
    if path.is_dir():
        raise TrackingError(f"MLflow store {uri} cannot be used: {path} is a directory")
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5)
    except sqlite3.Error as e:
        raise TrackingError(f"MLflow store {uri} cannot be opened for writing ({e})") from None
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        con.execute("BEGIN IMMEDIATE")  # a write lock: refused on a read-only file or file system
        con.rollback()
    except sqlite3.OperationalError as e:
        if "locked" not in str(e).lower() and "busy" not in str(e).lower():  # busy is fine: others write
            raise TrackingError(f"MLflow store {uri} cannot be written ({e})") from None
    except sqlite3.DatabaseError as e:
        raise TrackingError(f"MLflow store {uri} is not a usable sqlite database ({e})") from None
    finally:
        con.close()


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Inter-process lock (POSIX ``flock``) around the creation of a sqlite store."""
    path = _sqlite_path(uri)
    handle = None
    if path is not None:
        try:
            import fcntl

            digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
            lock = Path(tempfile.gettempdir()) / f"maskconnect-mlflow-{digest}.lock"
            handle = open(lock, "a")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if handle is not None:
                handle.close()
            handle = None
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the flock


def _client(uri: str):
    """An ``MlflowClient`` for ``uri``; the first use per process creates the store under a lock."""
    from mlflow import MlflowClient

    with _READY_LOCK:
        if uri in _READY_URIS:
            return MlflowClient(tracking_uri=uri)
        _check_sqlite_store(uri)
        with _store_lock(uri):
            client = MlflowClient(tracking_uri=uri)  # builds the store (runs migrations if fresh)
            client.search_experiments(max_results=1)
        _READY_URIS.add(uri)
        return client


def ensure_store(uri: str | None = None, *, strict: bool = False, retries: int = 5,
                 backoff: float = 0.5, budget_s: float | None = None) -> str:
    """Create the tracking store (database and schema) once, before parallel jobs start.

    Returns the (normalised) URI. Failures (and a missing mlflow) are a :class:`TrackingWarning`
    unless ``strict``, when they raise :class:`TrackingError` (one line). At most ``budget_s``
    (default ``TRACKING_BUDGET_S``) is spent on failures.
    """
    uri = _normalise_uri(uri)
    if not _have_mlflow():
        if strict:
            raise MaskConnectError("mlflow is not installed (pip install 'maskconnect[track]')")
        _warn_missing_once()
        return uri
    _tame_http_retries(uri)
    try:
        _retry(lambda: _client(uri), retries=retries, backoff=backoff, budget=_Budget(budget_s), http=_is_http(uri))
    except Exception as e:
        if strict:
            raise as_tracking_error(e, uri) from None
        _warn(f"MLflow store {uri} is not usable ({type(e).__name__}: {_short(e)})")
    return uri


def as_tracking_error(e: BaseException, uri: str) -> MaskConnectError:
    """A one-line :class:`TrackingError` for any failure of the store ``uri`` (MaskConnect errors as they are)."""
    if isinstance(e, MaskConnectError):
        return e
    return TrackingError(f"MLflow store {uri} is not usable ({type(e).__name__}: {_short(e)})")


# --------------------------------------------------------------------------------------------
# retries
# --------------------------------------------------------------------------------------------

TRACKING_BUDGET_S = 30.0  # seconds a run (or a track command) may lose to a store that fails


class _Budget:
    """The time one run may lose to tracking failures: failed calls and the sleeps between retries."""

    def __init__(self, seconds: float | None = None):
        if seconds is None:
            try:
                seconds = float(os.environ.get("MASKCONNECT_TRACKING_BUDGET_S", TRACKING_BUDGET_S))
            except ValueError:
                seconds = TRACKING_BUDGET_S
        self.total = max(0.0, seconds)
        self.spent = 0.0

    def left(self) -> float:
        return self.total - self.spent

    def spend(self, seconds: float) -> None:
        self.spent += max(0.0, seconds)


def _is_transient(e: BaseException) -> bool:
    """A sqlite 'database is locked' (or busy) that outlived MLflow's busy wait: the one failure that
    MLflow does not retry itself and that another try can fix."""
    text = str(e).lower()
    if "locked" not in text and "busy" not in text:
        return False
    code = getattr(e, "error_code", None)
    return code in (None, "TEMPORARILY_UNAVAILABLE") or "locked" in text


def _retry(fn: Callable[[], Any], *, retries: int = 5, backoff: float = 0.5,
           max_sleep: float = 8.0, budget: "_Budget | None" = None, http: bool = False) -> Any:
    """Call ``fn``; on a transient error (:func:`_is_transient`) sleep ``backoff * 2**i`` (with jitter)
    and try again, at most ``retries`` tries in all and never past ``budget`` (failed calls and sleeps
    count against it). ``http``: no retries here, MLflow's HTTP client retries (``_tame_http_retries``).
    """
    tries = 1 if http else max(1, int(retries))
    for attempt in range(tries):
        t0 = time.monotonic()
        try:
            return fn()
        except Exception as e:
            if budget is not None:
                budget.spend(time.monotonic() - t0)
            if attempt == tries - 1 or not _is_transient(e):
                raise
            sleep = min(max_sleep, backoff * 2 ** attempt) * (1.0 + 0.5 * random.random())
            if budget is not None:
                if budget.left() < sleep:
                    raise
                budget.spend(sleep)
            log.debug("MLflow call failed (%s: %s); retry %d/%d in %.2f s", type(e).__name__,
                      _short(e), attempt + 1, tries - 1, sleep)
            time.sleep(sleep)
    raise AssertionError("unreachable")


def _short(e: BaseException, n: int = 300) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    # MLflow's HTTP errors quote urllib3's whole retry chain: keep the request and the OS error
    request = re.search(r"API request to (\S+) failed", s)
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+", s) or re.search(r"(Read|Connect)TimeoutError\([^)]*?([Rr]ead|[Cc]onnect)[^)]*", s)
    if request and cause:
        s = f"request to {request.group(1)} failed: {cause.group(0).strip()}"
    return s if len(s) <= n else s[: n - 3] + "..."


# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------

def _limits() -> tuple[int, int, int, int]:
    """(max param value, max tag value, max key length, max params per batch)."""
    try:
        from mlflow.utils import validation as v

        return (v.MAX_PARAM_VAL_LENGTH, v.MAX_TAG_VAL_LENGTH, v.MAX_ENTITY_KEY_LENGTH,
                v.MAX_PARAMS_TAGS_PER_BATCH)
    except (ImportError, AttributeError):
        return 500, 5000, 250, 100


def _key(key: Any, max_len: int = 250) -> str:
    k = _KEY_BAD_CHARS.sub("_", str(key)).strip().lstrip("/")
    k = re.sub(r"/{2,}", "/", k).replace("..", "__")
    return (k or "_")[:max_len]


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
    """Flatten a (nested) config into MLflow params: ``{"a.b": "value"}``, values stringified and
    keys/values truncated to MLflow's limits."""
    max_val, _, max_key, _ = _limits()
    out: dict[str, str] = {}

    def walk(d: Mapping[str, Any], pre: str) -> None:
        for k, v in d.items():
            name = f"{pre}{k}"
            if isinstance(v, Mapping) and v:
                walk(v, name + ".")
            else:
                out[_key(name, max_key)] = _stringify(v)[:max_val]

    walk(config, prefix)
    return out


def _number(v: Any) -> float | None:
    """A finite-or-NaN float for a numeric value (numbers, numpy/torch scalars, numeric strings)."""
    if v is None or isinstance(v, (dict, list, tuple)):
        return None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        v = v.strip()
        if not v:
            return None
        try:
            return float(v)
        except ValueError:
            return None
    if hasattr(v, "item"):
        try:
            return _number(v.item())
        except Exception:
            return None
    return None


def _numeric_items(row: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, float]:
    skip = set(skip)
    out = {}
    for k, v in row.items():
        if k in skip:
            continue
        x = _number(v)
        if x is not None and not math.isinf(x):
            out[_key(k)] = x
    return out


def _final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric top-level values of a metrics.json record that measure the run."""
    return _numeric_items(metrics, skip=_NOT_METRICS)


def _tags_clean(tags: Mapping[str, Any]) -> dict[str, str]:
    _, max_tag, max_key, _ = _limits()
    return {_key(k, max_key): _stringify(v)[:max_tag] for k, v in tags.items() if v is not None}


# --------------------------------------------------------------------------------------------
# environment tags
# --------------------------------------------------------------------------------------------

def git_commit(cwd: Path | str | None = None, timeout: float = 5.0) -> str | None:
    """``git rev-parse HEAD`` in ``cwd`` (default: this package's directory), None if not a repo."""
    cwd = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else None


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(dist)
    except PackageNotFoundError:
        mod = sys.modules.get(dist)
        return getattr(mod, "__version__", None)
    except Exception:
        return None


def _env_tags() -> dict[str, str | None]:
    commit = git_commit()
    return {
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "torch_version": _version("torch"),
        "maskconnect_version": _version("maskconnect"),
        "python_version": platform.python_version(),
        "host": platform.node() or None,
    }


# --------------------------------------------------------------------------------------------
# MLflow helpers (all raise; callers decide)
# --------------------------------------------------------------------------------------------

def _artifact_location(uri: str, experiment: str) -> str | None:
    db = _sqlite_path(uri)
    if db is None:
        return None  # a server or another store decides
    safe = "/".join(_KEY_BAD_CHARS.sub("_", p) for p in experiment.split("/") if p not in ("", ".", ".."))
    return str(db.parent / ARTIFACT_DIR / (safe or "default"))


def _experiment_id(client, uri: str, name: str) -> str:
    """Id of experiment ``name``, created if missing (safe when processes race to create it)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _existing_run(client, run_id: str | None):
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


def _find_run_by_tag(client, run_dir: str):
    """The newest active run tagged ``maskconnect.run_dir == run_dir`` in any active experiment."""
    from mlflow.entities import ViewType

    exp_ids, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                         page_token=token)
        exp_ids += [e.experiment_id for e in page]
        token = getattr(page, "token", None)
        if not token:
            break
    best = None
    for i in range(0, len(exp_ids), 100):
        chunk = exp_ids[i:i + 100]
        if "'" not in run_dir and "\\" not in run_dir:
            runs = client.search_runs(chunk, filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
                                      run_view_type=ViewType.ACTIVE_ONLY, max_results=1,
                                      order_by=["attributes.start_time DESC"])
        else:  # a path the filter syntax cannot quote: filter here
            runs = [r for r in client.search_runs(chunk, run_view_type=ViewType.ACTIVE_ONLY,
                                                  max_results=50000)
                    if r.data.tags.get(RUN_DIR_TAG) == run_dir]
        for r in runs:
            if best is None or (r.info.start_time or 0) > (best.info.start_time or 0):
                best = r
    return best


def _metric_steps(client, run) -> dict[str, set[int]]:
    """``{key: {steps already logged}}`` for every metric of ``run``."""
    if run is None:
        return {}
    return {k: {m.step for m in client.get_metric_history(run.info.run_id, k)}
            for k in run.data.metrics}


def _log_batch(client, run_id: str, *, params: Mapping[str, str] | None = None,
               metrics: list | None = None, tags: Mapping[str, str] | None = None) -> None:
    """log_batch in chunks within MLflow's per-request limits."""
    from mlflow.entities import Param, RunTag

    _, _, _, per_batch = _limits()
    params = [Param(k, v) for k, v in (params or {}).items()]
    tags = [RunTag(k, v) for k, v in (tags or {}).items()]
    metrics = list(metrics or [])
    for i in range(0, len(params), per_batch):
        client.log_batch(run_id, params=params[i:i + per_batch])
    for i in range(0, len(tags), per_batch):
        client.log_batch(run_id, tags=tags[i:i + per_batch])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def _new_params(run, params: Mapping[str, str]) -> dict[str, str]:
    """The params not yet on ``run`` (MLflow params are immutable: changed values are skipped)."""
    if run is None:
        return dict(params)
    have = run.data.params
    changed = [k for k, v in params.items() if k in have and have[k] != v]
    if changed:
        log.info("MLflow run %s keeps its earlier values of params %s", run.info.run_id,
                 ", ".join(sorted(changed)[:10]))
    return {k: v for k, v in params.items() if k not in have}


def _metric_points(values: Mapping[str, float], step: int, steps: dict[str, set[int]],
                   timestamp_ms: int) -> list:
    """Metric entities for the (key, step) points not yet logged; records them in ``steps``."""
    from mlflow.entities import Metric

    out = []
    for k, v in values.items():
        seen = steps.setdefault(k, set())
        if step in seen:
            continue
        seen.add(step)
        out.append(Metric(k, v, timestamp_ms, step))
    return out


def _read_run_file(run_dir: Path) -> dict:
    try:
        data = json.loads((run_dir / RUN_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _run_entry(record: dict, uri: str) -> dict | None:
    entry = (record.get("runs") or {}).get(uri)
    if isinstance(entry, dict) and entry.get("run_id"):
        return entry
    if record.get("tracking_uri") == uri and record.get("run_id"):
        return record
    return None


def _write_run_file(run_dir: Path, uri: str, entry: dict, *, primary: bool) -> None:
    record = _read_run_file(run_dir)
    record.setdefault("runs", {})
    record["runs"][uri] = {k: entry[k] for k in ("run_id", "experiment_id", "experiment")}
    if primary or not record.get("run_id"):
        record.update(entry, tracking_uri=uri)
    record = {**{k: v for k, v in record.items() if k != "runs"}, "runs": record["runs"]}
    atomic_write_json(run_dir / RUN_FILE, record)


def _run_dir_key(run_dir: Path | str) -> str:
    return str(Path(run_dir).expanduser().resolve())


# --------------------------------------------------------------------------------------------
# Tracker
# --------------------------------------------------------------------------------------------

def _never_raises(method: Callable) -> Callable:
    """Turn any error in a Tracker method (preparation included) into the one warning."""
    import functools

    @functools.wraps(method)
    def wrapper(self: "Tracker", *args, **kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as e:
            self._fail(method.__name__, e)

    return wrapper


class Tracker:
    """MLflow mirror of one training run; every method is a no-op on failure (one warning).

    ``retries``/``backoff`` bound this module's retries of a sqlite 'database is locked' (default: 5
    tries, sleeps of about 0.5, 1, 2 and 4 s); ``budget_s`` (default ``TRACKING_BUDGET_S``, 30 s) bounds
    the time the whole run may lose to failures. After a call fails for good, or the budget is spent,
    the tracker is off for the rest of the run.
    """

    def __init__(self, run_dir: Path | str, *, experiment: str, run_name: str,
                 uri: str | None = None, enabled: bool = True, resume: bool = True,
                 retries: int = 5, backoff: float = 0.5, budget_s: float | None = None):
        self.run_dir = Path(run_dir)
        self.experiment = experiment
        self.run_name = run_name
        self.uri = _normalise_uri(uri) if enabled else (uri or "")
        self.enabled = enabled
        self.resume = resume
        self.retries = retries
        self.backoff = backoff
        self.budget = _Budget(budget_s)
        self.run_id: str | None = None
        self.failed = False
        self._warned = False
        self._client = None
        self._steps: dict[str, set[int]] = {}
        self._last_step: int | None = None

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True while calls reach MLflow (enabled, mlflow present, no failure so far)."""
        return self.enabled and not self.failed

    def _guard(self, what: str, fn: Callable[[], Any], *, needs_run: bool = True) -> None:
        if not self.active or (needs_run and self.run_id is None):
            return
        if not _have_mlflow():
            self.failed = True
            _warn_missing_once()
            return
        if self.budget.left() <= 0:
            self._fail(what, TimeoutError(f"the run's tracking budget of {self.budget.total:g} s is spent"))
            return
        try:
            _retry(fn, retries=self.retries, backoff=self.backoff, budget=self.budget, http=_is_http(self.uri))
        except Exception as e:  # never into training
            self._fail(what, e)

    def _fail(self, what: str, e: BaseException) -> None:
        self.failed = True
        if not self._warned:
            self._warned = True
            store = "" if self.uri == _normalise_uri(None) else f" --tracking-uri {shlex.quote(self.uri)}"
            _warn(f"MLflow tracking of {self.run_dir} is off after {what} failed "
                  f"({type(e).__name__}: {_short(e)}); training goes on. Once the store works, catch up with: "
                  f"maskconnect track sync {shlex.quote(str(self.run_dir))}{store}")

    def _get_client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    # -- API ------------------------------------------------------------------------------------
    @_never_raises
    def start(self, params: Mapping[str, Any], tags: Mapping[str, Any]) -> None:
        """Create the MLflow run (or continue the one recorded in ``run_dir/mlflow_run.json``),
        log the flattened ``params`` and the tags (caller's plus git commit, versions, run dir)."""
        if not self.active:
            return
        if not _have_mlflow():
            self.failed = True
            _warn_missing_once()
            return
        _tame_http_retries(self.uri)
        flat = flatten_params(params or {})
        all_tags = _tags_clean({**_env_tags(), **dict(tags or {}),
                                RUN_DIR_TAG: _run_dir_key(self.run_dir)})

        def go() -> None:
            client = self._get_client()
            run = _existing_run(client, self.run_id)  # a retry after create_run succeeded
            if run is None and self.resume:
                entry = _run_entry(_read_run_file(self.run_dir), self.uri)
                run = _existing_run(client, entry and entry.get("run_id"))
            if run is not None:
                experiment_id = run.info.experiment_id
                self._steps = _metric_steps(client, run)
                client.update_run(run.info.run_id, status="RUNNING")
            else:
                experiment_id = _experiment_id(client, self.uri, self.experiment)
                run = client.create_run(experiment_id, run_name=self.run_name, tags=all_tags)
                self.run_id = run.info.run_id
                self._steps = {}
            self.run_id = run.info.run_id
            self._last_step = max((max(s) for s in self._steps.values() if s), default=None)
            _write_run_file(self.run_dir, self.uri, {
                "run_id": self.run_id, "experiment_id": experiment_id,
                "experiment": self.experiment, "run_name": self.run_name}, primary=True)
            _log_batch(client, self.run_id, params=_new_params(run, flat), tags=all_tags)

        self._guard("start", go, needs_run=False)

    @_never_raises
    def log_epoch(self, row: Mapping[str, Any], step: int) -> None:
        """Log the numeric values of a history row at ``step`` (the epoch); points already logged
        for a (key, step) are skipped, so a resumed run does not duplicate them."""
        if not self.active or self.run_id is None:
            return
        step = int(step)
        self._last_step = step if self._last_step is None else max(self._last_step, step)
        values = _numeric_items(row, skip=("epoch",))
        points = _metric_points(values, step, self._steps, int(time.time() * 1000))
        if points:
            self._guard(f"log_epoch(step={step})",
                        lambda: _log_batch(self._get_client(), self.run_id, metrics=points))

    @_never_raises
    def finish(self, metrics: Mapping[str, Any], artifacts: Iterable[Path | str] = (),
               status: str = "FINISHED") -> None:
        """Log the final numeric ``metrics`` (at the last epoch), upload ``artifacts`` (missing files
        are skipped) and end the run with ``status`` (FINISHED, FAILED or KILLED)."""
        if not self.active or self.run_id is None:
            return
        metrics = dict(metrics or {})
        step = _final_step(metrics, self._last_step)
        points = _metric_points(_final_metrics(metrics), step, self._steps,
                                int(time.time() * 1000))
        files = [Path(a) for a in artifacts if Path(a).is_file()]

        if points:
            self._guard("finish (metrics)",
                        lambda: _log_batch(self._get_client(), self.run_id, metrics=points))
        for f in files:
            self._guard(f"finish (artifact {f.name})",
                        lambda f=f: self._get_client().log_artifact(self.run_id, str(f)))
        self._guard("finish (status)",
                    lambda: self._get_client().set_terminated(self.run_id, status=status))


def _final_step(metrics: Mapping[str, Any], last_step: int | None) -> int:
    epochs = metrics.get("epochs")
    if isinstance(epochs, int) and not isinstance(epochs, bool):
        return epochs
    return last_step if last_step is not None else 0


# --------------------------------------------------------------------------------------------
# sync
# --------------------------------------------------------------------------------------------

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
            epoch = _number(row.get("epoch"))
            step = int(epoch) if epoch is not None and not math.isnan(epoch) else i
            rows.append((step, _numeric_items(row, skip=("epoch",))))
    return rows


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
    return {key: str(v) for key, v in tags.items() if v is not None}


def _default_experiment(run_dir: Path, config: Mapping[str, Any]) -> str:
    """``maskconnect/<dataset>/<grid>`` for ``.../runs/<grid>/...``, else ``maskconnect/<dataset>``."""
    parts = run_dir.parts
    dataset = config.get("dataset")
    name = ["maskconnect"] + ([str(dataset)] if dataset else [])
    if "runs" in parts:
        i = len(parts) - 1 - parts[::-1].index("runs")
        if i + 1 < len(parts) - 1:
            name.append(parts[i + 1])
    return "/".join(name)


def _default_run_name(run_dir: Path) -> str:
    parts = run_dir.parts
    if "runs" in parts:
        i = len(parts) - 1 - parts[::-1].index("runs")
        if i + 2 < len(parts):
            return "/".join(parts[i + 2:])
    return run_dir.name


def _mtime_ms(path: Path) -> int | None:
    try:
        return int(path.stat().st_mtime * 1000)
    except OSError:
        return None


def sync_run_dir(run_dir: Path | str, *, uri: str | None = None, experiment: str | None = None,
                 retries: int = 5, backoff: float = 0.5, budget_s: float | None = None) -> str:
    """Mirror a run directory into MLflow, idempotently; returns the MLflow run id.

    Logs config.json (flattened params), every history.csv row (metrics at step = epoch), the final
    metrics.json values (at step = epochs), tags (git commit, torch version, device, seed, status,
    run dir) and the artifacts config.json, history.csv, metrics.json, masks.json. The run is the
    one named in ``mlflow_run.json`` for this store, else the newest run tagged with this directory,
    else a new one in ``experiment`` (default ``maskconnect/<dataset>/<grid>``). Only missing params
    and (key, step) metric points are logged, so re-running it adds nothing. Raises on failure, after
    at most ``budget_s`` (default ``TRACKING_BUDGET_S``) lost to it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    config = _read_json(run_dir / "config.json")
    if config is None:
        raise RunDirError(f"{run_dir} has no config.json: not a run directory")
    if not _have_mlflow():
        raise MaskConnectError("mlflow is not installed (pip install 'maskconnect[track]')")
    uri = _normalise_uri(uri)
    _tame_http_retries(uri)
    metrics = _read_json(run_dir / "metrics.json")
    history = _read_history(run_dir / "history.csv")
    record = _read_run_file(run_dir)
    run_key = _run_dir_key(run_dir)
    entry = _run_entry(record, uri)
    experiment = experiment or (entry or {}).get("experiment") or _default_experiment(run_dir, config)
    run_name = (entry or {}).get("run_name") or record.get("run_name") or _default_run_name(run_dir)

    versions = (metrics or {}).get("versions") or {}
    tags = _tags_clean({
        "git_commit": (metrics or {}).get("git_commit"),
        "mlflow.source.git.commit": (metrics or {}).get("git_commit"),
        "torch_version": versions.get("torch"),
        "maskconnect_version": versions.get("maskconnect"),
        "python_version": versions.get("python"),
        "device": (metrics or {}).get("device") or config.get("device"),
        "seed": (metrics or {}).get("seed", config.get("seed")),
        "maskconnect.status": (metrics or {}).get("status", "incomplete"),
        RUN_DIR_TAG: run_key,
        **run_tags(config, experiment),
    })
    params = flatten_params(config)
    final = _final_metrics(metrics) if metrics else {}
    last = history[-1][0] if history else None
    final_step = _final_step(metrics or {}, last)
    artifacts = [run_dir / n for n in SYNC_ARTIFACTS if (run_dir / n).is_file()]
    now = int(time.time() * 1000)

    def go() -> str:
        client = _client(uri)
        run = _existing_run(client, entry and entry.get("run_id")) or _find_run_by_tag(client, run_key)
        created = run is None
        if created:
            exp_id = _experiment_id(client, uri, experiment)
            run = client.create_run(exp_id, run_name=run_name, tags=tags,
                                    start_time=_mtime_ms(run_dir / "config.json"))
        run_id = run.info.run_id
        steps = _metric_steps(client, None if created else run)
        points = []
        for step, values in history:
            points += _metric_points(values, step, steps, now)
        if final:
            points += _metric_points(final, final_step, steps, now)
        _log_batch(client, run_id, params=_new_params(None if created else run, params),
                   tags=tags, metrics=points)
        for f in artifacts:
            client.log_artifact(run_id, str(f))
        if metrics is not None and metrics.get("status", "complete") == "complete":
            if run.info.status != "FINISHED" or created:
                client.set_terminated(run_id, status="FINISHED",
                                      end_time=_mtime_ms(run_dir / "metrics.json"))
        elif created:
            client.set_terminated(run_id, status="KILLED")  # incomplete directory
        exp_name = experiment if created else client.get_experiment(run.info.experiment_id).name
        _write_run_file(run_dir, uri, {"run_id": run_id, "experiment_id": run.info.experiment_id,
                                       "experiment": exp_name, "run_name": run_name},
                        primary=False)
        return run_id

    return _retry(go, retries=retries, backoff=backoff, budget=_Budget(budget_s), http=_is_http(uri))


# --------------------------------------------------------------------------------------------
# the report's summary
# --------------------------------------------------------------------------------------------

REPORT_TAG = "maskconnect.report_dir"


def log_report(report_dir: Path | str, *, uri: str | None = None, experiment: str = "maskconnect/reports") -> str:
    """Log a report folder (tables, figures, REPORT.md) as the artifacts of one MLflow run, found
    again by its folder on the next call (idempotent: artifacts are overwritten, not duplicated).
    Numeric values of ``summary.json`` in the folder, if present, are logged as metrics."""
    report_dir = Path(report_dir).resolve()
    if not report_dir.is_dir():
        raise RunDirError(f"report folder {report_dir} does not exist; run `maskconnect report` first")
    if not _have_mlflow():
        raise MaskConnectError("mlflow is not installed: pip install 'maskconnect[track]'")
    uri = ensure_store(uri, strict=True)
    client = _client(uri)
    exp_id = _experiment_id(client, uri, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{REPORT_TAG}` = '{report_dir}'", max_results=1)
    run_id = found[0].info.run_id if found else client.create_run(
        exp_id, run_name=f"report {report_dir.name}", tags={REPORT_TAG: str(report_dir)}).info.run_id
    summary = report_dir / "summary.json"
    if summary.exists():
        values = _numeric_items(json.loads(summary.read_text()))
        if values:
            import mlflow.entities as ent

            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[ent.Metric(_key(k), v, now, 0) for k, v in values.items()])
    client.log_artifacts(run_id, str(report_dir))
    client.set_terminated(run_id, "FINISHED")
    return run_id

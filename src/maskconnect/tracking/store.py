"""The MLflow store: its URI, creating it once, and what a store that fails may cost.

The default store is ``sqlite:///<project>/results/mlflow.db``, with the artifacts of experiments
created here in ``results/mlartifacts/<experiment>``. The 30 s failure budget, what MLflow retries
itself and what is retried here are described in docs/run_format.md ("Tracking (MLflow)").

A URI is checked before MLflow sees it (:func:`check_uri`): a scheme MLflow does not know, or a
sqlite store whose folder's parent does not exist (a typo would start a new store elsewhere), is bad
input, named as such (:class:`~maskconnect.errors.ConfigError`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import tempfile
import threading
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ConfigError, MaskConnectError, TrackingError
from .values import key

log = logging.getLogger("maskconnect.tracking")

ARTIFACT_DIR = "mlartifacts"  # next to a sqlite store
TRACKING_BUDGET_S = 30.0  # seconds a run (or a track command) may lose to a store that fails

_MISSING_WARNED = False
_READY_URIS: set[str] = set()
_READY_LOCK = threading.Lock()


class TrackingWarning(RuntimeWarning):
    """MLflow tracking is unavailable or failed; training goes on without it."""


def warn(message: str) -> None:
    log.debug("%s", message)
    warnings.warn(message, TrackingWarning, stacklevel=3)


def have_mlflow() -> bool:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


def warn_missing_once() -> None:
    global _MISSING_WARNED
    if not _MISSING_WARNED:
        _MISSING_WARNED = True
        warn("mlflow is not installed: MLflow tracking is off (install it with `pip install 'maskconnect[track]'`)")


# --- URIs ----------------------------------------------------------------------------------------

def default_tracking_uri(project_root: Path | str | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/results/mlflow.db`` (root: ``project_root``
    or the current directory, made absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    root = Path(project_root) if project_root is not None else Path.cwd()
    return f"sqlite:///{(root.absolute() / 'results' / 'mlflow.db').as_posix()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(os.path.abspath(rest))


def normalise_uri(uri: str | None) -> str:
    """``uri`` (default :func:`default_tracking_uri`), a sqlite path made absolute."""
    uri = uri or default_tracking_uri()
    path = sqlite_path(uri)
    if path is not None:
        _, sep, query = uri.partition("?")
        uri = f"sqlite:///{path.as_posix()}{sep}{query}"
    return uri


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


# The schemes of MLflow's own tracking stores ("": a local path, MLflow's file store); the database
# ones take a driver too (postgresql+psycopg2). Plugins add theirs as "mlflow.tracking_store" entry points.
MLFLOW_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc", "file", "")
ALLOWED_URIS = "sqlite:///PATH, http(s)://HOST:PORT, postgresql://..., mysql://..., mssql://..., databricks, file:PATH"


def _uri_field(uri: str) -> str:
    """Where ``uri`` came from, as the user would name it: $MLFLOW_TRACKING_URI or --tracking-uri."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return "MLFLOW_TRACKING_URI" if env and normalise_uri(env) == uri else "tracking_uri"


def check_uri(uri: str) -> None:
    """A :class:`ConfigError` naming ``uri`` when it cannot be what the user meant: a scheme MLflow does
    not know (MLflow's own message speaks of its model registry), or a sqlite store whose folder would
    have to be created with its parent (a typo: the store's folder is created only where its parent exists)."""
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if len(scheme) > 1 and scheme.split("+")[0] not in MLFLOW_SCHEMES:
        from importlib.metadata import entry_points

        if scheme not in {ep.name for ep in entry_points(group="mlflow.tracking_store")}:
            raise ConfigError(_uri_field(uri), uri, f"an MLflow tracking URI ({ALLOWED_URIS}); "
                                                    f"{scheme!r} is not a scheme MLflow knows")
    path = sqlite_path(uri)
    if path is not None and not path.parent.parent.exists():
        missing = next(p for p in reversed(path.parents) if not p.exists())
        raise ConfigError(_uri_field(uri), uri, f"a sqlite store in an existing folder: {missing} does not exist "
                                                "(create it first if the path is meant)")


# --- the store -----------------------------------------------------------------------------------

def _check_sqlite_store(uri: str) -> None:
    """Raise :class:`TrackingError` when the sqlite store of ``uri`` cannot be written: its folder is not
    a writable directory, or the database file is not a writable sqlite database. Milliseconds, and
    before MLflow, whose engine creation retries such a store for about 100 s."""
    import sqlite3

    path = sqlite_path(uri)
    if path is None:
        return
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TrackingError(f"MLflow store {uri} cannot be used: {parent} is a file, not a directory")
            break
    try:
        path.parent.mkdir(exist_ok=True)  # only where its parent exists (check_uri): a fresh results/, say
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
    """An inter-process ``flock`` around creating a sqlite store (MLflow migrates a fresh tracking
    database without one, so parallel jobs would race on its schema); none where it cannot be taken.

    The lock file is ``<store>.lock`` beside the store, removed by its holder when done: a waiter that
    then holds the lock of a removed file (not the one at that path) takes the lock again."""
    path, fd = sqlite_path(uri), None
    if path is not None:
        lock = path.with_name(f"{path.name}.lock")
        try:
            import fcntl

            while fd is None:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if os.path.samestat(os.fstat(fd), os.stat(lock)):
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
                fd = None
        except (ImportError, OSError):  # no fcntl, ENOLCK (some network file systems): go on without
            if fd is not None:  # flock refused here is refused to everyone: the file serves no one
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(lock)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            try:
                os.unlink(lock)
            except OSError:
                pass
            os.close(fd)  # releases the flock


def client(uri: str):
    """An ``MlflowClient`` for ``uri``; the first use per process creates the store under a lock. MLflow's
    HTTP retries (by default minutes against a dead server) are bounded here unless the user set them."""
    from mlflow import MlflowClient

    if is_http(uri):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with _READY_LOCK:
        if uri in _READY_URIS:
            return MlflowClient(tracking_uri=uri)  # MLflow caches the store per URI
        check_uri(uri)
        _check_sqlite_store(uri)
        with _store_lock(uri):
            c = MlflowClient(tracking_uri=uri)  # builds the store (runs migrations if fresh)
            c.search_experiments(max_results=1)  # reaches an HTTP store
        _READY_URIS.add(uri)
        return c


def ensure_store(uri: str | None = None) -> str:
    """Create the tracking store (database and schema) once, before parallel jobs start; returns the
    normalised URI. A missing mlflow or an unusable store is a one-line :class:`TrackingError` (or
    ``MaskConnectError`` for the missing package): ``maskconnect track init`` and ``track sync`` stop on
    it, where training only warns (:class:`~.live.Tracker`)."""
    uri = normalise_uri(uri)
    if not have_mlflow():
        raise MaskConnectError("mlflow is not installed (pip install 'maskconnect[track]')")
    try:
        retry(lambda: client(uri), budget=Budget(), http=is_http(uri))
    except Exception as e:
        raise as_tracking_error(e, uri) from None
    return uri


def as_tracking_error(e: BaseException, uri: str) -> MaskConnectError:
    """A one-line :class:`TrackingError` for any failure of the store ``uri`` (MaskConnect errors as they are)."""
    if isinstance(e, MaskConnectError):
        return e
    return TrackingError(f"MLflow store {uri} is not usable ({type(e).__name__}: {short(e)})")


def experiment_id(c, uri: str, name: str) -> str:
    """Id of experiment ``name``, created if missing (safe when processes race to create it), with its
    artifacts next to a sqlite store; a deleted experiment of that name is restored."""
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is None:
        db = sqlite_path(uri)
        try:
            return c.create_experiment(name, artifact_location=None if db is None else str(db.parent / ARTIFACT_DIR / key(name)))
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := c.get_experiment_by_name(name)) is None:
                raise
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    return exp.experiment_id


# --- what a failing store may cost ---------------------------------------------------------------

class Budget:
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
    return "locked" in text or ("busy" in text and getattr(e, "error_code", None) in (None, "TEMPORARILY_UNAVAILABLE"))


def retry(fn: Callable[[], Any], *, retries: int = 5, backoff: float = 0.5,
          max_sleep: float = 8.0, budget: Budget | None = None, http: bool = False) -> Any:
    """Call ``fn``; on a transient error (:func:`_is_transient`) sleep ``backoff * 2**i`` (with jitter)
    and try again, at most ``retries`` tries in all and never past ``budget`` (failed calls and sleeps
    count against it). ``http``: no retries here, MLflow's HTTP client retries (see :func:`client`).
    """
    budget = budget if budget is not None else Budget(float("inf"))
    tries = 1 if http else max(1, int(retries))
    for attempt in range(tries):
        t0 = time.monotonic()
        try:
            return fn()
        except Exception as e:
            budget.spend(time.monotonic() - t0)
            if attempt == tries - 1 or not _is_transient(e):
                raise
            sleep = min(max_sleep, backoff * 2 ** attempt) * (1.0 + 0.5 * random.random())
            if budget.left() < sleep:
                raise
            budget.spend(sleep)
            log.debug("MLflow call failed (%s: %s); retry %d/%d in %.2f s", type(e).__name__,
                      short(e), attempt + 1, tries - 1, sleep)
            time.sleep(sleep)
    raise AssertionError("unreachable")


def short(e: BaseException, n: int = 300) -> str:
    """One line of an MLflow error."""
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    # MLflow's HTTP errors quote urllib3's whole retry chain: keep the request and the OS error
    request = re.search(r"API request to (\S+) failed", s)
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+", s) or re.search(r"(Read|Connect)TimeoutError\([^)]*?([Rr]ead|[Cc]onnect)[^)]*", s)
    if request and cause:
        s = f"request to {request.group(1)} failed: {cause.group(0).strip()}"
    return s if len(s) <= n else s[: n - 3] + "..."

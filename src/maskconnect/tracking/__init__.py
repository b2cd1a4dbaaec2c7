"""MLflow tracking for training runs: an optional mirror of the run directory.

The run directory (docs/run_format.md) is the source of truth; MLflow only mirrors it, so mlflow is
imported lazily, inside functions, and a store that fails costs a run seconds and one warning.

==========  ==============================================================================================
``store``   the store's URI, creating it once, the 30 s failure budget, retrying a locked sqlite store
``values``  a config as params, a row's numbers as metrics, tags (``run_tags``)
``runs``    which MLflow run mirrors a directory (``mlflow_run.json``, the ``maskconnect.run_dir`` tag)
``live``    :class:`Tracker`, the mirror while a run trains
``sync``    ``track sync`` of run directories after the fact, ``track log-report``
==========  ==============================================================================================
"""

from .live import Tracker
from .runs import RUN_DIR_TAG, RUN_FILE
from .store import (
    TRACKING_BUDGET_S, TrackingWarning, as_tracking_error, default_tracking_uri, ensure_store, normalise_uri,
)
from .sync import log_report, sync_run_dir
from .values import flatten_params, run_tags
from ..errors import TrackingError

__all__ = [
    "RUN_DIR_TAG", "RUN_FILE", "TRACKING_BUDGET_S", "Tracker", "TrackingError", "TrackingWarning",
    "as_tracking_error", "default_tracking_uri", "ensure_store", "flatten_params", "log_report",
    "normalise_uri", "run_tags", "sync_run_dir",
]

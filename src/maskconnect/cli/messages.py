"""How the command line shows this package's warnings: one line each, ``maskconnect <command>: warning: ...``."""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def one_line_warnings(command: str):
    """Show this package's warnings (tracking off, lock unsupported, a report without runs) as one line each,
    ``maskconnect <command>: warning: ...``, and keep MLflow's and urllib3's retry logs out of the way
    (the warning says what failed)."""
    import logging
    import warnings

    from ..report import ReportWarning
    from ..training.lock import RunLockWarning
    from ..tracking import TrackingWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (TrackingWarning, RunLockWarning, ReportWarning)):
            print(f"maskconnect {command}: warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    quiet = [logging.getLogger(name) for name in ("urllib3.connectionpool", "mlflow.store.db.utils",
                                                  "mlflow.utils.request_utils", "alembic.runtime.migration")]
    levels = [q.level for q in quiet]
    with warnings.catch_warnings():
        warnings.showwarning = show
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)

"""``maskconnect track``: the MLflow store (create once, re-sync run directories, log a report)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("track", help="MLflow store: init, sync run directories, log a report",
                       description="MLflow tracking. The store is $MLFLOW_TRACKING_URI or sqlite:///results/mlflow.db. "
                                   "Browse it with: mlflow ui --backend-store-uri sqlite:///results/mlflow.db --host 127.0.0.1")
    tsub = p.add_subparsers(dest="track_command", metavar="ACTION")
    tsub.required = True
    q = tsub.add_parser("init", help="create the store and its schema once (before parallel jobs start)")
    q.add_argument("--tracking-uri", dest="tracking_uri")
    q.set_defaults(func=_init)
    q = tsub.add_parser("sync", help="re-sync run directories into MLflow (idempotent)")
    q.add_argument("runs", nargs="+", help="run directories")
    q.add_argument("--tracking-uri", dest="tracking_uri")
    q.add_argument("--experiment", help="default: maskconnect/<dataset>/<grid>")
    q.set_defaults(func=_sync)
    q = tsub.add_parser("log-report", help="log a report folder's files as an MLflow run (idempotent)")
    q.add_argument("--report-dir", dest="report_dir", required=True)
    q.add_argument("--tracking-uri", dest="tracking_uri")
    q.add_argument("--experiment", default="maskconnect/reports")
    q.add_argument("--marker", help="file to write (the run id) when done, for pipelines")
    q.set_defaults(func=_log_report)


def _init(args) -> int:
    from ..tracking import ensure_store

    print(ensure_store(args.tracking_uri))
    return 0


def _sync(args) -> int:
    from ..tracking import as_tracking_error, normalise_uri, sync_run_dir

    from .messages import one_line_warnings

    uri = normalise_uri(args.tracking_uri)
    with one_line_warnings("track sync"):
        for run in args.runs:
            try:
                run_id = sync_run_dir(Path(run), uri=uri, experiment=args.experiment)
            except Exception as e:  # a dead or read-only store: one line naming it, exit 1, no traceback
                raise as_tracking_error(e, uri) from None
            print(f"{run}: {run_id}")
    return 0


def _log_report(args) -> int:
    from ..io import atomic_write_text
    from ..tracking import as_tracking_error, log_report, normalise_uri

    try:
        run_id = log_report(args.report_dir, uri=args.tracking_uri, experiment=args.experiment)
    except Exception as e:
        raise as_tracking_error(e, normalise_uri(args.tracking_uri)) from None
    if args.marker:
        atomic_write_text(args.marker, run_id + "\n")
    print(run_id)
    return 0

"""``maskconnect evaluate``: evaluate a finished run's model and its pruned model (writes eval.json)."""

from __future__ import annotations

import json
from ..errors import RunDirError


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a finished run's model and its pruned model",
                       description="Evaluate a run directory's final model (frozen masks) and pruned model on the "
                                   "test set; writes eval.json (top-1/top-5 of both, params, FLOPs).")
    p.add_argument("--run", required=True, help="run directory (holding metrics.json and checkpoint.pt)")
    p.add_argument("--out", help="output JSON (default RUN/eval.json)")
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from ..io import atomic_write_json, check_output_file, check_path
    from ..training.evaluation import evaluate_run

    run = check_path(args.run, "--run")
    if not run.is_dir():
        raise RunDirError(f"--run {run} is not a run directory")
    # checked before evaluating: a path that cannot be written fails in seconds, not after the evaluation
    out = check_output_file(args.out if args.out is not None else run / "eval.json", "--out")
    result = evaluate_run(run, data_dir=args.data_dir, device=args.device)
    atomic_write_json(out, result)
    print(json.dumps(result))
    return 0

"""What a training process pays outside its epochs before and after them, measured in a fresh process.

``maskconnect train`` starts an interpreter, imports the command line and the training loop (torch
with them), initialises the device, loads the dataset and, when the run is tracked, starts an MLflow run
(mlflow's import included), logs each epoch and ends the run. None of that is in a step time. The
probe (``python -m maskconnect.preflight.startup ARGS``) does the same in a new process and prints how
long each part took; the parent times the process from spawn to exit, so the interpreter's start and
teardown are the rest. The tracked part runs against a throw-away sqlite store created by another
process first (as the pipeline's ``tracking_init`` creates the real one before any training job), so
the probe imports mlflow cold, as a run does; the preflight itself never imports mlflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .timing import _runqueue_wait_s, load_window, machine_state

TRACKED_EPOCHS = 3  # log_epoch calls timed (their median prices every epoch)


def _child(args: dict) -> dict:
    t0 = time.perf_counter()
    # what ``maskconnect train`` imports before the run starts: torch and the training stack; the command
    # line's own modules (argparse wrappers, imported lazily) add nothing measurable, and the preflight,
    # a layer below the command line, does not import it (tests/test_layers.py)
    import maskconnect.training.loop  # noqa: F401
    import torch

    t_import = time.perf_counter()
    device = torch.device(args["device"])
    if device.type == "cuda":
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
    t_device = time.perf_counter()
    from maskconnect.data import build_data
    from maskconnect.errors import MaskConnectError

    data_error = None
    try:
        build_data(args["dataset"], data_dir=args.get("data_dir"), batch_size=args["batch"],
                   eval_batch_size=args["eval_batch"], device=device, seed=0, workers=args.get("workers", 0),
                   synthetic=args.get("synthetic") or None, download=False)
    except MaskConnectError as e:
        data_error = str(e).splitlines()[0]
    t_data = time.perf_counter()
    out = {"import_s": t_import - t0, "device_init_s": t_device - t_import, "data_s": t_data - t_device,
           "data_error": data_error}
    if args.get("store"):
        from maskconnect.tracking import Tracker

        run_dir = Path(args["store"]) / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "history.csv").write_text("epoch,test_top1\n1,50.0\n")
        tracker = Tracker(run_dir, experiment="preflight-probe", run_name="probe", uri=args["store_uri"])
        t = time.perf_counter()
        tracker.start({"dataset": args["dataset"], "batch_size": args["batch"]}, {"probe": "preflight"})
        start_s = time.perf_counter() - t
        epochs = []
        for e in range(TRACKED_EPOCHS):
            t = time.perf_counter()
            tracker.log_epoch({"epoch": e + 1, "train_loss": 1.0, "test_top1": 50.0, "lr": 0.1}, step=e + 1)
            epochs.append(time.perf_counter() - t)
        t = time.perf_counter()
        tracker.finish({"top1": 50.0, "epochs": TRACKED_EPOCHS}, [run_dir / "history.csv"])
        out.update(tracker_start_s=start_s, tracker_epoch_s=sorted(epochs)[len(epochs) // 2],
                   tracker_finish_s=time.perf_counter() - t, tracker_active=tracker.active)
    out["child_s"] = time.perf_counter() - t0
    out["wait_s"] = _runqueue_wait_s()
    return out


def _create_store(uri: str, env: dict) -> str | None:
    """Create the throw-away store in its own process (so the probe's mlflow import is cold); the
    reason it could not, or None."""
    code = ("import sys; from maskconnect.tracking import ensure_store; "
            "ensure_store(sys.argv[1])")
    r = subprocess.run([sys.executable, "-c", code, uri], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or ["failed"])[-1]
    return None


def probe(*, dataset: str, batch: int, eval_batch: int, device: str, threads: int, track: bool,
          data_dir: str | None = None, workers: int = 0, synthetic: dict | None = None) -> dict:
    """Run the probe once in a new process (``OMP_NUM_THREADS=threads``, as the grid's job runs) and
    return its parts in seconds: ``interpreter_s`` (start and teardown), ``import_s``,
    ``device_init_s``, ``data_s`` and, when ``track``, ``tracker_start_s``, ``tracker_epoch_s`` and
    ``tracker_finish_s``; with the machine's load over the probe (``load``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads))}
    args = {"dataset": dataset, "batch": batch, "eval_batch": eval_batch, "device": device, "data_dir": data_dir,
            "workers": workers, "synthetic": synthetic or {}}
    with tempfile.TemporaryDirectory(prefix="maskconnect-probe-") as tmp:
        store_error = None
        if track:
            args["store"], args["store_uri"] = tmp, f"sqlite:///{tmp}/mlflow.db"
            store_error = _create_store(args["store_uri"], env)
            if store_error:
                args.pop("store")
        start = machine_state()
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", __name__, json.dumps(args)], env=env, capture_output=True,
                           text=True, timeout=600)
        wall = time.perf_counter() - t0
        end = machine_state()
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1], "process_s": wall}
    got = json.loads(r.stdout.strip().splitlines()[-1])
    load = load_window(start, end, 1)
    load["runqueue_wait"] = (round(got["wait_s"] / wall, 4) if got.get("wait_s") is not None and wall > 0 else None)
    got.pop("wait_s", None)
    got["interpreter_s"] = max(0.0, wall - got.pop("child_s"))
    if track and store_error:
        got["tracker_error"] = f"the probe's MLflow store could not be created ({store_error})"
    return {**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in got.items()}, "process_s": round(wall, 4),
            "load": load, "repeats": 1}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))

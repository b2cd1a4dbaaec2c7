"""The preflight's checks, in the order they run; each adds named rows to the record."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from ..specs import arch_label
from ..training.step import Precision
from . import cost as C
from . import datapath, steps
from .steps import Path as StepPath

INDEX_URL_ADVICE = ("reinstall torch for your driver: MASKCONNECT_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 "
                    "bash scripts/setup.sh (README: 'GPU drivers and torch's CUDA build')")


def _timed(pf, name: str, fn) -> dict:
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # a crash on the device path is a failed check, not a traceback
        result = {"passed": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return pf.add(name, result, time.perf_counter() - t0)


def environment(pf) -> bool:
    """torch sees the device the grid needs; versions and the GPU are recorded."""
    from ..provenance import nvidia_smi

    smi = nvidia_smi()
    res: dict = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                 "cuda_available": torch.cuda.is_available(), "nvidia_smi": smi}
    if pf.device.type == "cuda":
        if not torch.cuda.is_available():
            if smi:
                res["advice"] = (f"nvidia-smi sees {smi[0]['name']} (driver {smi[0]['driver_version']}), but torch "
                                 f"{torch.__version__} (built for CUDA {torch.version.cuda}) cannot use it: the driver "
                                 f"is older than this wheel needs (CUDA 13 needs driver R580+); {INDEX_URL_ADVICE}")
            else:
                res["advice"] = ("no GPU: torch sees none and nvidia-smi finds none (no driver loaded?); run on a GPU "
                                 "node, or check the grid's device with --device cpu")
            return pf.add("environment", {**res, "passed": False}, 0.0)["passed"]
        idx = pf.device.index or 0
        if idx >= torch.cuda.device_count():
            res["advice"] = f"cuda:{idx} requested, {torch.cuda.device_count()} GPU(s) visible"
            return pf.add("environment", {**res, "passed": False}, 0.0)["passed"]
        props = torch.cuda.get_device_properties(idx)
        res.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version(), gpus_visible=torch.cuda.device_count(),
                   driver=smi[0]["driver_version"] if smi else None)
    else:
        if smi and not torch.cuda.is_available():
            res["note"] = (f"nvidia-smi sees {smi[0]['name']} but torch cannot use it; {INDEX_URL_ADVICE}")
        if any(r.device.startswith("cuda") for r in pf.grid.runs):
            res["note"] = (res.get("note", "") + " The grid's runs go to CUDA; this preflight ran on the CPU.").strip()
    return pf.add("environment", {**res, "passed": True}, 0.0)["passed"]


def _masked_models(pf) -> list[tuple[str, object, object]]:
    """(label, model, spec) for each masked model of the grid: each {D,w,C} (and width), every
    learned and random K the grid trains."""
    from ..models import build_model

    seen, out = set(), []
    for p in pf.plans:
        s = p.spec
        key = (s.dataset, s.arch, s.stage_width, s.connectivity, s.fan_in)
        if not s.masked or key in seen:
            continue
        seen.add(key)
        torch.manual_seed(0)
        model = build_model(s)
        if s.connectivity == "learned":  # non-uniform rows: the draw differs from row to row
            with torch.no_grad():
                model.masks.real.uniform_(0.05, 1.0, generator=torch.Generator().manual_seed(3))
                if model.masks.valid is not None:  # a ResNet's rows: candidates only
                    model.masks.real.mul_(model.masks.valid)
        width = f" width {s.stage_width}" if s.stage_width else ""
        out.append((f"{s.dataset} {arch_label(s.arch)}{width} {s.connectivity} K={s.fan_in}", model, s))
    return out


def _batch(spec, device: torch.device):
    """A small fixed batch for the correctness checks (4 ImageNet-sized images, else 8)."""
    n = 4 if spec.layout == "imagenet" else 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, spec.in_channels, spec.image_size, spec.image_size, generator=g).to(device)
    return x, torch.randint(0, spec.num_classes, (n,), generator=g).to(device)


def _precisions(pf) -> Precision:
    """The fast precision the grid's runs use on this device (bf16 + channels_last on CUDA by default);
    on a CPU, CUDA's default, so the CPU runs what a GPU will."""
    if pf.device.type == "cpu":
        return Precision(pf.device, torch.bfloat16, True)
    p = pf.plans[0]
    return Precision.for_device(pf.device, amp=p.amp, channels_last=p.channels_last)


def correctness(pf, compile: bool | None = None) -> None:
    dev = pf.device
    fp32 = Precision(dev, None, False)
    fast = _precisions(pf)
    if dev.type == "cuda":
        candidates = [("default path (saving), fp32", StepPath(True, False, fp32))]
    else:
        candidates = [("CPU default path (plain autograd, CPU fast paths), fp32", StepPath(False, True, fp32)),
                      ("CUDA's path (saving, GPU kernels), fp32", StepPath(True, False, fp32)),
                      ("saving path with the CPU's matmul 1x1 backward, fp32", StepPath(True, True, fp32))]
    if fast.amp_dtype is not None or fast.channels_last:
        what = "default path (saving)" if dev.type == "cuda" else "CUDA's path (saving, GPU kernels)"
        prec = fast.describe()
        candidates.append((f"{what}, {prec['autocast_dtype'] or 'fp32'} autocast + {prec['memory_format']}",
                           StepPath(True, False, fast)))
    models = _masked_models(pf)
    for label, model, spec in models:
        x, y = _batch(spec, dev)
        model = model.to(dev)
        ref: dict = {}

        def compare(path=None):
            if "fp32" not in ref:
                with steps.exact_fp32():
                    plain = StepPath(False, False, fp32)
                    r = steps.run_step(model, x, y, plain)
                    ref["fp32"] = r, steps.sensitivity(model, x, y, plain, r, steps.U_FP32)
            return steps.compare_step(model, x, y, path, dev, fp32_reference=ref["fp32"])

        for what, path in candidates:
            _timed(pf, f"train step {label}: {what}", lambda p=path: compare(p))
    _timed(pf, "1x1 backward: batched-matmul branch (CPU)", lambda: steps.conv1x1_backward_check(dev, matmul=True))
    _timed(pf, f"1x1 backward: convolution-kernel branch ({dev.type})",
           lambda: steps.conv1x1_backward_check(dev, matmul=False))
    grid_compiles = any(p.compile for p in pf.plans)
    if compile is None:
        compile = grid_compiles
    if not compile or not models:
        pf.add("torch.compile against eager", {"passed": True, "skipped": "the grid does not compile (--compile runs it)"
                                               if models else "the grid has no masked model"}, 0.0)
        return
    label, model, spec = next((m for m in models if m[2].connectivity == "learned"), models[0])
    x, y = _batch(spec, dev)
    _timed(pf, f"torch.compile against eager: {label}",
           lambda: steps.compile_check(model, x, y, StepPath(dev.type == "cuda", False, fast)))


def data(pf) -> None:
    for ds in dict.fromkeys(p.spec.dataset for p in pf.plans):
        batch = next(p.batch for p in pf.plans if p.spec.dataset == ds)
        _timed(pf, f"data path: {ds} on {pf.device.type}",
               lambda d=ds, b=batch: datapath.data_check(d, pf.device, min(b, 64)))


def ddp(pf, enabled: bool = True) -> None:
    n = torch.cuda.device_count() if pf.device.type == "cuda" else 0
    if not enabled or n < 2:
        why = "--no-ddp" if not enabled else f"{n} GPU visible" if pf.device.type == "cuda" else "not a GPU run"
        pf.add("DDP over the visible GPUs", {"passed": True, "skipped": why}, 0.0)
        return
    _timed(pf, f"DDP (NCCL) over {n} GPUs: masks identical on every rank", lambda: datapath.ddp_check(n))


def _kind(s) -> str:
    return {"full": "Fixed-Full", "prev": "Fixed-Prev", "random": "Fixed-Random", "learned": "Learned"}[s.connectivity]


def _median(t: dict | None) -> float:
    return t["median"] if t and "median" in t else 0.0


def _timing_rows(times: dict, loaders: dict, probes: dict) -> list[tuple[str, dict]]:
    """(what, record) of every timing of the cost check, for the verdict on whether they were disturbed."""
    rows = []
    for t in times.values():
        for phase, p in (t.get("phases") or {}).items():
            rows += [(f"{t['label']} {phase} training step", p["train_step"]), (f"{t['label']} {phase} evaluation pass", p["eval_pass"])]
        if t.get("checkpoint"):
            rows.append((f"{t['label']} checkpoint", t["checkpoint"]))
        if t.get("finish"):
            rows.append((f"{t['label']} end of run", t["finish"]))
    for (ds, *_), lt in loaders.items():
        for part in ("train_batch", "test_batch"):
            if part in lt:
                rows.append((f"{ds} loader {part.replace('_', ' ')}", lt[part]))
    for (ds, *_), pr in probes.items():
        if "load" in pr:
            rows.append((f"{ds} start-up probe", pr))
    return rows


def cost(pf, repeats: int = 20) -> dict:
    """Memory check and, per distinct network of the grid, the timings that price its runs (cost.py),
    the data path's batches, one start-up probe per dataset, then the projection; a row says whether
    the timings can be trusted."""
    from . import startup
    from .timing import disturbance

    dev = pf.device
    scratch = (pf.out or Path("results/preflight") / pf.grid.name) / ".timing"
    times: dict = {}
    loaders: dict = {}
    probes: dict = {}
    for p in pf.plans:
        key = p.model_key
        if key in times:
            continue
        s = p.spec
        precision = Precision.for_device(dev, amp=p.amp, channels_last=p.channels_last)
        width = f" width {s.stage_width}" if s.stage_width else ""
        label = f"{s.dataset} {arch_label(s.arch)}{width} {_kind(s)}, batch {p.batch}"
        mem = _timed(pf, f"memory: {label}", lambda: C.memory_check(s, p.batch, dev, precision))
        if not mem["passed"] or mem.get("error"):
            times[key] = {"label": label, "error": "did not fit in memory"}
            continue
        t0, threads = time.perf_counter(), torch.get_num_threads()
        if dev.type == "cpu":
            torch.set_num_threads(max(1, p.run.threads))  # as the job will run
        syn = dict(p.run.train).get("synthetic") or None
        try:
            phases, (model, opt, sched) = C.phase_times(p, dev, precision, repeats=repeats)
            first = phases[C.phases_of(p)[0]]
            times[key] = {"label": label, "threads": torch.get_num_threads() if dev.type == "cpu" else None,
                          "batch": p.batch, "eval_batch": p.eval_batch, "repeats": repeats,
                          "train_step_s": first["train_step"]["median"], "eval_step_s": first["eval_pass"]["median"],
                          "phases": phases,
                          "checkpoint": C.checkpoint_time(p, model, opt, sched, dev, scratch / "checkpoint"),
                          "finish": C.finish_time(p, model, dev, scratch / "finish")}
            del model, opt, sched
            lkey = (s.dataset, p.batch, p.eval_batch, p.run.threads)
            if lkey not in loaders:
                loaders[lkey] = datapath.loader_times(s.dataset, dev, p.batch, p.eval_batch, repeats=repeats,
                                                      data_dir=p.cfg.data_dir, workers=p.cfg.workers, synthetic=syn)
            pkey = (s.dataset, p.run.threads, p.cfg.track)
            if pkey not in probes:
                probes[pkey] = startup.probe(dataset=s.dataset, batch=p.batch, eval_batch=p.eval_batch,
                                             device=dev.type, threads=p.run.threads, track=p.cfg.track,
                                             data_dir=p.cfg.data_dir, workers=p.cfg.workers, synthetic=syn)
        except Exception as e:  # noqa: BLE001 - recorded, and the projection says it is missing
            times[key] = {"label": label, "error": f"{type(e).__name__}: {e}"}
        finally:
            torch.set_num_threads(threads)
        times[key]["seconds"] = time.perf_counter() - t0
    shutil.rmtree(scratch, ignore_errors=True)

    disturbed = [f"{what}: {'; '.join(why)}" for what, t in _timing_rows(times, loaders, probes) for why in [disturbance(t)] if why]
    n_timings = len(_timing_rows(times, loaders, probes))
    pf.add("cost: timings undisturbed", {
        "passed": not disturbed, "timings": n_timings, "disturbed": disturbed,
        **({"advice": f"{len(disturbed)} of {n_timings} timings were disturbed, so the projection below is not to be "
                      f"trusted ({disturbed[0]}{'; ...' if len(disturbed) > 1 else ''}): rerun the preflight when "
                      "the machine is quiet"} if disturbed else {})}, 0.0)

    failed = [f"{t['label']}: {t['error']}" for t in times.values() if t.get("error")]
    failed += [f"{ds} start-up probe: {pr[k]}" for (ds, *_), pr in probes.items() for k in ("error", "tracker_error")
               if pr.get(k)]
    if failed:
        pf.add("cost: every part timed", {
            "passed": False, "failed": failed,
            "advice": f"{len(failed)} part(s) of the runs could not be timed, so the projection leaves them out "
                      f"({failed[0]})"}, 0.0)

    runs, parts, jobs = [], {}, {}
    gpus_here = torch.cuda.device_count() if dev.type == "cuda" else 0
    capacity = gpus_here if dev.type == "cuda" else (os.cpu_count() or 1)
    for p in pf.plans:
        t = times[p.model_key]
        syn = dict(p.run.train).get("synthetic") or {}
        row = {"run": p.run.run_id, "grid": p.run.grid, "gpus": p.run.gpus, "threads": p.run.threads,
               "epochs": p.epochs, "freeze_epoch": p.cfg.freeze_epoch if p.spec.connectivity == "learned" else None,
               "batch": p.batch, "model": t["label"], "hours": None, "device_hours": None}
        if "phases" in t:
            lt = loaders[(p.spec.dataset, p.batch, p.eval_batch, p.run.threads)]
            pr = probes[(p.spec.dataset, p.run.threads, p.cfg.track)]
            steps, evals = C.step_counts(p.spec.dataset, p.batch, p.eval_batch, p.run.gpus, syn.get("train_size"),
                                         syn.get("test_size"))
            phases = {name: {"train_step_s": ph["train_step"]["median"], "eval_step_s": ph["eval_pass"]["median"],
                             "loader_s": _median(lt.get("train_batch")), "test_loader_s": _median(lt.get("test_batch")),
                             "warmup_s": ph["warmup_s"]} for name, ph in t["phases"].items()}
            first = next(iter(t["phases"].values()))
            per_run = {k: pr.get(k, 0.0) or 0.0 for k in ("interpreter_s", "import_s", "device_init_s", "data_s")}
            per_run.update(tracker_s=(pr.get("tracker_start_s") or 0.0) + (pr.get("tracker_finish_s") or 0.0),
                           model_build_s=first["model_build_s"], finish_s=t["finish"]["seconds"])
            epoch_end = {"checkpoint_s": t["checkpoint"]["median"], "tracker_epoch_s": pr.get("tracker_epoch_s") or 0.0}
            priced = C.price_run(epochs=p.epochs, freeze_epoch=p.cfg.freeze_epoch, steps=steps, evals=evals,
                                 phases=phases, epoch_end=epoch_end, per_run=per_run,
                                 asynchronous_loader=bool(lt.get("asynchronous")))
            h = priced["seconds"] / 3600
            row.update(steps=steps, evals=evals, phases=priced["phases"], epoch_end_s=epoch_end,
                       per_run_s=priced["per_run_s"], loop_s=priced["loop_s"], seconds=priced["seconds"],
                       hours=h, device_hours=h * max(p.run.gpus, 1))
        runs.append(row)
        agg = parts.setdefault(p.run.grid, {"runs": 0, "hours": 0.0, "device_hours": 0.0, "missing": 0})
        agg["runs"] += 1
        if row["hours"] is None:
            agg["missing"] += 1
        else:
            agg["hours"] += row["hours"]
            agg["device_hours"] += row["device_hours"]
            units = max(p.run.gpus, 1) if dev.type == "cuda" else min(max(1, p.run.threads), capacity)
            jobs.setdefault(p.run.grid, []).append((row["seconds"], units))
    for part, agg in parts.items():
        wall = C.grid_wall_s(jobs.get(part, []), capacity)
        agg["wall_hours"] = None if wall is None else wall / 3600
    walls = C.grid_wall_s([j for js in jobs.values() for j in js], capacity)
    total = {"runs": len(runs), "hours": sum(a["hours"] for a in parts.values()),
             "device_hours": sum(a["device_hours"] for a in parts.values()),
             "wall_hours": None if walls is None else walls / 3600,
             "missing": sum(a["missing"] for a in parts.values())}
    if dev.type == "cuda":
        concurrency = (f"{capacity} GPU(s) on this node, each run on its own GPUs (run.gpus); a run that needs more GPUs "
                       "than the node has gets no wall time")
    else:
        concurrency = f"{capacity} CPUs: each job takes its threads (run.threads), as many jobs at once as fit"
    return {"device": str(dev), "unit": "GPU-hours" if dev.type == "cuda" else "CPU-hours",
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "repeats": repeats,
            "method": "per run: epochs of each phase x (training steps x (step + loader batch) + evaluation passes x "
                      "(evaluation pass + test batch) + checkpoint and tracker per epoch) + start-up, data loading, model "
                      "build, warm-up (compile), tracker and end of run (medians of timings on this device; learned runs: "
                      "the joint epochs at the learned step, the fine-tune epochs at the frozen model's); multi-GPU runs: "
                      "device-hours = hours x GPUs; wall: the grid's runs in order, as many at once as the concurrency allows",
            "concurrency": {"capacity": capacity, "what": concurrency},
            "disturbed": disturbed, "models": list(times.values()),
            "loaders": [{"dataset": k[0], **v} for k, v in loaders.items()],
            "startup": [{"dataset": k[0], "threads": k[1], "tracked": k[2], **v} for k, v in probes.items()],
            "runs": runs, "parts": parts, "total": total}

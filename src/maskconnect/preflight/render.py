"""preflight.md: the record as a person reads it."""

from __future__ import annotations

import math


def _value(c: dict) -> str:
    if c.get("skipped"):
        return f"skipped: {c['skipped']}"
    if c.get("error"):
        return c["error"]
    if c.get("advice"):
        return c["advice"]
    if "worst" in c and c["worst"]:
        w = c["worst"]
        return f"worst {w['tensor']}: {w['rel_error']:.2e} (bound {w['bound']:.2e}), {c['tensors']} tensors"
    if "worst_rel_error" in c:
        return f"{c['worst_rel_error']:.2e} (bound {c['bound']}), {c['shapes']} shapes on {c['device']}"
    if "max_abs_difference" in c:
        return f"max |difference| {c['max_abs_difference']:.1e} over {c.get('images', '?')} images ({c.get('source', '')})"
    if "step_bytes" in c:
        extra = f", largest batch ~{c['largest_batch_estimate']:,}" if c.get("largest_batch_estimate") else ""
        return f"{c['step_bytes'] / 2**20:,.1f} MiB of {c['device_bytes'] / 2**30:,.1f} GiB ({100 * c['fraction']:.2f}%){extra}"
    if "failed" in c and c.get("name") == "cost: every part timed":
        return "; ".join(c["failed"])
    if "disturbed" in c:
        return f"{c['timings']} timings, none disturbed (each with its spread and load: the cost section)"
    if "masks_identical" in c:
        return f"{c['ranks']} ranks, masks identical: {c['masks_identical']}, moved: {c['masks_moved']}"
    if c.get("name") == "environment":
        gpu = f"{c['gpu']} ({c['gpu_memory_bytes'] / 2**30:.0f} GiB), driver {c.get('driver')}, " if c.get("gpu") else ""
        return f"{gpu}torch {c['torch']}, CUDA build {c['torch_cuda']}" + (f"; {c['note']}" if c.get("note") else "")
    return ""


def markdown(rec: dict) -> str:

    env = rec["environment"]
    n_pass = sum(c["passed"] for c in rec["checks"])
    lines = [f"# Preflight: grid `{rec['grid']}` on {rec['device']} ({env['device_name']})", "",
             f"**{'PASSED' if rec['passed'] else 'FAILED'}**: {n_pass} of {len(rec['checks'])} checks passed in "
             f"{rec['seconds']:.0f} s. torch {env['torch_version']}, CUDA {env.get('cuda_version')}, "
             f"cuDNN {env.get('cudnn_version')}, Python {env['python_version']}, commit {str(env.get('git_commit'))[:12]}.",
             "", "| check | result | measured |", "|---|---|---|"]
    for c in rec["checks"]:
        status = "skipped" if c.get("skipped") else ("ok" if c["passed"] else "**FAILED**")
        lines.append(f"| {c['name']} | {status} | {_value(c).replace('|', '/')} |")
    proj = rec.get("projection")
    if proj:
        lines += cost_lines(proj)
    return "\n".join(lines) + "\n"


def _spread(t: dict | None) -> str:
    if not t or "median" not in t:
        return "-"
    return f"{t['median']:.4f} ({t['min']:.4f}-{t['max']:.4f}, n={t['repeats']})"


def _load(t: dict | None) -> str:
    load = (t or {}).get("load") or {}
    if not load:
        return "-"
    la = [x[0] if x else None for x in (load.get("loadavg_start"), load.get("loadavg_end"))]
    wait = load.get("runqueue_wait")
    return (f"{la[0]}->{la[1]} on {load.get('cpus')} CPUs"
            + (f", waited {100 * wait:.0f}%" if wait is not None else ""))


def cost_lines(proj: dict) -> list[str]:
    """The cost section: every timing with its spread and load, the per-phase and per-run pricing of
    each kind of run, and the grid's hours, wall time and device-hours."""
    unit = proj["unit"]
    lines = ["", f"## Cost on this device ({unit})", "", proj["method"] + ".",
             f"cudnn.benchmark: {proj.get('cudnn_benchmark')}. Timings: median (min-max, n) seconds; load average "
             "(1 min) at the start and end, and the share of the time this process waited for a CPU.", ""]
    if proj.get("disturbed"):
        lines += [f"**The timings were disturbed** ({len(proj['disturbed'])}): the projection is not to be trusted; "
                  "rerun the preflight on a quiet machine.", ""] + [f"* {d}" for d in proj["disturbed"]] + [""]
    lines += ["| model | phase | train step (s) | eval pass (s) | load |", "|---|---|---|---|---|"]
    for m in proj["models"]:
        if "phases" not in m:
            lines.append(f"| {m['label']} | | {m.get('error', '-')} | | |")
            continue
        for name, ph in m["phases"].items():
            lines.append(f"| {m['label']} | {name} | {_spread(ph['train_step'])} | {_spread(ph['eval_pass'])} | "
                         f"{_load(ph['train_step'])} |")
    for lt in proj.get("loaders", []):
        if "skipped" in lt:
            lines.append(f"| {lt['dataset']} loader | | {lt['skipped']} | | |")
        else:
            lines.append(f"| {lt['dataset']} loader ({lt['source']}), batch {lt['batch']}/{lt['eval_batch']} | "
                         f"{'asynchronous' if lt['asynchronous'] else 'in the step'} | {_spread(lt['train_batch'])} | "
                         f"{_spread(lt['test_batch'])} | {_load(lt['train_batch'])} |")
    for pr in proj.get("startup", []):
        if "error" in pr:
            lines.append(f"| {pr['dataset']} start-up probe | | {pr['error']} | | |")
            continue
        parts = ", ".join(f"{k.removesuffix('_s')} {pr[k]:.2f}" for k in ("interpreter_s", "import_s", "data_s",
                                                                           "tracker_start_s", "tracker_finish_s")
                          if isinstance(pr.get(k), (int, float)))
        note = f"; {pr['data_error']}" if pr.get("data_error") else ""
        lines.append(f"| {pr['dataset']} start-up probe (a new process, {pr['threads']} thread(s)) | per run | "
                     f"{pr['process_s']:.2f}: {parts}{note} | | {_load(pr)} |")
    seen = set()
    for r in proj["runs"]:
        if r.get("seconds") is None:
            continue
        key = (r["model"], r["epochs"], r.get("freeze_epoch"))
        if key in seen:
            continue
        seen.add(key)
        n = sum(1 for x in proj["runs"] if (x["model"], x["epochs"], x.get("freeze_epoch")) == key)
        phases = ", ".join(f"{v['epochs']} {k} x {v['epoch_s']:.3g} s" for k, v in r["phases"].items())
        per = r["per_run_s"]
        per_text = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in per.items() if v)
        lines.append(f"| runs of {r['model']} (x{n}) | {phases} | loop {r['loop_s']:.1f} s + per run "
                     f"{sum(per.values()):.1f} s = **{r['seconds']:.1f} s** | {per_text} | |")
    conc = proj.get("concurrency") or {}
    lines += ["", f"Wall time with the grid's real concurrency: {conc.get('what', '-')}.", "",
              f"| grid | runs | hours (sum of runs) | hours (wall) | {unit} |", "|---|---:|---:|---:|---:|"]
    for part, a in proj["parts"].items():
        miss = f" ({a['missing']} not measured)" if a["missing"] else ""
        lines.append(f"| {part} | {a['runs']}{miss} | {hours_text(a['hours'])} | {hours_text(a.get('wall_hours'))} | "
                     f"{hours_text(a['device_hours'])} |")
    t = proj["total"]
    lines.append(f"| **all** | {t['runs']} | {hours_text(t['hours'])} | {hours_text(t.get('wall_hours'))} | "
                 f"{hours_text(t['device_hours'])} |")
    return lines


def hours_text(h: float | None) -> str:
    if h is None or not math.isfinite(h):
        return "-"
    return f"{h:,.2f}" if h < 100 else f"{h:,.0f}"

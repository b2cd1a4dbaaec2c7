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
        unit = proj["unit"]
        lines += ["", f"## Cost on this device ({unit})", "", proj["method"] + ".", "",
                  "| model | train step (s) | eval pass (s) |", "|---|---:|---:|"]
        for m in proj["models"]:
            if "train_step_s" in m:
                lines.append(f"| {m['label']} | {m['train_step_s']:.4f} | {m['eval_step_s']:.4f} |")
            else:
                lines.append(f"| {m['label']} | {m.get('error', '-')} | |")
        lines += ["", f"| grid | runs | hours (wall) | {unit} |", "|---|---:|---:|---:|"]
        for part, a in proj["parts"].items():
            miss = f" ({a['missing']} not measured)" if a["missing"] else ""
            lines.append(f"| {part} | {a['runs']}{miss} | {hours_text(a['hours'])} | {hours_text(a['device_hours'])} |")
        t = proj["total"]
        lines.append(f"| **all** | {t['runs']} | {hours_text(t['hours'])} | {hours_text(t['device_hours'])} |")
    return "\n".join(lines) + "\n"


def hours_text(h: float | None) -> str:
    if h is None or not math.isfinite(h):
        return "-"
    return f"{h:,.2f}" if h < 100 else f"{h:,.0f}"

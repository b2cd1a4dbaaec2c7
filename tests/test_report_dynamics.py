"""The report's mask-dynamics figure and its REPORT.md section: converged masks, saturated masks and
unconverged runs are told apart from history.csv and metrics.json alone (docs/design.md section 8)."""

import json
import math
from pathlib import Path

from maskconnect.report import build_report

COLUMNS = ("epoch,phase,lr,mask_lr,train_loss,train_top1,test_loss,test_top1,test_top5,mask_entropy,mask_changed,"
           "mask_mean,mask_at_0,mask_at_1,mask_margin,mask_ties,epoch_time_s")


def _run(root: Path, conn: str, k: int, seed: int, *, rule: str, end_entropy: float, changed: int, ties: int,
         at_1: float, tied_at_freeze: int, last_top1=(90.0, 90.2, 90.4), epochs: int = 8) -> Path:
    run = root / "digits" / "20-4-8" / f"{conn}-K{k}" / f"seed{seed}"
    run.mkdir(parents=True)
    learned = conn == "learned"
    metrics = {"status": "complete", "dataset": "digits", "arch": "20,4,8", "depth": 20, "width": 4, "cardinality": 8,
               "connectivity": conn, "fan_in": k, "seed": seed, "top1": last_top1[-1], "top5": 99.0,
               "best_top1": last_top1[-1], "best_top5": 99.0, "test_loss": 0.3, "params_train": 273_000,
               "params_test": 273_000, "masks": 320, "flops": 1, "epochs": epochs, "wall_time_s": 1.0,
               "device": "cpu", "config": {"mask_rule": rule} if learned else {}, "versions": {}, "git_commit": None}
    if learned:
        metrics.update(mask_rule=rule, mask_tied_rows=tied_at_freeze, mask_rows=40)
    (run / "metrics.json").write_text(json.dumps(metrics))
    lines = [COLUMNS]
    top = [80.0] * (epochs - len(last_top1)) + list(last_top1)
    for e in range(1, epochs + 1):
        phase = ("joint" if e <= epochs // 2 else "finetune") if learned else "fixed"
        if learned:
            frac = min(e, epochs // 2) / (epochs // 2)
            ent = math.log(8) * (1 - frac) + end_entropy * frac
            m = f"{ent:.4f},{changed if e >= epochs // 2 else 30},0.25,0.1,{at_1 * frac:.3f},0.1,{ties if e >= epochs // 2 else 0}"
        else:
            m = ",,,,,,"
        lines.append(f"{e},{phase},0.1,0.1,0.5,90,0.3,{top[e - 1]},99,{m},1.0")
    (run / "history.csv").write_text("\n".join(lines) + "\n")
    return run


def test_mask_dynamics_section_and_figure(tmp_path):
    root = tmp_path / "runs" / "demo"
    for seed in range(2):
        _run(root, "learned", 2, seed, rule="projected", end_entropy=0.6 * math.log(8), changed=1, ties=0, at_1=0.1,
             tied_at_freeze=0)
        _run(root, "learned", 4, seed, rule="clip", end_entropy=0.995 * math.log(8), changed=35, ties=20, at_1=0.9,
             tied_at_freeze=20)
        _run(root, "random", 2, seed, rule="", end_entropy=0, changed=0, ties=0, at_1=0, tied_at_freeze=0,
             last_top1=(70.0, 80.0, 88.0) if seed == 1 else (90.0, 90.2, 90.4))
    out = tmp_path / "report"
    written = build_report(tmp_path, out, grid="demo")
    assert "figures/mask_dynamics_digits_20-4-8.png" in written
    png = written["figures/mask_dynamics_digits_20-4-8.png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    text = (out / "REPORT.md").read_text()
    assert "What the masks did (digits)" in text
    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| {20,4,8} |")}
    k2, k4 = rows["2"], rows["4"]
    assert "| projected |" in k2 and "| 0.600 |" in k2 and k2.rstrip().endswith("| converged |")
    assert "| clip |" in k4 and "| 20.0 |" in k4 and "**not converged**" in k4
    # the random run whose accuracy still climbed by 18 points over its last 3 epochs is called out
    assert "1 of 6 runs had not converged" in text and "18.00" in text

"""``maskconnect preflight``: it passes on a correct device path, and every check can fail.

On this CPU the preflight runs what CUDA runs (the memory-saving path with the GPU's kernels, bf16
autocast + channels_last), so a wrong gradient injected into any custom backward of the model must
fail it, as must a wrong data path, a step that does not fit in memory, or a GPU torch cannot see.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from maskconnect import models
from maskconnect.kernels import cpu as cpu_kernels, saving
from maskconnect.models import masked
from maskconnect.cli import main
from maskconnect.preflight import datapath, steps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import checkout, job_counts, snakemake, tool_env  # noqa: E402,F401  (fixture and helpers)


def _preflight(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "pf"
    code = main(["preflight", "--out", str(out), *args])
    rec = json.loads((out / "preflight.json").read_text()) if (out / "preflight.json").exists() else None
    return code, rec


def _failed(rec: dict) -> list[str]:
    return [c["name"] for c in rec["checks"] if not c["passed"]]


def _failed_besides_timing(rec: dict) -> list[str]:
    """The failed checks, less the cost check's verdict on disturbed timings: other engineers' jobs share
    this machine's cores, and a disturbed timing rightly fails that row (tests/test_preflight_cost.py)."""
    timing = next((c for c in rec["checks"] if c["name"] == "cost: timings undisturbed"), None)
    if timing is not None and not timing["passed"]:
        assert timing["disturbed"] and "rerun the preflight when the machine is quiet" in timing["advice"]
    return [n for n in _failed(rec) if n != "cost: timings undisturbed"]


def test_a_network_the_cost_check_cannot_time_fails_the_preflight_and_names_the_reason(tmp_path, monkeypatch):
    from maskconnect.preflight import cost

    def broken(*args, **kwargs):
        raise RuntimeError("the step raised")
    monkeypatch.setattr(cost, "phase_times", broken)
    code, rec = _preflight(tmp_path, "--grid", "demo", "--device", "cpu", "--time-steps", "2", "--no-compile")
    assert code == 1 and not rec["passed"]
    check = next(c for c in rec["checks"] if c["name"] == "cost: every part timed")
    assert not check["passed"] and len(check["failed"]) == 3 and "RuntimeError: the step raised" in check["failed"][0]
    assert rec["projection"]["total"]["missing"] == 18
    assert "RuntimeError: the step raised" in (tmp_path / "pf" / "preflight.md").read_text()


def test_a_start_up_probe_whose_tracker_fails_fails_the_cost_check(tmp_path, monkeypatch):
    """The MLflow run's start and end are about 6 s of a 40 s demo run: a probe that could not time them
    must not leave a projection that silently omits them."""
    from maskconnect.preflight import startup

    monkeypatch.setattr(startup, "_create_store", lambda uri, env: "the store refused")
    grid = tmp_path / "cost.yaml"
    grid.write_text(COST_GRID)
    code, rec = _preflight(tmp_path, "--grid", str(grid), "--device", "cpu", "--time-steps", "1")
    check = next(c for c in rec["checks"] if c["name"] == "cost: every part timed")
    assert code == 1 and not check["passed"]
    assert check["failed"] == ["digits start-up probe: the probe's MLflow store could not be created (the store refused)"]


def test_demo_preflight_on_cpu_passes_and_records_the_checks_and_the_cost(tmp_path):
    code, rec = _preflight(tmp_path, "--grid", "demo", "--device", "cpu")
    assert _failed_besides_timing(rec) == [] and code == (0 if rec["passed"] else 1)
    run = [c for c in rec["checks"] if not c.get("skipped")]
    names = [c["name"] for c in run]
    assert len(set(names)) == len(names) >= 6
    for kind in ("environment", "train step", "1x1 backward: batched-matmul", "1x1 backward: convolution-kernel",
                 "data path: digits", "memory: digits", "cost: timings undisturbed"):
        assert any(n.startswith(kind) for n in names), kind
    # every masked model of the grid (random K=2,4; learned K=1,2,4) on CUDA's path in fp32 and bf16
    for label in ("random K=2", "random K=4", "learned K=1", "learned K=2", "learned K=4"):
        assert any(label in n and "CUDA's path (saving, GPU kernels), fp32" in n for n in names), label
        assert any(label in n and "bfloat16 autocast + channels_last" in n for n in names), label
    step = next(c for c in run if c["name"].startswith("train step") and "fp32" in c["name"])
    # correct paths agree to fp32 rounding (measured 1e-9 to 5e-5), far below a one-percent fault
    assert step["tensors"] > 100 and step["worst"]["rel_error"] < 1e-3
    env = rec["environment"]
    assert env["torch_version"] == torch.__version__ and env["device"] == "cpu"
    proj = rec["projection"]
    assert proj["total"]["runs"] == 18 and proj["total"]["missing"] == 0 and proj["total"]["hours"] > 0
    assert proj["cudnn_benchmark"] is torch.backends.cudnn.benchmark is True
    assert {m["label"].split(", batch")[0].split()[-1] for m in proj["models"]} == {"Fixed-Full", "Fixed-Random", "Learned"}
    full = next(m for m in proj["models"] if "Fixed-Full" in m["label"])
    learned = next(m for m in proj["models"] if "Learned" in m["label"])
    assert learned["train_step_s"] > full["train_step_s"] > 0  # a masked step moves C branch tensors
    # every timing holds its spread, repeat count and load; learned runs have both phases, timed apart
    assert set(full["phases"]) == {"fixed"} and set(learned["phases"]) == {"joint", "finetune"}
    timings = [ph[k] for m in proj["models"] for ph in m["phases"].values() for k in ("train_step", "eval_pass")]
    timings += [m["checkpoint"] for m in proj["models"]] + [lt[k] for lt in proj["loaders"] for k in ("train_batch", "test_batch")]
    for t in timings:
        assert t["min"] <= t["median"] <= t["max"] and t["repeats"] == len(t["samples"]) >= 3
        assert t["load"]["cpus"] == os.cpu_count() and len(t["load"]["loadavg_start"]) == len(t["load"]["loadavg_end"]) == 3
    assert learned["phases"]["joint"]["train_step"]["repeats"] == 20
    probe = proj["startup"][0]
    assert probe["dataset"] == "digits" and probe["tracked"] is True and probe["process_s"] > probe["import_s"] > 0
    assert "load" in probe and probe["data_error"] is None
    # learned runs: the joint epochs at the learned step, the fine-tune epochs at the frozen model's
    lrun = next(r for r in proj["runs"] if "learned" in r["run"])
    assert lrun["phases"]["joint"]["epochs"] == lrun["freeze_epoch"] == 10 and lrun["phases"]["finetune"]["epochs"] == 8
    assert lrun["seconds"] == pytest.approx(lrun["loop_s"] + sum(lrun["per_run_s"].values()))
    # two single-thread jobs at once on this machine's cores: the wall time is below the sum
    assert proj["total"]["wall_hours"] < proj["total"]["hours"]
    md = (tmp_path / "pf" / "preflight.md").read_text()
    assert ("**PASSED**" if rec["passed"] else "**FAILED**") in md and "| demo | 18 |" in md
    assert md.count("| ok |") == sum(c["passed"] for c in run) and "Learned, batch 64 | finetune |" in md


COST_GRID = """\
name: costgrid
defaults: {dataset: digits, seeds: [0, 1], recipe: smoke, device: cpu}
entries:
  - {arch: "11,2,4", connectivity: full, train: {epochs: 3, batch_size: 64, eval_batch_size: 100, stage_width: 8}}
  - {arch: "11,2,2", connectivity: full, train: {epochs: 2, batch_size: 50, eval_batch_size: 128, stage_width: 4}}
"""


def test_the_projection_is_epochs_times_training_steps_and_evaluation_passes(tmp_path):
    """Each run's projected hours, by hand from the record's own timings: epochs x (training steps x
    (step + loader batch) + evaluation passes x (evaluation pass + test batch) + checkpoint + tracker
    epoch) + the per-run terms, with the step counts of the data a run iterates (not the projection's
    table of dataset sizes); the total is their sum."""
    from maskconnect.data import build_data
    from maskconnect.preflight import cost

    grid = tmp_path / "cost.yaml"
    grid.write_text(COST_GRID)
    code, rec = _preflight(tmp_path, "--grid", str(grid), "--device", "cpu", "--time-steps", "1")
    assert _failed_besides_timing(rec) == [], _failed(rec)
    proj = rec["projection"]
    times = {m["label"]: m for m in proj["models"]}
    loaders = {(lt["batch"], lt["eval_batch"]): lt for lt in proj["loaders"]}
    probe = proj["startup"][0]
    settings = {"digits/11-2-4": (3, 64, 100), "digits/11-2-2": (2, 50, 128)}  # epochs, batch, eval batch
    hand = {}
    for run in proj["runs"]:
        epochs, batch, eval_batch = settings[run["run"].rsplit("/", 2)[0]]
        data = build_data("digits", batch_size=batch, eval_batch_size=eval_batch, augment=False)
        steps, evals = data.steps_per_epoch(), sum(1 for _ in data.test_batches())
        t, lt = times[run["model"]], loaders[(batch, eval_batch)]
        ph = t["phases"]["fixed"]
        assert (run["epochs"], t["batch"], t["eval_batch"]) == (epochs, batch, eval_batch)
        epoch = (steps * (ph["train_step"]["median"] + lt["train_batch"]["median"])
                 + evals * (ph["eval_pass"]["median"] + lt["test_batch"]["median"])
                 + t["checkpoint"]["median"] + probe["tracker_epoch_s"])
        once = (probe["interpreter_s"] + probe["import_s"] + probe["device_init_s"] + probe["data_s"]
                + probe["tracker_start_s"] + probe["tracker_finish_s"] + ph["model_build_s"] + ph["warmup_s"]
                + t["finish"]["seconds"])
        hand[run["run"]] = (epochs * epoch + once) / 3600
        assert run["hours"] == pytest.approx(hand[run["run"]], rel=1e-9), (run, steps, evals)
    assert len(hand) == 4 and proj["total"]["hours"] == pytest.approx(sum(hand.values()), rel=1e-9)
    # run_hours on made-up times: 1442 training images are 23 steps of 64 (12 of 2 x 64 on two GPUs), 355
    # test images 4 passes of 100: 3 x (23 x 0.5 + 4 x 0.2) = 36.9 s, and 3 x (12 x 0.5 + 4 x 0.2) = 20.4 s
    made_up = {"train_step_s": 0.5, "eval_step_s": 0.2}
    assert cost.run_hours("digits", 3, 64, 100, 0, made_up) == pytest.approx(36.9 / 3600)
    assert cost.run_hours("digits", 3, 64, 100, 2, made_up) == pytest.approx(20.4 / 3600)


def _scaled(fn, index: int, factor: float, when=lambda *a: True):
    """``fn`` (a backward) with its ``index``-th returned gradient scaled by ``factor``."""
    def wrapped(*args):
        out = list(fn(*args))
        if out[index] is not None and when(*args):
            out[index] = out[index] * factor
        return tuple(out)
    return staticmethod(wrapped)


def _inject(monkeypatch, where: str) -> None:
    """Break one custom backward where the code looks it up: the autograd Functions' classes, and
    ``_conv1x1_backward`` in ``kernels.saving`` (its callers, and the preflight's own check, read it
    from there at call time)."""
    if where == "_ChannelsLastBN.backward (input gradient x1.5)":
        fn = cpu_kernels._ChannelsLastBN
        monkeypatch.setattr(fn, "backward", _scaled(fn.backward, 0, 1.5))
    elif where == "_MixedInput.backward (branch-tensor gradient x1.5)":
        monkeypatch.setattr(saving._MixedInput, "backward", _scaled(saving._MixedInput.backward, 1, 1.5))
    elif where == "_SharedBNTail.backward (conv3 weight gradient of the wrong sign)":
        monkeypatch.setattr(saving._SharedBNTail, "backward", _scaled(saving._SharedBNTail.backward, 2, -1.0))
    else:
        matmul = "matmul" in where
        orig = saving._conv1x1_backward

        def wrong(grad, x, weight, groups, need_input, need_weight):
            gi, gw = orig(grad, x, weight, groups, need_input, need_weight)
            if cpu_kernels._matmul_1x1(x, groups, weight.shape[0]) == matmul and gi is not None:
                gi = gi * 1.5
            return gi, gw
        monkeypatch.setattr(saving, "_conv1x1_backward", wrong)


INJECTIONS = {
    "_ChannelsLastBN.backward (input gradient x1.5)": ["CPU default path"],
    "_MixedInput.backward (branch-tensor gradient x1.5)": ["CUDA's path (saving, GPU kernels), fp32", "matmul 1x1 backward"],
    "_conv1x1_backward, matmul branch (input gradient x1.5)": ["matmul 1x1 backward, fp32", "1x1 backward: batched-matmul"],
    "_conv1x1_backward, convolution branch (input gradient x1.5)": ["CUDA's path (saving, GPU kernels), fp32",
                                                                    "1x1 backward: convolution-kernel"],
    # a fault of the size the bf16 rows are there to catch too (preflight/steps.py): a gradient of the wrong sign
    "_SharedBNTail.backward (conv3 weight gradient of the wrong sign)": [
        "CUDA's path (saving, GPU kernels), fp32", "matmul 1x1 backward",
        "CUDA's path (saving, GPU kernels), bfloat16 autocast + channels_last"],
}
# each fault's factor: the relative error it makes in the gradient it scales is |factor - 1|
FACTORS = {where: -1.0 if "wrong sign" in where else 1.5 for where in INJECTIONS}


@pytest.mark.parametrize("where", list(INJECTIONS))
def test_a_wrong_gradient_in_any_custom_backward_fails_the_cpu_preflight(where, tmp_path, monkeypatch):
    from maskconnect.preflight import startup

    monkeypatch.setattr(startup, "probe", lambda **kw: {"error": "not run in this test"})
    _inject(monkeypatch, where)
    code, rec = _preflight(tmp_path, "--grid", "smoke", "--device", "cpu", "--time-steps", "1")
    failed = _failed(rec)
    assert code == 1 and rec["passed"] is False
    for expected in INJECTIONS[where]:
        assert any(expected in name for name in failed), (expected, failed)
    assert not any(n.startswith(("data path", "memory", "environment")) for n in failed)  # only what was broken
    # the failing rows name the error the fault makes (at least that of the gradient it scales, less trimming)
    fault = abs(FACTORS[where] - 1)
    for row in (c for c in rec["checks"] if c["name"] in failed and c.get("worst")):
        assert row["worst"]["rel_error"] >= 0.8 * fault, (row["name"], row["worst"])
    assert "FAILED" in (tmp_path / "pf" / "preflight.md").read_text()


def test_a_wrong_augmentation_fails_the_data_check(tmp_path, monkeypatch):
    import maskconnect.data.tensor as tensor

    orig = tensor.crop_flip
    monkeypatch.setattr(tensor, "crop_flip", lambda raw, idx, dy, dx, flip, pad: orig(raw, idx, dx, dy, flip, pad))
    result = datapath.data_check("digits", torch.device("cpu"), 64)
    assert result["passed"] is False and result["max_abs_difference"] > 0.1
    monkeypatch.setattr(tensor, "crop_flip", orig)
    assert datapath.data_check("digits", torch.device("cpu"), 64)["passed"] is True


def test_cifar_data_path_on_stand_in_images_when_the_files_are_absent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here
    result = datapath.data_check("cifar100", torch.device("cpu"), 32)
    assert result["passed"] is True and result["images"] == 3 * 32 and "stand-in" in result["source"]


def test_a_step_that_does_not_fit_in_memory_fails_and_names_the_largest_batch(tmp_path):
    grid = tmp_path / "huge.yaml"
    grid.write_text("name: huge\ndefaults: {dataset: digits, seeds: [0], recipe: smoke, device: cpu}\n"
                    "entries:\n  - {arch: '20,4,8', connectivity: learned, fan_ins: [2], train: {batch_size: 50000000}}\n")
    code, rec = _preflight(tmp_path, "--grid", str(grid), "--device", "cpu")
    mem = next(c for c in rec["checks"] if c["name"].startswith("memory"))
    assert code == 1 and mem["passed"] is False and mem["step_bytes"] > mem["device_bytes"]
    assert 0 < mem["largest_batch_estimate"] < 50_000_000
    assert rec["projection"]["total"]["missing"] == 1  # not timed: it would not fit


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_cuda_requested_where_torch_sees_none_fails_the_environment_check(tmp_path, monkeypatch):
    code, rec = _preflight(tmp_path, "--grid", "smoke", "--device", "cuda")
    env = rec["checks"][0]
    assert code == 1 and env["name"] == "environment" and env["passed"] is False and len(rec["checks"]) == 1
    # a GPU that nvidia-smi sees and torch does not: the driver/wheel mismatch, and the way out
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 535.104.05, 81559'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    code, rec = _preflight(tmp_path, "--grid", "smoke", "--device", "cuda")
    advice = rec["checks"][0]["advice"]
    assert code == 1 and "NVIDIA H100" in advice and "535.104.05" in advice and "MASKCONNECT_TORCH_INDEX_URL" in advice


def test_bad_arguments_exit_2_before_any_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["preflight", "--grid", "smoke", "--out", str(afile / "sub")]) == 2
    assert "out" in capsys.readouterr().err and not (afile.parent / "sub").exists()
    assert main(["preflight", "--grid", "nope"]) == 2
    assert main(["preflight", "--grid", "smoke", "--device", "tpu"]) == 2


# ---- the bounds, against numbers computed here ---------------------------------------------------------

CPU = torch.device("cpu")
U_BF16 = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits


@pytest.fixture(scope="module")
def step_case():
    """A small learned model, a batch, and its gradients from plain autograd with torch's own kernels, run
    here: exact (float64), fp32, and under bf16 autocast + channels_last (the precision of the bf16 rows)."""
    import copy

    import torch.nn.functional as F

    from maskconnect import kernels
    from maskconnect.specs import make_spec
    from step_check import fp32_mask_draws

    torch.manual_seed(0)
    model = models.build_model(make_spec("11,2,4", dataset="digits", connectivity="learned", fan_in=2, stage_width=16))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)

    def grads(dtype=torch.float32, bf16=False):
        m, xx = copy.deepcopy(model).to(dtype).train(), x.to(dtype)
        m.save_memory = False
        if bf16:
            m, xx = m.to(memory_format=torch.channels_last), xx.contiguous(memory_format=torch.channels_last)
        with kernels.cpu_fast_paths(False), fp32_mask_draws():
            torch.manual_seed(steps.DRAW_SEED)   # the draw the preflight's steps make
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = m(xx)
            F.cross_entropy(logits.to(dtype), y).backward()
        return {f"grad:{n}": p.grad.detach().double() for n, p in m.named_parameters() if p.grad is not None}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the tests that use it run (one_thread): the same sums as theirs
    try:
        return model, x, y, grads(torch.float64), grads(), grads(bf16=True)
    finally:
        torch.set_num_threads(threads)


def _trimmed_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the max(2, numel // 1000) largest |a - b| entries left out (tensors of at most 4
    entries whole): the error measure preflight/steps.py documents, written here."""
    d = (a - b).abs().flatten().sort().values
    k = max(2, d.numel() // 1000) if d.numel() > 4 else 0
    return float(d[:d.numel() - k].norm() / b.norm())


def _faulty_candidate(monkeypatch, candidate):
    """Make ``candidate``'s step (only its own step, not the reference's or the sensitivity's) return the
    gradient ``fault["key"]`` multiplied by ``fault["factor"]``; returns that ``fault`` dict to fill. The
    other steps are deterministic and the same for every fault: each is run once and reused."""
    fault: dict = {}
    run_step, done = steps.run_step, {}

    def faulty(model, x, y, path, **kw):
        if path is candidate and kw.get("perturb_seed") is None:
            out = run_step(model, x, y, path, **kw)
            return {**out, fault["key"]: out[fault["key"]] * fault["factor"]} if fault else out
        key = (id(model), repr(path), repr(sorted(kw.items())))
        if key not in done:
            done[key] = run_step(model, x, y, path, **kw)
        return done[key]

    monkeypatch.setattr(steps, "run_step", faulty)
    return fault


def test_a_one_percent_error_in_any_gradient_fails_the_fp32_check(one_thread, step_case, monkeypatch):
    """Each gradient of CUDA's path 1% off, one at a time: the fp32 check fails on that tensor, whose bound
    lies between fp32's own rounding of it (float64 reference) and the error the fault makes."""
    model, x, y, g64, g32, _ = step_case
    from maskconnect.training.step import Precision

    candidate = steps.Path(True, False, Precision(CPU))
    plain = steps.Path(False, False, Precision(CPU))
    with steps.exact_fp32():
        ref = steps.run_step(model, x, y, plain)
        reference = ref, steps.sensitivity(model, x, y, plain, ref, steps.U_FP32)
    assert steps.compare_step(model, x, y, candidate, CPU, fp32_reference=reference)["passed"]
    fault = _faulty_candidate(monkeypatch, candidate)
    for key, exact in g64.items():
        fault.update(key=key, factor=1.01)
        r = steps.compare_step(model, x, y, candidate, CPU, fp32_reference=reference)
        row = next((t for t in r["failed_tensors"] if t["tensor"] == key), None)
        assert not r["passed"] and row is not None, (key, r["worst"])
        error = _trimmed_rel(1.01 * g32[key], g32[key])                 # what the fault does, computed here
        assert row["rel_error"] == pytest.approx(error, rel=0.01)
        assert _trimmed_rel(g32[key], exact) <= row["bound"] < error, (key, row)


def test_a_gradient_of_the_wrong_sign_fails_the_bf16_check_and_its_bound_follows_bf16(one_thread, step_case, monkeypatch):
    """The bf16 rows catch a gradient error about ten times what bf16 rounding does to it (preflight/steps.py):
    here each gradient of the wrong sign, one at a time. Each tensor's bound is at least what bf16 autocast
    moves it by (so a GPU's correct bf16 path passes) and at most ten times that (so the bound is not
    loose), both measured here against the fp32 step."""
    model, x, y, _, g32, g16 = step_case
    from maskconnect.training.step import Precision

    candidate = steps.Path(True, False, Precision(CPU, torch.bfloat16, True))
    assert steps.compare_step(model, x, y, candidate, CPU)["passed"]
    fault = _faulty_candidate(monkeypatch, candidate)
    for key in g32:
        fault.update(key=key, factor=-1.0)
        r = steps.compare_step(model, x, y, candidate, CPU)
        row = next((t for t in r["failed_tensors"] if t["tensor"] == key), None)
        assert not r["passed"] and row is not None, (key, r["worst"])
        moved = _trimmed_rel(g16[key], g32[key])                        # what bf16 does to this gradient
        assert moved <= row["bound"] <= 10 * max(moved, U_BF16), (key, moved, row)


def test_bf16_rounding_moves_the_steps_more_than_fp32_rounding(one_thread, step_case):
    """Why the bf16 rows have their own, wider bound: bf16 autocast moves every gradient far more than fp32
    rounding does (measured here against float64), and the preflight's sensitivities say so too."""
    model, x, y, g64, g32, g16 = step_case
    from maskconnect.training.step import Precision

    for key in g64:
        assert _trimmed_rel(g32[key], g64[key]) < _trimmed_rel(g16[key], g32[key]), key
    r32 = steps.compare_step(model, x, y, steps.Path(True, False, Precision(CPU)), CPU)
    r16 = steps.compare_step(model, x, y, steps.Path(True, False, Precision(CPU, torch.bfloat16, True)), CPU)
    assert r32["passed"] and r16["passed"] and r16["median_sensitivity"] > r32["median_sensitivity"]


@pytest.mark.slow
def test_ddp_check_over_two_cpu_processes():
    result = datapath.ddp_check(2, backend="gloo", device_type="cpu")
    assert result == {"passed": True, "ranks": 2, "backend": "gloo", "masks_identical": True, "masks_moved": True,
                      "steps": 3}


# ---- the pipeline runs it first ----------------------------------------------------------------------

def test_snakemake_runs_the_preflight_ahead_of_the_training_jobs_of_a_gpu_grid(checkout):
    proc = snakemake(["-n", "--config", "grid=cifar100"], checkout, check=True)
    assert job_counts(proc.stdout)["preflight"] == 1 and job_counts(proc.stdout)["train"] == 64
    blocks = proc.stdout.split("\n\n")
    train = [b for b in blocks if b.lstrip().startswith(("rule train:", "localrule train:")) or "\nrule train:" in b]
    assert len(train) == 64
    assert all("results/preflight/cifar100/preflight.json" in b.split("input:")[1].splitlines()[0] for b in train)
    off = snakemake(["-n", "--config", "grid=cifar100", "preflight=false"], checkout, check=True)
    assert "preflight" not in job_counts(off.stdout)
    demo = snakemake(["-n"], checkout, check=True)  # the CPU demo: not by default
    assert "preflight" not in job_counts(demo.stdout)
    forced = snakemake(["-n", "--config", "preflight=true"], checkout, check=True)
    assert job_counts(forced.stdout)["preflight"] == 1


def test_paper_grids_dvc_yaml_has_a_preflight_stage_every_train_stage_depends_on():
    from maskconnect import experiments as G

    for name in ("cifar100", "cifar10", "imagenet", "paper"):
        stages = G.dvc_stages(G.load_grid(name))
        record = G.preflight_record(name)
        assert stages["preflight"]["outs"] == [{record: {"cache": False}}]
        assert "maskconnect preflight --grid" in stages["preflight"]["cmd"]
        trains = [s for k, s in stages.items() if k.startswith("train-")]
        assert trains and all(record in s["deps"] for s in trains)
    assert "preflight" not in G.dvc_stages(G.load_grid("demo"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_a_failed_preflight_stops_the_pipeline_before_any_training(checkout):
    """A GPU grid on a machine whose torch sees no GPU (one GPU id made visible to Snakemake's profile and
    gpu-slot, as a node whose driver torch cannot use): the preflight job fails, nothing trains."""
    grid = checkout / "gpu-grid.yaml"
    grid.write_text("name: gpugrid\ndefaults: {dataset: digits, seeds: [0], recipe: smoke, device: cuda, gpus: 1}\n"
                    "entries:\n  - {arch: '11,2,4', connectivity: learned, fan_ins: [2]}\n")
    env = {**tool_env(checkout), "CUDA_VISIBLE_DEVICES": "0"}
    proc = snakemake(["--cores", "1", "--config", f"grid={grid.name}"], checkout, env=env)
    assert proc.returncode != 0
    log = (checkout / "results" / "logs" / "gpugrid" / "preflight.log").read_text()
    assert "FAILED environment" in log
    assert not (checkout / "results" / "runs" / "gpugrid").exists()  # no training job started


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("c++") is None, reason="torch.compile (inductor) needs a C++ compiler on a CPU")
def test_compile_check_passes_on_inductor_and_fails_when_the_compiled_graph_differs(monkeypatch):
    from maskconnect.training.step import Precision
    from maskconnect.specs import make_spec

    torch.manual_seed(0)
    model = models.build_model(make_spec("11,2,2", dataset="digits", connectivity="learned", fan_in=1, stage_width=4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    # the CPU's own path (fast paths on): with them off, torch 2.15's inductor computed the gradient of the
    # strided 1x1 shortcut conv 29x off float64 on an AMD EPYC (right on the Intel CPUs CI ran on before),
    # which the check rightly fails; this test is about the check, not about inductor on every CPU
    path = steps.Path(False, True, Precision(torch.device("cpu")))
    ok = steps.compile_check(model, x, y, path)
    assert ok["passed"] and ok["tensors"] > 20, ok
    mix = masked.mix
    # a compiled graph that computes another function than eager (the mixing, only when traced; the
    # compiled model runs the plain path, which looks ``mix`` up in models.masked)
    monkeypatch.setattr(masked, "mix", lambda m, t: mix(m, t) * (1.5 if torch.compiler.is_compiling() else 1.0))
    bad = steps.compile_check(model, x, y, path)
    assert not bad["passed"] and bad["failed_tensors"]

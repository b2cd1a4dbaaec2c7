"""The CUDA path: bf16 autocast, channels_last, torch.compile, device-resident data (the CIFAR loader's
GPU batches are checked against CPU batches in test_data.py).

Skipped without a GPU. On a GPU box: PYTHONPATH=src python -m pytest tests/test_cuda.py
The same precision path (bf16 autocast, channels_last, compile) is tested on a CPU in
test_precision_cpu.py, and the saving path through the convolution_backward branch in
test_gpu_path_cpu.py; these tests add the CUDA kernels (cuDNN, Triton): the memory-saving path (the
CUDA default) against the plain autograd path, and compiled against eager, compared entry by entry
(outputs, every gradient, BN running statistics) in float64, exact fp32 (TF32 off) and bf16; then training
steps, whose loss must fall at least half as far as the same steps in exact fp32 on the same device.
"""

import copy

import pytest
import torch

from maskconnect.preflight.steps import exact_fp32  # TF32 off: fp32 means fp32

from maskconnect.connectivity import param_groups
from maskconnect.data import build_data
from maskconnect.training.step import Precision, evaluate, train_step
from maskconnect.models import MaskedBlock, build_model
from maskconnect.specs import make_spec
from step_check import assert_step_agrees, float64_reference, fp32_mask_draws, perturbed_learned, run_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
C = 8
# {20,4,8} at a small width: every kind of module (stem-fed, identity, projection, output node)
SMALL = dict(dataset="cifar10", stage_width=16)


def _learned(k: int, device: str, channels_last: bool = False, arch: str = "20,4,8"):
    model = perturbed_learned(k, arch, **SMALL).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


# A float64 step has no rounding worth the name: the two computations must agree to 1e-8 of each
# tensor's norm (the strict proof that the gradients are the same). In fp32 and bf16 the bound is a few
# times the plain path's own rounding error, measured against float64 (tests/step_check.py).
FLOAT64_FLOOR = 1e-8
DTYPES = ["float64", "float32", "bf16"]


def _check(got, want, model, x, dtype):
    if dtype == "float64":
        assert_step_agrees(got, want, want, floor=FLOAT64_FLOOR)
    else:
        assert_step_agrees(got, want, float64_reference(model, x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_saving_path_matches_plain_path_on_cuda(channels_last, dtype, monkeypatch):
    """The memory-saving path, the CUDA default (save_memory None: _MixedInput, _SharedBNTail and the
    convolution_backward branch of the 1x1 backward, on cuDNN), against the plain autograd path, for
    every K: outputs, every gradient (masks included), BN running statistics. fp32 with TF32 off."""
    ran = []
    saving_forward = MaskedBlock.forward_saving
    monkeypatch.setattr(MaskedBlock, "forward_saving", lambda self, *a, **k: ran.append(1) or saving_forward(self, *a, **k))
    x = torch.randn(4, 3, 16, 16, device="cuda", dtype=torch.float64 if dtype == "float64" else torch.float32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with exact_fp32():
        for k in range(1, C + 1):
            saving = _learned(k, "cuda", channels_last).to(x.dtype)
            plain = copy.deepcopy(saving)
            plain.save_memory = False
            assert saving.save_memory is None  # the default: the saving path on CUDA
            before = copy.deepcopy(plain)
            with fp32_mask_draws():
                got = run_step(saving, saving, x, dtype == "bf16")
                assert len(ran) == len(saving.blocks())  # the saving path ran, every module
                del ran[:]
                want = run_step(plain, plain, x, dtype == "bf16")
            assert not ran
            _check(got, want, before, x, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_compiled_training_step_matches_eager_on_cuda(dtype):
    """torch.compile (Triton; it traces the plain path) against eager (the saving path, the CUDA
    default): outputs, every gradient, BN buffers; the same mask draw (inductor falls back to eager's
    RNG). In fp32 (TF32 off) the two round differently, and a ReLU input that rounds to the other side
    of 0 moves the gradients of the layers below it by ~1e-3 of their norm at this size (measured on a
    CPU, 4 images: 1.2e-3 and 2.4e-3); so fp32 allows 1e-2 of each tensor's norm beyond 3x eager's
    rounding error (a wrong gradient is off by tens of percent), and float64 proves the gradients."""
    import torch._inductor.config as inductor_config

    x = torch.randn(16, 3, 32, 32, device="cuda", dtype=getattr(torch, dtype))
    torch._dynamo.reset()
    try:
        with exact_fp32(), inductor_config.patch(fallback_random=True), fp32_mask_draws():
            for k in (1, 4):
                eager = _learned(k, "cuda").to(x.dtype)
                compiled = copy.deepcopy(eager)
                ref = float64_reference(eager, x) if dtype == "float32" else None
                want = run_step(eager, eager, x)
                got = run_step(torch.compile(compiled, fullgraph=True), compiled, x)
                if dtype == "float64":
                    assert_step_agrees(got, want, want, floor=FLOAT64_FLOOR)
                else:
                    assert_step_agrees(got, want, ref, floor=1e-2)
                torch._dynamo.reset()
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("connectivity,k", [("full", None), ("random", 4), ("learned", 4)])
def test_bf16_channels_last_step_matches_fp32(connectivity, k):
    spec = make_spec("29,8,8", dataset="cifar10", connectivity=connectivity, fan_in=k)
    torch.manual_seed(0)
    model = build_model(spec).cuda().eval()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref = model(x)
        fast = Precision.for_device("cuda")
        with fast.autocast():
            out = fast.prepare_model(model)(fast.prepare_input(x)).float()
    assert fast.amp_dtype == torch.bfloat16 and fast.channels_last
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    _train_a_few_steps(model, fast, x)


def _train_a_few_steps(model, precision: Precision, x, steps: int = 12, step_model=None) -> list[float]:
    """Fit one fixed batch for a few SGD steps under ``precision``: the loss goes down, stays finite,
    and (learned masks) the mask gradient is finite and the masks stay in [0, 1]. How far the loss must
    fall is measured on this device: the same steps from the same weights in exact fp32 (NCHW, eager)."""
    reference = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    losses = _fit(model, precision, x, steps, step_model)
    with exact_fp32():
        ref = _fit(reference, Precision(x.device), x, steps)
    fall, ref_fall = sum(losses[:3]) - sum(losses[-3:]), sum(ref[:3]) - sum(ref[-3:])
    # fitting the batch: fp32 does, and the precision under test gets at least half as far
    assert ref_fall > 0 and fall > 0.5 * ref_fall, (losses, ref)
    return losses


def _fit(model, precision: Precision, x, steps: int, step_model=None) -> list[float]:
    model = precision.prepare_model(model).train()
    step_model = model if step_model is None else step_model
    y = torch.arange(x.shape[0], device=x.device) % 10
    opt = torch.optim.SGD(param_groups(model, lr=0.05, weight_decay=0.0), lr=0.05, momentum=0.9)
    torch.manual_seed(0)  # the mask draws
    losses = []
    for _ in range(steps):
        loss, _ = train_step(step_model, opt, precision.prepare_input(x), y, precision)
        losses.append(float(loss))
        real = getattr(getattr(model, "masks", None), "real", None)
        if real is not None:
            assert real.grad is not None and torch.isfinite(real.grad).all() and real.grad.abs().sum() > 0
            assert 0.0 <= float(real.detach().min()) and float(real.detach().max()) <= 1.0
    assert all(l == l and l < 100 for l in losses), losses  # finite
    return losses


def test_training_step_on_gpu_resident_data_has_no_host_sync():
    spec = make_spec("20,4,8", dataset="synthetic", connectivity="learned", fan_in=4)
    model = build_model(spec)
    precision = Precision.for_device("cuda")
    model = precision.prepare_model(model)
    opt = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=5e-4), lr=0.1, momentum=0.9)
    data = build_data("synthetic", batch_size=64, device="cuda", synthetic={"train_size": 256, "test_size": 64})
    x, y = next(iter(data.train_batches(0)))
    assert x.is_cuda and y.is_cuda
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation inside the step raises
    try:
        loss, correct = train_step(model, opt, precision.prepare_input(x), y, precision)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
    assert 0.0 <= float(model.masks.real.min()) and float(model.masks.real.max()) <= 1.0
    ev = evaluate(model, data.test_batches(), precision, 10)
    assert 0 <= ev["test_top1"] <= 100


def test_torch_compile_masked_model():
    spec = make_spec("20,4,8", dataset="cifar10", connectivity="learned", fan_in=4)
    torch.manual_seed(0)
    model = build_model(spec).cuda().eval()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model)(x)
    assert torch.allclose(out, ref, atol=1e-3, rtol=1e-3)
    # training through the compiled model (Triton kernels, bf16, channels_last), as train(compile=True) does
    torch._dynamo.reset()
    fast = Precision.for_device("cuda")
    model = fast.prepare_model(model)
    _train_a_few_steps(model, fast, torch.randn(16, 3, 32, 32, device="cuda"), step_model=torch.compile(model))
    torch._dynamo.reset()

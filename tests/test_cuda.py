"""The CUDA path: bf16 autocast, channels_last, torch.compile, device-resident data (the CIFAR loader's
GPU batches are checked against CPU batches in test_data.py).

Skipped without a GPU. On a GPU box: PYTHONPATH=src python -m pytest tests/test_cuda.py
The same precision path (bf16 autocast, channels_last, compile) is tested on a CPU in
test_precision_cpu.py; these tests add the CUDA kernels (cuDNN, Triton) and check that they train.
"""

import pytest
import torch

from maskconnect.connectivity import param_groups
from maskconnect.data import build_data
from maskconnect.engine import Precision, evaluate, train_step
from maskconnect.models import build_model
from maskconnect.specs import make_spec

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


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
    and (learned masks) the mask gradient is finite and the masks stay in [0, 1]."""
    model = precision.prepare_model(model).train()
    step_model = model if step_model is None else step_model
    y = torch.arange(x.shape[0], device=x.device) % 10
    opt = torch.optim.SGD(param_groups(model, lr=0.05, weight_decay=0.0), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss, _ = train_step(step_model, opt, precision.prepare_input(x), y, precision)
        losses.append(float(loss))
        real = getattr(getattr(model, "masks", None), "real", None)
        if real is not None:
            assert real.grad is not None and torch.isfinite(real.grad).all() and real.grad.abs().sum() > 0
            assert 0.0 <= float(real.detach().min()) and float(real.detach().max()) <= 1.0
    assert all(l == l and l < 100 for l in losses), losses  # finite
    # fitting the batch: on a CPU under bf16 the last three losses sum 0.4 (learned) to >4 (full) below the first three
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.15, losses
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

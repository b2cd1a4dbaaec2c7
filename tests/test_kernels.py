"""Kernels: each fast or lean form computes what torch's own kernel computes, and the options that switch
them are set for a block and restored after it.

The memory-saving path against plain autograd is in tests/test_memory_path.py and
tests/test_gpu_path_cpu.py; the fused mixing under torch.compile in tests/test_compile.py.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from maskconnect import kernels
from maskconnect.kernels import cpu as cpu_kernels
from maskconnect.models import build_model
from maskconnect.specs import make_spec

# --- the options ------------------------------------------------------------------------------------


def test_options_are_set_for_a_block_and_restored_after_it_even_when_it_raises():
    assert kernels.current() == kernels.DEFAULTS == kernels.KernelOptions()
    with kernels.options(fuse_mix_when_compiling=True, small_map_pixels=0) as inside:
        assert kernels.current() is inside
        assert inside == dataclasses.replace(kernels.DEFAULTS, fuse_mix_when_compiling=True, small_map_pixels=0)
        with kernels.options(small_map_pixels=9):  # nested: changes only what it names
            assert kernels.current().small_map_pixels == 9 and kernels.current().fuse_mix_when_compiling
        assert kernels.current() is inside
    assert kernels.current() is kernels.DEFAULTS
    with pytest.raises(RuntimeError), kernels.options(save_memory=True):
        raise RuntimeError
    assert kernels.current() is kernels.DEFAULTS
    with pytest.raises(TypeError):  # an unknown name is an error, not a silent no-op
        with kernels.options(save_memroy=True):
            pass
    with pytest.raises(dataclasses.FrozenInstanceError):
        kernels.current().save_memory = True


@pytest.mark.parametrize("enabled", [True, False])
def test_cpu_fast_paths_switch_the_three_cpu_paths(enabled):
    with kernels.cpu_fast_paths(False), kernels.cpu_fast_paths(enabled):  # on: back to the default limits
        o = kernels.current()
        assert o.grouped_1x1_as_matmul_on_cpu is o.subsample_strided_1x1_on_cpu is enabled
        assert o.small_map_pixels == (kernels.DEFAULTS.small_map_pixels if enabled else 0)
        assert (o.save_memory, o.fuse_mix_when_compiling, o.matmul_max_group_width) == (
            kernels.DEFAULTS.save_memory, kernels.DEFAULTS.fuse_mix_when_compiling, kernels.DEFAULTS.matmul_max_group_width)
    assert kernels.current() is kernels.DEFAULTS


def test_a_model_takes_save_memory_from_the_options_when_built():
    spec = make_spec("11,2,2", dataset="digits", connectivity="learned", fan_in=1, stage_width=4)
    assert build_model(spec).save_memory is None  # None: the saving path on CUDA, plain on a CPU
    with kernels.options(save_memory=True):
        model = build_model(spec)
    assert model.save_memory is True  # read once, when built


# --- each kernel against torch's ---------------------------------------------------------------------

def test_mix_matches_einsum():
    y = torch.randn(2, 3, 4, 5, 5)
    m = torch.tensor([[1.0, 0, 1], [0, 1, 1]])
    ref = F.relu(torch.einsum("jk,nkchw->njchw", m, y)).reshape(2, 8, 5, 5)
    assert torch.allclose(kernels.mix(m, y), ref, atol=1e-6)


@pytest.mark.parametrize("groups,cin,cout", [(4, 8, 32), (4, 32, 8), (1, 6, 4), (2, 256, 256)])
def test_grouped_1x1_is_the_grouped_convolution(groups, cin, cout):
    """Both forms of the grouped 1x1 (the matmul when taken: narrow branches, groups > 1) against
    F.conv2d, outputs and both gradients."""
    g = torch.Generator().manual_seed(groups + cin)
    x = torch.randn(3, cin, 5, 4, generator=g)
    w = torch.randn(cout, cin // groups, 1, 1, generator=g)
    grad = torch.randn(3, cout, 5, 4, generator=g)
    got = {}
    for fast in (True, False):
        with kernels.options(grouped_1x1_as_matmul_on_cpu=fast):
            assert cpu_kernels._matmul_1x1(x, groups, cout) == (fast and groups > 1 and min(cin, cout) // groups <= 64)
            xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = kernels.grouped_1x1(xi, wi, groups)
            y.backward(grad)
            got[fast] = (y, xi.grad, wi.grad)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.conv2d(xr, wr, groups=groups)
    ref.backward(grad)
    for fast in (True, False):
        for a, b in zip(got[fast], (ref, xr.grad, wr.grad)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_strided_1x1_shortcut_is_the_strided_convolution(stride):
    """The CPU shortcut conv subsamples first; outputs and both gradients are torch's strided conv's."""
    g = torch.Generator().manual_seed(stride)
    x = torch.randn(5, 6, 9, 8, generator=g)  # odd and even sizes: the stride's last pixel
    conv = kernels.Shortcut1x1(6, 4, stride)
    torch.nn.init.normal_(conv.weight, generator=g)
    assert conv.weight.shape == (4, 6, 1, 1) and conv.stride == (stride, stride)
    grad = torch.randn(5, 4, -(-9 // stride), -(-8 // stride), generator=g)
    got = {}
    for fast in (True, False):
        with kernels.options(subsample_strided_1x1_on_cpu=fast):
            xi, w = x.clone().requires_grad_(), conv.weight.detach().clone().requires_grad_()
            y = kernels.conv1x1(xi, w, stride) if fast else torch.nn.functional.conv2d(xi, w, stride=stride)
            y.backward(grad)
            got[fast] = (y, xi.grad, w.grad)
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with kernels.options(subsample_strided_1x1_on_cpu=True):
        torch.testing.assert_close(conv(x), got[False][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (1, 4), (4, 4)])
def test_small_map_batch_norm_is_torch_batch_norm(hw):
    """The channels-last BN for small maps: output, input/weight/bias gradients, running statistics and
    the batch counter equal torch's own training-mode batch norm (F.batch_norm, not our module)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 5, *hw, generator=g) * 3 + 1
    grad = torch.randn(x.shape, generator=g)
    bn = kernels.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(generator=g)
    w, b = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    rm, rv = torch.zeros(5), torch.ones(5)
    xr = x.clone().requires_grad_()
    ref = torch.nn.functional.batch_norm(xr, rm, rv, w, b, True, 0.1, 1e-5)
    ref.backward(grad)
    xi = x.clone().requires_grad_()
    out = bn(xi)
    out.backward(grad)
    assert out.is_contiguous() and xi.grad.is_contiguous()
    for got, want in [(out, ref), (xi.grad, xr.grad), (bn.weight.grad, w.grad), (bn.bias.grad, b.grad),
                      (bn.running_mean, rm), (bn.running_var, rv)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    torch.testing.assert_close(bn(x), torch.nn.functional.batch_norm(x, rm, rv, w.detach(), b.detach(), False))

"""The connections between modules: ``mix(m, y) = ReLU(bmm(m, y))`` (docs/design.md sections 3 and 10).

**bmm with a stride-0 expanded mask** (always, in eager mode), not ``torch.matmul``: matmul folds a
2-D @ 3-D product into one tall (N*X, n) GEMM whose backward copies y transposed; for a learned mask
that made the mixing 3-6x slower on a CPU (bench/README.md). With bmm the mask gradient is bmm(grad,
y^T) summed over the batch, with no copy. Measured (``python -m bench mixing``): the {29,64,8}
stage-1 tail went from 443 to 252 ms, {50,4,32}'s from 1901 to 792 ms; a whole Learned K=4 step at
batch 8 from 359 to 280 ms ({20,4,8}) and 592 to 403 ms ({29,8,8}).

**The fused form under torch.compile** (``fuse_mix_when_compiling``, off). It writes the mixing as a
broadcast product summed over the source axis, which inductor turns into one kernel with the
element-wise work around it (the shared last BN's normalisation, the identity share, the ReLU:
tests/test_compile.py checks the fusion), so the branch tensors are read once and the mixed inputs
written once in the forward pass. Its backward, though, computes the mask gradient as C*C separate
reductions over the whole batch (each reading a pair of branch tensors) where the bmm form does one
GEMM. Measured on a CPU (bench/mixing.py, {20,4,8} stage-1 tail, batch 8, 2 threads, fwd+bwd): eager
bmm 31 ms, compiled bmm 46 ms, compiled fused 160 ms; forward alone 22 / 5.1 / 5.8 ms. So the bmm form
is the default until a GPU measurement (``python -m bench mixing --device cuda``) says otherwise. Eager
mode always uses bmm: the fused expression would materialise an (N, n_out, n_in, ...) product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .options import current


def mix(mask: Tensor, y: Tensor) -> Tensor:
    """Connections between modules: out_j = ReLU(sum_k mask[j, k] * y_k).

    ``mask`` (n_out, n_in), ``y`` (N, n_in, C, H, W) -> (N, n_out*C, H, W). The mask is cast to y's
    dtype (exact for 0/1, so bf16 autocast is safe).
    """
    batch, n_in, ch, hh, ww = y.shape
    n_out = mask.shape[0]
    m = mask.to(y.dtype)
    y3 = y.reshape(batch, n_in, ch * hh * ww)
    if current().fuse_mix_when_compiling and torch.compiler.is_compiling():
        out = (m.view(1, n_out, n_in, 1) * y3.unsqueeze(1)).sum(2)
    else:
        out = torch.bmm(m.expand(batch, n_out, n_in), y3)
    return F.relu(out).reshape(batch, n_out * ch, hh, ww)

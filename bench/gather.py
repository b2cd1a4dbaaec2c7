"""Is mixing by gathering the K selected sources faster than the dense bmm? (not adopted: docs/design.md section 10)

Not a registered benchmark: a one-off measurement whose result is recorded in bench/README.md.
Forward of the mixing only (the backward is the same either way: a learned mask's straight-through
gradient needs the dense product dL/dm = sum g y^T over every source, selected or not):

* ``dense``: ``maskconnect.kernels.mix`` (bmm with a stride-0 mask, then ReLU);
* ``gather``: the K selected sources of each row (``topk`` of the mask: no host synchronisation),
  summed by K ``index_select`` + add passes, then ReLU.

    PYTHONPATH=src python -m bench.gather [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from maskconnect.connectivity import random_masks
from maskconnect.kernels import mix

# (label, batch, C, K, module width, H): the first mixing of {29,64,8} and of ImageNet {50,4,32}
SHAPES = [("{29,64,8} stage 1, K=4", 8, 8, 4, 256, 32), ("{50,4,32} stage 1, K=16", 2, 32, 16, 256, 56),
          ("{50,4,32} stage 1, K=4", 2, 32, 4, 256, 56)]


def mix_gather(mask: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    batch, n_in, ch, hh, ww = y.shape
    idx = mask.topk(k, dim=-1).indices  # (n_out, K): the selected sources, on the device
    out = y.index_select(1, idx[:, 0])
    for j in range(1, k):
        out = out + y.index_select(1, idx[:, j])
    return F.relu(out).reshape(batch, -1, hh, ww)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for label, n, c, k, w, h in SHAPES:
        y = torch.randn(n, c, w, h, h)
        m = random_masks(1, c, k, seed=0)[0]
        assert torch.allclose(mix(m, y), mix_gather(m, y, k), rtol=1e-5, atol=1e-5)
        fns = {"dense": lambda: mix(m, y), "gather": lambda: mix_gather(m, y, k)}
        t = {name: [] for name in fns}
        for r in range(args.repeats):  # interleaved, CPU time of this process (robust on a shared machine)
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                c0 = time.process_time()
                fns[name]()
                t[name].append(time.process_time() - c0)
        med = {name: statistics.median(v) for name, v in t.items()}
        print(f"{label}: dense {med['dense'] * 1e3:.1f} ms, gather {med['gather'] * 1e3:.1f} ms, "
              f"gather/dense {med['gather'] / med['dense']:.2f} (batch {n}, median of {args.repeats})")


if __name__ == "__main__":
    main()

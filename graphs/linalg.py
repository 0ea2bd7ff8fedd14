"""Matrix multiplication lowering with numpy's broadcasting of batch axes."""

from __future__ import annotations

from max.graph import ops

from modgrad.graphs import lowering


@lowering("matmul")
def _matmul(a, b, device):
    a_batch, b_batch = list(a.shape[:-2]), list(b.shape[:-2])
    if b.rank == 2 or a_batch == b_batch:
        return ops.matmul(a, b)
    rank = max(len(a_batch), len(b_batch))
    a_batch = [1] * (rank - len(a_batch)) + a_batch
    b_batch = [1] * (rank - len(b_batch)) + b_batch
    batch = [bd if ad == 1 else ad for ad, bd in zip(a_batch, b_batch)]
    a = ops.broadcast_to(a, batch + list(a.shape[-2:]))
    b = ops.broadcast_to(b, batch + list(b.shape[-2:]))
    return ops.matmul(a, b)

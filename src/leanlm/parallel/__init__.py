"""Tensor parallelism: the one plan that shards the ``Transformer`` in place, for serving and
training (:mod:`leanlm.parallel.plan`), and its two styles with the collectives they use
(:mod:`leanlm.parallel.styles`).

    mesh = tp_mesh()                      # under torchrun: a 1-D mesh over the world
    model = load_model(path)              # every rank loads the whole model ...
    tensor_parallel_(model, mesh)         # ... and keeps its shards; logits stay whole
    cache = model.make_cache(batch, n)    # local_kv_heads(config, tp) heads per rank
"""

from leanlm.parallel.plan import (
    check_tensor_parallel,
    local_kv_heads,
    shard_adapters_,
    tensor_parallel_,
    tp_mesh,
    tp_plan,
)
from leanlm.parallel.styles import ColumnParallel, RowParallel, TPShard

__all__ = [
    "ColumnParallel",
    "RowParallel",
    "TPShard",
    "check_tensor_parallel",
    "local_kv_heads",
    "shard_adapters_",
    "tensor_parallel_",
    "tp_mesh",
    "tp_plan",
]

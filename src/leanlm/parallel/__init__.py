"""Tensor parallelism: the one plan that shards the ``Transformer`` in place, for serving and
training (:mod:`leanlm.parallel.plan`), and its two styles with the collectives they use
(:mod:`leanlm.parallel.styles`).

    mesh = tp_mesh()                      # under torchrun: a 1-D mesh over the world
    model = load_model(path)              # every rank loads the whole model ...
    tensor_parallel_(model, mesh)         # ... and keeps its shards; logits stay whole
    cache = model.make_cache(batch, n)    # local_kv_heads(config, tp) heads per rank

Training adds sequence parallelism (:mod:`leanlm.parallel.sequence`) and the vocabulary-parallel
fused cross-entropy (:mod:`leanlm.parallel.loss`): ``tensor_parallel_(model, mesh["tp"],
sequence_parallel=True, loss_parallel=True)``, as ``leanlm.train.parallelize`` calls it.
"""

from leanlm.parallel.loss import vocab_parallel_cross_entropy
from leanlm.parallel.plan import (
    check_tensor_parallel,
    local_kv_heads,
    shard_adapters_,
    tensor_parallel_,
    tp_mesh,
    tp_plan,
)
from leanlm.parallel.sequence import (
    GatherSequence,
    SumGradients,
    check_sequence_parallel,
    sum_partial_gradients_,
)
from leanlm.parallel.styles import ColumnParallel, RowParallel, TPShard

__all__ = [
    "ColumnParallel",
    "GatherSequence",
    "RowParallel",
    "SumGradients",
    "TPShard",
    "check_sequence_parallel",
    "check_tensor_parallel",
    "local_kv_heads",
    "shard_adapters_",
    "sum_partial_gradients_",
    "tensor_parallel_",
    "tp_mesh",
    "tp_plan",
    "vocab_parallel_cross_entropy",
]

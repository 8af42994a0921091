"""Serving (vLLM v1's split): pure-Python KV-cache bookkeeping over block ids, a scheduler that
emits a ``SchedulerOutput``, and a model runner that owns the tensors. See ``kv_cache.py``."""

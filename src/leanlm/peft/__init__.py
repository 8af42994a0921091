"""Parameter-efficient fine-tuning: adapters attached in place, saved in Hugging Face peft's format.

Each method is registered under its command-line name in :data:`REGISTRY` (``lora``, ``dora``,
``adapter``, ``pfeiffer``, ``parallel-adapter``, ``ia3``, ``compacter``); :func:`method_config`
builds its config by that name.
"""

from leanlm.peft.adapters import BottleneckConfig, CompacterConfig, ParallelAdapterConfig
from leanlm.peft.api import (
    REGISTRY,
    adapter_state_dict,
    apply_peft_,
    load_adapter,
    mark_trainable_,
    merge_,
    method_config,
    register_adapter,
    remove_peft_,
    save_adapter,
    set_adapter,
    unmerge_,
)
from leanlm.peft.ia3 import IA3Config
from leanlm.peft.lora import LoRAConfig

__all__ = ["REGISTRY", "BottleneckConfig", "CompacterConfig", "IA3Config", "LoRAConfig",
           "ParallelAdapterConfig", "adapter_state_dict", "apply_peft_", "load_adapter", "mark_trainable_",
           "merge_", "method_config", "register_adapter", "remove_peft_", "save_adapter", "set_adapter",
           "unmerge_"]

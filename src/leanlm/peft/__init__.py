"""Parameter-efficient fine-tuning: adapters attached in place, saved in Hugging Face peft's format."""

from leanlm.peft.adapters import BottleneckConfig, CompacterConfig, ParallelAdapterConfig
from leanlm.peft.api import (
    adapter_state_dict,
    apply_peft_,
    load_adapter,
    mark_trainable_,
    merge_,
    remove_peft_,
    save_adapter,
    set_adapter,
    unmerge_,
)
from leanlm.peft.ia3 import IA3Config
from leanlm.peft.lora import LoRAConfig

__all__ = ["BottleneckConfig", "CompacterConfig", "IA3Config", "LoRAConfig", "ParallelAdapterConfig",
           "adapter_state_dict", "apply_peft_", "load_adapter", "mark_trainable_", "merge_",
           "remove_peft_", "save_adapter", "set_adapter", "unmerge_"]

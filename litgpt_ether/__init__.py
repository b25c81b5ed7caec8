"""ETHER and ETHER+ hyperplane-reflection finetuning for litgpt models."""

from litgpt_ether.ether import (
    GPT,
    BlockMatrix,
    Config,
    ConfigError,
    ETHERLayer,
    ETHERLinear,
    ETHERQKVLinear,
    Reflection,
    ether_filter,
    ether_state_dict,
    load_base_checkpoint,
    mark_only_ether_as_trainable,
    merge_ether,
)

__all__ = [
    "GPT",
    "BlockMatrix",
    "Config",
    "ConfigError",
    "ETHERLayer",
    "ETHERLinear",
    "ETHERQKVLinear",
    "Reflection",
    "ether_filter",
    "ether_state_dict",
    "load_base_checkpoint",
    "mark_only_ether_as_trainable",
    "merge_ether",
]

"""Tiny litgpt models, a tokenizer and a dataset built on the spot: the suite never downloads."""

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from make_tiny import make_checkpoint, make_dataset  # noqa: E402

# One tiny config per architecture family the method must cover. Every reflected size is a multiple
# of 4, so n in {1, 2, 4} divides all of them.
_COMMON = dict(block_size=32, vocab_size=48, padded_vocab_size=48, n_layer=2, n_embd=16, head_size=4, n_head=4)
FAMILIES = {
    # LLaMA MLP, multi-head attention, no bias
    "llama-mha": dict(_COMMON, n_query_groups=4, mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm",
                      intermediate_size=32, bias=False, parallel_residual=False),
    # grouped-query attention: k and v narrower than q
    "llama-gqa": dict(_COMMON, n_query_groups=2, mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm",
                      intermediate_size=32, bias=False, parallel_residual=False),
    # multi-query attention, Gemma MLP
    "gemma-mqa": dict(_COMMON, n_query_groups=1, mlp_class_name="GemmaMLP", norm_class_name="RMSNorm",
                      intermediate_size=32, bias=False, parallel_residual=False),
    # GPT-NeoX MLP with biases everywhere, parallel residual, biased head
    "neox-bias": dict(_COMMON, n_query_groups=4, mlp_class_name="GptNeoxMLP", norm_class_name="LayerNorm",
                      intermediate_size=32, bias=True, lm_head_bias=True, rotary_percentage=0.5),
    # mixture of experts
    "moe": dict(_COMMON, n_query_groups=2, mlp_class_name="LLaMAMoE", norm_class_name="RMSNorm",
                intermediate_size=32, moe_intermediate_size=16, n_expert=4, n_expert_per_token=2, bias=False,
                parallel_residual=False),
}  # fmt: skip


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="session")
def dataset_path(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "reverse.json")


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())

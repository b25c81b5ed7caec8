"""Tiny litgpt models, a tokenizer and a dataset built on the spot: the suite never downloads."""

import io
import os
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import torch

# Without CUDA, the fused kernels (litgpt_ether.kernels, opt-in with LITGPT_ETHER_KERNELS=triton) run on CPU tensors
# through Triton's interpreter. Triton reads the switch when it defines a kernel, its own helpers included, so it is set
# before anything imports Triton (litgpt does)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import litgpt.config  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

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


TINY_PRESET = Path(__file__).parents[1] / "config_hub" / "finetune" / "tiny" / "etherplus.yaml"


def run_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """``litgpt_ether ARGS`` in a fresh process, as a user runs it."""
    cmd = [sys.executable, "-m", "litgpt_ether", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, input=input)


def run_main(*args: str) -> subprocess.CompletedProcess:
    """``litgpt_ether ARGS`` in this process, reported as ``run_cli`` reports a fresh one (exit status, stdout,
    stderr with the traceback an uncaught exception would print), without the seconds a fresh process spends on
    imports. For runs that stop early or train a few steps."""
    from litgpt_ether.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", ["litgpt_ether", *args]), redirect_stdout(out), redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["litgpt_ether", *args], code, out.getvalue(), err.getvalue())


def finetune_args(checkpoint_dir: Path, dataset_path: Path, out_dir: Path, *extra: str) -> list[str]:
    """The tiny preset, pointed at the fixtures by CLI overrides."""
    return [
        "finetune", "--config", str(TINY_PRESET), str(checkpoint_dir), "--out_dir", str(out_dir),
        "--data.json_path", str(dataset_path), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def finetune_out(checkpoint_dir, dataset_path, tmp_path_factory) -> Path:
    """One real ETHER+ finetune run (tiny preset, 40 steps), shared by the tests of the after-tuning verbs.

    Its ``final/`` holds both the adapter and the merged weights; ``step-000020/`` holds an adapter only.
    Tests must not modify it: copy it first.
    """
    out_dir = tmp_path_factory.mktemp("finetune") / "out"
    result = run_cli(*finetune_args(checkpoint_dir, dataset_path, out_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


def export_to_hf(litgpt_dir: Path, out_dir: Path) -> Path:
    """Convert a litgpt checkpoint of the tiny LLaMA-style model to a Hugging Face directory.

    litgpt's ``convert_from_litgpt`` writes the weights; transformers needs a ``config.json`` too, built
    here from the litgpt config (what ``litgpt download`` would have fetched for a real model).
    """
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint
    from transformers import LlamaConfig

    convert_lit_checkpoint(litgpt_dir, out_dir)
    c = litgpt.config.Config.from_file(litgpt_dir / "model_config.yaml")
    assert c.mlp_class_name == "LLaMAMLP" and not c.bias, "export_to_hf only knows the tiny LLaMA-style model"
    LlamaConfig(
        vocab_size=c.padded_vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_query_groups,
        head_dim=c.head_size,
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_base,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ).save_pretrained(out_dir)
    state = torch.load(out_dir / "model.pth", weights_only=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors")
    (out_dir / "model.pth").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out_dir / name).write_bytes((litgpt_dir / name).read_bytes())
    return out_dir


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())

"""Tiny litgpt models, a tokenizer and a dataset built on the spot: the suite never downloads."""

import io
import json
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
import litgpt.model  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from litgpt.prompts import Alpaca, save_prompt_style  # noqa: E402
from litgpt.utils import save_config  # noqa: E402

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_tiny import make_checkpoint, make_dataset  # noqa: E402

from litgpt_ether.checkpoint import save_adapter  # noqa: E402
from litgpt_ether.ether import GPT, Config, ether_state_dict  # noqa: E402

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


TINY_PRESET = ROOT / "config_hub" / "finetune" / "tiny" / "etherplus.yaml"


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


DEMO_TEST_ROWS = 60  # the slice of the demo's held-out set a short run is scored on


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The demo's ETHER+ preset as shipped, shortened by CLI overrides (300 steps, a slice of the held-out set), run
    where the docs' commands expect it: ``WORK/out/finetune/demo-etherplus``, with ``WORK/demo`` and
    ``WORK/config_hub`` linked to the repository's. Returns WORK. Tests must not modify the run: write elsewhere."""
    work = tmp_path_factory.mktemp("demo_work")
    for name in ("demo", "config_hub"):
        (work / name).symlink_to(ROOT / name, target_is_directory=True)
    test_rows = json.loads((ROOT / "demo" / "data" / "test.json").read_text())[:DEMO_TEST_ROWS]
    (work / "test.json").write_text(json.dumps(test_rows))
    result = run_cli(
        "finetune", "--config", str(ROOT / "config_hub" / "finetune" / "demo" / "etherplus.yaml"),
        str(ROOT / "demo" / "base"), "--data.json_path", str(ROOT / "demo" / "data"),
        "--out_dir", str(work / "out" / "finetune" / "demo-etherplus"), "--test_data", str(work / "test.json"),
        "--train.max_steps", "300", "--eval.interval", "1000",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (work / "finetune.stdout").write_text(result.stdout)
    return work


def family_base(directory: Path, family: str, **overrides) -> Path:
    """A random-weight base checkpoint of ``family`` (with ``overrides`` to its config), with the tiny tokenizer (its
    vocabulary fits 64)."""
    make_checkpoint(directory)
    config = litgpt.config.Config(**{**FAMILIES[family], "block_size": 128, "vocab_size": 64, "padded_vocab_size": 64,
                                     "name": f"tiny-{family}", **overrides})  # fmt: skip
    torch.manual_seed(1)
    torch.save(litgpt.model.GPT(config).state_dict(), directory / "lit_model.pth")
    save_config(config, directory)
    save_prompt_style(Alpaca(), directory)  # the base answers in the adapters' format too
    return directory


def make_adapter(base: Path, out_dir: Path, seed: int, **ether_args) -> Path:
    """An adapter far from the identity (vectors drawn at random, ETHER+'s ``v`` independent of ``u``)."""
    config = Config.from_file(base / "model_config.yaml", **ether_args)
    model = GPT(config)
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in ether_state_dict(model).items()}
    out_dir.mkdir(parents=True)
    save_adapter(out_dir / "lit_model.pth.ether", state, config)
    save_prompt_style(Alpaca(), out_dir)
    return out_dir


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())

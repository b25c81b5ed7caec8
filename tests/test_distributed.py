"""FSDP across processes: two CPU processes (gloo) train to the adapter of one process with the same global batch.

Fabric's ModelParallelStrategy runs FSDP2 on the CPU, so this is the real multi-process path (sharding, the
gather of the ETHER tensors and of the optimizer state for saving, activation checkpointing), minus CUDA.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import finetune_args, run_cli, run_main
from make_tiny import sample_pairs

from litgpt_ether.checkpoint import ADAPTER_FILE, load_adapter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# One epoch is one step (8 samples, global batch 8, micro-batch 1): whatever order each process draws its
# share in, every step sees the same samples with one process or two. Evaluation, sampling and the held-out
# exact match all run mid-training, as every process must join each forward of a sharded model.
RUN = ("--accelerator", "cpu", "--train.max_steps", "4", "--train.epochs", "10", "--train.global_batch_size", "8",
       "--train.micro_batch_size", "1", "--train.save_interval", "2", "--eval.interval", "2",
       "--data.val_split_fraction", "null")  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp-data")
    rows = sample_pairs(14, seed=3)
    (root / "train.json").write_text(json.dumps(rows[:8]))
    (root / "val.json").write_text(json.dumps(rows[8:12]))
    (root / "test.json").write_text(json.dumps(rows[12:]))
    return root


def args(checkpoint_dir: Path, data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return [*finetune_args(checkpoint_dir, data_dir, out_dir, *RUN, "--test_data", str(data_dir / "test.json")),
            *extra]  # fmt: skip


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_adapter(path / ADAPTER_FILE)[0]


def token_counts(log: str) -> list[int]:
    """The run's token counts from litgpt's performance report: raw, with prompt, with padding."""
    return [
        int(n) for n in re.findall(r"\| - (?:Input Tokens|Tokens w/ Prompt|Total Tokens \(w/ Padding\)) *: *(\d+)", log)
    ]


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


def train(run, out_dir: Path, checkpoint_dir: Path, data_dir: Path, devices: int, *extra: str) -> tuple[Path, str]:
    """A finetune run through ``run`` (``run_main`` or ``run_cli``): its out_dir and everything it printed."""
    result = run(*args(checkpoint_dir, data_dir, out_dir, "--devices", str(devices), *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir, result.stdout + result.stderr


@pytest.fixture(scope="module")
def single(checkpoint_dir, data_dir, tmp_path_factory) -> tuple[Path, str]:
    return train(run_main, tmp_path_factory.mktemp("fsdp") / "single", checkpoint_dir, data_dir, devices=1)


@pytest.fixture(scope="module")
def two(checkpoint_dir, data_dir, tmp_path_factory) -> tuple[Path, str]:
    # a fresh process: Fabric's launcher starts the second process by running the same command again
    return train(run_cli, tmp_path_factory.mktemp("fsdp") / "two", checkpoint_dir, data_dir, devices=2)


def test_two_processes_match_one_process_with_the_same_global_batch(single, two):
    single, single_log = single
    out_dir, log = two
    assert "Starting with 2 processes" in log
    assert "gloo" in log
    start = adapter(single / "step-000002")  # the adapter has moved: an equal one is not an untrained one
    assert any(not torch.allclose(start[k], adapter(single / "final")[k]) for k in start)
    for name in ("step-000002", "step-000004", "final"):
        assert_same_adapter(adapter(out_dir / name), adapter(single / name))
    summaries = [json.loads((d / "final" / "summary.json").read_text()) for d in (single, out_dir)]
    assert summaries[0]["exact_match_after"] == summaries[1]["exact_match_after"]
    assert summaries[0]["trainable_parameters"] == summaries[1]["trainable_parameters"]
    counts = token_counts(single_log)  # summed over both processes: the same tokens as one process saw
    assert len(counts) == 3 and counts[0] > 0
    assert token_counts(log) == counts


def test_two_processes_resume_from_a_step_checkpoint(checkpoint_dir, data_dir, two, tmp_path):
    """The optimizer state was saved gathered from the shards; loaded back into shards it continues the run."""
    out_dir, log = two
    resumed = tmp_path / "resumed"
    step = resumed / "step-000002"
    step.parent.mkdir()
    step.symlink_to(out_dir / "step-000002", target_is_directory=True)
    result = run_cli(*args(checkpoint_dir, data_dir, resumed, "--devices", "2", "--resume", str(step)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming at step 2" in result.stdout + result.stderr
    assert_same_adapter(adapter(resumed / "final"), adapter(out_dir / "final"))
    # the saved counts are the run's (both processes), restored once: the whole run's tokens, not more
    assert token_counts(result.stdout + result.stderr) == token_counts(log)


def test_oft_blocks_shard_and_gather_like_the_vectors(checkpoint_dir, data_dir, tmp_path):
    """OFT's ``(n, k, k)`` blocks are sharded over the processes, gathered for saving, and train alike."""
    oft = ("--ether_method", "oft", "--ether_head", "false", "--optimizer.lr", "0.01")
    single, _ = train(run_main, tmp_path / "single", checkpoint_dir, data_dir, 1, *oft)
    two, _ = train(run_cli, tmp_path / "two", checkpoint_dir, data_dir, 2, *oft)
    final = adapter(single / "final")
    assert final and all(k.endswith(".R") for k in final) and any(v.abs().max() > 0 for v in final.values())
    for name in ("step-000002", "final"):
        assert_same_adapter(adapter(two / name), adapter(single / name))

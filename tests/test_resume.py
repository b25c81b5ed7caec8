"""Resume after a crash: a run killed at any step and resumed ends with the adapter of a run that never stopped;
checkpoints are renamed into place, so a kill during a save leaves nothing a later run would load."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import finetune_args, run_cli, run_main

from litgpt_ether.checkpoint import ADAPTER_FILE, TRAINING_STATE_FILE, load_adapter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 24
# dropout draws from the RNG and accumulation makes a step of two batches: both must resume exactly
RUN = ("--train.max_steps", str(STEPS), "--train.save_interval", "1", "--train.global_batch_size", "16",
       "--train.micro_batch_size", "8", "--ether_dropout", "0.1", "--eval.interval", "10")  # fmt: skip


def final_adapter(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_adapter(out_dir / "final" / ADAPTER_FILE)[0]


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(checkpoint_dir, dataset_path, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("resume") / "whole"
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, *RUN))
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


def started_until_step_5(checkpoint_dir: Path, dataset_path: Path, out_dir: Path) -> subprocess.Popen:
    """The run in a process of its own, once its fifth step checkpoint is on disk."""
    cmd = [sys.executable, "-m", "litgpt_ether", *finetune_args(checkpoint_dir, dataset_path, out_dir, *RUN)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out_dir / "step-000005").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


def test_sigkilled_run_resumes_to_the_adapter_of_an_uninterrupted_run(
    checkpoint_dir, dataset_path, tmp_path, uninterrupted
):
    out_dir = tmp_path / "out"
    proc = started_until_step_5(checkpoint_dir, dataset_path, out_dir)  # then killed wherever: mid-step or mid-save
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out_dir / "final").exists()

    result = run_cli(*finetune_args(checkpoint_dir, dataset_path, out_dir, *RUN, "--resume", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_at = int(result.stdout.split("Resuming at step ")[1].split(":")[0])
    assert 5 <= resumed_at < STEPS
    assert_same_adapter(final_adapter(out_dir), final_adapter(uninterrupted))


def test_ctrl_c_stops_a_run_in_one_line_and_it_resumes_to_the_adapter_of_an_uninterrupted_run(
    checkpoint_dir, dataset_path, tmp_path, uninterrupted
):
    out_dir = tmp_path / "out"
    proc = started_until_step_5(checkpoint_dir, dataset_path, out_dir)
    os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends
    stderr = proc.communicate(timeout=300)[1].decode()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("litgpt_ether: finetune interrupted; its latest checkpoint is ")
    assert last.endswith("continue it with the same command and --resume auto")
    assert not (out_dir / "final").exists() and not list(out_dir.glob(".*partial"))

    result = run_cli(*finetune_args(checkpoint_dir, dataset_path, out_dir, *RUN, "--resume", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_adapter(final_adapter(out_dir), final_adapter(uninterrupted))


def test_resume_from_a_named_step_checkpoint(checkpoint_dir, dataset_path, tmp_path, uninterrupted):
    out_dir = tmp_path / "out"
    step = uninterrupted / "step-000007"
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, *RUN, "--resume", str(step)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming at step 7:" in result.stdout
    assert_same_adapter(final_adapter(out_dir), final_adapter(uninterrupted))
    assert not (out_dir / "step-000007").exists() and (out_dir / "step-000008").is_dir()


@pytest.mark.parametrize(
    "options",
    [
        ("--ether_method", "oft", "--optimizer.lr", "0.01"),
        ("--ether_method", "naive", "--optimizer.lr", "0.01"),
        ("--ether_method", "etherplus", "--precision", "16-true"),  # float16 weights, fp32 vectors and AdamW state
    ],
    ids=["oft", "naive", "etherplus-16-true"],
)
def test_other_methods_and_16_true_resume_to_the_adapter_of_an_uninterrupted_run(
    checkpoint_dir, dataset_path, tmp_path, options
):
    short = (*RUN[:1], "6", *RUN[2:], *options)
    whole = run_main(*finetune_args(checkpoint_dir, dataset_path, tmp_path / "whole", *short))
    assert whole.returncode == 0, whole.stderr[-3000:]
    step = tmp_path / "whole" / "step-000003"
    resumed = run_main(
        *finetune_args(checkpoint_dir, dataset_path, tmp_path / "resumed", *short, "--resume", str(step))
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming at step 3:" in resumed.stdout
    assert_same_adapter(final_adapter(tmp_path / "resumed"), final_adapter(tmp_path / "whole"))


KILL_DURING_SAVE = """
import os, signal, sys, torch
import litgpt_ether.finetune as finetune

real_save = torch.save
def save(obj, f, *args, **kwargs):
    # the third step checkpoint's training state: write half of it, then die as a killed process would
    if "{state}" in str(f) and ".step-000003." in str(f):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as file:
            file.truncate(os.path.getsize(f) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
finetune.torch.save = save

from litgpt_ether.__main__ import main
sys.argv = ["litgpt_ether", *sys.argv[1:]]
main()
"""


def test_kill_during_a_save_leaves_only_complete_checkpoints(checkpoint_dir, dataset_path, tmp_path, uninterrupted):
    out_dir = tmp_path / "out"
    script = KILL_DURING_SAVE.replace("{state}", TRAINING_STATE_FILE)
    args = finetune_args(checkpoint_dir, dataset_path, out_dir, *RUN)
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # the half-written checkpoint never got its name; the ones before it are whole
    assert sorted(p.name for p in out_dir.glob("step-*")) == ["step-000001", "step-000002"]
    (partial,) = out_dir.glob(".step-000003.*.partial")  # named after the killed process
    for step in ("step-000001", "step-000002"):
        assert_same_adapter(load_adapter(out_dir / step / ADAPTER_FILE)[0],
                            load_adapter(uninterrupted / step / ADAPTER_FILE)[0])  # fmt: skip
        torch.load(out_dir / step / TRAINING_STATE_FILE, weights_only=True)

    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, *RUN, "--resume", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming at step 2:" in result.stdout
    assert not partial.exists() and f"Removed {str(partial)!r}" in result.stderr
    assert_same_adapter(final_adapter(out_dir), final_adapter(uninterrupted))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_out_dir_holding_a_run_is_refused_and_left_as_it_was(checkpoint_dir, dataset_path, tmp_path, uninterrupted):
    out_dir = tmp_path / "out"
    shutil.copytree(uninterrupted, out_dir, ignore=shutil.ignore_patterns("logs"))
    before = snapshot(out_dir)
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, *RUN))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"litgpt_ether: error: out_dir {str(out_dir)!r} already holds a run (final, step-000001, step-000002, ...):"
        " pass --resume auto to continue it, or --overwrite true to start over and delete it"
    ]
    assert snapshot(out_dir) == before


def test_overwrite_starts_over(checkpoint_dir, dataset_path, tmp_path):
    out_dir = tmp_path / "out"
    (out_dir / "step-000099").mkdir(parents=True)
    (out_dir / "final").mkdir()
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, "--train.max_steps", "3",
                                     "--train.save_interval", "2", "--overwrite", "true"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out_dir.glob("step-*")) == ["step-000002"]
    assert (out_dir / "final" / ADAPTER_FILE).is_file()


@pytest.mark.parametrize(
    ("option", "value", "changed"),
    [("--ether_nb", "4", "ether"), ("--train.micro_batch_size", "4", "micro_batch_size"), ("--seed", "7", "seed")],
)
def test_resume_with_other_settings_is_refused(checkpoint_dir, dataset_path, tmp_path, uninterrupted, option, value,
                                               changed):  # fmt: skip
    out_dir = tmp_path / "out"
    step = uninterrupted / "step-000003"
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, *RUN, "--resume", str(step), option, value))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"litgpt_ether: error: cannot resume {str(step)!r}: this run's settings differ ({changed}")
    assert not (out_dir / "final").exists()


def test_resume_from_something_else_is_refused(checkpoint_dir, dataset_path, tmp_path):
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, tmp_path / "out", "--resume", str(checkpoint_dir)))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"litgpt_ether: error: --resume {str(checkpoint_dir)!r} is not a step checkpoint of a finetune run"
        " (a step-* directory)"
    ]


def test_resume_auto_with_nothing_to_resume_does_not_start_over_a_finished_run(checkpoint_dir, dataset_path, tmp_path):
    out_dir = tmp_path / "out"
    (out_dir / "final").mkdir(parents=True)
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, "--resume", "auto"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"litgpt_ether: error: out_dir {str(out_dir)!r} holds a run but no complete step checkpoint to resume from:"
        " pass --overwrite true to start over and delete it"
    ]
    assert [p.name for p in out_dir.iterdir()] == ["final"]


def test_resume_auto_in_an_empty_out_dir_starts_afresh(checkpoint_dir, dataset_path, tmp_path):
    out_dir = tmp_path / "out"
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, "--resume", "auto",
                                     "--train.max_steps", "3", "--train.save_interval", "2"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming" not in result.stdout
    assert (out_dir / "step-000002" / TRAINING_STATE_FILE).is_file() and (out_dir / "final" / ADAPTER_FILE).is_file()

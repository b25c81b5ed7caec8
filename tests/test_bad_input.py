"""Bad input: one line on stderr (``litgpt_ether: error: ...``), a non-zero exit, no traceback, nothing written.

The CLI runs in this process (``run_main``): the same ``main`` as the ``litgpt_ether`` command, without the seconds a
fresh process spends on imports. Cases covered elsewhere, not repeated here:

1. missing checkpoint dir: test_finetune.py::test_missing_checkpoint_dir_is_a_clear_error,
   test_merge.py::test_missing_path_is_a_clear_error
2. checkpoint dir without weights or tokenizer: test_finetune.py::test_incomplete_checkpoint_dir_names_the_missing_files
3. adapter from another base model: test_merge.py::test_adapter_from_another_base_is_refused_and_nothing_written
4. corrupted or truncated adapter: test_merge.py::test_corrupted_adapter_is_a_one_line_error
5. ether_nb not dividing a targeted size: test_finetune.py::test_nb_not_dividing_is_a_one_line_error
10. unknown lm-eval task: test_evaluate.py::test_unknown_task_is_a_one_line_error_and_nothing_is_written
13. prompt longer than the context:
    test_generate.py::test_cli_generate_prompt_too_long_for_the_context_is_a_one_line_error,
    test_generate.py::test_cli_chat_streams_replies_and_skips_a_prompt_too_long_for_the_context
"""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import finetune_args, read_yaml, run_cli, run_main
from litgpt.data import SFTDataset
from litgpt.prompts import Alpaca
from litgpt.tokenizer import Tokenizer

import litgpt_ether.finetune
from litgpt_ether import ConfigError
from litgpt_ether.checkpoint import ADAPTER_FILE, LOCK_FILE, load_adapter
from litgpt_ether.checks import check_outputs_fit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def one_line_error(result: subprocess.CompletedProcess, *fragments: str, code: int | None = None) -> str:
    """The error line, checked: the last line of stderr and the only error line, a non-zero exit, no traceback."""
    assert result.returncode != 0 if code is None else result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    last = result.stderr.strip().splitlines()[-1]
    assert errors == [last] and last.startswith("litgpt_ether: error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def refused_finetune(checkpoint_dir: Path, dataset_path: Path, out_dir: Path, *extra: str) -> str:
    """The error line of a finetune run that must stop before it writes anything."""
    line = one_line_error(run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, *extra)))
    assert not out_dir.exists()
    return line


# 6. config file and command line


@pytest.mark.parametrize(
    "config, message",
    [
        ("no_such_key: 3\n", "Subcommand 'finetune' does not accept nested key 'no_such_key'"),
        ("seed: not-a-number\n", "Parser key \"seed\": Expected a <class 'int'>. Got value: not-a-number"),
        ("train:\n  max_stepz: 3\n", "max_stepz"),
    ],
    ids=["unknown-key", "wrong-type", "unknown-nested-key"],
)
def test_bad_config_file_is_one_line(checkpoint_dir, tmp_path, config, message):
    (tmp_path / "config.yaml").write_text(f"checkpoint_dir: {checkpoint_dir}\nout_dir: {tmp_path / 'out'}\n{config}")
    one_line_error(run_main("finetune", "--config", str(tmp_path / "config.yaml")), message, code=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", ["finetune", "generate", "merge"])
def test_unknown_flag_is_one_line(checkpoint_dir, verb):
    one_line_error(
        run_main(verb, str(checkpoint_dir), "--no_such_flag", "1"), "Unrecognized arguments: --no_such_flag 1"
    )


def test_unknown_data_file_is_one_line(checkpoint_dir, tmp_path):
    # litgpt's JSON refuses a missing file while the command line is turned into objects
    line = refused_finetune(checkpoint_dir, tmp_path / "missing.json", tmp_path / "out")
    assert "missing.json' does not exist" in line


def test_debug_switch_keeps_the_traceback(checkpoint_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LITGPT_ETHER_DEBUG", "1")
    result = run_main("generate", str(checkpoint_dir), "--max_new_tokens", "0")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1]
        == "litgpt_ether.checks.ConfigError: max_new_tokens must be an integer >= 1, got 0"
    )


# 7. the JSON training data


@pytest.mark.parametrize(
    "content, problem",
    [
        ("[]", "holds no samples: expected a non-empty JSON list"),
        ('{"instruction": "reverse red", "output": "red"}', "holds no samples: expected a non-empty JSON list"),
        ("[{not json", "is not readable JSON (Expecting property name enclosed in double quotes"),
        (
            json.dumps([{"instruction": "reverse red", "output": "red"}, {"instruction": "x"}]),
            "sample 1 has no 'output'",
        ),
        (json.dumps([{"input": "", "output": "red"}]), "sample 0 has no 'instruction'"),
    ],
    ids=["empty", "not-a-list", "not-json", "no-output", "no-instruction"],
)
def test_bad_json_data_is_refused_before_training(checkpoint_dir, tmp_path, content, problem):
    data = tmp_path / "data.json"
    data.write_text(content)
    line = refused_finetune(checkpoint_dir, data, tmp_path / "out")
    assert f"data file {str(data)!r}" in line and problem in line


# 8. samples longer than max_seq_length


def prompt_length(checkpoint_dir: Path, row: dict) -> int:
    return len(Tokenizer(checkpoint_dir).encode(Alpaca().apply(prompt=row["instruction"], **row)))


def test_prompts_that_fill_max_seq_length_leave_nothing_to_train(checkpoint_dir, dataset_path, tmp_path):
    rows = json.loads(dataset_path.read_text())
    shortest = min(prompt_length(checkpoint_dir, row) for row in rows)
    line = refused_finetune(
        checkpoint_dir, dataset_path, tmp_path / "out", "--train.max_seq_length", str(shortest)
    )  # the output would start right after the last position: nothing of it is kept
    assert f"train.max_seq_length={shortest} (the shortest is {shortest} tokens" in line
    assert "no output token would be trained" in line

    # one more token keeps the first output token (the EOS of an empty output at least): trainable, no error
    tokenizer = Tokenizer(checkpoint_dir)
    check_outputs_fit(SFTDataset(rows, tokenizer, Alpaca(), max_seq_length=shortest + 1), shortest + 1)
    with pytest.raises(ConfigError):
        check_outputs_fit(SFTDataset(rows, tokenizer, Alpaca(), max_seq_length=shortest), shortest)


# 9. the loss becomes NaN or infinite


@pytest.mark.parametrize(
    "bad, step, kept, last",
    [
        ("nan", 7, ["step-000003", "step-000006"], "the last good checkpoint is {out_dir}/step-000006"),
        ("inf", 2, [], "no checkpoint was saved before it"),
    ],
)
def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(
    checkpoint_dir, dataset_path, tmp_path, monkeypatch, bad, step, kept, last
):
    out_dir = tmp_path / "out"
    real_loss = litgpt_ether.finetune.chunked_cross_entropy
    calls, before = [], {}

    def loss_going_bad(*args, **kwargs):  # the preset takes one micro-batch per step
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        if len(calls) < step:
            return loss
        before.update({p: p.read_bytes() for p in out_dir.rglob("*")
                       if p.is_file() and "logs" not in p.parts and p.name != LOCK_FILE})  # fmt: skip
        return loss * float(bad)

    monkeypatch.setattr(litgpt_ether.finetune, "chunked_cross_entropy", loss_going_bad)
    extra = ["--train.max_steps", "10", "--train.save_interval", "3", "--eval.interval", "100"]
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, *extra))

    line = one_line_error(result)
    assert line == f"litgpt_ether: error: loss became {bad} at step {step}; {last.format(out_dir=out_dir)}"
    assert len(calls) == step  # stopped at once
    assert sorted(p.name for p in out_dir.iterdir()) == ["logs", *kept]  # no final/, nothing after the bad step
    assert {p: p.read_bytes() for p in before} == before  # the checkpoints before it are untouched
    for name in kept:
        state, _ = load_adapter(out_dir / name / ADAPTER_FILE)
        assert all(torch.isfinite(v).all() for v in state.values())


# 11. --quantize: needs CUDA, one device and a "-true" precision (test_quantize.py trains with it)


def without_module(monkeypatch, missing: str) -> None:
    """Make ``missing`` look uninstalled to the extras check, as on a base install without that extra."""
    import litgpt_ether.checks

    real = litgpt_ether.checks.find_spec
    monkeypatch.setattr(litgpt_ether.checks, "find_spec", lambda name: None if name == missing else real(name))


@pytest.mark.parametrize(
    "verb, module, extra",
    [("finetune", "bitsandbytes", "quant"), ("generate", "bitsandbytes", "quant"), ("chat", "bitsandbytes", "quant"),
     ("evaluate", "lm_eval", "eval")],
)  # fmt: skip
def test_a_missing_extra_is_one_line_naming_it(
    checkpoint_dir, dataset_path, tmp_path, monkeypatch, verb, module, extra
):
    without_module(monkeypatch, module)
    args = {
        "finetune": finetune_args(checkpoint_dir, dataset_path, tmp_path / "out", "--quantize", "bnb.nf4"),
        "generate": ["generate", str(checkpoint_dir), "--quantize", "bnb.nf4"],
        "chat": ["chat", str(checkpoint_dir), "--quantize", "bnb.nf4"],
        "evaluate": ["evaluate", str(checkpoint_dir), "--tasks", "x", "--out_dir", str(tmp_path / "out")],
    }[verb]
    line = one_line_error(run_main(*args), f"needs the '{extra}' extra ({module} is not installed)")
    assert line.endswith(f"pip install -e '.[{extra}]' in your litgpt-ether clone")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", ["finetune", "generate", "chat", "evaluate"])
def test_quantize_without_cuda_is_one_line(checkpoint_dir, dataset_path, tmp_path, monkeypatch, verb):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if verb == "evaluate":
        pytest.importorskip("lm_eval", reason="the eval extra installs lm-eval")
    args = {
        "finetune": finetune_args(checkpoint_dir, dataset_path, tmp_path / "out", "--quantize", "bnb.nf4"),
        "generate": ["generate", str(checkpoint_dir), "--quantize", "bnb.nf4"],
        "chat": ["chat", str(checkpoint_dir), "--quantize", "bnb.nf4"],
        "evaluate": ["evaluate", str(checkpoint_dir), "--tasks", "x", "--quantize", "bnb.nf4", "--out_dir",
                     str(tmp_path / "out")],
    }[verb]  # fmt: skip
    line = one_line_error(run_main(*args))
    assert line == "litgpt_ether: error: --quantize bnb.nf4 needs a CUDA device (none found)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "verb, flags, cuda_devices, message",
    [
        ("finetune", ["--precision", "bf16-mixed"], 1,
         "--quantize bnb.nf4 needs --precision 16-true, bf16-true or 32-true (not mixed), got 'bf16-mixed'"),
        ("finetune", ["--devices", "2"], 2,
         "--quantize bnb.nf4 trains on one device only, got 2: FSDP does not shard quantized weights"),
        ("finetune", ["--accelerator", "cpu"], 1, "--quantize bnb.nf4 needs a CUDA device; it cannot run on 'cpu'"),
        ("evaluate", ["--device", "cpu"], 1, "--quantize bnb.nf4 needs a CUDA device; it cannot run on 'cpu'"),
        ("generate", ["--precision", "16-mixed"], 1,
         "--quantize bnb.nf4 needs --precision 16-true, bf16-true or 32-true (not mixed), got '16-mixed'"),
    ],
)  # fmt: skip
def test_quantize_settings_bitsandbytes_cannot_run_are_one_line(
    checkpoint_dir, dataset_path, tmp_path, monkeypatch, verb, flags, cuda_devices, message
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # checked before anything touches CUDA
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    if verb == "evaluate":
        pytest.importorskip("lm_eval", reason="the eval extra installs lm-eval")
    args = {
        "finetune": finetune_args(checkpoint_dir, dataset_path, tmp_path / "out", "--quantize", "bnb.nf4", *flags),
        "generate": ["generate", str(checkpoint_dir), "--quantize", "bnb.nf4", *flags],
        "evaluate": ["evaluate", str(checkpoint_dir), "--tasks", "arc_easy", "--quantize", "bnb.nf4", "--out_dir",
                     str(tmp_path / "out"), *flags],
    }[verb]  # fmt: skip
    one_line_error(run_main(*args), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("precision", ["16-mixed", "16-true"])
def test_a_precision_fsdp_cannot_run_is_one_line(checkpoint_dir, dataset_path, tmp_path, precision):
    args = finetune_args(checkpoint_dir, dataset_path, tmp_path / "out", "--accelerator", "cpu", "--devices", "2",
                         "--precision", precision)  # fmt: skip
    one_line_error(run_main(*args), f"--precision {precision} does not work with FSDP (more than one device)")
    assert not (tmp_path / "out").exists()


def test_int8_training_needs_float16(checkpoint_dir, dataset_path, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = finetune_args(checkpoint_dir, dataset_path, tmp_path / "out", "--quantize", "bnb.int8-training",
                         "--precision", "bf16-true")  # fmt: skip
    one_line_error(run_main(*args), "--quantize bnb.int8-training needs --precision 16-true, got 'bf16-true'")


def test_quantize_outside_litgpts_choices_is_one_line(checkpoint_dir):
    line = one_line_error(run_main("generate", str(checkpoint_dir), "--quantize", "int3"), code=2)
    assert line.endswith(
        "--quantize must be one of 'bnb.nf4', 'bnb.nf4-dq', 'bnb.fp4', 'bnb.fp4-dq', 'bnb.int8', got 'int3'"
    )


# 12. devices the machine does not have


@pytest.mark.parametrize(
    "flags, cuda_devices, message",
    [
        (["--accelerator", "cuda", "--devices", "2"], 0, "--accelerator cuda: no CUDA device found"),
        (["--accelerator", "gpu"], 0, "--accelerator gpu: no CUDA device found"),
        (["--accelerator", "cuda", "--devices", "2"], 1, "--devices 2 but only 1 CUDA device is visible"),
        (["--devices", "3"], 2, "--devices 3 but only 2 CUDA devices are visible"),  # auto picks CUDA
        (["--devices", "0"], 0, "--devices must be a positive integer, 'auto' or -1 (all), got 0"),
        (["--devices", "-2"], 0, "--devices must be a positive integer, 'auto' or -1 (all), got -2"),
        (["--devices", "0,1"], 0, "--devices must be a positive integer, 'auto' or -1 (all), got '0,1'"),
    ],
    ids=["cuda-on-cpu", "gpu-on-cpu", "more-than-cuda", "auto-more-than-cuda", "zero", "negative", "a-list"],
)
def test_devices_that_do_not_exist_are_one_line(
    checkpoint_dir, dataset_path, tmp_path, monkeypatch, flags, cuda_devices, message
):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)  # checked before anything touches CUDA
    line = refused_finetune(checkpoint_dir, dataset_path, tmp_path / "out", *flags)
    assert line == f"litgpt_ether: error: {message}"


# 14. the optimizer


def test_whole_optimizer_as_json_replaces_the_configs_optimizer(checkpoint_dir, dataset_path, tmp_path, monkeypatch):
    used = []
    real = litgpt_ether.finetune.instantiate_torch_optimizer

    def instantiate(*args, **kwargs):
        used.append(real(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(litgpt_ether.finetune, "instantiate_torch_optimizer", instantiate)
    sgd = '{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}'
    extra = ["--optimizer", sgd, "--train.max_steps", "3", "--train.save_interval", "3"]
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, tmp_path / "out", *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    assert type(used[0]) is torch.optim.SGD and used[0].defaults["lr"] == 0.1
    hparams = read_yaml(tmp_path / "out" / "final" / "hyperparameters.yaml")
    assert hparams["optimizer"] == {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}


@pytest.mark.parametrize(
    "optimizer, message",
    [
        ("NoSuchOptimizer", "--optimizer 'NoSuchOptimizer' is not an optimizer class"),
        ('{"class_path": "torch.optim.NoSuch"}', "--optimizer 'torch.optim.NoSuch' is not an optimizer class"),
        ('{"class_path": "torch.nn.Linear"}', "--optimizer 'torch.nn.Linear' is not an optimizer class"),
        ('{"class_path": "torch.optim.SGD", "init_args": {"lrr": 0.1}}', "--optimizer torch.optim.SGD has no option"),
    ],
    ids=["name", "class_path", "not-an-optimizer", "unknown-option"],
)
def test_unknown_optimizer_is_one_line(checkpoint_dir, dataset_path, tmp_path, optimizer, message):
    assert message in refused_finetune(checkpoint_dir, dataset_path, tmp_path / "out", "--optimizer", optimizer)


def test_the_real_command_prints_one_line(checkpoint_dir):
    """The same in a fresh process, as a user runs it: jsonargparse's error, no usage block, exit status 2."""
    result = run_cli("generate", str(checkpoint_dir), "--no_such_flag", "1")
    assert re.fullmatch(r"litgpt_ether: error: Unrecognized arguments: --no_such_flag 1\n", result.stderr)
    assert result.returncode == 2

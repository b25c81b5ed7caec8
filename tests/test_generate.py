"""``litgpt_ether generate`` and ``chat``: merged and unmerged outputs, the saved prompt style, bad input."""

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, run_main

from litgpt_ether import ConfigError
from litgpt_ether import chat as chat_verb
from litgpt_ether import generate as generate_verb
from litgpt_ether.checkpoint import MODEL_FILE
from litgpt_ether.generate import PromptTooLongError
from litgpt_ether.merge import merge

PROMPT = "reverse red green blue"
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    " ### Instruction: reverse red green blue ### Response:"
)  # the word-level tokenizer decodes the Alpaca template with single spaces
TOO_LONG = " ".join(["red"] * 120)  # 120 tokens + the template > the tiny model's context of 128
GREEDY = ("--temperature", "0", "--precision", "32-true", "--max_new_tokens", "12")


def generated(capsys, checkpoint_dir: Path, **kwargs) -> str:
    """Greedy (litgpt picks the argmax when temperature is 0) text printed by the generate verb in this process."""
    kwargs = {"prompt": PROMPT, "temperature": 0.0, "precision": "32-true", "max_new_tokens": 12, **kwargs}
    generate_verb.main(checkpoint_dir, **kwargs)
    return capsys.readouterr().out


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_greedy_generation_is_the_same_merged_and_with_the_adapter_applied_on_the_fly(
    finetune_out, checkpoint_dir, tmp_path, capsys
):
    unmerged = tmp_path / "unmerged"
    shutil.copytree(finetune_out / "final", unmerged)
    (unmerged / MODEL_FILE).unlink()  # only the adapter is left: resolve applies it to the base model
    base = tmp_path / "base"  # the base model with the finetune's prompt style: same prompt, no adapter
    shutil.copytree(checkpoint_dir, base)
    shutil.copy(finetune_out / "final" / "prompt_style.yaml", base)

    from_merged = generated(capsys, finetune_out / "final")
    assert "applied on the fly" not in capsys.readouterr().err
    from_adapter = generated(capsys, unmerged)
    from_base = generated(capsys, base)

    assert from_merged.startswith(ALPACA) and len(from_merged) > len(ALPACA) + 10
    assert from_merged == from_adapter
    assert from_merged != from_base  # the adapter changes the output: the comparison above means something


def test_generate_wraps_the_prompt_in_the_saved_prompt_style(finetune_out, checkpoint_dir, capsys):
    assert generated(capsys, finetune_out / "final").startswith(ALPACA)
    # the base checkpoint has no prompt_style.yaml and its name maps to litgpt's default (no template)
    assert generated(capsys, checkpoint_dir).startswith(PROMPT)


def test_cli_generate_applies_an_unmerged_adapter_and_reports_tokens_per_second(finetune_out, tmp_path, capsys):
    step_dir = finetune_out / "step-000020"  # an adapter only, no merged weights
    result = run_main("generate", str(step_dir), "--prompt", PROMPT, *GREEDY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "applied on the fly" in result.stderr
    assert "tokens/sec" in last_line(result)

    merge(step_dir, out_dir=tmp_path / "merged")
    capsys.readouterr()
    assert result.stdout == generated(capsys, tmp_path / "merged")


def test_cli_chat_streams_replies_and_skips_a_prompt_too_long_for_the_context(finetune_out):
    stdin = f"{PROMPT}\n{TOO_LONG}\nreverse pink gold\n!quit\n"
    result = run_cli("chat", str(finetune_out / "step-000020"), "--precision", "32-true", input=stdin)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(">> Reply: ") == 2
    assert result.stderr.count("tokens/sec") == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("litgpt_ether: error:")]
    assert len(errors) == 1 and "do not fit in the model's context of 128" in errors[0]
    assert "Traceback" not in result.stderr


def test_chat_ends_cleanly_at_the_end_of_input(finetune_out, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPT}\n"))  # no !quit: input() meets end of file
    chat_verb.main(finetune_out / "final", temperature=0.0, precision="32-true", max_new_tokens=5)
    captured = capsys.readouterr()
    assert captured.out.count(">> Reply: ") == 1
    assert "tokens/sec" in captured.err


def test_chat_grows_its_cache_for_a_longer_prompt_quietly_and_answers_it_as_a_fresh_chat(finetune_out, monkeypatch,
                                                                                        capsys):  # fmt: skip
    longer = "reverse red green blue pink gold red green blue"
    replies = []
    for stdin in (f"reverse red\n{longer}\n", f"{longer}\n"):
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        chat_verb.main(finetune_out / "final", temperature=0.0, precision="32-true", max_new_tokens=8)
        out = capsys.readouterr().out
        assert "Warning" not in out  # litgpt's growing cache prints "Call 'set_kv_cache' before..." on stdout
        replies.append(out.split(">> Reply: ")[-1])
    assert replies[0] == replies[1]


def test_cli_generate_prompt_too_long_for_the_context_is_a_one_line_error(finetune_out):
    result = run_main("generate", str(finetune_out / "final"), "--prompt", TOO_LONG, *GREEDY)
    assert result.returncode != 0
    assert last_line(result).startswith("litgpt_ether: error: the prompt is 1")
    assert "do not fit in the model's context of 128" in last_line(result)
    assert "Traceback" not in result.stderr


def test_prompt_that_fits_only_with_fewer_new_tokens_names_the_most_that_fit(finetune_out, capsys):
    with pytest.raises(PromptTooLongError, match=r"lower --max_new_tokens to \d+ or less"):
        generated(capsys, finetune_out / "final", max_new_tokens=120)


def test_missing_checkpoint_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="nowhere' is not a checkpoint directory"):  # one line, as every verb
        generate_verb.main(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "option", [{"max_new_tokens": 0}, {"top_k": 0}, {"top_p": 1.5}], ids=["max_new_tokens", "top_k", "top_p"]
)
def test_bad_sampling_options_are_refused_before_loading(tmp_path, capsys, option):
    # a missing checkpoint dir would exit: the options are checked first
    with pytest.raises(ConfigError, match=next(iter(option))):
        generated(capsys, tmp_path / "nowhere", **option)


def test_cli_chat_skips_a_line_that_is_not_utf8_and_answers_the_rest(finetune_out):
    stdin = f"{PROMPT}\n".encode() + b"reverse \xff\xfe red\n" + b"reverse pink gold\n!quit\n"
    cmd = [sys.executable, "-m", "litgpt_ether", "chat", str(finetune_out / "step-000020"), "--precision", "32-true"]
    result = subprocess.run(cmd, capture_output=True, input=stdin, timeout=600)
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err[-3000:]
    assert out.count(">> Reply: ") == 2 and err.count("tokens/sec") == 2
    errors = [line for line in err.splitlines() if line.startswith("litgpt_ether: error:")]
    assert errors == ["litgpt_ether: error: the prompt is not valid UTF-8 text: skipped"]
    assert "Traceback" not in err

"""The whole after-tuning workflow through the CLI, as a user runs it: finetune -> merge -> generate -> evaluate."""

import json
from pathlib import Path

import pytest
from conftest import finetune_args, run_cli, run_main

TASKS = Path(__file__).parent / "lm_eval_tasks"
# one greedy prompt, answered alike by a merged checkpoint and by its adapter applied on the fly
GREEDY = ("--prompt", "reverse red green blue", "--temperature", "0", "--max_new_tokens", "4", "--precision", "32-true")


def test_finetune_merge_generate_evaluate(finetune_out, tmp_path):
    # finetune ran through the CLI in the fixture; merge an intermediate step's adapter into its base
    merged = tmp_path / "merged"
    result = run_cli("merge", str(finetune_out / "step-000020"), "--out_dir", str(merged))
    assert result.returncode == 0, result.stderr[-2000:]

    from_merged = run_cli("generate", str(merged), *GREEDY)
    from_adapter = run_cli("generate", str(finetune_out / "step-000020"), *GREEDY)
    assert from_merged.returncode == 0 and from_adapter.returncode == 0, from_merged.stderr[-2000:]
    assert "### Response:" in from_merged.stdout  # the saved Alpaca prompt style came along with the merge
    assert from_merged.stdout == from_adapter.stdout
    assert "tokens/sec" in from_merged.stderr

    result = run_cli(
        "evaluate", str(merged), "--tasks", "colours_reverse_mc,colours_reverse_gen", "--include_path", str(TASKS),
        "--limit", "4", "--precision", "32-true", "--out_dir", str(tmp_path / "eval"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert set(results) == {"colours_reverse_mc", "colours_reverse_gen"}
    assert 0.0 <= results["colours_reverse_mc"]["acc,none"] <= 1.0
    assert "colours_reverse_gen" in result.stdout  # lm-eval's table


@pytest.mark.parametrize("method", ["oft", "naive"])
def test_every_verb_works_on_oft_and_naive_outputs(checkpoint_dir, dataset_path, tmp_path, method):
    out_dir = tmp_path / "out"
    extra = ("--ether_method", method, "--train.max_steps", "20", "--train.save_interval", "10")
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, *extra))
    assert result.returncode == 0, result.stderr[-2000:]
    step = out_dir / "step-000010"
    assert run_main("merge", str(step), "--out_dir", str(tmp_path / "merged")).returncode == 0

    from_merged = run_main("generate", str(tmp_path / "merged"), *GREEDY)
    from_adapter = run_main("generate", str(step), *GREEDY)  # applied on the fly
    assert from_merged.returncode == 0 and from_merged.stdout == from_adapter.stdout, from_merged.stderr[-2000:]

    chat = run_cli("chat", str(out_dir), "--temperature", "0", "--max_new_tokens", "4", input="reverse red green\n")
    assert chat.returncode == 0 and ">> Reply:" in chat.stdout, chat.stderr[-2000:]

    inspected = run_main("inspect", str(step), "--json", "true")
    reports = json.loads(inspected.stdout)
    assert reports and all(r["h_in_minus_i"] is not None or r["h_out_minus_i"] is not None for r in reports)

    result = run_main("evaluate", str(out_dir), "--tasks", "colours_reverse_mc", "--include_path", str(TASKS),
                      "--limit", "2", "--out_dir", str(tmp_path / "eval"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "acc,none" in json.loads((tmp_path / "eval" / "results.json").read_text())["results"]["colours_reverse_mc"]

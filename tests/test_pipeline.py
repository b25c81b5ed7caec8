"""The whole after-tuning workflow through the CLI, as a user runs it: finetune -> merge -> generate -> evaluate."""

import json
from pathlib import Path

from conftest import run_cli

TASKS = Path(__file__).parent / "lm_eval_tasks"


def test_finetune_merge_generate_evaluate(finetune_out, tmp_path):
    # finetune ran through the CLI in the fixture; merge an intermediate step's adapter into its base
    merged = tmp_path / "merged"
    result = run_cli("merge", str(finetune_out / "step-000020"), "--out_dir", str(merged))
    assert result.returncode == 0, result.stderr[-2000:]

    prompt = [
        "--prompt",
        "reverse red green blue",
        "--temperature",
        "0",
        "--max_new_tokens",
        "4",
        "--precision",
        "32-true",
    ]
    from_merged = run_cli("generate", str(merged), *prompt)
    from_adapter = run_cli("generate", str(finetune_out / "step-000020"), *prompt)
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

"""The bad-input catalogue: every verb, every class of mistake (out-of-range numbers, unknown choices, unreadable or
missing files, impossible combinations, outputs that cannot be written or would be overwritten).

Each case runs the CLI in this process against one "world" directory (a base model, data, a finished run, a merged
checkpoint, broken copies of each) and asserts: a non-zero exit, exactly one ``litgpt_ether: error:`` line on stderr
(the last one) naming the problem, and every file and directory of the world byte-identical afterwards, nothing
added, nothing removed.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import finetune_args, run_main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the hash of its bytes (directories and links named as such)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = f"link:{path.readlink()}"
        elif path.is_dir():
            entries[key] = "dir"
        else:
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def world(checkpoint_dir, dataset_path, tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("world")
    shutil.copytree(checkpoint_dir, w / "base")
    shutil.copy(dataset_path, w / "data.json")
    ok = run_main(*finetune_args(w / "base", w / "data.json", w / "run", "--train.max_steps", "4",
                                 "--train.save_interval", "2", "--eval.interval", "100", "--test_data",
                                 str(w / "data.json")))  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    ok = run_main("merge", str(w / "run" / "final" / "lit_model.pth.ether"), "--out_dir", str(w / "merged"))
    assert ok.returncode == 0, ok.stderr[-3000:]

    bad = w / "bad"
    shutil.copytree(w / "base", bad / "base-truncated")
    truncate(bad / "base-truncated" / "lit_model.pth")
    shutil.copytree(w / "base", bad / "base-reshaped")  # a tensor of another shape than the config says
    state = torch.load(w / "base" / "lit_model.pth", weights_only=True)
    state["lm_head.weight"] = torch.cat([state["lm_head.weight"]] * 2)
    torch.save(state, bad / "base-reshaped" / "lit_model.pth")
    shutil.copytree(w / "merged", bad / "merged-truncated")
    truncate(bad / "merged-truncated" / "lit_model.pth")
    shutil.copytree(w / "run" / "step-000002", bad / "adapter-truncated")
    truncate(bad / "adapter-truncated" / "lit_model.pth.ether")
    (bad / "not-json.json").write_text("{ this is not json")
    (bad / "empty.json").write_text("[]")
    (bad / "no-output.json").write_text(json.dumps([{"instruction": "reverse red", "input": ""}]))
    rows = json.loads((w / "data.json").read_text())
    (bad / "long.json").write_text(json.dumps([{**rows[0], "instruction": "red " * 300}] + rows[1:20]))
    (bad / "a-file").write_text("not a directory")
    (bad / "data-dir").mkdir()
    (bad / "unknown-key.yaml").write_text("no_such_key: 3\n")
    (bad / "evaluated").mkdir()
    (bad / "evaluated" / "results.json").write_text("{}")  # an earlier evaluation's
    return w


def F(*extra: str, base: str = "{w}/base") -> list[str]:
    """finetune, the tiny preset, pointed at the world; ``--out_dir`` goes to a new directory unless overridden."""
    return finetune_args(Path(base), Path("{w}/data.json"), Path("{w}/new-out"), *extra)


CASES = {
    # finetune: ETHER options
    "ft-method": (
        F("--ether_method", "foo"),
        "--ether_method must be one of 'ether', 'etherplus', 'oft', 'naive', got 'foo'",
    ),
    "ft-nb-zero": (F("--ether_nb", "0"), "ether_nb must be an integer >= 1, got 0"),
    "ft-nb-not-dividing": (F("--ether_nb", "3"), "ether_nb=3 does not divide"),
    "ft-dropout": (F("--ether_dropout", "1.5"), "ether_dropout must be in [0, 1), got 1.5"),
    "ft-precision": (F("--precision", "foo"), "--precision must be one of 64, 32, 16, transformer-engine"),
    "ft-val-split": (F("--data.val_split_fraction", "1.5"), "data.val_split_fraction must be in (0, 1), got 1.5"),
    "ft-flip-two-sided": (F("--ether_flip_side", "true"), "ether_flip_side only applies to one-sided methods"),
    "ft-no-target": (
        F(
            "--ether_query",
            "false",
            "--ether_value",
            "false",
            "--ether_projection",
            "false",
            "--ether_mlp",
            "false",
            "--ether_head",
            "false",
        ),
        "no ETHER target enabled",
    ),  # fmt: skip
    # finetune: optimizer
    "ft-lr-negative": (F("--optimizer.init_args.lr", "-0.01"), "optimizer.lr must be a finite number > 0, got -0.01"),
    "ft-lr-nan": (F("--optimizer.lr", "nan"), "optimizer.lr must be a finite number > 0, got nan"),
    "ft-lr-inf": (F("--optimizer.lr", "inf"), "optimizer.lr must be a finite number > 0, got inf"),
    "ft-weight-decay": (F("--optimizer.weight_decay", "-1"), "optimizer.weight_decay must be a finite number >= 0"),
    "ft-betas": (F("--optimizer.betas", "[0.9, 1.5]"), "optimizer.betas must be two numbers in [0, 1)"),
    "ft-eps": (F("--optimizer.eps", "0"), "optimizer.eps must be a finite number > 0, got 0.0"),
    "ft-optimizer-class": (F("--optimizer", "Foo"), "--optimizer 'Foo' is not an optimizer class"),
    "ft-optimizer-option": (F("--optimizer.nosuch", "1"), "--optimizer torch.optim.AdamW has no option 'nosuch'"),
    # finetune: train and eval numbers
    "ft-micro-batch": (F("--train.micro_batch_size", "0"), "train.micro_batch_size must be an integer >= 1, got 0"),
    "ft-global-batch": (F("--train.global_batch_size", "-8"), "train.global_batch_size must be an integer >= 1"),
    "ft-global-below-micro": (
        F("--train.global_batch_size", "2", "--train.micro_batch_size", "4"),
        "train.global_batch_size=2 is smaller than",
    ),  # fmt: skip
    "ft-epochs": (F("--train.epochs", "0"), "train.epochs must be an integer >= 1, got 0"),
    "ft-max-steps": (F("--train.max_steps", "-1"), "train.max_steps must be an integer >= 1, got -1"),
    "ft-warmup-zero": (F("--train.lr_warmup_steps", "0"), "train.lr_warmup_steps must be an integer >= 1, got 0"),
    "ft-warmup-too-long": (F("--train.lr_warmup_steps", "100"), "train.lr_warmup_steps=100 leaves no step"),
    "ft-max-time": (F("--train.max_time", "-5"), "train.max_time must be a finite number > 0"),
    "ft-max-seq-zero": (F("--train.max_seq_length", "0"), "train.max_seq_length must be an integer >= 1, got 0"),
    "ft-max-seq-over-context": (
        F("--train.max_seq_length", "1000"),
        "train.max_seq_length=1000 is longer than the model's context (128 tokens)",
    ),  # fmt: skip
    "ft-max-tokens": (F("--train.max_tokens", "5"), "finetune doesn't support the 'max_tokens' argument"),
    "ft-save-interval": (F("--train.save_interval", "0"), "train.save_interval must be an integer >= 1, got 0"),
    "ft-log-interval": (F("--train.log_interval", "0"), "train.log_interval must be an integer >= 1, got 0"),
    "ft-eval-interval": (F("--eval.interval", "0"), "eval.interval must be an integer >= 1, got 0"),
    "ft-eval-tokens": (F("--eval.max_new_tokens", "0"), "eval.max_new_tokens must be an integer >= 1, got 0"),
    "ft-eval-iters": (F("--eval.max_iters", "0"), "eval.max_iters must be an integer >= 1, got 0"),
    "ft-seed": (F("--seed", "-1"), "seed must be an integer in [0, 4294967295], got -1"),
    "ft-seed-type": (F("--seed", "x"), "Parser key \"seed\": Expected a <class 'int'>"),
    "ft-num-nodes": (F("--num_nodes", "0"), "num_nodes must be an integer >= 1, got 0"),
    "ft-devices": (F("--devices", "0"), "--devices must be a positive integer, 'auto' or -1 (all), got 0"),
    "ft-logger": (F("--logger_name", "foo"), "--logger_name must be one of 'csv'"),
    "ft-precision-fsdp": (
        F("--accelerator", "cpu", "--devices", "2", "--precision", "16-mixed"),
        "--precision 16-mixed does not work with FSDP",
    ),  # fmt: skip
    "ft-quantize-cpu": (F("--quantize", "bnb.nf4", "--accelerator", "cpu"), "needs a CUDA device"),
    "ft-quantize-choice": (F("--quantize", "int3"), "--quantize must be one of 'bnb.nf4'"),
    "ft-config-key": (F("--config", "{w}/bad/unknown-key.yaml"), "does not accept nested key 'no_such_key'"),
    "ft-unknown-flag": (F("--no_such_flag", "1"), "Unrecognized arguments: --no_such_flag 1"),
    # finetune: files
    "ft-no-checkpoint": (F(base="{w}/nowhere"), "checkpoint_dir '{w}/nowhere'"),
    "ft-base-truncated": (F(base="{w}/bad/base-truncated"), "is not a readable checkpoint, truncated or corrupt?"),
    "ft-base-reshaped": (F(base="{w}/bad/base-reshaped"), "lm_head.weight has shape (128, 32), the model wants"),
    "ft-data-missing": (F("--data.json_path", "{w}/nowhere.json"), "'{w}/nowhere.json' does not exist"),
    "ft-data-not-json": (F("--data.json_path", "{w}/bad/not-json.json"), "is not readable JSON"),
    "ft-data-empty": (F("--data.json_path", "{w}/bad/empty.json"), "holds no samples"),
    "ft-data-no-output": (F("--data.json_path", "{w}/bad/no-output.json"), "sample 0 has no 'output'"),
    "ft-data-dir": (F("--data.json_path", "{w}/bad/data-dir"), "it must contain 'train.json' and 'val.json'"),
    "ft-sample-too-long": (
        F("--data.json_path", "{w}/bad/long.json"),
        "tokens with the prompt style applied (instruction 'red red red red red red red red red red ...'), longer"
        " than the model's context of 128: pass --train.max_seq_length 128",
    ),  # fmt: skip
    "ft-prompts-fill": (F("--train.max_seq_length", "4"), "every training sample's prompt fills"),
    "ft-test-data-missing": (F("--test_data", "{w}/nowhere.json"), "test_data '{w}/nowhere.json' is not a readable"),
    "ft-test-data-bad": (F("--test_data", "{w}/bad/no-output.json"), "must be a non-empty JSON list"),
    # finetune: outputs
    "ft-out-is-file": (F("--out_dir", "{w}/bad/a-file/out"), "cannot be a directory: '{w}/bad/a-file' is a file"),
    "ft-out-holds-run": (F("--out_dir", "{w}/run"), "already holds a run (final, step-000002, step-000004)"),
    "ft-resume-not-step": (F("--out_dir", "{w}/run", "--resume", "{w}/base"), "is not a step checkpoint"),
    "ft-resume-other-seed": (
        F("--out_dir", "{w}/run", "--resume", "auto", "--seed", "7"),
        "cannot resume '{w}/run/step-000004': this run's settings differ (seed: 1337 -> 7)",
    ),
    "ft-overwrite-truncated-base": (
        F("--out_dir", "{w}/run", "--overwrite", "true", base="{w}/bad/base-truncated"),
        "is not a readable checkpoint",
    ),  # fmt: skip
    "ft-overwrite-long-sample": (
        F("--out_dir", "{w}/run", "--overwrite", "true", "--data.json_path", "{w}/bad/long.json"),
        "longer than the model's context",
    ),  # fmt: skip
    # merge
    "merge-missing": (["merge", "{w}/nowhere"], "'{w}/nowhere'"),
    "merge-no-adapter": (["merge", "{w}/base"], "holds no ETHER adapter"),
    "merge-into-checkpoint": (
        ["merge", "{w}/run/step-000002", "--out_dir", "{w}/merged"],
        "out_dir '{w}/merged' is not empty",
    ),  # fmt: skip
    "merge-into-base": (
        ["merge", "{w}/run/step-000002", "--out_dir", "{w}/base", "--overwrite", "true"],
        "holds the adapter or its base model",
    ),  # fmt: skip
    "merge-into-parent": (
        ["merge", "{w}/run/step-000002", "--out_dir", "{w}/run", "--overwrite", "true"],
        "holds the adapter or its base model",
    ),  # fmt: skip
    "merge-out-is-file": (["merge", "{w}/run/step-000002", "--out_dir", "{w}/bad/a-file"], "is a file"),
    "merge-adapter-truncated": (["merge", "{w}/bad/adapter-truncated"], "is not a readable ETHER adapter"),
    "merge-base-missing": (["merge", "{w}/run/step-000002", "--base_checkpoint_dir", "{w}/nowhere"], "nowhere"),
    "merge-base-truncated": (
        [
            "merge",
            "{w}/run/step-000002",
            "--base_checkpoint_dir",
            "{w}/bad/base-truncated",
            "--out_dir",
            "{w}/new-merged",
        ],
        "is not a readable checkpoint",
    ),  # fmt: skip
    # generate
    "gen-max-new-tokens": (["generate", "{w}/merged", "--max_new_tokens", "0"], "max_new_tokens must be an integer"),
    "gen-top-k": (["generate", "{w}/merged", "--top_k", "0"], "top_k must be an integer >= 1, got 0"),
    "gen-precision": (["generate", "{w}/merged", "--precision", "half"], "--precision must be one of"),
    "gen-top-p": (["generate", "{w}/merged", "--top_p", "1.5"], "top_p must be in [0, 1], got 1.5"),
    "gen-temperature": (["generate", "{w}/merged", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    "gen-num-samples": (["generate", "{w}/merged", "--num_samples", "0"], "num_samples must be an integer >= 1"),
    "gen-seed": (["generate", "{w}/merged", "--seed", "-3"], "seed must be an integer in [0, 4294967295], got -3"),
    "gen-merged-truncated": (["generate", "{w}/bad/merged-truncated"], "is not a readable checkpoint"),
    "gen-adapter-truncated": (["generate", "{w}/bad/adapter-truncated"], "is not a readable ETHER adapter"),
    "gen-prompt-too-long": (["generate", "{w}/merged", "--prompt", "red " * 200], "do not fit in the model's context"),
    "gen-missing": (["generate", "{w}/nowhere"], "'{w}/nowhere'"),
    "gen-quantize-choice": (["generate", "{w}/merged", "--quantize", "int3"], "--quantize must be one of"),
    # chat
    "chat-top-p": (["chat", "{w}/merged", "--top_p", "-0.1"], "top_p must be in [0, 1], got -0.1"),
    "chat-temperature": (["chat", "{w}/merged", "--temperature", "nan"], "Expected a <class 'float'>. Got value: nan"),
    "chat-max-new-tokens": (["chat", "{w}/merged", "--max_new_tokens", "-1"], "max_new_tokens must be an integer"),
    "chat-merged-truncated": (["chat", "{w}/bad/merged-truncated"], "is not a readable checkpoint"),
    "chat-base-missing": (["chat", "{w}/run/step-000002", "--base_checkpoint_dir", "{w}/nowhere"], "nowhere"),
    # evaluate
    "eval-fewshot": (
        ["evaluate", "{w}/merged", "--tasks", "x", "--num_fewshot", "-1"],
        "num_fewshot must be an integer >= 0, got -1",
    ),  # fmt: skip
    "eval-batch-size": (["evaluate", "{w}/merged", "--tasks", "x", "--batch_size", "0"], "batch_size must be"),
    "eval-limit-zero": (
        ["evaluate", "{w}/merged", "--tasks", "x", "--limit", "0"],
        "limit must be a finite number > 0",
    ),
    "eval-limit-nan": (
        ["evaluate", "{w}/merged", "--tasks", "x", "--limit", "nan"],
        "--limit: Expected a <class 'float'>, got 'nan'",
    ),
    "eval-unknown-task": (["evaluate", "{w}/merged", "--tasks", "no_such_task_anywhere"], "no_such_task_anywhere"),
    "eval-include-path": (
        ["evaluate", "{w}/merged", "--tasks", "x", "--include_path", "{w}/nowhere"],
        "--include_path '{w}/nowhere' is not a directory",
    ),  # fmt: skip
    "eval-precision": (["evaluate", "{w}/merged", "--tasks", "arc_easy", "--precision", "fp8"], "got 'fp8'"),
    "eval-results-exist": (
        ["evaluate", "{w}/merged", "--tasks", "arc_easy", "--out_dir", "{w}/bad/evaluated"],
        "results.json' exists: choose another --out_dir, or pass --overwrite true",
    ),
    "eval-out-is-file": (["evaluate", "{w}/merged", "--tasks", "arc_easy", "--out_dir", "{w}/bad/a-file"], "is a file"),
    "eval-device": (["evaluate", "{w}/merged", "--tasks", "arc_easy", "--device", "tpu:9"], "is not a device"),
    "eval-merged-truncated": (["evaluate", "{w}/bad/merged-truncated", "--tasks", "arc_easy"], "not a readable"),
    # inspect
    "inspect-missing": (["inspect", "{w}/nowhere"], "'{w}/nowhere'"),
    "inspect-no-adapter": (["inspect", "{w}/merged"], "holds no ETHER adapter"),
    "inspect-adapter-truncated": (["inspect", "{w}/bad/adapter-truncated"], "is not a readable ETHER adapter"),
    "inspect-base-truncated": (
        ["inspect", "{w}/run/step-000002", "--base_checkpoint_dir", "{w}/bad/base-truncated"],
        "is not a readable checkpoint",
    ),  # fmt: skip
    # the command line itself
    "no-verb-flag": (["finetune", "--no_such_flag"], "Unrecognized arguments"),
    "unknown-verb": (["train"], "invalid choice: 'train'"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_changes_nothing(world, case):
    args, message = CASES[case]
    if args[0] == "evaluate":
        pytest.importorskip("lm_eval", reason="the eval extra installs lm-eval")
    args = [str(a).replace("{w}", str(world)) for a in args]
    before = tree(world)
    result = run_main(*args)
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("litgpt_ether: error:")] == [lines[-1]], result.stderr[-3000:]
    assert message.replace("{w}", str(world)) in lines[-1]
    assert tree(world) == before


def test_the_catalogue_covers_every_verb_with_sixty_cases():
    verbs = {args[0] for args, _ in CASES.values()}
    assert {"finetune", "merge", "generate", "chat", "evaluate", "inspect"} <= verbs
    assert len(CASES) >= 60

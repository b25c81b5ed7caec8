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
import yaml
from conftest import finetune_args, run_main

from litgpt_ether.checkpoint import exclusive

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

    # run files that are read after the checks (the base's, a step checkpoint's), each broken one way
    def base_with(name: str, file: str, text: str) -> None:
        shutil.copytree(w / "base", bad / name)
        (bad / name / file).write_text(text)

    base_with("config-empty", "model_config.yaml", "")
    base_with("config-list", "model_config.yaml", "- 1\n- 2\n")
    base_with("config-unknown-key", "model_config.yaml", (w / "base" / "model_config.yaml").read_text() + "nosuch: 1\n")
    base_with("tokenizer-corrupt", "tokenizer.json", (w / "base" / "tokenizer.json").read_text()[:100])
    base_with("style-missing-class", "prompt_style.yaml", "class_path: litgpt.prompts.NoSuchStyle\n")
    base_with("style-not-a-style", "prompt_style.yaml", "class_path: collections.OrderedDict\n")
    base_with("style-empty", "prompt_style.yaml", "")

    def step_with(name: str, file: str, text: str | None = None, adapter: object = None) -> None:
        shutil.copytree(w / "run" / "step-000002", bad / name)
        if text is not None:
            (bad / name / file).write_text(text)
        if adapter is not None:
            torch.save(adapter, bad / name / file)

    hparams = yaml.safe_load((w / "run" / "step-000002" / "hyperparameters.yaml").read_text())
    step_with("hparams-empty", "hyperparameters.yaml", "")
    step_with("hparams-list", "hyperparameters.yaml", "- finetune\n")
    step_with("hparams-no-base", "hyperparameters.yaml", yaml.safe_dump({k: v for k, v in hparams.items()
                                                                         if k != "checkpoint_dir"}))  # fmt: skip
    step_with("hparams-base-number", "hyperparameters.yaml", yaml.safe_dump({**hparams, "checkpoint_dir": 3}))
    step_with("step-style-missing-class", "prompt_style.yaml", "class_path: litgpt.prompts.NoSuchStyle\n")
    adapter = torch.load(w / "run" / "step-000002" / "lit_model.pth.ether", weights_only=True)
    first = next(iter(adapter["model"]))
    nan = {**adapter["model"], first: torch.full_like(adapter["model"][first], float("nan"))}
    step_with("adapter-nan", "lit_model.pth.ether", adapter={**adapter, "model": nan})
    lists = {**adapter["model"], first: adapter["model"][first].tolist()}
    step_with("adapter-not-tensors", "lit_model.pth.ether", adapter={**adapter, "model": lists})
    step_with("adapter-model-list", "lit_model.pth.ether", adapter={**adapter, "model": [1, 2]})

    # data rows whose fields are not text, and configs that are not YAML mappings
    good = {"instruction": "reverse red", "input": "", "output": "der"}
    for name, row in {"instruction-null": {**good, "instruction": None}, "output-number": {**good, "output": 3},
                      "input-list": {**good, "input": ["a"]}, "output-mapping": {**good, "output": {"a": 1}},
                      "row-string": "reverse red"}.items():  # fmt: skip
        (bad / f"{name}.json").write_text(json.dumps(rows[:3] + [row] + rows[3:20]))
    (bad / "binary.yaml").write_bytes(bytes(range(128, 256)) * 2)
    (bad / "list.yaml").write_text("- a\n- b\n")
    return w


@pytest.fixture(scope="module")
def locked(world) -> Path:
    """Output directories another writer holds (this process, through its own lock): a run's, an evaluation's and an
    empty one."""
    locked = world / "locked"
    shutil.copytree(world / "run" / "step-000002", locked / "step")
    with exclusive(locked / "step"), exclusive(locked / "empty"):
        yield world


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
    "ft-test-data-bad": (F("--test_data", "{w}/bad/no-output.json"), "sample 0 has no 'output'"),
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
    # run files read after the checks: the base model's
    "ft-config-empty": (F(base="{w}/bad/config-empty"), "model_config.yaml' is empty: expected a YAML mapping"),
    "ft-config-list": (F(base="{w}/bad/config-list"), "model_config.yaml' holds a list: expected a YAML mapping"),
    "ft-config-unknown-key": (F(base="{w}/bad/config-unknown-key"), "is not a litgpt model config (TypeError"),
    "ft-tokenizer-corrupt": (F(base="{w}/bad/tokenizer-corrupt"), "the tokenizer in '{w}/bad/tokenizer-corrupt' is"),
    "ft-style-missing-class": (F(base="{w}/bad/style-missing-class"), "names no usable prompt style"),
    "gen-config-empty": (["generate", "{w}/bad/config-empty"], "model_config.yaml' is empty"),
    "gen-config-unknown-key": (["generate", "{w}/bad/config-unknown-key"], "is not a litgpt model config"),
    "gen-tokenizer-corrupt": (["generate", "{w}/bad/tokenizer-corrupt"], "tokenizer-corrupt' is not readable"),
    "gen-style-missing-class": (["generate", "{w}/bad/style-missing-class"], "names no usable prompt style"),
    "gen-style-not-a-style": (["generate", "{w}/bad/style-not-a-style"], "OrderedDict, which is not a litgpt"),
    "gen-style-empty": (["generate", "{w}/bad/style-empty"], "prompt_style.yaml' is empty"),
    "chat-config-list": (["chat", "{w}/bad/config-list"], "model_config.yaml' holds a list"),
    "chat-tokenizer-corrupt": (["chat", "{w}/bad/tokenizer-corrupt"], "tokenizer-corrupt' is not readable"),
    "chat-style-not-a-style": (["chat", "{w}/bad/style-not-a-style"], "which is not a litgpt PromptStyle"),
    "eval-config-empty": (["evaluate", "{w}/bad/config-empty", "--tasks", "arc_easy"], "model_config.yaml' is empty"),
    "eval-tokenizer-corrupt": (["evaluate", "{w}/bad/tokenizer-corrupt", "--tasks", "arc_easy"], "not readable"),
    "merge-base-tokenizer-corrupt": (
        [
            "merge",
            "{w}/run/step-000002",
            "--base_checkpoint_dir",
            "{w}/bad/tokenizer-corrupt",
            "--out_dir",
            "{w}/new-merged",
        ],
        "the tokenizer in '{w}/bad/tokenizer-corrupt' is not readable",
    ),  # fmt: skip
    "inspect-base-config-list": (
        ["inspect", "{w}/run/step-000002", "--base_checkpoint_dir", "{w}/bad/config-list"],
        "holds a list",
    ),  # fmt: skip
    # ... a step checkpoint's
    "gen-hparams-empty": (["generate", "{w}/bad/hparams-empty"], "hyperparameters.yaml' is empty"),
    "gen-hparams-list": (["generate", "{w}/bad/hparams-list"], "hyperparameters.yaml' holds a list"),
    "gen-hparams-no-base": (["generate", "{w}/bad/hparams-no-base"], "names no checkpoint_dir (the base model)"),
    "gen-hparams-base-number": (["generate", "{w}/bad/hparams-base-number"], "names no checkpoint_dir"),
    "gen-step-style": (["generate", "{w}/bad/step-style-missing-class"], "names no usable prompt style"),
    "chat-hparams-empty": (["chat", "{w}/bad/hparams-empty"], "hyperparameters.yaml' is empty"),
    "merge-hparams-list": (["merge", "{w}/bad/hparams-list"], "hyperparameters.yaml' holds a list"),
    "merge-hparams-no-base": (["merge", "{w}/bad/hparams-no-base"], "pass --base_checkpoint_dir"),
    "inspect-hparams-empty": (["inspect", "{w}/bad/hparams-empty"], "hyperparameters.yaml' is empty"),
    "eval-hparams-list": (["evaluate", "{w}/bad/hparams-list", "--tasks", "arc_easy"], "holds a list"),
    # ... and its adapter: non-finite values or not tensors, refused by every verb alike
    "merge-adapter-nan": (["merge", "{w}/bad/adapter-nan"], "holds non-finite values (NaN or inf)"),
    "gen-adapter-nan": (["generate", "{w}/bad/adapter-nan"], "holds non-finite values (NaN or inf)"),
    "chat-adapter-nan": (["chat", "{w}/bad/adapter-nan"], "holds non-finite values (NaN or inf)"),
    "eval-adapter-nan": (["evaluate", "{w}/bad/adapter-nan", "--tasks", "arc_easy"], "holds non-finite values"),
    "inspect-adapter-nan": (["inspect", "{w}/bad/adapter-nan"], "holds non-finite values (NaN or inf)"),
    "gen-adapter-not-tensors": (["generate", "{w}/bad/adapter-not-tensors"], "is not a tensor"),
    "inspect-adapter-not-tensors": (["inspect", "{w}/bad/adapter-not-tensors"], "is not a tensor"),
    "merge-adapter-model-list": (["merge", "{w}/bad/adapter-model-list"], "entries must be mappings"),
    # data rows and configs
    "ft-data-instruction-null": (
        F("--data.json_path", "{w}/bad/instruction-null.json"),
        "sample 3's 'instruction' is null, not text",
    ),  # fmt: skip
    "ft-data-output-number": (F("--data.json_path", "{w}/bad/output-number.json"), "sample 3's 'output' is int"),
    "ft-data-input-list": (F("--data.json_path", "{w}/bad/input-list.json"), "sample 3's 'input' is list, not text"),
    "ft-data-output-mapping": (F("--data.json_path", "{w}/bad/output-mapping.json"), "sample 3's 'output' is dict"),
    "ft-data-row-string": (F("--data.json_path", "{w}/bad/row-string.json"), "sample 3 has no 'instruction' or"),
    "ft-test-data-null": (F("--test_data", "{w}/bad/instruction-null.json"), "test_data '{w}/bad/instruction-null"),
    "ft-config-binary": (F("--config", "{w}/bad/binary.yaml"), "--config '{w}/bad/binary.yaml' is not a YAML text"),
    "ft-config-file-list": (F("--config", "{w}/bad/list.yaml"), "must hold a YAML mapping of options, got list"),
    "gen-config-binary": (["generate", "--config", "{w}/bad/binary.yaml"], "is not a YAML text file"),
    # sampling the arithmetic cannot hold
    "gen-temperature-overflow": (["generate", "{w}/merged", "--temperature", "1e39"], "temperature 1e+39 overflows"),
    "gen-temperature-underflow": (["generate", "{w}/merged", "--temperature", "1e-39"], "overflows"),
    "chat-temperature-overflow": (
        ["chat", "{w}/merged", "--temperature", "1e39", "--precision", "16-true"],
        "temperature 1e+39 overflows float16 arithmetic",
    ),  # fmt: skip
    "gen-temperature-fp16": (
        ["generate", "{w}/merged", "--temperature", "70000", "--precision", "16-true"],
        "temperature 70000 overflows float16",
    ),  # fmt: skip
    # serve: options that could never work, refused before anything listens
    "serve-adapter-nan": (["serve", "{w}/base", "--adapters", "a={w}/bad/adapter-nan"], "holds non-finite values"),
    "serve-temperature": (["serve", "{w}/base", "--adapters", "a={w}/run", "--temperature", "1e39"], "overflows"),
    "serve-max-new-tokens": (
        ["serve", "{w}/base", "--adapters", "a={w}/run", "--max_new_tokens", "128"],
        "max_new_tokens",
    ),  # fmt: skip
    "serve-top-p": (["serve", "{w}/base", "--adapters", "a={w}/run", "--top_p", "2"], "top_p must be in [0, 1]"),
    "serve-tokenizer-corrupt": (["serve", "{w}/bad/tokenizer-corrupt", "--adapters", "a={w}/run"], "not readable"),
    "serve-adapter-style": (
        ["serve", "{w}/base", "--adapters", "a={w}/bad/step-style-missing-class"],
        "names no usable prompt style",
    ),  # fmt: skip
    # one writer per output directory (the ``locked`` fixture holds these)
    "ft-out-locked": (F("--out_dir", "{w}/locked/empty"), "'{w}/locked/empty' is being written by process"),
    "merge-out-locked": (["merge", "{w}/run/step-000002", "--out_dir", "{w}/locked/empty"], "is being written by"),
    "merge-in-place-locked": (["merge", "{w}/locked/step"], "'{w}/locked/step' is being written by process"),
    "eval-out-locked": (
        ["evaluate", "{w}/merged", "--tasks", "arc_easy", "--out_dir", "{w}/locked/empty"],
        "is being written by process",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_changes_nothing(locked, case):
    world = locked
    args, message = CASES[case]
    if args[0] == "evaluate":
        pytest.importorskip("lm_eval", reason="the eval extra installs lm-eval")
    if args[0] == "serve":
        pytest.importorskip("litserve", reason="the serve extra installs LitServe")
    args = [str(a).replace("{w}", str(world)) for a in args]
    before = tree(world)
    result = run_main(*args)
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("litgpt_ether: error:")] == [lines[-1]], result.stderr[-3000:]
    assert message.replace("{w}", str(world)) in lines[-1]
    assert tree(world) == before


def test_the_catalogue_covers_every_verb_with_150_distinct_cases():
    verbs = {args[0] for args, _ in CASES.values()}
    assert {"finetune", "merge", "generate", "chat", "evaluate", "inspect", "serve"} <= verbs
    assert len({tuple(args) for args, _ in CASES.values()}) == len(CASES) >= 150
    assert (
        f"test_catalogue.py` ({len(CASES)} bad inputs"
        in (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    )

"""``litgpt_ether finetune`` end to end through the CLI, on a tiny random model and a learnable task."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import litgpt.config
import litgpt.model
import pytest
import torch
from conftest import finetune_args, read_yaml, run_main
from litgpt.prompts import load_prompt_style
from litgpt.tokenizer import Tokenizer

from litgpt_ether import GPT, Config, ConfigError, ether_filter, load_base_checkpoint
from litgpt_ether.checkpoint import ADAPTER_FILE, load_adapter
from litgpt_ether.finetune import load_test_rows, normalize_optimizer

OUTPUT_FILES = [ADAPTER_FILE, "lit_model.pth", "model_config.yaml", "hyperparameters.yaml", "prompt_style.yaml",
                "tokenizer.json", "tokenizer_config.json"]  # fmt: skip


def logged_losses(out_dir: Path) -> list[float]:
    with open(out_dir / "logs" / "csv" / "version_0" / "metrics.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f) if row.get("loss")]


@pytest.mark.parametrize("method", ["ether", "etherplus", "oft", "naive"])
def test_finetune_learns_and_writes_reloadable_outputs(checkpoint_dir, dataset_path, tmp_path, method):
    out_dir = tmp_path / "out"
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, "--ether_method", method))
    assert result.returncode == 0, result.stderr[-3000:]
    # the example generated at each validation fits the context, so litgpt's "Skipping example generation" is gone
    assert "Skipping example generation" not in result.stdout and result.stdout.count("### Response:") >= 2

    losses = logged_losses(out_dir)
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)

    final = out_dir / "final"
    for name in OUTPUT_FILES:
        assert (final / name).is_file(), name
        assert (out_dir / "step-000020" / name).is_file() or name == "lit_model.pth", name
    hparams = read_yaml(final / "hyperparameters.yaml")
    assert hparams["ether_method"] == method and hparams["ether_nb"] == 2 and hparams["ether_head"] is True
    assert type(load_prompt_style(final)).__name__ == "Alpaca"
    assert Tokenizer(final).vocab_size == Tokenizer(checkpoint_dir).vocab_size

    # the adapter holds ETHER tensors only and rebuilds the model around the base checkpoint
    ether_state, ether_args = load_adapter(final / ADAPTER_FILE)
    assert ether_state and all(ether_filter(k, v) for k, v in ether_state.items())
    config = Config.from_file(checkpoint_dir / "model_config.yaml", **ether_args)
    assert config.ether_method == method and config.ether_head and config.ether_query and config.ether_value
    tuned = GPT(config)
    load_base_checkpoint(tuned, checkpoint_dir / "lit_model.pth")
    tuned.load_state_dict(ether_state, strict=False)
    step_state, _ = load_adapter(out_dir / "step-000020" / ADAPTER_FILE)
    assert any(not torch.equal(step_state[k], ether_state[k]) for k in ether_state)  # training moved on

    # the merged checkpoint is plain litgpt: its own config, strict load, same outputs as base + adapter
    plain = litgpt.model.GPT(litgpt.config.Config.from_file(final / "model_config.yaml"))
    plain.load_state_dict(torch.load(final / "lit_model.pth", weights_only=True), strict=True)
    base = litgpt.model.GPT(plain.config)
    base.load_state_dict(torch.load(checkpoint_dir / "lit_model.pth", weights_only=True))
    idx = torch.randint(0, plain.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(plain(idx), tuned(idx), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain(idx), base(idx), atol=1e-3)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_nb_not_dividing_is_a_one_line_error(checkpoint_dir, dataset_path, tmp_path):
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, tmp_path / "out", "--ether_nb", "3"))
    assert result.returncode != 0
    assert last_line(result) == "litgpt_ether: error: ether_nb=3 does not divide lm_head input (size 32)"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_no_target_is_an_error(checkpoint_dir, dataset_path, tmp_path):
    off = ["--ether_query", "--ether_value", "--ether_projection", "--ether_mlp", "--ether_head"]
    args = finetune_args(checkpoint_dir, dataset_path, tmp_path / "out", *(a for flag in off for a in (flag, "false")))
    result = run_main(*args)
    assert result.returncode != 0
    assert last_line(result).startswith("litgpt_ether: error: no ETHER target enabled")
    assert "Traceback" not in result.stderr


def test_missing_checkpoint_dir_is_a_clear_error(dataset_path, tmp_path):
    result = run_main(*finetune_args(tmp_path / "nowhere", dataset_path, tmp_path / "out"))
    assert result.returncode != 0
    assert last_line(result) == (
        f"litgpt_ether: error: checkpoint_dir {str(tmp_path / 'nowhere')!r} is not a checkpoint directory."
    )
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_incomplete_checkpoint_dir_names_the_missing_files(checkpoint_dir, dataset_path, tmp_path):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(checkpoint_dir, incomplete)
    (incomplete / "tokenizer.json").unlink()
    (incomplete / "lit_model.pth").unlink()
    result = run_main(*finetune_args(incomplete, dataset_path, tmp_path / "out"))
    assert result.returncode != 0
    assert last_line(result) == (
        f"litgpt_ether: error: checkpoint_dir {str(incomplete)!r} is missing the files:"
        " ['lit_model.pth', 'tokenizer.json OR tokenizer.model']."
    )
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_global_batch_smaller_than_one_micro_batch_per_device_is_a_one_line_error(
    checkpoint_dir, dataset_path, tmp_path
):
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, tmp_path / "out", "--devices", "2"))
    assert result.returncode != 0
    assert last_line(result) == (
        "litgpt_ether: error: train.global_batch_size=8 is smaller than devices x num_nodes x"
        " train.micro_batch_size = 16"
    )
    assert "Traceback" not in result.stderr


def test_optimizer_options_given_key_by_key_reach_the_optimizer():
    # what jsonargparse hands over for `--config preset.yaml --optimizer.lr 3e-2 --optimizer.betas [0.9,0.95]`
    parsed = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01, "weight_decay": 0.0}, "lr": "3e-2",
              "betas": "[0.9, 0.95]"}  # fmt: skip
    assert normalize_optimizer(parsed) == {
        "class_path": "torch.optim.AdamW",
        "init_args": {"lr": 0.03, "weight_decay": 0.0, "betas": [0.9, 0.95]},
    }
    assert normalize_optimizer("AdamW") == "AdamW"


def test_warmup_as_long_as_the_run_is_a_one_line_error(checkpoint_dir, dataset_path, tmp_path):
    args = finetune_args(checkpoint_dir, dataset_path, tmp_path / "out", "--train.lr_warmup_steps", "40")
    result = run_main(*args)
    assert result.returncode != 0
    assert last_line(result) == (
        "litgpt_ether: error: train.lr_warmup_steps=40 leaves no step after warmup (the run has 40)"
    )


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "holds no samples"),
        ({"instruction": "x", "output": "y"}, "holds no samples"),
        ([{"instruction": "x", "output": "y"}, {"instruction": "reverse red"}], "sample 1 has no 'output'"),
        ([{"instruction": "x", "output": 3}], "sample 0's 'output' is int, not text"),
        ([{"instruction": "x", "input": None, "output": "y"}], "sample 0's 'input' is null, not text"),
    ],
)
def test_test_data_without_text_instruction_and_output_rows_is_refused(tmp_path, rows, message):
    (tmp_path / "test.json").write_text(json.dumps(rows))
    with pytest.raises(ConfigError, match=message):
        load_test_rows(tmp_path / "test.json")


def test_test_data_that_is_missing_or_not_json_is_refused(tmp_path):
    (tmp_path / "test.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not a readable JSON file"):
        load_test_rows(tmp_path / "test.json")
    with pytest.raises(ConfigError, match="is not a readable JSON file"):
        load_test_rows(tmp_path / "missing.json")


def test_padded_batches_train_exactly_as_unpadded_ones(checkpoint_dir, dataset_path, tmp_path):
    """``--pad_multiple``: the extra positions carry label -100 and sit after every sample's tokens (causal
    attention never lets them reach earlier ones), so the losses are those of litgpt's own padding."""
    losses = []
    for name, extra in (("plain", ()), ("padded", ("--pad_multiple", "16"))):
        out_dir = tmp_path / name
        result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, "--train.max_steps", "4", *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        losses.append(logged_losses(out_dir))
    assert len(losses[0]) == 4
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_pad_to_multiple_pads_with_ignored_labels_up_to_the_limit():
    from litgpt_ether.finetune import pad_to_multiple

    ids, labels = torch.ones(2, 5, dtype=torch.long), torch.full((2, 5), 7)
    for multiple, limit, length in ((4, 64, 8), (16, 12, 12), (5, 64, 5), (3, 4, 5)):  # never below the batch
        padded_ids, padded_labels = pad_to_multiple(ids, labels, multiple, limit)
        assert padded_ids.shape == padded_labels.shape == (2, length)
        assert (padded_ids[:, 5:] == 0).all() and (padded_labels[:, 5:] == -100).all()
        assert torch.equal(padded_ids[:, :5], ids) and torch.equal(padded_labels[:, :5], labels)


@pytest.mark.parametrize("method", ["ether", "etherplus"])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_ether_models_compile_to_one_graph_without_a_break(method, kernels, monkeypatch):
    """As litgpt's test_lora_compile: the whole model, forward, one graph; with the fused kernels too."""
    if kernels == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("LITGPT_ETHER_KERNELS", kernels)
    config = Config.from_name("Llama-2-7b-hf", n_layer=2, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128,
                              padded_vocab_size=64, vocab_size=64, block_size=32, ether_method=method, ether_nb=4,
                              ether_query=True, ether_value=True, ether_mlp=True)  # fmt: skip
    model = GPT(config)
    explanation = torch._dynamo.explain(model)(torch.randint(0, 64, (2, 16)))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_blocks_train_as_eager_ones(checkpoint_dir, dataset_path, tmp_path, monkeypatch):
    """``--compile true`` compiles the blocks once (padded batches: one length) and the steps match eager ones. Here
    with the ``aot_eager`` backend, which traces as inductor does without its minutes of C++ compilation on a CPU."""
    from torch._dynamo.utils import counters

    compile_block = torch.nn.Module.compile
    compiled = []

    def aot_eager(module, *args, **kwargs):
        compiled.append(module)
        return compile_block(module, backend="aot_eager")

    monkeypatch.setattr(torch.nn.Module, "compile", aot_eager)
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    monkeypatch.setenv("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    torch._dynamo.reset()
    counters.clear()
    losses = []
    for name, extra in (("eager", ()), ("compiled", ("--compile", "true"))):
        out_dir = tmp_path / name
        args = finetune_args(checkpoint_dir, dataset_path, out_dir, "--train.max_steps", "4", "--pad_multiple", "16")
        result = run_main(*args, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        losses.append(logged_losses(out_dir))
    assert [type(m).__name__ for m in compiled] == ["Block", "Block"]
    # two graphs for all blocks and steps: the first block's input needs no gradient (the frozen embedding's), the
    # others' do; no new one for any later step
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_compile_on_more_than_one_device_is_a_one_line_error(checkpoint_dir, dataset_path, tmp_path):
    args = finetune_args(checkpoint_dir, dataset_path, tmp_path / "out", "--compile", "true", "--devices", "2",
                         "--accelerator", "cpu")  # fmt: skip
    result = run_main(*args)
    assert result.returncode != 0 and "--compile true runs on one device" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()

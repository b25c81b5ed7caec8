"""``litgpt_ether merge``: adapter + base -> a standard litgpt checkpoint dir, or a one-line refusal."""

import shutil
from pathlib import Path

import litgpt.config
import litgpt.model
import pytest
import torch
from conftest import run_main
from litgpt.utils import save_config

from litgpt_ether import ConfigError
from litgpt_ether.checkpoint import ADAPTER_FILE, load_model, resolve
from litgpt_ether.merge import merge

LITGPT_DIR_FILES = ["lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json",
                    "prompt_style.yaml"]  # fmt: skip


def plain_model(directory: Path) -> litgpt.model.GPT:
    model = litgpt.model.GPT(litgpt.config.Config.from_file(directory / "model_config.yaml")).eval()
    model.load_state_dict(torch.load(directory / "lit_model.pth", weights_only=True), strict=True)
    return model


def tokens(model: litgpt.model.GPT) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("source", ["dir", "file"])
def test_merge_writes_a_litgpt_checkpoint_equal_to_base_plus_adapter(finetune_out, tmp_path, source):
    step_dir = finetune_out / "step-000020"
    merge(step_dir if source == "dir" else step_dir / ADAPTER_FILE, out_dir=tmp_path / "merged")
    for name in LITGPT_DIR_FILES:
        assert (tmp_path / "merged" / name).is_file(), name
    merged = plain_model(tmp_path / "merged")
    on_the_fly = load_model(resolve(step_dir))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens(merged)), on_the_fly(tokens(merged)), rtol=1e-5, atol=1e-5)


def test_merge_casts_to_the_base_dtype(finetune_out, checkpoint_dir, tmp_path):
    bf16_base = tmp_path / "bf16-base"
    shutil.copytree(checkpoint_dir, bf16_base)
    state = torch.load(checkpoint_dir / "lit_model.pth", weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, bf16_base / "lit_model.pth")
    merge(finetune_out / "final", base_checkpoint_dir=bf16_base, out_dir=tmp_path / "merged")
    merged = torch.load(tmp_path / "merged" / "lit_model.pth", weights_only=True)
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    fp32 = torch.load(finetune_out / "final" / "lit_model.pth", weights_only=True)
    for k in fp32:
        torch.testing.assert_close(merged[k].float(), fp32[k], rtol=2e-2, atol=2e-2)


def test_adapter_from_another_base_is_refused_and_nothing_written(finetune_out, checkpoint_dir, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(checkpoint_dir, other)
    config = litgpt.config.Config.from_file(checkpoint_dir / "model_config.yaml", n_embd=48, head_size=12)
    torch.save(litgpt.model.GPT(config).state_dict(), other / "lit_model.pth")
    save_config(config, other)
    with pytest.raises(ConfigError, match="does not fit base model"):
        merge(finetune_out / "final", base_checkpoint_dir=other, out_dir=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

    # through the command line, merging in place (the default): one line, and the merged weights already there stay
    final = tmp_path / "final"
    shutil.copytree(finetune_out / "final", final)
    before = {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()}
    result = run_main("merge", str(final), "--base_checkpoint_dir", str(other))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert result.stderr.count("error:") == 1
    assert last.startswith(f"litgpt_ether: error: adapter {str(final / ADAPTER_FILE)!r} does not fit base model")
    assert {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()} == before


def test_non_finite_merge_is_refused_and_nothing_written(finetune_out, tmp_path):
    adapter_dir = tmp_path / "adapter"
    shutil.copytree(finetune_out / "step-000020", adapter_dir)
    adapter = torch.load(adapter_dir / ADAPTER_FILE, weights_only=True)
    name = next(iter(adapter["model"]))
    adapter["model"][name] = torch.full_like(adapter["model"][name], float("nan"))
    torch.save(adapter, adapter_dir / ADAPTER_FILE)
    with pytest.raises(ConfigError, match="non-finite"):
        merge(adapter_dir, out_dir=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_corrupted_adapter_is_a_one_line_error(finetune_out, tmp_path):
    adapter_dir = tmp_path / "adapter"
    shutil.copytree(finetune_out / "step-000020", adapter_dir)
    data = (adapter_dir / ADAPTER_FILE).read_bytes()
    (adapter_dir / ADAPTER_FILE).write_bytes(data[: len(data) // 2])
    result = run_main("merge", str(adapter_dir), "--out_dir", str(tmp_path / "merged"))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("litgpt_ether: error: ") and "is not a readable ETHER adapter" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "merged").exists()


def test_directory_without_an_adapter_is_refused(checkpoint_dir):
    with pytest.raises(ConfigError, match="holds no ETHER adapter"):
        merge(checkpoint_dir)


def test_missing_path_is_a_clear_error(tmp_path):
    result = run_main("merge", str(tmp_path / "nowhere"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"litgpt_ether: error: checkpoint_dir {str(tmp_path / 'nowhere')!r} is not a checkpoint directory."
    )
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr

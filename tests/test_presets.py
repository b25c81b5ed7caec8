"""The shipped presets parse through the CLI and build their model with the paper's settings."""

from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser
from litgpt.args import TrainArgs

from litgpt_ether import GPT, Config, mark_only_ether_as_trainable
from litgpt_ether.finetune import setup

HUB = Path(__file__).parents[1] / "config_hub" / "finetune"
PRESETS = sorted(p for model in ("llama-2-7b", "phi-1_5") for p in (HUB / model).glob("*.yaml"))
MODELS = {"llama-2-7b": "Llama-2-7b-hf", "phi-1_5": "phi-1_5"}


def test_every_documented_preset_ships():
    assert {f"{p.parent.name}/{p.stem}" for p in PRESETS} >= {
        "llama-2-7b/ether", "llama-2-7b/etherplus", "llama-2-7b/oft", "phi-1_5/ether", "phi-1_5/etherplus"
    }  # fmt: skip


def parse_preset(preset: Path):
    """Parse and instantiate a preset exactly as ``litgpt_ether finetune --config`` does."""
    parser = ArgumentParser()
    parser.add_function_arguments(setup)
    parser.add_argument("--config", action="config")
    return parser.instantiate_classes(parser.parse_args(["--config", str(preset)]))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_paper_preset_parses_and_builds_its_model(preset):
    cfg = parse_preset(preset)
    assert cfg.precision == "bf16-true" and cfg.ether_dropout == 0.0
    assert cfg.ether_query and cfg.ether_value and not (cfg.ether_key or cfg.ether_mlp or cfg.ether_head)
    # the paper's rates on its language tasks: 1e-3 for ETHER and ETHER+, 1e-5 for OFT and Naive
    assert cfg.optimizer["init_args"]["lr"] == pytest.approx(1e-5 if cfg.ether_method in ("oft", "naive") else 1e-3)
    assert type(cfg.data).__name__ == "Alpaca"
    assert isinstance(cfg.train, TrainArgs) and cfg.train.micro_batch_size == 4
    if preset.parent.name == "llama-2-7b":
        assert cfg.ether_nb == 32

    ether_args = {k: v for k, v in vars(cfg).items() if k.startswith("ether_")}
    with torch.device("meta"):
        model = GPT(Config.from_name(MODELS[preset.parent.name], **ether_args))  # nb divides every size
    mark_only_ether_as_trainable(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0

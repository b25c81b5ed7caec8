"""Fold an ETHER adapter into its base checkpoint, giving weights plain litgpt can load."""

from pathlib import Path

import torch

from litgpt_ether.ether import GPT, Config, ConfigError, merge_ether

ADAPTER_FILE = "lit_model.pth.ether"


def save_adapter(path: Path, state_dict: dict[str, torch.Tensor], config: Config) -> None:
    """An adapter file: the ETHER tensors plus the ETHER options that rebuild the model around a base config."""
    torch.save({"model": state_dict, "ether": config.ether_args()}, path)


def load_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    adapter = torch.load(path, mmap=True, weights_only=True)
    return adapter["model"], adapter["ether"]


def merge_adapter(adapter_path: Path, base_checkpoint_dir: Path, out_path: Path) -> None:
    """Write ``H_out W H_in`` for every ETHER layer (fp32 math, base dtype) and the base weights elsewhere."""
    ether_state, ether_args = load_adapter(adapter_path)
    config = Config.from_file(base_checkpoint_dir / "model_config.yaml", **ether_args)
    with torch.device("meta"):
        model = GPT(config)
    base_state = torch.load(base_checkpoint_dir / "lit_model.pth", mmap=True, weights_only=True)
    base_state = base_state.get("model", base_state)
    model.load_state_dict(base_state | ether_state, assign=True)
    merged = merge_ether(model).state_dict()
    bad = [k for k, v in merged.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConfigError(f"merging {adapter_path} gives non-finite weights in {bad[:3]}; nothing written")
    torch.save(merged, out_path)

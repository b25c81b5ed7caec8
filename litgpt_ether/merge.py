"""``litgpt_ether merge``: fold an ETHER adapter into its base model, giving a checkpoint plain litgpt loads."""

from pathlib import Path

from litgpt_ether.checkpoint import ADAPTER_FILE, merge_adapter, resolve
from litgpt_ether.ether import ConfigError


def merge(checkpoint_dir: Path, base_checkpoint_dir: Path | None = None, out_dir: Path | None = None) -> None:
    """Merge an ETHER adapter into its base model: ``W' = H_out W H_in`` per layer, in fp32, cast to the base dtype.

    Writes a standard litgpt checkpoint directory (weights, model config, tokenizer, prompt style). Nothing is
    written when the adapter does not fit the base model or the merge gives non-finite weights.

    Arguments:
        checkpoint_dir: A finetune ``out_dir``, its ``final/`` or ``step-*`` directory, or an adapter file
            (``lit_model.pth.ether``).
        base_checkpoint_dir: The base model's checkpoint directory. Defaults to the one recorded in the adapter's
            ``hyperparameters.yaml``; set it if the base model has moved.
        out_dir: Where to write the merged checkpoint. Defaults to the adapter's own directory.
    """
    resolved = resolve(checkpoint_dir, base_checkpoint_dir, prefer_adapter=True)
    if resolved.adapter is None:
        raise ConfigError(f"{str(checkpoint_dir)!r} holds no ETHER adapter ({ADAPTER_FILE})")
    path = merge_adapter(resolved, Path(out_dir) if out_dir is not None else resolved.files_dir)
    print(f"Saved the merged model to {str(path)!r}")

"""``litgpt_ether merge``: fold an ETHER adapter into its base model, giving a checkpoint plain litgpt loads."""

from pathlib import Path

from litgpt_ether.checkpoint import ADAPTER_FILE, LOCK_FILE, Resolved, exclusive, merge_adapter, resolve, staged_dir
from litgpt_ether.checks import ConfigError, check_output_dir


def merge(
    checkpoint_dir: Path, base_checkpoint_dir: Path | None = None, out_dir: Path | None = None, overwrite: bool = False
) -> None:
    """Merge an ETHER adapter into its base model: ``W' = H_out W H_in`` per layer, in fp32, cast to the base dtype.

    Writes a standard litgpt checkpoint directory (weights, model config, tokenizer, prompt style). Nothing is
    written when the adapter does not fit the base model or the merge gives non-finite weights.

    Arguments:
        checkpoint_dir: A finetune ``out_dir``, its ``final/`` or ``step-*`` directory, or an adapter file
            (``lit_model.pth.ether``).
        base_checkpoint_dir: The base model's checkpoint directory. Defaults to the one recorded in the adapter's
            ``hyperparameters.yaml``; set it if the base model has moved.
        out_dir: Where to write the merged checkpoint: a new or empty directory (or any, with ``overwrite``).
            Defaults to the adapter's own directory, where the merged weights join their adapter.
        overwrite: Replace a non-empty ``out_dir`` as a whole, once the merge has succeeded.
    """
    resolved = resolve(checkpoint_dir, base_checkpoint_dir, prefer_adapter=True)
    if resolved.adapter is None:
        raise ConfigError(f"{str(checkpoint_dir)!r} holds no ETHER adapter ({ADAPTER_FILE})")
    if out_dir is None or Path(out_dir).resolve() == resolved.files_dir.resolve():
        # beside its own adapter: the weights are that adapter's merge, whatever was there before
        check_output_dir(resolved.files_dir)
        with exclusive(resolved.files_dir):
            path = merge_adapter(resolved, resolved.files_dir)
    else:
        out_dir = Path(out_dir)
        check_apart(out_dir, resolved, "adapter")
        with exclusive(out_dir, lambda: refuse_nonempty(out_dir, overwrite)):
            with staged_dir(out_dir) as tmp:  # written whole under a temporary name, then renamed into place
                merge_adapter(resolved, tmp)
        path = out_dir / "lit_model.pth"
    print(f"Saved the merged model to {str(path)!r}")


def check_apart(out_dir: Path, resolved: Resolved, what: str) -> None:
    """A writable ``out_dir`` that neither is nor holds the input (``what``) or its base model: replacing it whole
    would delete them."""
    check_output_dir(out_dir)
    inputs = [resolved.files_dir.resolve(), resolved.base_dir.resolve()]
    if any(p == out_dir.resolve() or out_dir.resolve() in p.parents for p in inputs):
        raise ConfigError(f"out_dir {str(out_dir)!r} holds the {what} or its base model: choose another")


def refuse_nonempty(out_dir: Path, overwrite: bool) -> None:
    """An ``out_dir`` holding anything (but the lock file) is replaced only with ``overwrite``."""
    if out_dir.is_dir() and any(p.name != LOCK_FILE for p in out_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"out_dir {str(out_dir)!r} is not empty: choose a new directory, or pass --overwrite true to replace it"
            " as a whole"
        )

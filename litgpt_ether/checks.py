"""Checks of user input that would otherwise fail late, with a traceback, or not at all.

Each raises ``ConfigError`` (one line on the command line) and runs before a model is loaded or a file is
written.
"""

import dataclasses
import importlib
import inspect
import math
import os
import tempfile
import typing
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from litgpt.data import JSON, DataModule, SFTDataset
from litgpt.data.json_data import load_split
from litgpt.finetune.lora import get_longest_seq_length, validate_args
from litgpt.utils import get_default_supported_precision


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints it as one line."""


# --------------------------------------------------------------------------------------------------
# Numbers: every numeric argument of every verb (and of ``Config``) is checked here, by its name in the verb's
# signature (``train.micro_batch_size`` for a field of the ``train`` dataclass, ``optimizer.lr`` for an optimizer
# option), before anything is loaded or written.


def _number(value: Any, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return integer or math.isfinite(value)


def at_least(low: float, integer: bool = True) -> tuple[Callable[[Any], bool], str]:
    kind = "an integer" if integer else "a finite number"
    return (lambda v: _number(v, integer) and v >= low), f"{kind} >= {low:g}"


def positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _number(v, False) and v > 0), "a finite number > 0"


def within(low: float, high: float, high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    upper = (lambda v: v < high) if high_open else (lambda v: v <= high)
    return (lambda v: _number(v, False) and v >= low and upper(v)), f"in [{low:g}, {high:g}{')' if high_open else ']'}"


# The largest seed Lightning's ``seed_everything`` (and NumPy) accepts
MAX_SEED = 2**32 - 1

NUMBER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # the model (``Config``, finetune)
    "ether_nb": at_least(1),
    "ether_dropout": within(0, 1, high_open=True),
    # every verb
    "seed": (lambda v: _number(v, True) and 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
    # finetune
    "num_nodes": at_least(1),
    "train.save_interval": at_least(1),
    "train.log_interval": at_least(1),
    "train.global_batch_size": at_least(1),
    "train.micro_batch_size": at_least(1),
    "train.lr_warmup_steps": at_least(1),  # litgpt's warmup divides by it
    "train.lr_warmup_fraction": within(0, 1),
    "train.epochs": at_least(1),
    "train.max_tokens": at_least(1),
    "train.max_steps": at_least(1),
    "train.max_time": positive(),
    "train.max_seq_length": at_least(1),
    "pad_multiple": at_least(1),
    # litgpt's JSON data module splits one file into train and val by this fraction: both must hold samples
    "data.val_split_fraction": (lambda v: _number(v, False) and 0 < v < 1, "in (0, 1)"),
    "train.min_lr": at_least(0, integer=False),
    "eval.interval": at_least(1),
    "eval.max_new_tokens": at_least(1),
    "eval.max_iters": at_least(1),
    "optimizer.lr": positive(),
    "optimizer.weight_decay": at_least(0, integer=False),
    "optimizer.eps": positive(),
    "optimizer.momentum": at_least(0, integer=False),
    "optimizer.betas": (
        lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(within(0, 1, high_open=True)[0](b) for b in v),
        "two numbers in [0, 1)",
    ),
    # generate, chat
    "max_new_tokens": at_least(1),
    "num_samples": at_least(1),
    "top_k": at_least(1),
    "top_p": within(0, 1),
    "temperature": at_least(0, integer=False),
    # serve
    "port": (lambda v: _number(v, True) and 1024 <= v <= 65535, "an integer in [1024, 65535]"),
    "max_batch_size": at_least(1),
    "max_seq_length": at_least(1),
    # evaluate
    "num_fewshot": at_least(0),
    "batch_size": at_least(1),
    "limit": positive(),
}


def check_number(name: str, value: Any) -> None:
    """``value`` obeys the rule for ``name`` (``None`` means "not set" and always passes)."""
    rule = NUMBER_RULES.get(name)
    if rule is not None and value is not None and not rule[0](value):
        raise ConfigError(f"{name} must be {rule[1]}, got {value!r}")


def check_numbers(arguments: dict[str, Any]) -> None:
    """Every number among a verb's arguments (its ``locals()`` on entry), dataclass fields and optimizer options
    included, against ``NUMBER_RULES``."""
    for name, value in arguments.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for field in dataclasses.fields(value):
                check_number(f"{name}.{field.name}", getattr(value, field.name))
        elif name == "optimizer" and isinstance(value, dict):
            for key, option in (value.get("init_args") or {}).items():
                check_number(f"optimizer.{key}", option)
        else:
            check_number(name, value)


# --------------------------------------------------------------------------------------------------
# Files: what a verb will write must be writable before it spends any time.


def check_output_dir(path: Path) -> None:
    """``path`` is, or can be created as, a directory this process can write into; nothing is left behind.

    Tried for real (a temporary directory made and removed in the nearest existing ancestor) rather than with
    ``os.access``, which says yes to root on a read-only file system and no to some ACLs that would allow it.
    """
    path = Path(path)
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise ConfigError(f"out_dir {str(path)!r}: {str(existing)!r} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"out_dir {str(path)!r} cannot be a directory: {str(existing)!r} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".litgpt_ether-write-test-"))
    except OSError as err:
        raise ConfigError(f"out_dir {str(path)!r} is not writable ({err.strerror}: {str(existing)!r})") from None


# litgpt's choices: ``litgpt finetune_lora --quantize`` and ``litgpt generate --quantize``
TrainingQuantize = Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8-training"]
InferenceQuantize = Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8"]
Accelerator = Literal["auto", "cpu", "cuda", "gpu", "mps"]


def require_extra(module: str, extra: str, what: str) -> None:
    """Refuse, in one line naming the extra to install, a feature whose optional dependency is missing.

    The base install runs every verb but ``evaluate`` and ``serve``; lm-eval (``eval``), LitServe (``serve``) and
    bitsandbytes (``quant``) are extras, and a user who asks for them without the extra gets the install command, not
    an ``ImportError`` traceback.
    """
    if find_spec(module) is None:
        raise ConfigError(
            f"{what} needs the {extra!r} extra ({module} is not installed): pip install -e '.[{extra}]'"
            " in your litgpt-ether clone"
        )


def check_precision(precision: str | None) -> None:
    """A ``--precision`` Lightning accepts, refused in one line before anything starts (Lightning refuses it only when
    the Fabric is made, with a traceback)."""
    allowed = [str(p) for p in _flat_args(_PRECISION_INPUT)]
    if precision is not None and str(precision) not in allowed:
        raise ConfigError(f"--precision must be one of {', '.join(dict.fromkeys(allowed))}, got {precision!r}")


def _flat_args(annotation: Any) -> list[Any]:
    """The values of a ``Literal``, or of a ``Union`` of them."""
    args = typing.get_args(annotation)
    return [v for a in args for v in (_flat_args(a) if typing.get_args(a) else [a])]


def quantization(
    quantize: str | None, precision: str | None, training: bool, accelerator: str = "auto", world_size: int = 1
) -> tuple[str | None, Any]:
    """``(precision, plugins)`` for ``L.Fabric``: the precision defaults to the best the device supports, and
    ``--quantize`` becomes Fabric's bitsandbytes plugin (with a "-true" precision), as in litgpt.

    Refuses, in one line, what the plugin cannot do: no CUDA device (it quantizes on CUDA only), several devices
    (FSDP does not shard quantized weights), mixed precision, and int8 with another dtype than float16.
    """
    check_precision(precision)
    if quantize is None:
        return precision or get_default_supported_precision(training), None
    require_extra("bitsandbytes", "quant", f"--quantize {quantize}")
    if accelerator not in ("auto", "cuda", "gpu"):
        raise ConfigError(f"--quantize {quantize} needs a CUDA device; it cannot run on {accelerator!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"--quantize {quantize} needs a CUDA device (none found)")
    if world_size > 1:
        raise ConfigError(
            f"--quantize {quantize} trains on one device only, got {world_size}: FSDP does not shard quantized weights"
        )
    int8 = quantize.startswith("bnb.int8")
    if precision is None:
        precision = "16-true" if int8 or not torch.cuda.is_bf16_supported() else "bf16-true"
    dtypes = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "32-true": torch.float32}
    if precision not in dtypes or (int8 and precision != "16-true"):
        need = "16-true" if int8 else "16-true, bf16-true or 32-true (not mixed)"
        raise ConfigError(f"--quantize {quantize} needs --precision {need}, got {precision!r}")
    from lightning.fabric.plugins import BitsandbytesPrecision

    return None, BitsandbytesPrecision(quantize.removeprefix("bnb."), dtypes[precision])


def compute_dtype(precision: str | None, plugins: Any = None) -> torch.dtype:
    """The dtype logits are computed in under ``quantization``'s ``(precision, plugins)``: what sampling must fit."""
    if plugins is not None:
        return plugins.dtype
    kind = str(precision).split("-")[0]
    return {"16": torch.float16, "bf16": torch.bfloat16, "64": torch.float64}.get(kind, torch.float32)


def check_temperature(temperature: float, dtype: torch.dtype) -> None:
    """A sampling temperature the logits' dtype can divide by: it and its reciprocal finite there (0 is greedy).

    Sampling divides the logits by the temperature, as a number of their dtype: 1e39 is infinite in float32 (and
    100000 in float16), and 1e-39 has an infinite reciprocal, so every probability would be NaN.
    """
    largest = torch.finfo(dtype).max
    if temperature > 0 and (temperature > largest or 1 / temperature > largest):
        raise ConfigError(
            f"temperature {temperature:g} overflows {str(dtype).removeprefix('torch.')} arithmetic: use one in"
            f" [{1 / largest:.3g}, {largest:.3g}], or 0 for greedy decoding"
        )


def check_devices(accelerator: str, devices: int | str) -> int:
    """The number of devices per node, refused when the accelerator does not have that many.

    ``"auto"`` and ``-1`` mean every CUDA device (else one), as in litgpt. On the CPU, any number of devices is
    legal (Fabric runs that many processes).
    """
    if devices in ("auto", -1):
        count = torch.cuda.device_count() if accelerator in ("auto", "cuda", "gpu") else 0
        devices = count or 1
    elif not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"--devices must be a positive integer, 'auto' or -1 (all), got {devices!r}")
    cuda = torch.cuda.device_count()
    if accelerator in ("cuda", "gpu") and cuda == 0:
        raise ConfigError(f"--accelerator {accelerator}: no CUDA device found")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--accelerator mps: no MPS device found")
    if (accelerator in ("cuda", "gpu") or (accelerator == "auto" and cuda > 0)) and devices > cuda:
        raise ConfigError(f"--devices {devices} but only {cuda} CUDA device{'s are' if cuda > 1 else ' is'} visible")
    return devices


def check_optimizer(optimizer: str | dict) -> None:
    """The optimizer class exists and takes the given options (resolved as litgpt's ``instantiate_torch_optimizer``)."""
    if isinstance(optimizer, dict):
        if not isinstance(optimizer.get("class_path"), str):
            raise ConfigError(f"--optimizer needs a class_path (such as torch.optim.AdamW), got {optimizer!r}")
        name, options = optimizer["class_path"], optimizer.get("init_args") or {}
    else:
        name, options = optimizer, {}
    module_name, _, class_name = name.rpartition(".") if "." in name else ("torch.optim", ".", name)
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"--optimizer {name!r} is not an optimizer class (such as AdamW, SGD, torch.optim.AdamW)")
    parameters = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(options) - set(parameters) - {"params"})
        if unknown:
            raise ConfigError(f"--optimizer {name} has no option {', '.join(map(repr, unknown))}")


def check_json_data(data: DataModule) -> None:
    """A ``JSON`` data module's files: readable, and a non-empty list of samples with instruction and output."""
    if not isinstance(data, JSON):
        return
    path = Path(data.json_path)
    if path.is_dir():
        files = [data.find_split("train"), data.find_split("val")]
        if None in files:
            raise ConfigError(f"--data.json_path {str(path)!r} is a directory without train.json and val.json")
    else:
        files = [path]
    for file in files:
        try:
            rows = load_split(file)
        except (OSError, ValueError) as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ConfigError(f"data file {str(file)!r} is not readable JSON ({' '.join(str(err).split())})") from None
        check_rows(rows, f"data file {str(file)!r}")


def check_rows(rows: Any, where: str) -> None:
    """Alpaca-style samples: a non-empty list of mappings whose ``instruction`` and ``output`` (and ``input``, if
    given) are text. The first bad sample is named by its index; litgpt would fail on it mid-run, or train on
    ``str(None)``."""
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{where} holds no samples: expected a non-empty JSON list")
    for i, row in enumerate(rows):
        missing = [key for key in ("instruction", "output") if not isinstance(row, dict) or key not in row]
        if missing:
            raise ConfigError(
                f"{where}: sample {i} has no {' or '.join(map(repr, missing))}"
                " (every sample needs 'instruction' and 'output')"
            )
        for key in ("instruction", "input", "output"):
            if key in row and not isinstance(row[key], str):
                kind = "null" if row[key] is None else type(row[key]).__name__
                raise ConfigError(f"{where}: sample {i}'s {key!r} is {kind}, not text")


def check_outputs_fit(dataset: Any, max_seq_length: int | None) -> None:
    """Refuse a training set whose every prompt fills ``max_seq_length``: no output token would be trained.

    litgpt's ``SFTDataset`` encodes the prompt (prompt style applied) and the output, then truncates the pair to
    ``max_seq_length``: when the prompt alone is that long, the output is cut off entirely (and with
    ``mask_prompt`` every label is ignored). Stops at the first sample that keeps an output token, so it costs
    one tokenization when the data is fine.
    """
    if max_seq_length is None or max_seq_length < 1 or not isinstance(dataset, SFTDataset) or len(dataset) == 0:
        return
    shortest = None
    for i in range(len(dataset.data)):
        example = dataset.data[i]
        if dataset.transform is not None:
            example = dataset.transform(example)
        prompt = dataset.prompt_style.apply(prompt=example["instruction"], **example)
        length = len(dataset.tokenizer.encode(prompt))
        if length < max_seq_length:
            return
        shortest = length if shortest is None else min(shortest, length)
    raise ConfigError(
        f"every training sample's prompt fills train.max_seq_length={max_seq_length} (the shortest is {shortest}"
        " tokens with the prompt style applied), so no output token would be trained; raise --train.max_seq_length"
    )


def check_train_args(train: Any, eval: Any) -> None:
    """litgpt's own check of the ``train`` and ``eval`` options its finetuning loop supports, as one line."""
    try:
        validate_args(train, eval)
    except ValueError as err:
        # litgpt names its own file and prints the whole dataclass: keep what the user must change
        problems = [line.split(" This is set in ")[0].split(" ", 1)[1] for line in str(err).splitlines()]
        raise ConfigError(f"finetune {'; '.join(problems)}") from None
    if train.lr_warmup_steps is None:
        raise ConfigError("train.lr_warmup_steps must be set (1 for no warmup): litgpt's schedule divides by it")


def check_samples_fit(train_data: Any, val_data: Any, max_seq_length: int | None, block_size: int) -> int:
    """The longest sample's length in tokens, checked to fit the model's context (or ``train.max_seq_length``,
    which truncates every sample, to be no longer than the context).

    Without this, litgpt stops in the first forward pass with "Cannot attend to N" and no word of which sample.
    Every sample is tokenized once here; the training loop sizes the model with the result.
    """
    if max_seq_length is not None and max_seq_length > block_size:
        raise ConfigError(
            f"train.max_seq_length={max_seq_length} is longer than the model's context ({block_size} tokens)"
        )
    longest = 0
    for split, dataset in (("training", train_data), ("validation", val_data)):
        if len(dataset) == 0:
            continue
        length, index = get_longest_seq_length(dataset)
        longest = max(longest, length)
        if length > block_size and max_seq_length is None:
            instruction = " ".join(str(dataset.data[index].get("instruction", "")).split())
            start = instruction if len(instruction) <= 40 else instruction[:40] + " ..."
            raise ConfigError(
                f"sample {index} of the {split} data is {length} tokens with the prompt style applied (instruction"
                f" {start!r}), longer than the model's context of {block_size}: pass --train.max_seq_length"
                f" {block_size} (or less) to truncate long samples, or shorten it"
            )
    return longest

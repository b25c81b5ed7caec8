"""``litgpt_ether generate``: sample from a finetune output, merged or not, as ``litgpt generate`` does.

``load_for_inference`` is shared with ``litgpt_ether chat``: it resolves the path (a merged dir, a finetune
``out_dir``, its ``final/`` or ``step-*`` dir), loads the model (the adapter applied on the fly when there are
no merged weights), the tokenizer and the saved prompt style, and sets the model up with Lightning Fabric.
Generation itself is litgpt's (``litgpt.generate.base.generate_fn`` and its sampling).
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from pprint import pformat

import lightning as L
import litgpt.config
import litgpt.model
import torch
from litgpt.generate.base import generate_fn
from litgpt.prompts import PromptStyle
from litgpt.tokenizer import Tokenizer

from litgpt_ether.checkpoint import load_model, load_tokenizer, read_prompt_style, resolve
from litgpt_ether.checks import (
    ConfigError,
    InferenceQuantize,
    check_numbers,
    check_temperature,
    compute_dtype,
    quantization,
)


class PromptTooLongError(ConfigError):
    """The prompt plus ``max_new_tokens`` does not fit in the model's context."""


@dataclass
class Inference:
    """A model ready to generate, with what it needs around it."""

    fabric: L.Fabric
    model: litgpt.model.GPT  # wrapped by ``fabric.setup_module``
    tokenizer: Tokenizer
    prompt_style: PromptStyle

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def stop_tokens(self) -> tuple[list[int], ...]:
        return self.prompt_style.stop_tokens(self.tokenizer)


def check_fits(prompt_length: int, max_new_tokens: int, block_size: int) -> None:
    """litgpt sizes the KV cache for prompt + ``max_new_tokens``, which must fit in the model's context."""
    if prompt_length == 0:
        raise ConfigError("the prompt is empty once tokenized (no prompt style and no BOS token); give a prompt")
    if prompt_length + max_new_tokens > block_size:
        room = block_size - prompt_length
        hint = f"lower --max_new_tokens to {room} or less" if room > 0 else "shorten the prompt"
        raise PromptTooLongError(
            f"the prompt is {prompt_length} tokens (prompt style applied) and max_new_tokens is {max_new_tokens}:"
            f" {prompt_length + max_new_tokens} tokens do not fit in the model's context of {block_size}; {hint}"
        )


def load_for_inference(
    checkpoint_dir: Path,
    base_checkpoint_dir: Path | None = None,
    precision: str | None = None,
    quantize: str | None = None,
    temperature: float = 0.0,
) -> Inference:
    """Resolve ``checkpoint_dir``, load model, tokenizer and prompt style, and set the model up on one device."""
    precision, plugins = quantization(quantize, precision, training=False)
    check_temperature(temperature, compute_dtype(precision, plugins))
    resolved = resolve(checkpoint_dir, base_checkpoint_dir)
    fabric = L.Fabric(devices=1, precision=precision, plugins=plugins)

    tokenizer = load_tokenizer(resolved.files_dir)
    t0 = time.perf_counter()
    if resolved.adapter is None:
        fabric.print(f"Loading model {str(resolved.files_dir)!r}", file=sys.stderr)
    else:
        fabric.print(
            f"Loading base model {str(resolved.base_dir)!r} with the ETHER adapter {str(resolved.adapter)!r}"
            " applied on the fly",
            file=sys.stderr,
        )
    model = fabric.setup_module(load_model(resolved))
    fabric.print(f"Time to load the model: {time.perf_counter() - t0:.02f} seconds.", file=sys.stderr)

    return Inference(fabric, model, tokenizer, read_prompt_style(resolved.files_dir, model.config))


@torch.inference_mode()
def main(
    checkpoint_dir: Path,
    prompt: str = "What food do llamas eat?",
    *,
    input: str = "",
    sys_prompt: str | None = None,
    base_checkpoint_dir: Path | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 50,
    top_k: int | None = 50,
    top_p: float = 1.0,
    temperature: float = 0.8,
    precision: str | None = None,
    quantize: InferenceQuantize | None = None,
    seed: int = 1234,
) -> None:
    """Generate text from a finetuned model, merged or not, with the prompt style it was finetuned with.

    The output (prompt included, as litgpt prints it) goes to stdout; loading and speed (tokens/sec) to
    stderr. Generation stops at ``max_new_tokens`` or at a stop sequence of the prompt style.

    Arguments:
        checkpoint_dir: A finetune ``out_dir``, its ``final/`` or ``step-*`` directory, or any litgpt
            checkpoint directory. Merged weights (``lit_model.pth``) are used when present; otherwise the ETHER
            adapter (``lit_model.pth.ether``) is applied on the fly to its base model.
        prompt: The prompt, wrapped in the saved prompt style (``prompt_style.yaml``; else the model's own).
        input: Optional input for the instruction, for prompt styles that take one (such as Alpaca).
        sys_prompt: Optional system prompt, for prompt styles that take one.
        base_checkpoint_dir: The base model's checkpoint directory, for an unmerged adapter. Defaults to the one
            recorded in the adapter's ``hyperparameters.yaml``; set it if the base model has moved.
        num_samples: The number of samples to generate.
        max_new_tokens: The most tokens to generate per sample. Prompt plus ``max_new_tokens`` must fit in the
            model's context.
        top_k: Sample among the ``top_k`` most probable tokens only (None: all).
        top_p: Sample among the most probable tokens whose cumulative probability exceeds ``top_p``, in [0, 1]
            (applied after ``top_k`` and ``temperature``, as litgpt does). 0 picks the most probable token.
        temperature: Randomness of the sampling: higher is more random; 0 picks the most probable token
            (greedy decoding).
        precision: Fabric precision ("bf16-true", "16-true", "32-true", ...). Defaults to the best the device
            supports, as litgpt does.
        quantize: Quantize the weights with bitsandbytes (litgpt's choices; needs CUDA).
        seed: The random seed for sampling.
    """
    print(pformat(locals()), file=sys.stderr)
    check_numbers(locals())
    inference = load_for_inference(checkpoint_dir, base_checkpoint_dir, precision, quantize, temperature)
    fabric, model, tokenizer = inference.fabric, inference.model, inference.tokenizer

    styled = inference.prompt_style.apply(prompt, sys_prompt=sys_prompt, input=input)
    encoded = tokenizer.encode(styled, device=fabric.device)
    prompt_length = encoded.size(0)
    check_fits(prompt_length, max_new_tokens, inference.block_size)
    max_returned_tokens = prompt_length + max_new_tokens
    with fabric.init_tensor():
        model.max_seq_length = max_returned_tokens  # a KV cache no bigger than needed, as litgpt does
        model.set_kv_cache(batch_size=1)

    L.seed_everything(seed, verbose=False)
    for i in range(num_samples):
        t0 = time.perf_counter()
        tokens = list(
            generate_fn(
                model,
                encoded,
                max_returned_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                stop_tokens=inference.stop_tokens(),
                include_prompt=True,
                include_eos=False,
            )
        )
        t = time.perf_counter() - t0
        for block in model.transformer.h:
            block.attn.kv_cache.reset_parameters()
        y = torch.cat(tokens)
        fabric.print(tokenizer.decode(y))
        tokens_generated = y.size(0) - prompt_length
        fabric.print(
            f"Time for inference {i + 1}: {t:.02f} sec total, {tokens_generated / t:.02f} tokens/sec,"
            f" {tokens_generated} tokens",
            file=sys.stderr,
        )
    if fabric.device.type == "cuda":
        fabric.print(f"Memory used: {torch.cuda.max_memory_allocated() / 1e9:.02f} GB", file=sys.stderr)

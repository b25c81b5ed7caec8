"""``litgpt_ether chat``: chat with a finetune output, merged or not, through litgpt's own chat loop.

Loading is ``litgpt_ether.generate.load_for_inference``; the loop, the streaming and the speed report are
``litgpt.chat.base.interact`` and ``process_prompt`` as they are.
"""

import sys
from pathlib import Path
from pprint import pformat

import lightning as L
import torch
from litgpt.chat.base import interact
from litgpt.tokenizer import Tokenizer

from litgpt_ether.checks import ConfigError, InferenceQuantize, check_numbers
from litgpt_ether.generate import PromptTooLongError, check_fits, load_for_inference


class NotTextError(ConfigError):
    """A prompt line that is not valid UTF-8; the chat goes on with the next."""


class _ContextGuard:
    """The tokenizer, refusing a prompt that leaves no room for ``max_new_tokens`` in the model's context.

    litgpt's ``process_prompt`` encodes each prompt once, before it prints or changes anything, so raising there
    skips the prompt and leaves the model as it was; without this, litgpt stops the chat with a traceback. A prompt
    that needs a longer KV cache than the last one clears the cache first: ``process_prompt`` then builds it as on
    a first turn, where growing it in place printed litgpt's "Warning: KV cache has length ... Call
    'set_kv_cache' before doing any forwards!" into the reply (it does call it).
    """

    def __init__(self, tokenizer: Tokenizer, model: torch.nn.Module, max_new_tokens: int, block_size: int) -> None:
        self._tokenizer, self._model = tokenizer, model
        self._max_new_tokens, self._block_size = max_new_tokens, block_size

    def encode(self, string: str, *args, **kwargs) -> torch.Tensor:
        if any("\udc80" <= c <= "\udcff" for c in string):  # bytes stdin could not decode (``surrogateescape``)
            raise NotTextError("the prompt is not valid UTF-8 text: skipped")
        encoded = self._tokenizer.encode(string, *args, **kwargs)
        check_fits(encoded.size(0), self._max_new_tokens, self._block_size)
        if encoded.size(0) + self._max_new_tokens > self._model.max_seq_length:
            self._model.clear_kv_cache()
        return encoded

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


@torch.inference_mode()
def main(
    checkpoint_dir: Path,
    *,
    base_checkpoint_dir: Path | None = None,
    max_new_tokens: int = 50,
    top_k: int | None = 50,
    top_p: float = 1.0,
    temperature: float = 0.8,
    precision: str | None = None,
    quantize: InferenceQuantize | None = None,
    multiline: bool = False,
    seed: int = 1234,
) -> None:
    """Chat with a finetuned model, merged or not, with the prompt style it was finetuned with.

    Reads prompts from stdin until ``!quit``, ``!exit``, an empty prompt (unless ``multiline``) or end of input,
    and streams each reply to stdout, with its speed (tokens/sec) on stderr, as ``litgpt chat`` does. Each prompt
    is answered on its own (no conversation history), as in litgpt. A prompt that does not fit in the model's
    context with ``max_new_tokens``, or that is not valid UTF-8, is skipped with a one-line error on stderr and the
    chat goes on.

    Arguments:
        checkpoint_dir: A finetune ``out_dir``, its ``final/`` or ``step-*`` directory, or any litgpt
            checkpoint directory. Merged weights (``lit_model.pth``) are used when present; otherwise the ETHER
            adapter (``lit_model.pth.ether``) is applied on the fly to its base model.
        base_checkpoint_dir: The base model's checkpoint directory, for an unmerged adapter. Defaults to the one
            recorded in the adapter's ``hyperparameters.yaml``; set it if the base model has moved.
        max_new_tokens: The most tokens to generate per reply.
        top_k: Sample among the ``top_k`` most probable tokens only (None: all).
        top_p: Sample among the most probable tokens whose cumulative probability exceeds ``top_p``, in [0, 1]
            (applied after ``top_k`` and ``temperature``, as litgpt does). 0 picks the most probable token.
        temperature: Randomness of the sampling: higher is more random; 0 picks the most probable token
            (greedy decoding).
        precision: Fabric precision ("bf16-true", "16-true", "32-true", ...). Defaults to the best the device
            supports, as litgpt does.
        quantize: Quantize the weights with bitsandbytes (litgpt's choices; needs CUDA).
        multiline: Read multi-line prompts, each ended by a line ``!submit``.
        seed: The random seed for sampling.
    """
    print(pformat(locals()), file=sys.stderr)
    check_numbers(locals())
    inference = load_for_inference(checkpoint_dir, base_checkpoint_dir, precision, quantize, temperature)
    guarded = _ContextGuard(inference.tokenizer, inference.model, max_new_tokens, inference.block_size)

    if multiline:
        exit_instruction = "To exit, enter '!quit' or '!exit' on an empty prompt and press 'Enter'."
    else:
        exit_instruction = "To exit, press 'Enter' on an empty prompt."
    print(f"Now chatting with {inference.model.config.name}.\n{exit_instruction}\n")
    L.seed_everything(seed, verbose=False)
    # an undecodable line becomes lone surrogates that ``_ContextGuard`` refuses, instead of a UnicodeDecodeError
    # that would end the chat and lose the rest of the input
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")

    while True:
        try:
            interact(
                multiline=multiline,
                model=inference.model,
                tokenizer=guarded,
                prompt_style=inference.prompt_style,
                fabric=inference.fabric,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                top_k=top_k,
                top_p=top_p,
                stop_tokens=inference.stop_tokens(),
            )
            break  # !quit, !exit, an empty prompt or Ctrl-C
        except (PromptTooLongError, NotTextError) as err:
            print(f"litgpt_ether: error: {err}", file=sys.stderr)  # skip this prompt, read the next one
        except EOFError:  # end of input: litgpt's loop would end with a traceback
            print()
            break
    if inference.fabric.device.type == "cuda":
        inference.fabric.print(f"\nMemory used: {torch.cuda.max_memory_allocated() / 1e9:.02f} GB", file=sys.stderr)

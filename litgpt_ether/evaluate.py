"""``litgpt_ether evaluate``: lm-eval tasks run directly on the litgpt model, merged or not.

``LitGPTLM`` implements lm-eval's ``LM`` interface over a litgpt ``GPT``: no conversion to Hugging Face format,
and an unmerged adapter is evaluated as it is (applied on the fly). Tokenization rules (context/continuation
split, empty contexts, BOS) come from lm-eval's ``TemplateLM``, so requests are tokenized as lm-eval's own ``hf``
model tokenizes them; scoring is one batched litgpt forward, generation is litgpt's ``batched_generate_fn``.
"""

import json
import sys
import time
from collections import defaultdict
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import lightning as L
import litgpt.model
import torch
from litgpt.generate.base import batched_generate_fn
from litgpt.tokenizer import Tokenizer
from litgpt.utils import get_default_supported_precision
from tqdm import tqdm

from litgpt_ether.checkpoint import Resolved, exclusive, load_model, load_tokenizer, resolve, write_text_atomic
from litgpt_ether.checks import (
    ConfigError,
    InferenceQuantize,
    check_numbers,
    check_output_dir,
    quantization,
    require_extra,
)

# lm-eval is the `eval` extra: without it every other verb still works, and this one says what to install
LM_EVAL_AVAILABLE = find_spec("lm_eval") is not None
if LM_EVAL_AVAILABLE:
    from lm_eval import simple_evaluate
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window, make_table
else:
    TemplateLM = object

# (request strings or None, context tokens, continuation tokens): what ``TemplateLM`` hands ``_loglikelihood_tokens``
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


class LitGPTLM(TemplateLM):
    """lm-eval's model interface over a litgpt ``GPT`` (plain, ETHER, or wrapped by ``fabric.setup_module``).

    Context handling follows lm-eval's ``hf`` model: the model sees at most ``max_length`` tokens, contexts are
    truncated from the left, generation leaves room for ``max_gen_toks``.
    """

    max_gen_toks = 256  # lm-eval's default when a task sets none

    def __init__(self, model: litgpt.model.GPT, tokenizer: Tokenizer, batch_size: int = 1) -> None:
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int | None:
        """What an empty context (and a rolling window's start) is conditioned on: BOS, else EOS, as ``hf``."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.max_seq_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """litgpt's tokenizer; ``None`` keeps its own BOS rule (``add_bos_token`` of the checkpoint)."""
        return self.tokenizer.encode(string, bos=add_special_tokens).tolist()

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(torch.tensor(tokens, dtype=torch.long))

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in the results' ``config``, as lm-eval's ``hf`` model records it."""
        parameters = list(self.model.parameters())
        return {"model_num_parameters": sum(p.numel() for p in parameters), "model_dtype": str(parameters[0].dtype)}

    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """Longest first (padding stays small, an out-of-memory shows at once), right-padded, one forward per batch.

        Right padding never changes the scores: attention is causal, so no real token attends to a pad.
        """
        longest = max((len(continuation) for _, _, continuation in requests), default=0)
        if longest > self.max_length:
            raise ConfigError(f"a continuation of {longest} tokens does not fit in the context of {self.max_length}")
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][1] + requests[i][2]), i))
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            # the last token is only predicted; what does not fit is dropped from the left
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in batch]
            x = torch.zeros(len(batch), max(map(len, inputs)), dtype=torch.long)
            for row, tokens in enumerate(inputs):
                x[row, : len(tokens)] = torch.tensor(tokens)
            logprobs = torch.log_softmax(self.model(x.to(self._device)).float(), dim=-1)
            for row, i in enumerate(batch):
                strings, _, continuation = requests[i]
                end = len(inputs[row])
                scores = logprobs[row, end - len(continuation) : end]
                target = torch.tensor(continuation, device=scores.device)
                logprob = scores.gather(-1, target[:, None]).sum().item()
                results[i] = (logprob, bool((scores.argmax(-1) == target).all()))
                if strings is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, results[i])
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each token of the text scored once, conditioned on ``prefix_token_id`` and as much text as fits.

        The text is encoded without BOS: the prefix token is its only start, so no BOS is scored as text.
        """
        owners, windows = [], []
        for owner, (string,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                owners.append(owner)
                windows.append((None, *make_disjoint_window(window)))
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Batches share their generation settings and their prompt length.

        litgpt's batched generation takes no padding mask, so prompts in one batch must have the same length.
        """
        groups: dict[tuple[str, int], list[tuple[int, list[int], dict[str, Any]]]] = defaultdict(list)
        for i, (context, gen_kwargs) in enumerate(request.args for request in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            room = self.max_length - kwargs["max_gen_toks"]
            if room <= 0:
                raise ConfigError(
                    f"max_gen_toks={kwargs['max_gen_toks']} leaves no room for a prompt in the context of"
                    f" {self.max_length} tokens"
                )
            prompt = self.tok_encode(context)[-room:]
            groups[(json.dumps(kwargs, sort_keys=True, default=str), len(prompt))].append((i, prompt, kwargs))

        results = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for key in sorted(groups, key=lambda k: -k[1]):
            group = groups[key]
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                texts = self._generate([prompt for _, prompt, _ in batch], batch[0][2])
                for (i, _, _), text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], kwargs: dict[str, Any]) -> list[str]:
        """Greedy unless ``do_sample``; each row stops at EOS or once its text holds a string of ``until``."""
        until, max_gen_toks = kwargs["until"], kwargs["max_gen_toks"]
        temperature = float(kwargs.get("temperature", 1.0)) if kwargs["do_sample"] else 0.0
        sample_args = {"temperature": temperature, "top_k": kwargs.get("top_k"), "top_p": kwargs.get("top_p", 1.0)}
        x = torch.tensor(prompts, dtype=torch.long, device=self._device)
        max_returned_tokens = x.size(1) + max_gen_toks
        self.model.set_kv_cache(batch_size=len(prompts), max_seq_length=max_returned_tokens, device=self._device)
        generated: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        stop_tokens = ([self.eot_token_id],) if self.eot_token_id is not None else ()
        try:
            for step in batched_generate_fn(
                self.model,
                x,
                max_returned_tokens,
                sample_args=sample_args,
                stop_tokens=stop_tokens,
                include_prompt=False,
                include_eos=False,
            ):
                for row, token in enumerate(step):
                    if token is not None and not done[row]:
                        generated[row].append(token.item())
                        text = self.tok_decode(generated[row])
                        done[row] = any(stop and stop in text for stop in until)
                if all(done):
                    break
        finally:
            self.model.clear_kv_cache()
        return [postprocess_generated_text(self.tok_decode(tokens), until, None) for tokens in generated]


def find_tasks(tasks: str, include_path: Path | None) -> tuple["TaskManager", list[str]]:
    """lm-eval's task names and glob patterns, checked before anything is loaded or written.

    Names that are all plain tasks of ``include_path`` are looked up there alone: indexing lm-eval's own
    thousands of task files takes seconds, and a local task would take precedence over them anyway.
    """
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise ConfigError("--tasks names no task")
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--include_path {str(include_path)!r} is not a directory")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_subtasks for name in names):
            return local, names
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [name for name in names if not manager.match_tasks([name])]
    if unknown:
        where = "lm-eval's tasks" + (f" or {str(include_path)!r}" if include_path is not None else "")
        raise ConfigError(
            f"unknown task {', '.join(map(repr, unknown))}: not found in {where} (`lm-eval ls tasks` lists them)"
        )
    return manager, manager.match_tasks(names)


def setup_fabric(device: str | None, precision: str | None, quantize: str | None = None) -> L.Fabric:
    """One device, as litgpt's inference scripts use; ``device`` in lm-eval's terms ("cpu", "cuda", "cuda:1")."""
    try:
        parsed = torch.device(device) if device is not None else None
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device (examples: 'cpu', 'cuda', 'cuda:1')") from None
    accelerator = "auto" if parsed is None else parsed.type
    precision, plugins = quantization(quantize, precision, training=False, accelerator=accelerator)
    devices = [parsed.index] if parsed is not None and parsed.index is not None else 1
    return L.Fabric(accelerator=accelerator, devices=devices, precision=precision, plugins=plugins)


def evaluate(
    checkpoint_dir: Path,
    *,
    tasks: str,
    base_checkpoint_dir: Path | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    limit: float | None = None,
    include_path: Path | None = None,
    out_dir: Path | None = None,
    precision: str | None = None,
    quantize: InferenceQuantize | None = None,
    device: str | None = None,
    seed: int = 1234,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate a finetuned model, merged or not, on lm-eval tasks, without converting it to Hugging Face format.

    Prints lm-eval's results table and writes ``results.json`` in lm-eval's format (the dictionary lm-eval's
    ``simple_evaluate`` returns). Task names are checked first: an unknown one is an error and nothing is written.

    Arguments:
        checkpoint_dir: A finetune ``out_dir``, its ``final/`` or ``step-*`` directory, or any litgpt checkpoint
            directory. Merged weights (``lit_model.pth``) are used when present; otherwise the ETHER adapter
            (``lit_model.pth.ether``) is applied on the fly to its base model.
        tasks: Comma-separated lm-eval task names or glob patterns, for example "hellaswag,arc_easy".
        base_checkpoint_dir: The base model's checkpoint directory, for an unmerged adapter. Defaults to the one
            recorded in the adapter's ``hyperparameters.yaml``; set it if the base model has moved.
        num_fewshot: Number of examples in the few-shot context. Defaults to each task's own setting.
        batch_size: Requests per forward pass.
        limit: Examples per task: a count, or a fraction of each task when below 1. For quick checks only.
        include_path: A directory of extra lm-eval task YAMLs (your own tasks), as lm-eval's ``--include_path``.
        out_dir: Where to write ``results.json``. Defaults to ``eval/`` inside the resolved checkpoint directory.
        precision: Fabric precision ("bf16-true", "16-true", "32-true", ...). Defaults to the best the device
            supports, as litgpt does.
        quantize: Quantize the weights with bitsandbytes (litgpt's choices; needs CUDA).
        device: The device, as lm-eval names it ("cpu", "cuda", "cuda:1"). Defaults to the best available.
        seed: The random seed for Python, NumPy, torch and the few-shot sampler.
        overwrite: Replace a ``results.json`` already in ``out_dir`` (else that is an error, before anything runs).
    """
    require_extra("lm_eval", "eval", "evaluate")
    check_numbers(locals())
    fabric = setup_fabric(device, precision, quantize)
    task_manager, task_names = find_tasks(tasks, include_path)
    resolved = resolve(checkpoint_dir, base_checkpoint_dir)
    out_dir = Path(out_dir) if out_dir is not None else resolved.files_dir / "eval"
    check_output_dir(out_dir)  # before the tasks run, which can take hours
    with exclusive(out_dir, lambda: refuse_results(out_dir, overwrite)):  # one evaluation writes here at a time
        return run_tasks(resolved, fabric, task_names, task_manager, out_dir, num_fewshot, batch_size, limit,
                         precision, quantize, seed)  # fmt: skip


def refuse_results(out_dir: Path, overwrite: bool) -> None:
    if (out_dir / "results.json").exists() and not overwrite:
        results_file = str(out_dir / "results.json")
        raise ConfigError(f"{results_file!r} exists: choose another --out_dir, or pass --overwrite true to replace it")


def run_tasks(resolved: Resolved, fabric: L.Fabric, task_names: list[str], task_manager: Any, out_dir: Path,
              num_fewshot: int | None, batch_size: int, limit: float | None, precision: str | None,
              quantize: str | None, seed: int) -> dict[str, Any]:  # fmt: skip
    """Load the model, run the tasks and write ``results.json`` atomically."""
    t0 = time.perf_counter()
    model = fabric.setup_module(load_model(resolved))
    fabric.print(f"Time to load the model: {time.perf_counter() - t0:.02f} seconds.", file=sys.stderr)
    lm = LitGPTLM(model, load_tokenizer(resolved.files_dir), batch_size=batch_size)

    model_args = {
        "checkpoint_dir": str(resolved.files_dir),
        "base_checkpoint_dir": str(resolved.base_dir),
        "adapter": str(resolved.adapter) if resolved.adapter is not None else None,
        "precision": precision or get_default_supported_precision(training=False),
        "quantize": quantize,
    }
    results = simple_evaluate(
        model=lm,
        model_args=model_args,
        tasks=task_names,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=str(fabric.device),
        limit=limit,
        log_samples=False,
        task_manager=task_manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    dumped = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    write_text_atomic(dumped, out_dir / "results.json")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    print(f"Saved the results to {str(out_dir / 'results.json')!r}")
    return results

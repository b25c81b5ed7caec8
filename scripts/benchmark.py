"""Training cost of ETHER and ETHER+ against litgpt's LoRA, the frozen model and the reference code's weight-side form.

Every variant targets q and v only (the paper's instruction-tuning setup). Three measurements:

- ``flops``: FLOPs of one training step (forward + backward) counted by torch's ``FlopCounterMode`` on the
  meta device, as litgpt's scripts count them (``measure_flops``, ``chunked_cross_entropy(chunk_size=0)``).
  Hardware-independent; about a minute for all variants of a 7B model on a 2-core CPU::

      python scripts/benchmark.py flops                                   # Llama-2-7b-hf, 1 x 256, PASS/MISS lines
      python scripts/benchmark.py flops --model phi-1_5
      python scripts/benchmark.py flops --model pythia-14m --json --variants lora-r8 ether-n4

- ``time``: median step time, peak memory and trainable parameters on one GPU in bf16-true, random weights,
  AdamW (lr 1e-3) over the trainable parameters, the loss computed as litgpt's finetune scripts do
  (``lm_head_chunk_size=128``, chunked cross-entropy). One variant at a time::

      python scripts/benchmark.py time --model Llama-2-7b-hf --micro_batch_size 4 --seq_len 512
      python scripts/benchmark.py time --model pythia-14m --device cpu --steps 2 --json   # CPU smoke test, fp32
      python scripts/benchmark.py time --quantize bnb.nf4 --variants lora-r8 ether-n32 etherplus-n32  # vs QLoRA

- ``generate``: greedy-decoding tokens/s of the base model and of the same model after a two-sided ETHER+
  adapter (random vectors) has been merged with ``merge_ether``; the two should match::

      python scripts/benchmark.py generate --model Llama-2-7b-hf
      python scripts/benchmark.py generate --model pythia-14m --device cpu

- ``serve``: decoding tokens/s of ``litgpt_ether serve``'s engine with K adapters mixed in each batch, against one
  merged model at the same batch size; adapters of the kinds the finetune presets tune (default: the Llama-2-7B
  and demo presets, the demo model on the CPU, K in 1, 8, 64, batch 64; medians and ranges of 7 runs)::

      python scripts/benchmark.py serve --threads 2
      python scripts/benchmark.py serve --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --device cuda

Variants: ``frozen`` (every parameter frozen, but the embedding output requires grad so backward runs
through every layer: the floor), ``lora-r8`` (litgpt's LoRA, r=8, alpha=16), ``reference-ether-n{1,4,32}``,
``reference-etherplus-n{1,4,32}`` and ``reference-oft-n{4,32}`` (the reference code's weight-side form, written
here only: it builds ``H`` and ``W' = H_out W (H_in)`` every step), ``ether-n{1,4,32}``,
``etherplus-n{1,4,32}``, ``oft-n{4,32}`` and ``naive-n{4,32}`` (this package's activation-side layers;
ETHER+ two-sided). A variant whose ``n`` does not divide a reflected size is skipped with a note on stderr.

FlopCounterMode counts matrix products only; OFT's Cayley transform also solves (activation side) or inverts
(reference) ``n`` ``k x k`` matrices per side, counted here by formula: an LU factorisation (``2k³/3``) plus
``2k²`` per right-hand side, ``2k³`` for an inverse.
"""

import argparse
import gc
import inspect
import json as jsonlib
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

# Without CUDA the fused kernels (LITGPT_ETHER_KERNELS=triton; ``ops`` counts them) run through Triton's interpreter,
# which Triton reads when it defines a kernel: before litgpt imports it
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import litgpt.lora  # noqa: E402
import litgpt.model  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.fabric.utilities.throughput import measure_flops  # noqa: E402
from litgpt.config import Config as BaseConfig  # noqa: E402
from litgpt.utils import chunked_cross_entropy  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import register_flop_formula  # noqa: E402

from litgpt_ether import ether  # noqa: E402

VARIANTS = [
    "frozen",
    "lora-r8",
    *(f"reference-{m}-n{n}" for m in ("ether", "etherplus") for n in (1, 4, 32)),
    *(f"reference-oft-n{n}" for n in (4, 32)),
    *(f"{m}-n{n}" for m in ("ether", "etherplus") for n in (1, 4, 32)),
    *(f"{m}-n{n}" for m in ("oft", "naive") for n in (4, 32)),
]
_ETHER_VARIANT = re.compile(r"(reference-)?(ether|etherplus|oft|naive)-n(\d+)")

# The paper's training-step TFLOPs at micro-batch 1 x 256 tokens (reference code; anchors in ETHER.md).
PAPER_TFLOPS = {
    "Llama-2-7b-hf": {
        "frozen": 6.87, "lora-r8": 6.85,
        "reference-ether-n1": 25.26, "reference-ether-n4": 12.07, "reference-ether-n32": 8.22,
        "reference-etherplus-n1": 51.65, "reference-etherplus-n4": 18.66, "reference-etherplus-n32": 9.04,
    },
    "phi-1_5": {
        "lora-r8": 6.04,
        "reference-ether-n1": 9.13, "reference-ether-n4": 7.07, "reference-ether-n32": 6.71,
        "reference-etherplus-n1": 10.78, "reference-etherplus-n4": 7.69, "reference-etherplus-n32": 6.79,
    },
}  # fmt: skip
# Where the 1% targets apply: only the Llama column was measured side by side with this counting.
TARGET_MODEL = "Llama-2-7b-hf"


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# What FlopCounterMode does not count: the Cayley transform's dense solves and inverses (see the module docstring)
def _lu_flops(a_shape: torch.Size) -> int:
    k = a_shape[-1]
    return math.prod(a_shape[:-2]) * 2 * k**3 // 3


@register_flop_formula(torch.ops.aten._linalg_solve_ex)
def _solve_flops(a_shape: torch.Size, b_shape: torch.Size, *args: Any, **kwargs: Any) -> int:
    return _lu_flops(a_shape) + math.prod(b_shape) * 2 * a_shape[-1]


@register_flop_formula(torch.ops.aten.linalg_lu_solve)
def _lu_solve_flops(lu_shape: torch.Size, pivots_shape: torch.Size, b_shape: torch.Size, *args: Any, **kw: Any) -> int:
    return math.prod(b_shape) * 2 * lu_shape[-1]


@register_flop_formula(torch.ops.aten.linalg_inv_ex)
def _inv_flops(a_shape: torch.Size, *args: Any, **kwargs: Any) -> int:
    return math.prod(a_shape[:-2]) * 2 * a_shape[-1] ** 3


# --------------------------------------------------------------------------------------------------
# The reference code's weight-side form: here only, never in the package, to measure what it costs.


class ReferenceQKV(nn.Module):
    """litgpt's fused ``[q | k | v]`` linear with the reference code's weight-side ETHER, ETHER+ or OFT.

    Every forward builds the ``k x k`` blocks of ``H`` (from the vectors, or OFT's Cayley transform with an
    explicit inverse, as the reference), multiplies them into the (detached) frozen weight segment by segment
    and runs the linear with ``W'``: ``O(f·d·k)`` per step, and autograd then needs ``dH`` (weight-sized matmuls)
    and the full weight gradient of ``W'``.
    """

    def __init__(self, linear: nn.Linear, config: BaseConfig, method: str, n: int) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        q_size, kv_size = config.n_head * config.head_size, config.n_query_groups * config.head_size
        self.sizes = (q_size, kv_size, kv_size)
        self.segments = [(0, "q"), (2, "v")]
        self.method, self.two_sided, self.n = method, method == "etherplus", n
        self.vecs = nn.ParameterDict()
        for i, s in self.segments:
            self._add_side(f"{s}_out", self.sizes[i])
            if self.two_sided:
                self._add_side(f"{s}_in", linear.in_features)

    def _add_side(self, name: str, size: int) -> None:
        w, k = self.weight, size // self.n
        if self.method == "oft":  # R, zero: H = I at the start
            self.vecs[f"{name}_R"] = nn.Parameter(torch.zeros(self.n, k, k, device=w.device, dtype=w.dtype))
            return
        u = nn.Parameter(torch.empty(self.n, k, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))  # as the reference; ETHER+ then starts at H = I
        self.vecs[f"{name}_u"] = u
        if self.method == "etherplus":
            self.vecs[f"{name}_v"] = nn.Parameter(-u.detach().clone())

    def blocks(self, side: str) -> torch.Tensor:
        """The ``(n, k, k)`` diagonal blocks of ``H`` for one side, built explicitly."""
        if self.method == "oft":
            r = self.vecs[f"{side}_R"]
            q = (r - r.transpose(1, 2)) / 2
            eye = torch.eye(r.shape[-1], device=r.device)  # fp32, as the reference's: no bf16 inverse
            return torch.bmm(eye + q, torch.inverse(eye - q)).to(r.dtype)
        unit = lambda w: w / w.norm(dim=-1, keepdim=True)
        u = unit(self.vecs[f"{side}_u"])
        eye = torch.eye(u.shape[-1], device=u.device, dtype=u.dtype)
        if self.method == "ether":
            return eye - 2 * u.unsqueeze(-1) * u.unsqueeze(-2)
        v = unit(self.vecs[f"{side}_v"])
        return eye - u.unsqueeze(-1) * u.unsqueeze(-2) + v.unsqueeze(-1) * v.unsqueeze(-2)

    def merged_weight(self) -> torch.Tensor:
        """``W'``: ``H_out W_s`` (and ``· H_in`` when two-sided) per targeted segment, the rest untouched."""
        parts = list(self.weight.detach().split(self.sizes, dim=0))
        n = self.n
        for i, s in self.segments:
            w_s = parts[i]
            f_s, d = w_s.shape
            w_s = torch.einsum("nij,njd->nid", self.blocks(f"{s}_out"), w_s.reshape(n, f_s // n, d)).reshape(f_s, d)
            if self.two_sided:
                w_s = torch.einsum("fnj,nji->fni", w_s.reshape(f_s, n, d // n), self.blocks(f"{s}_in"))
                w_s = w_s.reshape(f_s, d)
            parts[i] = w_s
        return torch.cat(parts, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.bias)


# --------------------------------------------------------------------------------------------------
# Building the variants


def make_config(cls: type[BaseConfig], model: str | dict[str, Any], **fields: Any) -> BaseConfig:
    """A litgpt config name, or a dict of config fields (the tests' tiny models)."""
    return cls.from_name(model, **fields) if isinstance(model, str) else cls(**model, **fields)


def parse_ether_variant(variant: str) -> tuple[bool, str, int]:
    """``(reference, method, n)`` of an ETHER, ETHER+, OFT or Naive variant name."""
    match = _ETHER_VARIANT.fullmatch(variant)
    if match is None:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return match.group(1) is not None, match.group(2), int(match.group(3))


def is_package_variant(variant: str) -> bool:
    """ETHER, ETHER+, OFT or Naive in this package's layers (not the reference code's weight-side form)."""
    return _ETHER_VARIANT.fullmatch(variant) is not None and not variant.startswith("reference-")


def reference_skip_reason(config: BaseConfig, method: str, n: int) -> str | None:
    sizes = {"q output": config.n_head * config.head_size, "v output": config.n_query_groups * config.head_size}
    if method == "etherplus":
        sizes["input"] = config.n_embd
    bad = [f"{where} ({size})" for where, size in sizes.items() if size % n]
    return f"n={n} does not divide {', '.join(bad)}" if bad else None


def build(variant: str, model: str | dict[str, Any]) -> nn.Module | None:
    """The variant's model on the current default device and dtype, trainable parameters marked; None if skipped."""
    if variant == "frozen":
        gpt = litgpt.model.GPT(make_config(BaseConfig, model))
        for p in gpt.parameters():
            p.requires_grad = False
        # the embedding output requires grad, so backward runs (input gradients) through every layer
        gpt.transformer.wte.register_forward_hook(lambda module, args, out: out.requires_grad_())
        return gpt
    if variant == "lora-r8":
        config = make_config(
            litgpt.lora.Config, model, lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_query=True, lora_value=True
        )
        gpt = litgpt.lora.GPT(config)
        litgpt.lora.mark_only_lora_as_trainable(gpt)
        return gpt
    reference, method, n = parse_ether_variant(variant)
    if reference:
        config = make_config(BaseConfig, model)
        if (reason := reference_skip_reason(config, method, n)) is not None:
            note(f"skipping {variant}: {reason}")
            return None
        gpt = litgpt.model.GPT(config)
        for p in gpt.parameters():
            p.requires_grad = False
        for block in gpt.transformer.h:
            block.attn.qkv = ReferenceQKV(block.attn.qkv, config, method, n)
        return gpt
    fields = dict(ether_method=method, ether_nb=n, ether_query=True, ether_value=True)
    try:
        gpt = ether.GPT(make_config(ether.Config, model, **fields))
    except ether.ConfigError as e:
        note(f"skipping {variant}: {e}")
        return None
    ether.mark_only_ether_as_trainable(gpt)
    return gpt


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def ratios(results: list[dict[str, Any]], key: str) -> None:
    """Add ``ratio_lora`` and ``ratio_frozen`` (``key`` over the same for lora-r8 / frozen) to every row."""
    by_name = {r["variant"]: r[key] for r in results}
    for r in results:
        for col, base in (("ratio_lora", "lora-r8"), ("ratio_frozen", "frozen")):
            ok = r[key] is not None and by_name.get(base)
            r[col] = r[key] / by_name[base] if ok else None


def select(variants: list[str] | None) -> list[str]:
    chosen = VARIANTS if variants is None else variants
    for v in chosen:
        if v not in VARIANTS:
            raise SystemExit(f"error: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    return chosen


def fmt(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or a dash as wide as the spec's width for a missing value."""
    return format(x, spec) if x is not None else "-".rjust(int(re.match(r"\d*", spec).group() or 0))


# --------------------------------------------------------------------------------------------------
# flops


@contextmanager
def saved_activations(model: nn.Module) -> Iterator[dict[int, int]]:
    """Bytes autograd keeps for backward, by storage: what a step's activation memory is made of.

    Views of one storage count once; parameters and buffers are not counted. Works on the meta device, so it
    shows the memory effect of a layer's design on any machine. Attention's own saved tensors follow the math
    kernel the meta device dispatches to, which saves copies of q, k and v; GPU flash attention saves views of
    the QKV output instead, which the package's in-place ETHER output then shares (it counts here, not there).
    """
    owned = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in owned:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def count_flops(
    variant: str, model: str | dict[str, Any], micro_batch_size: int = 1, seq_len: int = 256
) -> tuple[int, int] | None:
    """FLOPs and saved-activation bytes (bf16) of one forward + backward of ``variant`` on the meta device."""
    with torch.device("meta"):
        gpt = build(variant, model)
        if gpt is None:
            return None
        gpt = gpt.to(torch.bfloat16)
        gpt.max_seq_length = seq_len
        x = torch.randint(0, 1, (micro_batch_size, seq_len))
    with saved_activations(gpt) as saved:
        forward = lambda: gpt(x)
        loss = lambda logits: chunked_cross_entropy(logits, x, chunk_size=0)
        flops = measure_flops(gpt, forward, loss)
    return flops, sum(saved.values())


def flops(
    model: str = "Llama-2-7b-hf",
    micro_batch_size: int = 1,
    seq_len: int = 256,
    variants: list[str] | None = None,
    json: bool = False,
) -> list[dict[str, Any]]:
    """Count the FLOPs of one training step of each variant (meta device, any machine).

    Arguments:
        model: A litgpt config name.
        micro_batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        variants: A subset of the variants (default: all).
        json: Print one JSON object per line instead of a table.
    """
    results = []
    for variant in select(variants):
        counted = count_flops(variant, model, micro_batch_size, seq_len)
        if counted is not None:
            n, saved = counted
            results.append({"variant": variant, "tflops": n / 1e12, "flops": n, "saved_gib": saved / 2**30})
    if json:
        for r in results:
            print(jsonlib.dumps(r), flush=True)
        return results
    ratios(results, "tflops")
    paper = PAPER_TFLOPS.get(model, {}) if (micro_batch_size, seq_len) == (1, 256) else {}
    print(f"{model}, micro-batch {micro_batch_size} x {seq_len} tokens: TFLOPs of one training step (fwd + bwd)")
    print(f"{'variant':24s} {'TFLOPs':>8s} {'/ lora-r8':>10s} {'/ frozen':>9s} {'paper':>7s} {'saved GiB':>10s}")
    for r in results:
        tflops = fmt(r["tflops"], "8.2f" if r["tflops"] >= 0.1 else "8.2e")  # tiny configs
        print(
            f"{r['variant']:24s} {tflops} {fmt(r['ratio_lora'], '10.3f')} "
            f"{fmt(r['ratio_frozen'], '9.3f')} {fmt(paper.get(r['variant']), '7.2f')} {r['saved_gib']:10.4f}"
        )
    for line in check_targets(model, micro_batch_size, seq_len, results):
        print(line)
    return results


def check_targets(model: str, micro_batch_size: int, seq_len: int, results: list[dict[str, Any]]) -> list[str]:
    """PASS/MISS lines: the paper's figures within 1% (Llama-2-7b-hf, 1 x 256), the package's ETHER and ETHER+
    <= 1.01 x LoRA, its OFT and Naive at n = 32 <= 1.05 x LoRA; a COST line for OFT and Naive at other n."""
    lines = []
    by_name = {r["variant"]: r["tflops"] for r in results}
    if model == TARGET_MODEL and (micro_batch_size, seq_len) == (1, 256):
        for variant, expected in PAPER_TFLOPS[model].items():
            if variant in by_name:
                err = by_name[variant] / expected - 1
                verdict = "PASS" if abs(err) <= 0.01 else "MISS"
                lines.append(f"{verdict} {variant}: {by_name[variant]:.2f} vs paper {expected:.2f} ({err:+.2%})")
    if "lora-r8" in by_name:
        lora = by_name["lora-r8"]
        for variant, t in by_name.items():
            if not is_package_variant(variant):
                continue
            _, method, n = parse_ether_variant(variant)
            target = 1.01 if method in ("ether", "etherplus") else 1.05 if n == 32 else None
            verdict = "COST" if target is None else "PASS" if t <= target * lora else "MISS"
            goal = f"target <= {target:.2f}" if target is not None else "no target"
            lines.append(f"{verdict} {variant}: {t / lora:.4f} x lora-r8 ({goal})")
    return lines


# --------------------------------------------------------------------------------------------------
# time


def resolve_device(device: str) -> tuple[torch.device, torch.dtype]:
    """bf16-true on CUDA; fp32 on CPU (a smoke test for tiny configs). Exits with code 2 without CUDA."""
    if device == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available (use --device cpu for a smoke test)", file=sys.stderr)
            raise SystemExit(2)
        return torch.device("cuda"), torch.bfloat16
    if device == "cpu":
        return torch.device("cpu"), torch.float32
    print(f"error: --device must be 'cuda' or 'cpu', got {device!r}", file=sys.stderr)
    raise SystemExit(2)


@contextmanager
def materialize_on(device: torch.device, dtype: torch.dtype, quantize: str | None = None) -> Iterator[None]:
    """Build directly on ``device`` in ``dtype`` with random weights: no fp32 copy of a 7B model ever exists.

    With ``quantize`` every ``nn.Linear`` is built as Fabric's bitsandbytes layer (what ``finetune --quantize`` and
    litgpt's QLoRA do), quantized as it is made on CUDA.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    quantized = nullcontext()
    if quantize is not None:
        from lightning.fabric.plugins import BitsandbytesPrecision

        quantized = BitsandbytesPrecision(quantize.removeprefix("bnb."), dtype).module_init_context()
    try:
        with torch.device(device), quantized:
            yield
    finally:
        torch.set_default_dtype(previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variant(
    variant: str,
    model: str | dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    micro_batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int,
    quantize: str | None = None,
    profile: int = 0,
    compile: bool = False,
) -> dict[str, Any] | None:
    """Median step time, peak memory and trainable parameters of one variant; None if skipped.

    With ``profile`` > 0, one more step runs under ``torch.profiler`` and its ``profile`` costliest operations (by
    their own device time, CPU time on a CPU) go to stderr: where a variant's extra time goes.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    if quantize is not None and variant.startswith("reference-"):
        note(f"skipping {variant}: the weight-side form multiplies into the weight, which a quantized layer hides")
        return None
    with materialize_on(device, dtype, quantize):
        gpt = build(variant, model)
    if gpt is None:
        return None
    gpt = gpt.to(device)  # quantizes bitsandbytes layers not quantized yet (built off CUDA): a no-op otherwise
    if compile:  # as finetune --compile: each block, for every variant alike (the warm-up steps compile)
        for block in gpt.transformer.h:
            block.compile()
    gpt.max_seq_length = seq_len
    gpt.train()
    params = [p for p in gpt.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3) if params else None  # frozen: nothing to step
    tokens = torch.randint(0, gpt.config.padded_vocab_size, (micro_batch_size, seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        logits = gpt(x, lm_head_chunk_size=128)
        chunked_cross_entropy(logits, y).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if profile > 0:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        note(f"{variant}: one step's costliest operations\n{prof.key_averages().table(sort_by=key, row_limit=profile)}")
    return {
        "variant": variant,
        "kernels": ether.kernel_mode(),
        "compiled": compile,
        "step_ms": 1000 * statistics.median(times),
        "peak_mem_gib": peak,
        "trainable_params": sum(p.numel() for p in params),
    }


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_cmd(
    model: str = "Llama-2-7b-hf",
    micro_batch_size: int = 1,
    seq_len: int = 256,
    steps: int = 10,
    warmup: int = 3,
    variants: list[str] | None = None,
    json: bool = False,
    device: str = "cuda",
    quantize: str | None = None,
    profile: int = 0,
    compile: bool = False,
    repeats: int = 1,
    kernels: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Time training steps of each variant: bf16-true on a GPU, random weights, AdamW (lr 1e-3).

    Arguments:
        model: A litgpt config name.
        micro_batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        steps: Timed steps per variant (the median is reported).
        warmup: Untimed steps first.
        variants: A subset of the variants (default: all).
        json: Print one JSON object per line instead of a table.
        device: "cuda" (bf16-true) or "cpu" (fp32, a smoke test for tiny configs; no peak memory).
        quantize: Quantize every base linear with bitsandbytes ("bnb.nf4", ...): ``lora-r8`` is then litgpt's QLoRA.
            The reference variants are skipped.
        profile: Profile one more step per variant and print its this many costliest operations to stderr.
        compile: ``torch.compile`` each transformer block of every variant (the warm-up steps compile).
        repeats: Rounds over every variant and path, interleaved, so that background load falls on all of them; a row
            then holds the median and the range of its rounds, its ratios those of each round against that round's.
        kernels: The paths to time the ETHER variants on ("torch", "triton": ``LITGPT_ETHER_KERNELS``; default: the
            environment's).
    """
    dev, dtype = resolve_device(device)
    if quantize is not None and quantize.startswith("bnb.int8"):
        dtype = torch.float16  # bitsandbytes' int8 layers compute in float16 only
    rounds: list[list[dict[str, Any]]] = []
    for _ in range(repeats):
        results = []
        for variant in select(variants):
            for path in kernels if kernels and is_package_variant(variant) else [None]:
                free_memory(dev)  # the previous variant's model and optimizer are gone with time_variant's frame
                note(f"timing {variant}{f' ({path})' if path else ''} ...")
                try:
                    with kernel_path(path):
                        r = time_variant(variant, model, dev, dtype, micro_batch_size, seq_len, steps, warmup,
                                         quantize, profile, compile)  # fmt: skip
                except torch.OutOfMemoryError:
                    note(f"{variant}: out of memory")
                    r = {"variant": variant, "kernels": path, "step_ms": None, "peak_mem_gib": None,
                         "trainable_params": None, "oom": True}  # fmt: skip
                if r is not None:
                    results.append(r)
        free_memory(dev)
        ratios(results, "step_ms")
        rounds.append(results)
    results = combine_rounds(rounds)
    if json:
        for r in results:
            print(jsonlib.dumps(r), flush=True)
        return results
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (fp32)"
    base = f", base weights {quantize}" if quantize else ""
    runs = f"; medians (min-max) of {repeats} interleaved rounds" if repeats > 1 else ""
    print(f"{model}{base}, micro-batch {micro_batch_size} x {seq_len} tokens, {where}: median of {steps} steps{runs}")
    print(f"{'variant':24s} {'path':7s} {'step ms':>9s} {'/ lora-r8':>10s} {'range':>13s} {'/ frozen':>9s} "
          f"{'peak GiB':>9s} {'trainable':>12s}")  # fmt: skip
    for r in results:
        trainable = "-" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
        lo, hi = r.get("ratio_lora_range") or (None, None)
        spread = f"{lo:.3f}-{hi:.3f}" if lo is not None else "-"
        print(
            f"{r['variant']:24s} {r['kernels'] or '-':7s} {fmt(r['step_ms'], '9.1f')} {fmt(r['ratio_lora'], '10.3f')}"
            f" {spread:>13s} {fmt(r['ratio_frozen'], '9.3f')} {fmt(r['peak_mem_gib'], '9.2f')} {trainable:>12s}"
        )
    return results


@contextmanager
def kernel_path(path: str | None) -> Iterator[None]:
    """``LITGPT_ETHER_KERNELS=path`` for the block (no change for None), restored after."""
    previous = os.environ.get("LITGPT_ETHER_KERNELS")
    if path is not None:
        os.environ["LITGPT_ETHER_KERNELS"] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("LITGPT_ETHER_KERNELS", None)
        else:
            os.environ["LITGPT_ETHER_KERNELS"] = previous


def combine_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per variant and path: the median of its rounds' step times and ratios, with their ranges, and the
    highest peak memory."""
    if len(rounds) == 1:
        return rounds[0]
    rows: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    for results in rounds:
        for r in results:
            rows.setdefault((r["variant"], r["kernels"]), []).append(r)
    combined = []
    for runs in rows.values():
        row = dict(runs[0], rounds=len(runs))
        for key in ("step_ms", "ratio_lora", "ratio_frozen"):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
            row[f"{key}_range"] = [min(values), max(values)] if values else None
        peaks = [r["peak_mem_gib"] for r in runs if r.get("peak_mem_gib") is not None]
        row["peak_mem_gib"] = max(peaks) if peaks else None
        combined.append(row)
    return combined


# --------------------------------------------------------------------------------------------------
# generate


def tokens_per_second(gpt: litgpt.model.GPT, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Greedy decoding with litgpt's KV-cache ``generate``; one untimed warm-up run first."""
    from litgpt.generate.base import generate

    total = prompt.numel() + new_tokens
    gpt.max_seq_length = total
    gpt.set_kv_cache(batch_size=1, device=prompt.device)
    with torch.inference_mode():
        generate(gpt, prompt, min(total, prompt.numel() + 4), temperature=0.0)
        sync(prompt.device)
        t0 = time.perf_counter()
        out = generate(gpt, prompt, total, temperature=0.0)
        sync(prompt.device)
        elapsed = time.perf_counter() - t0
    gpt.clear_kv_cache()
    return new_tokens / elapsed, out[prompt.numel() :]


def merged_ether_model(base: litgpt.model.GPT, model: str | dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The base weights plus a two-sided ETHER+ adapter (random, non-trivial vectors) on q and v, merged."""
    fields = dict(ether_method="etherplus", ether_nb=1, ether_query=True, ether_value=True)
    device = base.lm_head.weight.device
    with materialize_on(device, dtype):
        tuned = ether.GPT(make_config(ether.Config, model, **fields))
    missing, unexpected = tuned.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(ether.ether_filter(k, None) for k in missing), (missing, unexpected)
    with torch.no_grad():  # ETHER+ starts at H = I; random (u, v) make the merge do real work
        for name, p in tuned.named_parameters():
            if ether.ether_filter(name, p):
                p.copy_(torch.randn_like(p))
    return ether.merge_ether(tuned)


def generate_cmd(
    model: str = "Llama-2-7b-hf",
    device: str = "cuda",
    prompt_len: int = 64,
    new_tokens: int = 128,
    repeats: int = 3,
    json: bool = False,
) -> dict[str, Any]:
    """Greedy tokens/s of the base model and of the model with a merged ETHER+ adapter (should be equal).

    Arguments:
        model: A litgpt config name.
        device: "cuda" (bf16) or "cpu" (fp32; use a small config).
        prompt_len: Prompt tokens.
        new_tokens: Generated tokens (the rate counts these, prefill included in the time).
        repeats: Runs per model, alternating between the two; the best of each is reported.
        json: Print one JSON object instead of text.
    """
    dev, dtype = resolve_device(device)
    torch.manual_seed(0)
    with materialize_on(dev, dtype):
        base = litgpt.model.GPT(make_config(BaseConfig, model))
    prompt = torch.randint(0, base.config.vocab_size, (prompt_len,), device=dev)
    merged = merged_ether_model(base, model, dtype)
    base_params = sum(p.numel() for p in base.parameters())
    # interleaved and best-of: a machine's background load must not decide which model looks faster
    rates = {"base": [], "merged": []}
    for _ in range(repeats):
        rates["base"].append(tokens_per_second(base, prompt, new_tokens)[0])
        rates["merged"].append(tokens_per_second(merged, prompt, new_tokens)[0])
    base_tps, merged_tps = max(rates["base"]), max(rates["merged"])
    result = {
        "model": model,
        "device": dev.type,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "base_tokens_per_s": base_tps,
        "merged_tokens_per_s": merged_tps,
        "ratio": merged_tps / base_tps,
        "base_params": base_params,
        "merged_params": sum(p.numel() for p in merged.parameters()),
        "merged_ether_layers": sum(1 for _ in ether.ether_layers(merged)),
    }
    if json:
        print(jsonlib.dumps(result), flush=True)
    else:
        print(f"{model} on {dev.type}, {prompt_len}-token prompt, {new_tokens} new tokens (greedy)")
        print(f"base model:            {base_tps:9.1f} tokens/s")
        print(f"merged ETHER+ adapter: {merged_tps:9.1f} tokens/s ({result['ratio']:.3f} x base)")
    return result


class OperatorCount(TorchDispatchMode):
    """Counts the operators that do work: on a GPU each launches one kernel or more. Views and detaches are free.

    Eager decoding of a batch on a GPU is bound by the CPU issuing kernels (measured on an H100: a 7B model's step
    takes about 30 ms, where reading its weights takes 4.5), so the count per step stands in for the cost there on
    any machine.
    """

    FREE = frozenset({"detach", "detach_", "lift_fresh"})
    # operators that only allocate: no kernel
    ALLOCATING = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.launches = 0  # kernels launched: one per operator, none for allocations, the fused ones' own count

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if func.is_view or name in self.FREE:
            return func(*args, **(kwargs or {}))
        self.count += 1
        if func.namespace != "litgpt_ether":
            self.launches += name not in self.ALLOCATING
            return func(*args, **(kwargs or {}))
        from litgpt_ether import kernels  # this package's fused ops: as many launches as they make

        before = kernels.launches
        out = func(*args, **(kwargs or {}))
        self.launches += kernels.launches - before
        return out


# --------------------------------------------------------------------------------------------------
# ops

OPS_VARIANTS = ["frozen", "lora-r8", *(f"{m}-n{n}" for m in ("ether", "etherplus") for n in (1, 4, 32))]
# Targets of the fused kernels, in operators per training step against LoRA's
OPS_TARGETS = {"ether": 1.0, "etherplus": 1.07}


def count_step(variant: str, model: dict[str, Any], micro_batch_size: int, seq_len: int) -> dict[str, Any] | None:
    """Operators and kernel launches of one forward + backward (fp32, CPU), after a warm-up step; None if skipped.

    The gradients are set to None before the step, as ``optimizer.zero_grad(set_to_none=True)`` leaves them, so no
    gradient is accumulated into.
    """
    torch.manual_seed(0)
    with materialize_on(torch.device("cpu"), torch.float32):
        gpt = build(variant, model)
    if gpt is None:
        return None
    x = torch.randint(0, gpt.config.padded_vocab_size, (micro_batch_size, seq_len + 1))

    def step() -> None:
        for p in gpt.parameters():
            p.grad = None
        chunked_cross_entropy(gpt(x[:, :-1], lm_head_chunk_size=128), x[:, 1:]).backward()

    step()
    with OperatorCount() as counter:
        step()
    return {"variant": variant, "operators": counter.count, "launches": counter.launches}


def ops(
    model: str = "Llama-2-7b-hf",
    n_layer: int = 2,
    n_embd: int = 256,
    n_query_groups: int | None = None,
    micro_batch_size: int = 2,
    seq_len: int = 32,
    variants: list[str] | None = None,
    kernels: tuple[str, ...] = ("torch", "triton"),
    json: bool = False,
) -> list[dict[str, Any]]:
    """Count the operators (and kernel launches) of one training step of each variant on a narrow model (any machine).

    On a GPU this project's steps are bound by the CPU issuing operators: the count stands in for the cost there. The
    model is ``model``'s architecture at width ``n_embd`` (4 heads, MLP twice as wide, vocabulary 512) with
    ``n_layer`` layers; a view launches nothing and is not counted, one of this package's fused ops counts once as an
    operator and as many launches as it makes. ETHER and ETHER+ run once per path in ``kernels`` (``torch``,
    ``triton``: ``LITGPT_ETHER_KERNELS``; without CUDA Triton's interpreter runs the kernels).

    Arguments:
        model: A litgpt config name: its architecture (norms, MLP, attention) at a narrow width.
        n_layer: Layers.
        n_embd: Width.
        n_query_groups: Key/value heads (default: as many as heads, or the model's if it groups them).
        micro_batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        variants: A subset of the variants (default: frozen, lora-r8, ETHER and ETHER+ at n = 1, 4, 32).
        kernels: The paths of ETHER and ETHER+ to count.
        json: Print one JSON object per line instead of a table.
    """
    base = BaseConfig.from_name(model)
    groups = n_query_groups or (4 if base.n_query_groups == base.n_head else 2)
    arch = ("mlp_class_name", "norm_class_name", "bias", "parallel_residual", "rotary_percentage",
            "shared_attention_norm", "lm_head_bias")  # fmt: skip
    config = {k: getattr(base, k) for k in arch}
    config |= dict(
        name=model,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=4,
        n_query_groups=groups,
        head_size=n_embd // 4,
        intermediate_size=2 * n_embd,
        padded_vocab_size=512,
        vocab_size=512,
        block_size=max(64, seq_len),
    )
    results = []
    for variant in select(variants or OPS_VARIANTS):
        for path in kernels if is_package_variant(variant) else [None]:  # the frozen model and LoRA: no path
            if path == "triton" and not _has_triton():
                note(f"skipping {variant} (triton): Triton is not installed")
                continue
            with kernel_path(path):
                counted = count_step(variant, config, micro_batch_size, seq_len)
            if counted is not None:
                results.append({**counted, "kernels": path or "-"})
    by_name = {r["variant"]: r for r in results if r["kernels"] == "-"}
    for r in results:
        for key in ("operators", "launches"):
            for ref in ("frozen", "lora-r8"):
                r[f"{key}_{ref}"] = r[key] / by_name[ref][key] if ref in by_name else None
        r["extra_per_layer"] = (
            (r["operators"] - by_name["frozen"]["operators"]) / n_layer if "frozen" in by_name else None
        )
    if json:
        for r in results:
            print(jsonlib.dumps(r), flush=True)
        return results
    print(
        f"{model} architecture, {n_layer} layers of width {n_embd} ({groups} key/value heads), micro-batch"
        f" {micro_batch_size} x {seq_len}: operators and kernel launches of one training step (fwd + bwd)"
    )
    print(
        f"{'variant':16s} {'path':7s} {'operators':>9s} {'/ lora-r8':>10s} {'extra/layer':>11s} {'launches':>9s}"
        f" {'/ lora-r8':>10s}"
    )
    for r in results:
        print(
            f"{r['variant']:16s} {r['kernels']:7s} {r['operators']:9d} {fmt(r['operators_lora-r8'], '10.3f')}"
            f" {fmt(r['extra_per_layer'], '11.1f')} {r['launches']:9d} {fmt(r['launches_lora-r8'], '10.3f')}"
        )
    for r in results:
        method = r["variant"].split("-n")[0]
        if method in OPS_TARGETS and r["operators_lora-r8"] is not None:
            target = OPS_TARGETS[method]
            verdict = "PASS" if r["operators_lora-r8"] <= target else "MISS"
            print(f"{verdict} {r['variant']} ({r['kernels']}): {r['operators_lora-r8']:.3f} x lora-r8's operators"
                  f" (target <= {target:.2f})")  # fmt: skip
    return results


def _has_triton() -> bool:
    from importlib.util import find_spec

    return find_spec("triton") is not None


def random_checkpoint(name: str, directory: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> Path:
    """A litgpt checkpoint directory (config and random weights, in ``dtype``) for a config name; reused if there.

    The weights are drawn on ``device`` (a GPU draws a 7B model's in seconds), then saved from the CPU.
    """
    from litgpt.utils import save_config

    if not (directory / "lit_model.pth").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        config = make_config(BaseConfig, name)
        torch.manual_seed(0)
        with torch.device(device):
            model = litgpt.model.GPT(config).to(dtype)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, directory / "lit_model.pth")
        save_config(config, directory)
    return directory


REPO = Path(__file__).resolve().parent.parent
SERVE_PRESETS = (
    "config_hub/finetune/llama-2-7b/ether.yaml",
    "config_hub/finetune/llama-2-7b/etherplus.yaml",
    "config_hub/finetune/demo/ether.yaml",
    "config_hub/finetune/demo/etherplus.yaml",
)


def serve_cmd(
    checkpoint_dir: str = "demo/base",
    device: str = "cpu",
    presets: tuple[str, ...] = SERVE_PRESETS,
    batch_size: int = 64,
    adapters: tuple[int, ...] = (1, 8, 64),
    prompt_len: int = 32,
    new_tokens: int = 32,
    repeats: int = 7,
    threads: int | None = None,
    json: bool = False,
    load: bool = False,
    rates: tuple[float, ...] = (2.0, 8.0, 32.0),
    requests: int = 48,
    max_batch_size: int = 8,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Decoding tokens/s of ``litgpt_ether serve``'s batch engine with K adapters mixed in each batch, against one
    merged model alone (the base model's cost) at the same batch size.

    The adapters are of the kinds the finetune ``presets`` tune (their ``ether_*`` fields: the paper's Llama-2-7B
    recipes reflect q and v, the demo's every linear of the blocks), with random vectors; request ``i`` of a batch
    uses adapter ``i mod K``. Every request decodes ``new_tokens`` greedily (no stop tokens), through the same engine
    (``litgpt_ether.engine.Engine``) for both models; prompt and decoding are both timed. Runs alternate between the
    two models, so background load falls on both; reported: each model's median and range over ``repeats``, and the
    median and range of the ratio of each mixed run to the merged run just before it.

    Arguments:
        checkpoint_dir: A base litgpt checkpoint directory (default: the demo's model), or a litgpt config name
            (random weights, written once to ``checkpoints/random/NAME``).
        device: "cpu" (fp32) or "cuda" (bf16).
        presets: Finetune preset YAML files (or paths under this repository) whose adapter kind to serve.
        batch_size: Requests decoded together.
        adapters: The numbers of adapters K to mix per batch (each at most ``batch_size``).
        prompt_len: Prompt tokens per request (random tokens).
        new_tokens: Generated tokens per request.
        repeats: Runs per model and K.
        threads: CPU threads for torch (default: torch's own choice).
        json: Print JSON lines instead of a table.
        load: Run ``serve_load`` instead (a real server under Poisson load, static against continuous batching),
            with ``rates``, ``requests``, ``max_batch_size`` and ``seed`` (of the arrivals, prompts, lengths and
            adapters); its adapters are ``max(adapters)`` of the presets' kinds.
    """
    if load:
        return serve_load(checkpoint_dir, device, presets, max(adapters), rates, requests, max_batch_size, seed=seed,
                          json=json)  # fmt: skip
    import yaml
    from litgpt.prompts import Alpaca

    from litgpt_ether.checkpoint import MODEL_FILE, model_from_checkpoint
    from litgpt_ether.engine import Engine, Request, Rows, Sampling, run_all
    from litgpt_ether.serve import Adapter, build_model

    dev, dtype = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    base_dir = Path(checkpoint_dir)
    if not base_dir.is_dir():  # a litgpt config name: a random-weight checkpoint written once, here
        base_dir = random_checkpoint(checkpoint_dir, Path("checkpoints/random") / checkpoint_dir, dtype, dev)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, ether.Config.from_file(base_dir / "model_config.yaml").vocab_size,
                            (batch_size, prompt_len), generator=generator)  # fmt: skip

    def requests(k: int, tokens: int) -> list[Request]:
        return [Request(1 + i % k, prompts[i].to(dev), tokens, Sampling()) for i in range(batch_size)]

    def decode(model: nn.Module, rows: Rows, batch: list[Request]) -> None:
        run_all(Engine(model, rows, len(batch), prompt_len + max(r.max_new_tokens for r in batch)), batch)

    def rate(model: nn.Module, rows: Rows, k: int) -> float:
        batch = requests(k, new_tokens)  # built before the clock starts
        decode(model, rows, batch[:2])  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        decode(model, rows, batch)
        sync(dev)
        return batch_size * new_tokens / (time.perf_counter() - t0)

    def ops_per_step(model: nn.Module, rows: Rows, k: int) -> float:
        """Operators per decoding step of the whole batch: the difference between 12 and 2 new tokens, over 10."""
        counts = []
        for tokens in (2, 12):
            with torch.inference_mode(), OperatorCount() as counter:
                decode(model, rows, requests(k, tokens))
            counts.append(counter.count)
        return (counts[1] - counts[0]) / 10

    kinds = {}  # every preset read and checked against the model before anything is timed: its config, adapter shapes
    for preset in presets:
        path = Path(preset) if Path(preset).is_file() else REPO / preset
        preset_fields = yaml.safe_load(path.read_text()) if path.is_file() else None
        if not isinstance(preset_fields, dict):
            print(f"error: preset {preset!r} is not a finetune preset YAML file", file=sys.stderr)
            raise SystemExit(2)
        fields = {k: v for k, v in preset_fields.items() if k.startswith("ether_")}
        try:
            config = ether.Config.from_file(base_dir / "model_config.yaml", **fields)
            with torch.device("meta"):
                kinds[preset] = config, {k: v.shape for k, v in ether.ether_state_dict(ether.GPT(config)).items()}
        except ether.ConfigError as err:
            print(f"error: preset {preset!r} does not fit {base_dir}: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    results = []
    for preset, (config, shapes) in kinds.items():
        states = [{k: torch.randn(s, generator=generator) for k, s in shapes.items()} for _ in range(max(adapters))]
        pool = [Adapter(f"a{i}", base_dir, config.ether_args(), state, Alpaca()) for i, state in enumerate(states)]
        # the first adapter on the base weights, merged (a plain litgpt model), loaded as serve loads its own
        merged = ether.merge_ether(model_from_checkpoint(config, base_dir / MODEL_FILE, states[0])).to(dev, dtype)
        merged_ops = ops_per_step(merged, Rows(), 1)  # the same for every K
        for k in adapters:
            rows = Rows()
            mixed = build_model(base_dir, pool[:k], rows).to(device=dev, dtype=dtype)
            ops = {"merged": merged_ops, "mixed": ops_per_step(mixed, rows, k)}
            runs: dict[str, list[float]] = {"merged": [], "mixed": []}
            for _ in range(repeats):
                runs["merged"].append(rate(merged, Rows(), 1))  # no tables: the rows go unused
                runs["mixed"].append(rate(mixed, rows, k))
            result = {"checkpoint_dir": str(base_dir), "device": dev.type, "threads": torch.get_num_threads(),
                      "preset": preset, "batch_size": batch_size, "adapters": k, "prompt_len": prompt_len,
                      "new_tokens": new_tokens, "repeats": repeats}  # fmt: skip
            for name, values in runs.items():
                result[f"{name}_tokens_per_s"] = statistics.median(values)
                result[f"{name}_range"] = [min(values), max(values)]
                result[f"{name}_ops_per_step"] = ops[name]
            ratios = [a / b for a, b in zip(runs["mixed"], runs["merged"])]  # each run against the one just before
            result["ratio"], result["ratio_range"] = statistics.median(ratios), [min(ratios), max(ratios)]
            results.append(result)
            if json:
                print(jsonlib.dumps(result), flush=True)
            else:
                (lo, hi), (mlo, mhi), (rlo, rhi) = result["mixed_range"], result["merged_range"], result["ratio_range"]
                print(f"{preset}: K = {k:3d} adapters in a batch of {batch_size}: {result['mixed_tokens_per_s']:.1f}"
                      f" tokens/s ({lo:.1f}-{hi:.1f}), one merged model {result['merged_tokens_per_s']:.1f}"
                      f" ({mlo:.1f}-{mhi:.1f}); mixed / merged {result['ratio']:.2f} x ({rlo:.2f}-{rhi:.2f}),"
                      f" medians of {repeats} runs; operators per step {ops['mixed']:.0f} against"
                      f" {ops['merged']:.0f}", flush=True)  # fmt: skip
            del mixed
    return results


def serve_load(
    checkpoint_dir: str = "demo/base",
    device: str = "cpu",
    presets: tuple[str, ...] = SERVE_PRESETS[:2],
    adapters: int = 4,
    rates: tuple[float, ...] = (2.0, 8.0, 32.0),
    requests: int = 48,
    max_batch_size: int = 8,
    prompt_len: tuple[int, int] = (8, 48),
    new_tokens: tuple[int, int] = (8, 64),
    seed: int = 0,
    json: bool = False,
) -> list[dict[str, Any]]:
    """``litgpt_ether serve`` under a bounded open-loop load, static against continuous batching in the same run.

    A real server on 127.0.0.1 (each batching mode in turn, the same base, adapters and requests), fed by Poisson
    arrivals at each rate: ``requests`` streamed completions, each for one of ``adapters`` random adapters of the
    presets' kinds, with a random prompt and a random number of new tokens (EOS forbidden through ``logit_bias``, so
    every request decodes exactly that many). Reported per mode and rate: throughput (generated tokens over the time
    from the first request sent to the last one answered), time to first token and time per later token (p50, p99).
    ``checkpoint_dir`` may be a litgpt config name (random weights, as ``serve`` writes them); on "cuda" the server
    runs in bf16, on the CPU in fp32.
    """
    import asyncio
    import random
    import shutil
    import signal
    import socket
    import subprocess
    import tempfile

    import httpx
    import yaml
    from litgpt.prompts import Alpaca, save_prompt_style
    from litgpt.tokenizer import Tokenizer

    from litgpt_ether.checkpoint import save_adapter

    dev, dtype = resolve_device(device)
    base_dir = Path(checkpoint_dir)
    if not base_dir.is_dir():  # a litgpt config name: a random-weight checkpoint written once, as ``serve`` does
        base_dir = random_checkpoint(checkpoint_dir, Path("checkpoints/random") / checkpoint_dir, dtype, dev)
    config = ether.Config.from_file(base_dir / "model_config.yaml")
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    generator = torch.Generator().manual_seed(seed)
    specs = []
    for i in range(adapters):  # the presets' kinds in turn, random vectors
        path = Path(presets[i % len(presets)])
        fields = {k: v for k, v in yaml.safe_load((path if path.is_file() else REPO / path).read_text()).items()
                  if k.startswith("ether_")}  # fmt: skip
        adapter_config = ether.Config.from_file(base_dir / "model_config.yaml", **fields)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in ether.ether_state_dict(ether.GPT(adapter_config)).items()}
        (work / f"a{i}").mkdir()
        save_adapter(work / f"a{i}" / "lit_model.pth.ether",
                     {k: torch.randn(s, generator=generator) for k, s in shapes.items()}, adapter_config)  # fmt: skip
        save_prompt_style(Alpaca(), work / f"a{i}")
        specs.append(f"a{i}={work / f'a{i}'}")
    rng = random.Random(seed)
    eos = Tokenizer(base_dir).eos_id

    def plan(rate: float) -> list[tuple[float, str, list[int], int]]:
        """(seconds since the previous request, adapter, prompt, new tokens): within the model's context."""
        out = []
        for _ in range(requests):
            prompt = [rng.randrange(3, config.vocab_size) for _ in range(rng.randint(*prompt_len))]
            tokens = min(rng.randint(*new_tokens), config.block_size - len(prompt))
            out.append((rng.expovariate(rate), f"a{rng.randrange(adapters)}", prompt, tokens))
        return out

    plans = {rate: plan(rate) for rate in rates}

    async def one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], tokens: int) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        if eos is not None:
            body["logit_bias"] = {str(eos): -100}
        sent, first, last, usage = time.perf_counter(), None, None, None
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = jsonlib.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif chunk["choices"] and chunk["choices"][0].get("text"):
                    last = time.perf_counter()
                    first = first or last
        return {"sent": sent, "first": first, "last": last, "tokens": usage["completion_tokens"]}

    async def load(url: str, plan: list) -> list[dict]:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=requests)) as client:
            tasks = []
            for gap, model, prompt, tokens in plan:
                await asyncio.sleep(gap)
                tasks.append(asyncio.create_task(one(client, url, model, prompt, tokens)))
            return await asyncio.gather(*tasks)

    def percentile(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]

    results = []
    for batching in ("static", "continuous"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(work / f"{batching}.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "litgpt_ether", "serve", str(base_dir), "--adapters", *specs,
                                   "--port", str(port), "--precision", "32-true" if dev.type == "cpu" else "bf16-true",
                                   "--temperature", "0",
                                   "--max_batch_size", str(max_batch_size), "--batching", batching],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            asyncio.run(load(url, plans[rates[0]][:2]))  # warm-up
            for rate in rates:
                answers = asyncio.run(load(url, plans[rate]))
                wall = max(a["last"] for a in answers) - min(a["sent"] for a in answers)
                ttft = [a["first"] - a["sent"] for a in answers]
                tpot = [(a["last"] - a["first"]) / (a["tokens"] - 1) for a in answers if a["tokens"] > 1]
                result = {"batching": batching, "rate": rate, "requests": requests, "max_batch_size": max_batch_size,
                          "adapters": adapters, "checkpoint_dir": str(base_dir),
                          "tokens_per_s": sum(a["tokens"] for a in answers) / wall,
                          "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
                          "tpot_p50": percentile(tpot, 0.5), "tpot_p99": percentile(tpot, 0.99)}  # fmt: skip
                results.append(result)
                if json:
                    print(jsonlib.dumps(result), flush=True)
                else:
                    print(f"{batching:10s} {rate:6.1f} req/s: {result['tokens_per_s']:8.1f} tokens/s, time to first"
                          f" token p50 {result['ttft_p50'] * 1e3:7.0f} ms p99 {result['ttft_p99'] * 1e3:7.0f} ms,"
                          f" per token p50 {result['tpot_p50'] * 1e3:6.1f} ms p99 {result['tpot_p99'] * 1e3:6.1f} ms",
                          flush=True)  # fmt: skip
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
            log.close()
    shutil.rmtree(work, ignore_errors=True)
    return results


COMMANDS: dict[str, Callable[..., Any]] = {
    "flops": flops,
    "ops": ops,
    "time": time_cmd,
    "generate": generate_cmd,
    "serve": serve_cmd,
}


def parser() -> argparse.ArgumentParser:
    """One flat parser per subcommand; the defaults are the functions' defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    commands = {name: sub.add_parser(name, help=fn.__doc__.split("\n")[0]) for name, fn in COMMANDS.items()}
    for name, sp in commands.items():
        default = {arg: par.default for arg, par in inspect.signature(COMMANDS[name]).parameters.items()}.get
        sp.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
        if name == "serve":
            sp.add_argument(
                "--checkpoint_dir", default=default("checkpoint_dir"), help="a checkpoint dir or config name"
            )
            sp.add_argument("--device", choices=["cuda", "cpu"], default=default("device"))
            sp.add_argument("--batch_size", type=int, default=default("batch_size"))
            sp.add_argument("--presets", nargs="+", default=default("presets"), help="finetune preset YAML files")
            sp.add_argument("--adapters", type=int, nargs="+", default=default("adapters"), help="values of K")
            for arg in ("prompt_len", "new_tokens", "repeats", "threads", "requests", "max_batch_size", "seed"):
                sp.add_argument(f"--{arg}", type=int, default=default(arg))
            sp.add_argument("--load", action="store_true", help="a real server under Poisson load (serve_load)")
            sp.add_argument("--rates", type=float, nargs="+", default=default("rates"), help="requests per second")
            continue
        sp.add_argument("--model", default=default("model"), help="a litgpt config name")
        if name == "ops":
            for arg in ("n_layer", "n_embd", "n_query_groups", "micro_batch_size", "seq_len"):
                sp.add_argument(f"--{arg}", type=int, default=default(arg))
            sp.add_argument("--variants", nargs="+", choices=VARIANTS, metavar="VARIANT", help="default: the ops set")
            sp.add_argument("--kernels", nargs="+", choices=["torch", "triton"], default=default("kernels"))
            continue
        if name in ("flops", "time"):
            sp.add_argument("--micro_batch_size", type=int, default=default("micro_batch_size"))
            sp.add_argument("--seq_len", type=int, default=default("seq_len"))
            sp.add_argument("--variants", nargs="+", choices=VARIANTS, metavar="VARIANT", help="default: all")
        if name in ("time", "generate"):
            sp.add_argument("--device", choices=["cuda", "cpu"], default=default("device"))
        if name == "time":
            sp.add_argument("--steps", type=int, default=default("steps"), help="timed steps (median reported)")
            sp.add_argument("--warmup", type=int, default=default("warmup"), help="untimed steps first")
            sp.add_argument(
                "--quantize",
                choices=["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8-training"],
                help="quantize the base weights (lora-r8 becomes QLoRA)",
            )
            sp.add_argument("--profile", type=int, default=default("profile"), help="print N costliest ops per variant")
            sp.add_argument("--compile", action="store_true", help="torch.compile each block of every variant")
            sp.add_argument("--repeats", type=int, default=default("repeats"), help="interleaved rounds")
            sp.add_argument("--kernels", nargs="+", choices=["torch", "triton"], help="ETHER paths to time")
        if name == "generate":
            sp.add_argument("--prompt_len", type=int, default=default("prompt_len"))
            sp.add_argument("--new_tokens", type=int, default=default("new_tokens"))
            sp.add_argument("--repeats", type=int, default=default("repeats"), help="best of, interleaved")
    return p


def main(args: list[str] | None = None) -> Any:
    """The command line; ``args`` lets the tests run it in-process (importing litgpt takes ~10 s)."""
    kwargs = vars(parser().parse_args(args))
    return COMMANDS[kwargs.pop("command")](**kwargs)


if __name__ == "__main__":
    main()

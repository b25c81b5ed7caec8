"""``litgpt_ether serve``: one base model, many ETHER adapters, one batch.

Adapters are applied to activations, so the base weights are shared by every request: each reflected side of each
layer holds the unit vectors of *every* adapter in one table (row 0: no adapter, zeros, ``H = I``), and each row of
a batch gathers its own. A batch that mixes adapters is one forward pass through the base model, with the same
reflection math as training (``litgpt_ether.ether.reflect`` with per-row units).

The HTTP side is LitServe's OpenAI spec (``/v1/chat/completions``, streaming) with ``/v1/models`` added; requests
are batched by LitServe whatever adapters they name, and decoded together with a KV cache per row.
"""

import json
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from pprint import pformat
from typing import Any, Literal

import lightning as L
import litgpt.config
import litgpt.model
import torch
import torch.nn as nn
import torch.nn.functional as F
from litgpt.generate.base import sample
from litgpt.prompts import PromptStyle
from litgpt.tokenizer import Tokenizer

from litgpt_ether.checkpoint import (
    MODEL_FILE,
    check_adapter_fits,
    check_checkpoint_dir,
    load_adapter,
    load_tokenizer,
    model_from_checkpoint,
    read_model_config,
    read_prompt_style,
    resolve,
)
from litgpt_ether.checks import (
    ConfigError,
    InferenceQuantize,
    check_devices,
    check_number,
    check_numbers,
    check_temperature,
    compute_dtype,
    quantization,
    require_extra,
)
from litgpt_ether.ether import (
    GPT,
    Config,
    ETHERLayer,
    ETHERQKVLinear,
    fused_kernels,
    reflect,
    unit_vectors,
)
from litgpt_ether.generate import check_fits

try:  # the `serve` extra; without it the verb stops with one line naming the extra
    from fastapi import BackgroundTasks, HTTPException
    from fastapi.responses import JSONResponse
    from litserve import LitAPI, OpenAISpec
    from litserve.specs.openai import ChatCompletionRequest
    from litserve.utils import LitAPIStatus
except ImportError:
    LitAPI = OpenAISpec = object
    BackgroundTasks = ChatCompletionRequest = HTTPException = JSONResponse = LitAPIStatus = Any

BASE = "base"  # the model name that asks for no adapter
HOSTS = ("127.0.0.1", "0.0.0.0", "::")


# --------------------------------------------------------------------------------------------------
# The model: every adapter's vectors in one table per reflected side.


class Rows:
    """Which adapter (table row) each row of the batch uses; shared by every table of a served model.

    ``version`` changes with ``index``, so tables gather their rows once per batch composition, not once per step.
    """

    def __init__(self) -> None:
        self.set(torch.zeros(1, dtype=torch.long))

    def set(self, index: torch.Tensor) -> None:
        self.index, self.version = index, object()


class AdapterTable(nn.Module):
    """One reflected side's unit vectors for every served adapter, ``(adapters + 1, n, j, k)``; row 0 is zeros.

    Stands in for a ``Reflection`` in the ETHER layers (same ``units`` / ``coefs`` / ``forward``), so their forward
    passes run unchanged: ``units`` returns ``(B, 1, n, j, k)``, one set per batch row, which ``reflect`` broadcasts
    over the row's tokens. ETHER (``I - 2 û ûᵀ``) and ETHER+ (``I - û ûᵀ + v̂ v̂ᵀ``) share a table as ``(√2 û, 0)``
    and ``(û, v̂)`` with the coefficients ``(-1, 1)``; a table of ETHER adapters alone keeps ``(-2,)`` and one vector.
    """

    def __init__(self, table: torch.Tensor, coefs: tuple[float, ...], rows: Rows) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.coefs = coefs
        self.rows = rows

    def units(self, dtype: torch.dtype) -> torch.Tensor:
        key = (self.rows.version, dtype)
        if getattr(self, "_gathered", (None,))[0] != key:
            self._gathered = (key, self.table[self.rows.index].to(dtype)[:, None])
        return self._gathered[1]

    def forward(self, z: torch.Tensor, transpose: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Each batch row's ``z @ H`` (then ``+ bias``): one fused kernel (``LITGPT_ETHER_KERNELS=triton``) driven by
        the rows' adapter index, or the torch path."""
        if (kernels := fused_kernels(z)) is not None:
            return kernels.reflect_rows(z, self.table, self.rows.index, bias, list(self.coefs))
        z = reflect(z, self.units(z.dtype), self.coefs)
        return z if bias is None else z + bias

    def reflect_(self, z: torch.Tensor) -> None:
        """In place (a slice of a fused output); the torch path writes the reflected copy back."""
        if (kernels := fused_kernels(z)) is not None:
            kernels.reflect_rows_(z, self.table, self.rows.index, list(self.coefs))
        else:
            z.copy_(reflect(z, self.units(z.dtype), self.coefs))


def _spanning(tables: nn.ModuleDict) -> AdapterTable:
    """One table for a fused QKV's ``[q | k | v]`` from its segments' tables, zeros (``H = I``) where one is absent."""
    first = next(iter(tables.values()))
    zeros = torch.zeros_like(first.table)
    return AdapterTable(torch.cat([tables[s].table if s in tables else zeros for s in "qkv"], dim=1), first.coefs,
                        first.rows)  # fmt: skip


class ServedQKV(ETHERQKVLinear):
    """The fused QKV with per-row input reflections: each targeted segment multiplies its own reflected input.

    Training folds the input sides into one matmul plus a low-rank correction built from ``W_s w`` (``O(f·d)`` per set
    of vectors, cheap when shared by the batch); with a set per row that would cost as much as the matmul again, so
    the served layer reflects the input per segment instead: three matmuls that together are the fused one. A
    quantized weight cannot be sliced and keeps the low-rank path.

    Output side: where q, k and v are the same size (not GQA), one table spans the whole output (``fuse_outputs``)
    and q, k and v reflect in one pass: three operations per vector for the layer instead of three per segment
    plus a copy back into the output. Each is a kernel launch on a GPU, where eager decoding is bound by issuing
    them.
    """

    def fuse_outputs(self) -> None:
        """Replace the output segments' tables by one for ``[q | k | v]``, ``out_rows``; an untargeted segment's
        vectors are zero (``H = I``). Not for unequal segments, nor with a quantized weight and input reflections
        (the low-rank path reflects outputs by segment): ``out_rows`` is None there. The input sides get one such
        table too, ``in_rows``, for the fused kernels; their per-segment tables stay for the torch path."""
        # instance attributes: class ones would hide the submodules
        self.out_rows: AdapterTable | None = None
        self.in_rows: AdapterTable | None = None
        quantized_inputs = self.ether_in is not None and not self.weight.dtype.is_floating_point
        if len(set(self.sizes)) > 1 or quantized_inputs:
            return
        self.out_rows = _spanning(self.ether_out)
        self.ether_out = None  # its tables live on in ``out_rows``: not twice in memory
        if self.ether_in is not None:
            self.in_rows = _spanning(self.ether_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ether_in is not None and not self.weight.dtype.is_floating_point:
            return super().forward(x)  # the low-rank path
        if self.in_rows is not None and (kernels := fused_kernels(x)) is not None:
            # both sides and equal segments: three launches, the inputs reflected into a stack, one batched matmul,
            # the outputs reflected back side by side with the bias
            index, coefs = self.out_rows.rows.index, list(self.out_rows.coefs)
            stacked = kernels.reflect_rows_stacked(x.reshape(-1, x.shape[-1]), self.in_rows.table, index, coefs)
            z = torch.bmm(stacked, self.weight.view(3, -1, x.shape[-1]).mT)
            y = kernels.reflect_rows_unstacked(z, self.out_rows.table, index, self.bias, coefs)
            return y.view(*x.shape[:-1], y.shape[-1])
        if self.ether_in is None:
            z = self.project(x, bias=False)
        else:
            targeted = dict(self.segments)
            z = torch.cat([F.linear(self.ether_in[targeted[i]](x) if i in targeted else x, self.weight[a:b])
                           for i, (a, b) in enumerate(self.bounds)], dim=-1)  # fmt: skip
        if self.out_rows is not None:
            return self.out_rows(z, bias=self.bias)
        for i, segment in self.segments:  # unequal segments (GQA): one table each, in place
            a, b = self.bounds[i]
            self.ether_out[segment].reflect_(z[..., a:b])
        return z if self.bias is None else z + self.bias


@dataclass
class Adapter:
    """A served adapter: its name, where it came from, its ETHER options and the prompt style it was tuned with."""

    name: str
    path: Path
    ether_args: dict[str, Any]
    state: dict[str, torch.Tensor] = field(repr=False)
    prompt_style: PromptStyle


def parse_adapters(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """``name=path`` pairs: names unique, not ``base``, not empty."""
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--adapters takes name=path pairs, got {spec!r}")
        if name == BASE:
            raise ConfigError(f"adapter name {BASE!r} is reserved for the base model without an adapter")
        if name in (n for n, _ in pairs):
            raise ConfigError(f"adapter name {name!r} is given twice")
        pairs.append((name, Path(path)))
    return pairs


def load_adapter_for(base_dir: Path, name: str, path: Path) -> Adapter:
    """One adapter, checked: an ETHER or ETHER+ adapter (file or directory) that fits the base model."""
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist")
    resolved = resolve(path, base_checkpoint_dir=base_dir, prefer_adapter=True)
    if resolved.adapter is None:
        raise ConfigError(f"{str(path)!r} holds no ETHER adapter (lit_model.pth.ether)")
    state, ether_args = load_adapter(resolved.adapter)
    method = ether_args.get("ether_method", "ether")
    if method not in ("ether", "etherplus"):
        raise ConfigError(
            f"ether_method {method}: serve batches ETHER and ETHER+ adapters; merge it (litgpt_ether merge) and"
            " serve the merged checkpoint on its own"
        )
    base_config = read_model_config(base_dir / "model_config.yaml")
    config = read_model_config(base_dir / "model_config.yaml", ether_args)
    with torch.device("meta"):
        check_adapter_fits(GPT(config), state, resolved)
    tuned_on = resolved.files_dir / "model_config.yaml"
    if tuned_on.is_file() and read_model_config(tuned_on).name != base_config.name:
        raise ConfigError(f"was tuned on another model than {base_config.name!r} ({tuned_on})")
    return Adapter(name, path, config.ether_args(), state, read_prompt_style(resolved.files_dir, base_config))


def load_adapters(base_dir: Path, specs: Sequence[str]) -> list[Adapter]:
    """Read and check every adapter before anything is built; an error names the adapter."""
    adapters = []
    for name, path in parse_adapters(specs):
        try:
            adapters.append(load_adapter_for(base_dir, name, path))
        except ConfigError as err:
            raise ConfigError(f"adapter {name!r}: {err}") from None
    if not adapters:
        raise ConfigError("no adapters given: --adapters name=path [name=path ...]")
    return adapters


def _union_config(base_dir: Path, adapters: Sequence[Adapter]) -> Config:
    """Every target of any adapter, both sides wherever any adapter is two-sided (unused sides are dropped later),
    and the block count that divides every adapter's (their greatest common divisor)."""
    args = [a.ether_args for a in adapters]
    targets = ("query", "key", "value", "projection", "mlp", "head")
    plus = any(a["ether_method"] == "etherplus" for a in args)
    two_sided = any(a["ether_method"] == "etherplus" and not a["ether_one_sided"] for a in args)
    return Config.from_file(
        base_dir / "model_config.yaml",
        ether_method="etherplus" if plus else "ether",
        ether_one_sided=not two_sided,
        ether_nb=math.gcd(*(a["ether_nb"] for a in args)),
        ether_flip_side=False,
        **{f"ether_{t}": any(a[f"ether_{t}"] for a in args) for t in targets},
    )


def _units_of(state: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    """The adapter's unit vectors at ``key`` (``...ether_in``), ``(n, j, k)``, normalised exactly as in training;
    None if the adapter does not reflect there."""
    if f"{key}.u" not in state:
        return None
    return unit_vectors(state[f"{key}.u"], state.get(f"{key}.v")).float()


def _in_blocks(units: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """``(n, j, k)`` units as ``(n_blocks, (n / n_blocks) * j, size / n_blocks)``: each small block's vectors, zero
    outside it, among its big block's. Disjoint blocks' reflections commute and add up, so ``H`` is unchanged."""
    n, j, k = units.shape
    r = n // n_blocks
    grouped = units.reshape(n_blocks, r, j, k)
    out = units.new_zeros(n_blocks, r, j, r, k)
    for s in range(r):
        out[:, s, :, s] = grouped[:, s]
    return out.reshape(n_blocks, r * j, r * k)


def _table(
    adapters: Sequence[Adapter], key: str, size: int, n_blocks: int, plus: bool, vectors: int
) -> tuple[torch.Tensor, bool]:
    """The stacked units of every adapter at ``key`` (zeros for the base row and adapters without it), in the
    server's layout, and whether any adapter reflects there.

    Layout: ``n_blocks`` blocks (dividing every adapter's count); per block, pairs ``(-1, +1)`` of vectors when any
    adapter is ETHER+ (an ETHER vector becomes ``(√2 û, 0)``: ``I - 2ûûᵀ = I - (√2û)(√2û)ᵀ``), single ``-2``
    vectors otherwise; ``vectors`` per block (as many as the adapter with the most blocks needs), zeros for the others.
    """
    table = torch.zeros(len(adapters) + 1, n_blocks, vectors, size // n_blocks)
    found = False
    for row, adapter in enumerate(adapters, start=1):
        units = _units_of(adapter.state, key)
        if units is None:
            continue
        if plus and units.shape[1] == 1:
            units = torch.cat([units * 2**0.5, torch.zeros_like(units)], dim=1)
        units = _in_blocks(units, n_blocks)
        table[row, :, : units.shape[1]], found = units, True
    return table, found


def build_model(base_dir: Path, adapters: Sequence[Adapter], rows: Rows) -> GPT:
    """The base model (weights memory-mapped: ``model_from_checkpoint``) with an ``AdapterTable`` on every reflected
    side.

    A side that no adapter reflects is dropped (it would cost an identity pass), except the fused QKV's output
    segments, which its forward expects.
    """
    config = _union_config(base_dir, adapters)
    model = model_from_checkpoint(config, base_dir / MODEL_FILE)
    slots = max(a.ether_args["ether_nb"] for a in adapters) // config.ether_nb
    coefs = (-1.0, 1.0) * slots if config.ether_plus else (-2.0,) * slots
    table = partial(_table, adapters, n_blocks=config.ether_nb, plus=config.ether_plus, vectors=len(coefs))
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, ETHERLayer)]:
        for side in ("ether_in", "ether_out"):
            sides = getattr(layer, side)
            if sides is None:
                continue
            if isinstance(sides, nn.ModuleDict):  # the fused QKV: one per targeted segment
                used = []
                for segment, reflection in list(sides.items()):
                    units, found = table(f"{name}.{side}.{segment}", reflection.u.numel())
                    sides[segment] = AdapterTable(units, coefs, rows)
                    used.append(found)
                if side == "ether_in" and not any(used):
                    layer.ether_in = None
                layer.__class__ = ServedQKV  # same state, the serving forward
                if side == "ether_out":
                    layer.fuse_outputs()
            else:
                units, found = table(f"{name}.{side}", sides.u.numel())
                setattr(layer, side, AdapterTable(units, coefs, rows) if found else None)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Decoding: one batch of requests, each with its own adapter, prompt length, limits and sampling.


@dataclass
class Request:
    """One completion to decode: the adapter's table row, the encoded prompt (prompt style applied) and limits."""

    row: int
    prompt: torch.Tensor
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    stop_tokens: tuple[list[int], ...]


class RowsKVCache(litgpt.model.KVCache):
    """litgpt's KV cache, writing a batch whose rows sit at different positions with one indexed assignment per buffer.

    litgpt writes such a batch row by row, a Python loop of ``index_copy_``: 2·B small operations per layer and
    decoding step (on a GPU, as many kernel launches), for the merged model as much as for the mixed one. Here a k
    and v write of 64 rows ran 3-13x faster on a 2-core CPU (docs/benchmarks.md). ``decode`` turns the caches litgpt
    builds into this class, which adds no state.
    """

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_pos.dim() == 1 or self.is_sliding_window:  # one position for all rows, or a ring buffer: litgpt's
            return super().forward(input_pos, k, v)
        self.k, self.v = self.k.to(k.dtype), self.v.to(v.dtype)  # the buffers follow the activations, as litgpt's
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # against input_pos (rows, T): each row's own
        k_all, v_all = self.k[: k.shape[0]], self.v[: v.shape[0]]
        k_all[rows, :, input_pos] = k.transpose(1, 2)  # indices around a slice index (rows, T, groups, size)
        v_all[rows, :, input_pos] = v.transpose(1, 2)
        return k_all, v_all


def _held_back(tokens: list[int], stops: tuple[list[int], ...]) -> int:
    """How many trailing tokens could still be the start of a stop sequence (not yet safe to send)."""
    return max((n for s in stops for n in range(1, len(s)) if tokens[-n:] == s[:n]), default=0)


def _ended_by(tokens: list[int], stops: tuple[list[int], ...]) -> int:
    """The length of the stop sequence ``tokens`` ends with, or 0."""
    return next((len(s) for s in stops if s and tokens[-len(s) :] == s), 0)


class RowFailed(RuntimeError):
    """A request that cannot go on (its logits became NaN or infinite): it ends alone, the batch goes on."""


def _failure(logits: torch.Tensor, request: Request, token: int) -> RowFailed:
    """What ended a row: its logits, or (finite logits) its temperature, which divides them past the dtype's range."""
    message = f"this request's logits became non-finite (NaN or inf) at token {token}"
    if bool(torch.isfinite(logits).all()):
        message += (f" once divided by its temperature {request.temperature:g}, which overflows them: use a larger"
                    " temperature, or 0 for greedy decoding")  # fmt: skip
    return RowFailed(message)


@torch.inference_mode()
def decode(model: GPT, rows: Rows, requests: Sequence[Request]) -> Iterator[list[list[int] | RowFailed]]:
    """Decode every request together; after each step, yield per request the tokens it may now send (often none),
    or the ``RowFailed`` that ends it.

    Prompts are right-padded into one prefill: a row's padding sits after its prompt, so the causal mask hides it,
    and each row's first generated token overwrites its cache at the padding's first position before any query
    can see it. Then every active row decodes one token per step at its own position. Rows finish independently
    (stop sequence, as ``litgpt generate``: never sent; or ``max_new_tokens``) and leave the batch, their cache
    rows with them. A request's tokens equal those of a batch of one.

    A row whose logits, divided by its temperature, are not all finite would make sampling raise (``multinomial``)
    for the whole batch: it fails alone instead, before sampling, and leaves the batch as a finished row does.
    """
    device = model.transformer.wte.weight.device
    lengths = [r.prompt.numel() for r in requests]
    model.max_seq_length = max(n + r.max_new_tokens for n, r in zip(lengths, requests))
    model.set_kv_cache(batch_size=len(requests), device=device)
    for block in model.transformer.h:
        block.attn.kv_cache.__class__ = RowsKVCache
    prompts = torch.zeros(len(requests), max(lengths), dtype=torch.long, device=device)
    for i, r in enumerate(requests):
        prompts[i, : lengths[i]] = r.prompt
    rows.set(torch.tensor([r.row for r in requests], device=device))
    logits = model(prompts, torch.arange(prompts.shape[1], device=device), input_pos_maxp1=prompts.shape[1])
    logits = logits[torch.arange(len(requests), device=device), torch.tensor(lengths, device=device) - 1]

    active = list(range(len(requests)))  # request index of each batch row
    positions = torch.tensor(lengths, device=device)[:, None]
    # what sampling divides each row's logits by (greedy rows: 1), in their dtype, as litgpt's ``sample`` does
    scales = torch.tensor([r.temperature if r.temperature > 0 and r.top_p > 0 else 1.0 for r in requests],
                          dtype=logits.dtype, device=device)  # fmt: skip
    generated: list[list[int]] = [[] for _ in requests]
    sent = [0] * len(requests)
    while active:
        news: list[list[int] | RowFailed] = [[] for _ in requests]
        keep = []
        # greedy rows' tokens (litgpt's ``sample`` with temperature or top_p 0) and every row's check, in one copy
        finite = torch.isfinite(logits / scales[:, None]).all(-1)
        picked, sound = torch.stack([logits.argmax(-1), finite.long()]).tolist()
        for b, i in enumerate(active):
            r = requests[i]
            if not sound[b]:
                news[i] = _failure(logits[b], r, len(generated[i]) + 1)
                continue
            if r.temperature > 0 and r.top_p > 0:
                picked[b] = int(sample(logits[b][None, None], r.temperature, r.top_k, r.top_p))
            tokens = generated[i]
            tokens.append(picked[b])
            stop = _ended_by(tokens, r.stop_tokens)
            done = stop > 0 or len(tokens) == r.max_new_tokens
            ready = len(tokens) - stop if done else len(tokens) - _held_back(tokens, r.stop_tokens)
            news[i], sent[i] = tokens[sent[i] : ready], max(sent[i], ready)
            if not done:
                keep.append(b)
        yield news
        if len(keep) < len(active):  # finished rows leave the batch
            index = torch.tensor(keep, dtype=torch.long, device=device)
            for block in model.transformer.h:
                cache = block.attn.kv_cache
                cache.k, cache.v = cache.k[index], cache.v[index]
            rows.set(rows.index[index])
            positions, scales = positions[index], scales[index]
            active = [active[b] for b in keep]
        if not active:
            break
        x = torch.tensor([[generated[i][-1]] for i in active], device=device)
        logits = model(x, positions, input_pos_maxp1=int(positions.max()) + 1)[:, -1]
        positions = positions + 1
    model.clear_kv_cache()


# --------------------------------------------------------------------------------------------------
# Requests: checked in the HTTP process, before they are queued, so a bad one never spoils the batch it would join.


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """An OpenAI error response's body: what OpenAI clients parse into their exception."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class RequestError(ValueError):
    """A request the server refuses, with its HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return error_body(str(self), kind, self.param, self.code)


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts (images and audio are refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = [p for p in content if getattr(p, "type", None) != "text"]
    if parts:
        raise RequestError(400, f"only text content is supported, got a {parts[0].type!r} part", "messages")
    return "".join(p.text for p in content)


@dataclass
class Options:
    """What the server needs to turn a chat request into a ``Request``: picklable, shared by both processes."""

    names: list[str]  # table rows 1..: adapter names; row 0 is ``base``
    prompt_styles: dict[str, PromptStyle]
    tokenizer: Tokenizer
    block_size: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    dtype: torch.dtype  # the logits' (``compute_dtype``): what a temperature must not overflow

    def request(self, chat: Any) -> Request:
        """The ``Request`` for an OpenAI ``ChatCompletionRequest``, or a ``RequestError`` saying what is wrong.

        The last message is the prompt (a user message), wrapped in the adapter's prompt style, with the system
        messages as its system prompt; earlier turns are not part of it (as in ``litgpt_ether chat``). Sampling
        options the request leaves out (or sets to null) take the server's defaults.
        """
        if chat.model not in self.prompt_styles:
            known = ", ".join(repr(n) for n in [BASE, *self.names])
            raise RequestError(
                404, f"unknown model {chat.model!r}: this server has {known}", "model", "model_not_found"
            )
        if not chat.messages or chat.messages[-1].role != "user":
            raise RequestError(400, "the last message must be the user's prompt", "messages")
        if chat.stop:
            raise RequestError(
                400, "stop sequences are not supported: the prompt style's own stop tokens apply", "stop"
            )
        given = {f for f in chat.model_fields_set if getattr(chat, f) is not None}  # null: the server's default
        asked = [f for f in ("max_completion_tokens", "max_tokens") if getattr(chat, f) is not None]  # 0 included
        values = {
            "max_new_tokens": getattr(chat, asked[0]) if asked else self.max_new_tokens,
            "temperature": chat.temperature if "temperature" in given else self.temperature,
            "top_p": chat.top_p if "top_p" in given else self.top_p,
        }
        for name, value in values.items():
            try:
                check_number(name, value)
            except ConfigError as err:
                field = asked[0] if name == "max_new_tokens" and asked else name  # the request's own name for it
                raise RequestError(400, str(err).replace(name, field, 1), field) from None
        try:
            check_temperature(values["temperature"], self.dtype)
        except ConfigError as err:
            raise RequestError(400, str(err), "temperature") from None
        system = "\n".join(_text(m.content) for m in chat.messages if m.role == "system") or None
        style = self.prompt_styles[chat.model]
        prompt = self.tokenizer.encode(style.apply(_text(chat.messages[-1].content), sys_prompt=system))
        try:
            check_fits(prompt.numel(), values["max_new_tokens"], self.block_size)
        except ConfigError as err:
            raise RequestError(400, str(err).replace("--max_new_tokens", "max_tokens"), "messages") from None
        row = 0 if chat.model == BASE else self.names.index(chat.model) + 1
        return Request(row, prompt, values["max_new_tokens"], values["temperature"], self.top_k, values["top_p"],
                       style.stop_tokens(self.tokenizer))  # fmt: skip


async def _failing(pipe: AsyncIterator[tuple[Any, Any]]) -> AsyncIterator[tuple[Any, Any]]:
    """A request's responses, where one that carries an ``error`` (``AdapterAPI.predict``: the request failed alone,
    its batch went on) becomes LitServe's own error status, and ends it."""
    async for response, status in pipe:
        if status == LitAPIStatus.OK and "error" in (message := json.loads(response)):
            yield HTTPException(500, message["error"]), LitAPIStatus.ERROR
            return
        yield response, status


class _NoTraceback(logging.Filter):
    """Logs a failed request (an ``HTTPException``, the client's answer) in one line: its traceback would only show
    LitServe's streaming code."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HTTPException):
            record.exc_info = record.exc_text = None
        return True


class AdapterSpec(OpenAISpec):
    """LitServe's OpenAI spec, checking each request before it is queued and listing the models at ``/v1/models``.

    Also ends each streamed error event with a blank line, as SSE requires (LitServe 0.2.19 does not, and clients
    then read an error as an empty, successful stream), and answers a request that failed while its batch went on
    with an OpenAI error: a 500, or a streamed error event in place of the stream's end.
    """

    def __init__(self, options: Options) -> None:
        super().__init__()
        self.options = options

    def pre_setup(self, lit_api: Any) -> None:
        super().pre_setup(lit_api)
        self.add_endpoint("/v1/models", self.list_models, ["GET"])
        logging.getLogger(OpenAISpec.__module__).addFilter(_NoTraceback())  # before LitServe forks the HTTP process

    async def list_models(self) -> dict[str, Any]:
        names = [BASE, *self.options.names]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "litgpt-ether"} for n in names]}

    async def get_from_queues(self, uids: list[Any]) -> list[AsyncIterator[tuple[Any, Any]]]:
        return [_failing(pipe) for pipe in await super().get_from_queues(uids)]

    async def chat_completion(self, request: ChatCompletionRequest, background_tasks: BackgroundTasks) -> Any:
        # FastAPI reads the request body's schema from these annotations
        try:
            self.options.request(request)
        except RequestError as err:
            return JSONResponse(status_code=err.status, content=err.body())
        try:
            return await super().chat_completion(request, background_tasks)
        except HTTPException as err:  # not streamed (a stream ends in an error event); FastAPI's body is no OpenAI one
            return JSONResponse(status_code=err.status_code, content=error_body(err.detail, "server_error"))

    async def streaming_completion(self, request: ChatCompletionRequest, pipe_responses: list) -> Any:
        async for line in super().streaming_completion(request, pipe_responses):
            yield line if line.endswith("\n\n") else line + "\n\n"


class AdapterAPI(LitAPI):
    """Loads the base model and the adapter tables in the inference worker; decodes each batch together.

    Constructed in the main process and pickled into the worker (LitServe spawns it): paths and options only.
    """

    def __init__(self, base_dir: Path, adapters: list[str], options: Options, precision: str | None,
                 quantize: str | None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.base_dir, self.adapter_specs, self.options = base_dir, adapters, options
        self.precision, self.quantize = precision, quantize

    def setup(self, device: str) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: ``stop_quietly``
        precision, plugins = quantization(self.quantize, self.precision, training=False)
        accelerator, _, index = device.partition(":")
        fabric = L.Fabric(accelerator=accelerator, devices=[int(index)] if index else 1, precision=precision,
                          plugins=plugins)  # fmt: skip
        self.rows = Rows()
        model = build_model(self.base_dir, load_adapters(self.base_dir, self.adapter_specs), self.rows)
        self.model = fabric.setup_module(model)

    def decode_request(self, request: ChatCompletionRequest) -> Request:
        return self.options.request(request)

    def predict(self, inputs: Any) -> Iterator[Any]:
        """Per step, each request's new text (None when it has none: finished, failed, or mid-character), then its
        usage. A request that failed gets a message with an ``error`` once (``AdapterSpec`` answers it with that)."""
        batched = isinstance(inputs, list)
        requests = inputs if batched else [inputs]
        tokens: list[list[int]] = [[] for _ in requests]
        texts = [""] * len(requests)
        for news in decode(self.model, self.rows, requests):
            deltas: list[str | dict[str, str] | None] = []
            for i, new in enumerate(news):
                if isinstance(new, RowFailed):  # a message LitServe's OpenAI spec passes on whole
                    deltas.append({"role": "assistant", "content": "", "error": str(new)})
                    continue
                tokens[i] += new
                text = self.options.tokenizer.decode(torch.tensor(tokens[i], dtype=torch.long)) if new else texts[i]
                ready = text.startswith(texts[i]) and not text.endswith("\ufffd")  # whole characters only
                deltas.append(text[len(texts[i]) :] if ready and text != texts[i] else None)
                texts[i] = text if ready else texts[i]
            yield deltas if batched else deltas[0]
        usage = [{"role": "assistant", "content": "", "prompt_tokens": r.prompt.numel(),
                  "completion_tokens": len(t), "total_tokens": r.prompt.numel() + len(t)}
                 for r, t in zip(requests, tokens)]  # fmt: skip
        yield usage if batched else usage[0]

    def encode_response(self, outputs: Iterator[Any]) -> Iterator[Any]:
        for out in outputs:
            batch = out if isinstance(out, list) else [out]
            messages = [o if isinstance(o, dict) else {"role": "assistant", "content": o} for o in batch]
            yield messages if isinstance(out, list) else messages[0]


# --------------------------------------------------------------------------------------------------
# The verb.


def port_free(host: str, port: int) -> None:
    """Refuse an address LitServe cannot listen on, or a port something else listens on, before the model loads.

    Binds as uvicorn does, with SO_REUSEADDR: a server stopped a moment ago leaves its connections in TIME_WAIT for
    a minute, which would refuse a restart on the same port although uvicorn could listen there.
    """
    if host not in HOSTS:
        raise ConfigError(f"--host must be one of {', '.join(HOSTS)} (what LitServe listens on), got {host!r}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}): choose another --port") from None


def stop_quietly() -> None:
    """Ctrl-C, ``kill``, ``docker stop`` and systemd (SIGINT or SIGTERM, to the main process or to all of them) stop
    the server in order, without a traceback from any process.

    The main process turns either signal into KeyboardInterrupt, on which LitServe stops the processes it started
    (on SIGTERM they would outlive it, one of them polling a CPU core). Those it forks, uvicorn's HTTP process and
    multiprocessing's manager, inherit this handler and ignore the signal: uvicorn has its own while it serves, and
    the manager must outlive the inference worker that reads from it, which the main process ends first. The
    worker is spawned and ignores SIGINT (``AdapterAPI.setup``), since Ctrl-C reaches the whole process group.
    """
    main_pid, stopping = os.getpid(), []

    def interrupt(signum: int, frame: Any) -> None:
        if os.getpid() == main_pid and not stopping:  # once: GNU timeout signals the process, then its group
            stopping.append(signum)
            raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)


def main(
    checkpoint_dir: Path,
    *,
    adapters: list[str],
    precision: str | None = None,
    quantize: InferenceQuantize | None = None,
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
    devices: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    batch_timeout: float = 0.05,
    max_new_tokens: int = 50,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float = 1.0,
) -> None:
    """Serve one base model and many ETHER adapters behind an OpenAI-compatible API, batching across adapters.

    ``POST /v1/chat/completions`` (streaming or not): ``model`` names an adapter, or ``base`` for none; the last
    message is the prompt, in that adapter's prompt style. ``GET /v1/models`` lists them. Requests are batched
    (up to ``max_batch_size``, waiting at most ``batch_timeout`` seconds for a batch to fill) whatever adapters they
    name, and a batch is decoded together at the cost of the base model.

    Arguments:
        checkpoint_dir: The base model's litgpt checkpoint directory.
        adapters: ``name=path`` pairs; a path is a finetune ``out_dir``, its ``final/`` or ``step-*`` directory, or
            a ``lit_model.pth.ether`` file. ETHER and ETHER+ adapters of this base model, any targets and block
            counts (mixing block counts costs more per token: see the README).
        precision: Fabric precision ("bf16-true", "32-true", ...). Defaults to the best the device supports.
        quantize: Quantize the base weights with bitsandbytes (litgpt's choices; needs CUDA).
        accelerator: Where the model runs.
        devices: One server worker, with its own copy of the model, per device.
        host: The address to listen on: 127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface).
        port: The port to listen on.
        max_batch_size: The most requests decoded together.
        batch_timeout: Seconds a batch waits to fill before it starts.
        max_new_tokens: Tokens per completion when a request sets no ``max_tokens``.
        temperature: Sampling temperature when a request sets none (0: greedy).
        top_k: Sample among the ``top_k`` most probable tokens only (None: all).
        top_p: Nucleus sampling threshold when a request sets none.
    """
    print(pformat(locals()), file=sys.stderr)
    check_numbers(locals())
    require_extra("litserve", "serve", "litgpt_ether serve")
    from litserve import LitServer

    check_checkpoint_dir(checkpoint_dir)
    check_devices(accelerator, devices)
    # refused before anything loads: a quantization that cannot run, a temperature the logits' dtype cannot divide
    # by, a context with no room for a prompt
    dtype = compute_dtype(*quantization(quantize, precision, training=False, accelerator=accelerator))
    check_temperature(temperature, dtype)
    config = read_model_config(checkpoint_dir / "model_config.yaml")
    if max_new_tokens >= config.block_size:
        raise ConfigError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of"
                          f" {config.block_size} tokens: lower it")  # fmt: skip
    loaded = load_adapters(checkpoint_dir, adapters)
    port_free(host, port)
    styles = {BASE: read_prompt_style(checkpoint_dir, config), **{a.name: a.prompt_style for a in loaded}}
    options = Options([a.name for a in loaded], styles, load_tokenizer(checkpoint_dir), config.block_size,
                      max_new_tokens, temperature, top_k, top_p, dtype)  # fmt: skip
    batching = {"max_batch_size": max_batch_size, "batch_timeout": batch_timeout if max_batch_size > 1 else 0.0}
    api = AdapterAPI(checkpoint_dir, adapters, options, precision, quantize, spec=AdapterSpec(options), **batching)
    server = LitServer(api, accelerator=accelerator, devices=devices, workers_per_device=1, timeout=False)
    for a in loaded:
        print(f"adapter {a.name!r}: {a.ether_args['ether_method']}, n = {a.ether_args['ether_nb']} ({a.path})",
              file=sys.stderr)  # fmt: skip
    print(f"Serving {checkpoint_dir} and {len(loaded)} adapters at http://{host}:{port}/v1", file=sys.stderr)
    stop_quietly()
    server.run(host=host, port=port, num_api_servers=1, generate_client_file=False, log_level="warning")

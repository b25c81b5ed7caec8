"""``litgpt_ether serve``: one base model, many ETHER adapters, one batch.

Adapters are applied to activations, so the base weights are shared by every request: each reflected side of each
layer holds the unit vectors of *every* adapter in one table (row 0: no adapter, zeros, ``H = I``), and each row of
a batch gathers its own. A batch that mixes adapters is one forward pass through the base model, with the same
reflection math as training (``litgpt_ether.ether.reflect`` with per-row units).

The HTTP side is LitServe's OpenAI spec (``/v1/chat/completions``, streaming) with ``/v1/models`` added; requests
are batched by LitServe whatever adapters they name, and decoded together with a KV cache per row.
"""

import math
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from pprint import pformat
from typing import Any, Literal

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from litgpt.prompts import PromptStyle

from litgpt_ether.checkpoint import (
    MODEL_FILE,
    check_adapter_fits,
    check_checkpoint_dir,
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
    check_numbers,
    check_temperature,
    compute_dtype,
    quantization,
    require_extra,
)
from litgpt_ether.engine import Engine, Rows
from litgpt_ether.ether import (
    GPT,
    Config,
    ETHERLayer,
    ETHERQKVLinear,
    fused_kernels,
    reflect,
    unit_vectors,
)
from litgpt_ether.openai_api import BASE, Cancel, Job, OpenAISpec, Options, ServeLoop, Stream

try:  # the `serve` extra; without it the verb stops with one line naming the extra
    from litserve import LitAPI
except ImportError:
    LitAPI = object

HOSTS = ("127.0.0.1", "0.0.0.0", "::")


# --------------------------------------------------------------------------------------------------
# The model: every adapter's vectors in one table per reflected side.


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
    state, ether_args = resolved.load()
    method = ether_args.get("ether_method", "ether")
    if method not in ("ether", "etherplus"):
        raise ConfigError(
            f"ether_method {method}: serve batches ETHER and ETHER+ adapters; merge it (litgpt_ether merge) and"
            " serve the merged checkpoint with `litgpt serve`"
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
# The inference worker: the model, the engine and a text stream per job


class AdapterAPI(LitAPI):
    """Loads the base model and the adapter tables in the inference worker and decodes every job in one continuously
    batched engine (``engine.Engine``); ``ServeLoop`` feeds it jobs and sends what each step gives.

    Constructed in the main process and pickled into the worker (LitServe spawns it): paths and options only.
    """

    def __init__(self, base_dir: Path, adapters: list[str], options: Options, precision: str | None,
                 quantize: str | None, continuous: bool = True, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(stream=True, loop=ServeLoop(), spec=OpenAISpec(options), **kwargs)
        self.base_dir, self.adapter_specs, self.options = base_dir, adapters, options
        self.precision, self.quantize, self.continuous = precision, quantize, continuous

    def setup(self, device: str) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: ``stop_quietly``
        precision, plugins = quantization(self.quantize, self.precision, training=False)
        accelerator, _, index = device.partition(":")
        fabric = L.Fabric(accelerator=accelerator, devices=[int(index)] if index else 1, precision=precision,
                          plugins=plugins)  # fmt: skip
        rows = Rows()
        model = fabric.setup_module(build_model(self.base_dir, load_adapters(self.base_dir, self.adapter_specs), rows))
        self.engine = Engine(model, rows, self.max_batch_size, self.options.context, self.continuous)
        self.streams: dict[str, Stream] = {}

    def add_request(self, uid: str, job: Job | Cancel) -> None:
        if isinstance(job, Cancel):
            self.engine.cancel(job.uid)
            self.streams.pop(job.uid, None)
            return
        self.streams[uid] = Stream(job, self.options.tokenizer)
        self.engine.add(uid, job.request)

    def has_capacity(self) -> bool:
        """Always: the engine queues what does not fit and admits it at the first step with a free slot (LitServe's
        loop would hold it back until its next read of the request queue, up to a second later)."""
        return True

    def has_active_requests(self) -> bool:
        return self.engine.has_work()

    def step(self) -> list[tuple[str, dict[str, Any], bool]]:
        """One engine step: ``(uid, output, finished)`` for every job with something to send."""
        outputs = []
        for event in self.engine.step():
            stream = self.streams.get(event.uid)
            if stream is None:  # cancelled while this step ran
                continue
            output, cancel = stream.update(event)
            if cancel:
                self.engine.cancel(event.uid)
            if stream.done:
                del self.streams[event.uid]
            if output is not None:
                outputs.append((event.uid, output, stream.done))
        return outputs

    def predict(self, x: Any) -> Any:  # LitServe requires it; ``step`` decodes
        raise NotImplementedError


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
    max_seq_length: int | None = None,
    batching: Literal["continuous", "static"] = "continuous",
    max_new_tokens: int = 50,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float = 1.0,
) -> None:
    """Serve one base model and many ETHER adapters behind an OpenAI-compatible API, batching across adapters.

    ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming or not): ``model`` names an adapter, or
    ``base`` for none; a chat's last message is the prompt, in that adapter's prompt style, a completion's prompt is
    raw text. ``GET /v1/models`` lists them; ``GET /metrics`` counts requests and tokens. Requests are decoded in one
    continuously batched engine whatever adapters they name: a request joins the running batch at its next step and
    leaves it as soon as it ends, and a batch costs one forward pass of the base model per token.

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
        max_batch_size: The most sequences decoded together (one per request and choice).
        max_seq_length: The most tokens of a prompt and its completion; the KV cache holds this many per sequence.
            Defaults to the model's context.
        batching: "continuous" (requests join and leave the running batch at every step) or "static" (a batch
            starts when the previous one has ended: for comparison).
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
    context = max_seq_length or config.block_size
    if context > config.block_size:
        raise ConfigError(f"--max_seq_length {context} is longer than the model's context ({config.block_size})")
    if max_new_tokens >= context:
        raise ConfigError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the context of"
                          f" {context} tokens: lower it")  # fmt: skip
    loaded = load_adapters(checkpoint_dir, adapters)
    port_free(host, port)
    styles = {BASE: read_prompt_style(checkpoint_dir, config), **{a.name: a.prompt_style for a in loaded}}
    options = Options([a.name for a in loaded], styles, load_tokenizer(checkpoint_dir), context,
                      config.padded_vocab_size, max_new_tokens, temperature, top_k, top_p, dtype,
                      max_batch_size)  # fmt: skip
    api = AdapterAPI(checkpoint_dir, adapters, options, precision, quantize, batching == "continuous",
                     max_batch_size=max_batch_size)  # fmt: skip
    server = LitServer(api, accelerator=accelerator, devices=devices, workers_per_device=1, timeout=False)
    for a in loaded:
        print(f"adapter {a.name!r}: {a.ether_args['ether_method']}, n = {a.ether_args['ether_nb']} ({a.path})",
              file=sys.stderr)  # fmt: skip
    print(f"Serving {checkpoint_dir} and {len(loaded)} adapters at http://{host}:{port}/v1", file=sys.stderr)
    stop_quietly()
    server.run(host=host, port=port, num_api_servers=1, generate_client_file=False, log_level="warning")

"""ETHER and ETHER+ for litgpt: the whole method in one module.

A targeted linear keeps its frozen weight ``W`` (out x in) and learns block-diagonal reflections
``H`` on one or both sides: ``W' = H_out W H_in``. The bias is never transformed.

- ETHER:  ``H = blockdiag(I - 2 û ûᵀ)``, a Householder reflection per block.
- ETHER+: ``H = blockdiag(I - û ûᵀ + v̂ v̂ᵀ)``, two hyperplanes that can cancel; ``v = -u`` at init,
  so ETHER+ starts exactly at the pretrained model.

Training never builds ``H`` or ``W'``: since every block is identity plus a rank-1 or rank-2 update,
the reflections are applied to activations at ``O(tokens x size)``. The same function, applied to
the rows or columns of ``W`` in fp32, merges an adapter for inference (``merge_ether``).

Sides, as in the reference code: every targeted linear except the fused QKV reflects its input
(``W' = W H``; ``ether_flip_side`` reflects the output instead). The fused QKV reflects the output of
each targeted q/k/v segment separately (``W'_s = H_s W_s``). Two-sided ETHER+ does both, with a
separate reflection per side (and per q/k/v segment on both sides of the QKV).
"""

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

import litgpt.model
import torch
import torch.nn as nn
import torch.nn.functional as F
from litgpt.config import Config as BaseConfig
from torch.distributed.tensor import DTensor, distribute_tensor
from typing_extensions import Self

from litgpt_ether.checks import ConfigError, check_number

# The methods, as ``ether_method`` (and ``finetune --ether_method``) names them: ETHER, ETHER+, and the paper's
# baselines OFT (orthogonal k x k blocks, Cayley) and Naive (unconstrained blocks ``I + R``)
EtherMethod = Literal["ether", "etherplus", "oft", "naive"]
# OFT and Naive learn ``n·k²`` numbers per side: past this block size a layer costs more than it is worth
MAX_MATRIX_BLOCK = 2048


@dataclass
class Config(BaseConfig):
    """litgpt's ``Config`` plus the ETHER options.

    Args:
        ether_method: "ether" (Householder reflections), "etherplus" (ETHER+, two-sided unless
            ``ether_one_sided``), or the paper's baselines "oft" (Cayley-orthogonal blocks) and "naive"
            (unconstrained blocks ``I + R``), on ETHER's sides.
        ether_one_sided: ETHER+ only: reflect one side, like ETHER, instead of both.
        ether_nb: number of diagonal blocks ``n``; must divide every reflected dimension.
        ether_flip_side: one-sided only: reflect the output side of non-QKV layers instead of the input.
        ether_dropout: dropout on the input of targeted layers.
        ether_*: which linears to reflect.
    """

    ether_method: EtherMethod = "ether"
    ether_one_sided: bool = False
    ether_nb: int = 1
    ether_flip_side: bool = False
    ether_dropout: float = 0.0
    ether_query: bool = False
    ether_key: bool = False
    ether_value: bool = False
    ether_projection: bool = False
    ether_mlp: bool = False
    ether_head: bool = False

    def __post_init__(self) -> None:
        """Refuse an unknown method and out-of-range numbers when the config is made, not when a layer is built."""
        super().__post_init__()
        if self.ether_method not in get_args(EtherMethod):
            choices = ", ".join(map(repr, get_args(EtherMethod)))
            raise ConfigError(f"ether_method must be one of {choices}, got {self.ether_method!r}")
        check_number("ether_nb", self.ether_nb)
        check_number("ether_dropout", self.ether_dropout)

    @property
    def ether_plus(self) -> bool:
        return self.ether_method == "etherplus"

    @property
    def ether_two_sided(self) -> bool:
        return self.ether_plus and not self.ether_one_sided

    @property
    def ether_matrix(self) -> bool:
        """OFT and Naive: a dense ``k x k`` matrix per block instead of vectors."""
        return self.ether_method in ("oft", "naive")

    @property
    def ether_qkv(self) -> tuple[bool, bool, bool]:
        return (self.ether_query, self.ether_key, self.ether_value)

    @classmethod
    def ether_field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name.startswith("ether_")]

    def ether_args(self) -> dict[str, Any]:
        """The ETHER fields alone: what an adapter file needs to rebuild the model with a base config."""
        return {name: getattr(self, name) for name in self.ether_field_names()}


# --------------------------------------------------------------------------------------------------
# The reflection math: one function for activations (training) and weights (merging).
#
# A side's reflection is given by ``units`` of shape ``(n, j, k)`` (``j`` unit vectors per block: 1 for ETHER,
# 2 for ETHER+) and one coefficient per vector: ``H = blockdiag_i(I + sum_j c_j w_ij w_ijᵀ)``. Stacking the
# vectors lets every pass over the activations serve all of them: two batched matmuls per side.
#
# ``units`` may carry leading dims, ``(..., n, j, k)``, that broadcast against ``z``'s: ``(B, 1, n, j, k)`` gives
# every row of a batch its own reflection (``litgpt_ether serve``, one adapter per request).


def _per_row(units: torch.Tensor, pattern: str) -> str:
    """The einsum ``pattern`` (written for shared ``(n, j, k)`` units) with a leading ``...`` on ``units`` when they
    carry batch dims; the shared form stays the plain pattern, which is the faster one on CPU."""
    if units.dim() == 3:
        return pattern
    inputs, output = pattern.split("->")
    a, b = inputs.split(",")
    return f"{a},...{b}->{output if output.startswith('...') else '...' + output}"


def _dots(z: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """``z_b · w_bj`` for every block ``b`` and vector ``j``: ``(..., n*k) -> (..., n, j)``."""
    n, _, k = units.shape[-3:]
    return torch.einsum(_per_row(units, "...nk,njk->...nj"), z.reshape(*z.shape[:-1], n, k), units)


_COEFS: dict[tuple[tuple[float, ...], torch.device, torch.dtype], torch.Tensor] = {}


def _scale(dots: torch.Tensor, coefs: tuple[float, ...]) -> torch.Tensor:
    """``dots * coefs`` over the last dim. ETHER+'s pair lives on the device once: a tensor made from Python numbers on
    CUDA is a host-to-device copy that synchronizes the stream, which at every call would stall the GPU's queue."""
    if len(coefs) == 1:
        return dots * coefs[0]
    key = (coefs, dots.device, dots.dtype)
    if key not in _COEFS:
        with torch.inference_mode(False):  # first made under inference mode, it could not be saved for a backward
            _COEFS[key] = torch.tensor(coefs, dtype=dots.dtype, device=dots.device)
    return dots * _COEFS[key]


def reflect(z: torch.Tensor, units: torch.Tensor, coefs: tuple[float, ...]) -> torch.Tensor:
    """Return ``z @ H`` over the last dim of ``z``.

    ``H`` is symmetric, so this is also ``H z`` for column vectors. All dot products use the original ``z``,
    which is what makes ETHER+'s two hyperplanes one matrix.
    """
    if units.dim() > 3:  # a set per batch row, (B, 1, n, j, k) against z (B, T, n*k): the same sums, elementwise
        return _reflect_rows(z, units[:, 0], coefs)
    n, j, k = units.shape
    scaled = _scale(_dots(z, units), coefs)  # (..., n, j)
    # one vector (ETHER): a broadcast outer product; a matmul with an inner size of 1 is much slower on CPU
    update = scaled * units[:, 0] if j == 1 else torch.einsum("...nj,njk->...nk", scaled, units)
    return (z.reshape(*z.shape[:-1], n, k) + update).reshape(z.shape)


def _reflect_rows(z: torch.Tensor, units: torch.Tensor, coefs: tuple[float, ...]) -> torch.Tensor:
    """``reflect`` for ``z`` of shape ``(B, T, n*k)`` and one set of ``units`` per row, ``(B, n, j, k)``.

    Elementwise, one vector at a time (multiply, sum, add the scaled vector): as batched matmuls these sums are
    ``B·n`` products of ``T x k`` by ``k x j``, too small for a matmul kernel (measured on a 2-core CPU at the demo's
    and Llama recipes' block shapes, prompts and decoding: 1.1-2.2x faster). The coefficients stay Python numbers:
    no tensor to copy to the device.
    """
    batch, tokens, _ = z.shape
    n, _, k = units.shape[-3:]
    blocks = z.reshape(batch, tokens, n, k)
    out = blocks
    for i, c in enumerate(coefs):
        w = units[:, None, :, i]  # (B, 1, n, k)
        out = torch.addcmul(out, (blocks * w).sum(-1, keepdim=True), w, value=c)
    return out.reshape(z.shape)


def _units_grad(z: torch.Tensor, g: torch.Tensor, units: torch.Tensor, coefs: tuple[float, ...]) -> torch.Tensor:
    """Gradient of ``sum(g * reflect(z))`` with respect to ``units``, summed over every leading dim of ``z``.

    Per block and vector: ``c_j sum_t [(z_t · w_j) g_t + (g_t · w_j) z_t]``.
    """
    n, _, k = units.shape
    z, g = z.reshape(-1, n * k), g.reshape(-1, n * k)
    zd, gd = _scale(_dots(z, units), coefs), _scale(_dots(g, units), coefs)  # (t, n, j)
    return torch.einsum("tnj,tnk->njk", zd, g.view(-1, n, k)) + torch.einsum("tnj,tnk->njk", gd, z.view(-1, n, k))


def weight_units(
    linear: nn.Module, rows: Sequence[tuple[int, int]], units: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``W_b w_bj`` for each pair of row range ``a:b`` of a linear's weight and ``(..., n, j, k)`` units:
    ``(..., b - a, n*j)``.

    A float weight is read once per pair (``O(f·d·j)`` per set of units). A quantized one (bitsandbytes) is only ever
    multiplied through its own layer, once for all pairs, with the block-padded vectors as a batch: never dequantized
    for ETHER's sake.
    """
    weight = linear.weight
    if weight.dtype.is_floating_point:
        return [torch.einsum(_per_row(u, "fnk,njk->fnj"), weight[a:b].reshape(b - a, u.shape[-3], u.shape[-1]), u)
                .flatten(-2) for (a, b), u in zip(rows, units)]  # fmt: skip
    padded = []
    for u in units:  # vector (b, j) in block b, zeros elsewhere: (..., n*j, n*k), flattened to rows
        n, j, k = u.shape[-3:]
        eye = torch.eye(n, dtype=u.dtype, device=u.device)
        padded.append(torch.einsum(_per_row(u, "nm,njk->njmk"), eye, u).reshape(-1, n * k))
    out = linear(torch.cat(padded)).to(units[0].dtype)
    return [o.reshape(*u.shape[:-3], -1, o.shape[-1])[..., a:b].mT
            for o, u, (a, b) in zip(out.split([p.shape[0] for p in padded]), units, rows)]  # fmt: skip


def reflect_through(x: torch.Tensor, units: torch.Tensor, coefs: tuple[float, ...], proj: torch.Tensor) -> torch.Tensor:
    """Return ``(x @ H - x) @ Wᵀ`` given ``proj = W_b w_bj`` (``weight_units``): the input-side reflection as a
    rank-``n·j`` correction.

    Used where one matmul serves several input reflections (the fused QKV): ``x H Wᵀ = x Wᵀ +
    sum_j c_j (x_b · w_j) (W_b w_j)ᵀ``, so only cheap matrix-vector products touch ``W``.
    """
    dots = _scale(_dots(x, units), coefs).flatten(-2)
    return dots @ proj.T if proj.dim() == 2 else torch.einsum("...m,...fm->...f", dots, proj)


def _reflect_slices_(
    z: torch.Tensor, bias: torch.Tensor | None, slices: Sequence[tuple[int, int]], coefs: tuple[float, ...],
    units: Sequence[torch.Tensor], extras: Sequence[torch.Tensor | None], keep_inputs: bool,
) -> list[torch.Tensor]:  # fmt: skip
    """In place: ``z[..., a:b] <- (z[..., a:b] + extra) @ H`` per slice, then ``+ bias``; returns the reflected slices'
    inputs if ``keep_inputs`` (for a backward that cannot recompute them)."""
    inputs = []
    for (a, b), w, extra in zip(slices, units, extras):
        z_s = z[..., a:b]
        if extra is not None:
            z_s.add_(extra)
        if keep_inputs:
            inputs.append(z_s.clone())
        z_s.copy_(reflect(z_s, w, coefs))
    if bias is not None:
        z.add_(bias)
    return inputs


class _ReflectOutputs(torch.autograd.Function):
    """Reflect column slices of a matmul's output in place, then add the bias.

    Why a Function: nothing else keeps a frozen matmul's output, so writing into it costs no memory, and
    for ETHER (``H² = I``) the input is recomputed from the output in backward instead of being saved.
    Attention keeps the QKV output alive anyway, so ETHER's output side stores no activation at all;
    ETHER+ (not invertible in general) keeps a copy of the reflected slices only.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, bias: torch.Tensor | None, slices: tuple[tuple[int, int], ...],
                coefs: tuple[float, ...], *tensors: torch.Tensor) -> torch.Tensor:  # fmt: skip
        # ``tensors``: the units of each slice, then the additive input to each slice (or None)
        units, extras = tensors[: len(slices)], tensors[len(slices) :]
        self_inverse = coefs == (-2.0,)
        inputs = _reflect_slices_(z, bias, slices, coefs, units, extras, keep_inputs=not self_inverse)
        ctx.mark_dirty(z)
        ctx.slices, ctx.coefs, ctx.self_inverse = slices, coefs, self_inverse
        ctx.has_extra = [e is not None for e in extras]
        ctx.save_for_backward(z if self_inverse else None, bias, *units, *inputs)
        return z

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, bias, *rest = ctx.saved_tensors
        units, inputs = rest[: len(ctx.slices)], rest[len(ctx.slices) :]
        grad_z = g.clone()
        grad_units, grad_extras = [], []
        for i, ((a, b), w) in enumerate(zip(ctx.slices, units)):
            if ctx.self_inverse:
                y_s = y[..., a:b] if bias is None else y[..., a:b] - bias[a:b]
                z_s = reflect(y_s, w, ctx.coefs)
            else:
                z_s = inputs[i]
            g_s = g[..., a:b]
            grad_units.append(_units_grad(z_s, g_s, w, ctx.coefs))
            grad_z[..., a:b] = reflect(g_s, w, ctx.coefs)  # H is symmetric
            grad_extras.append(grad_z[..., a:b] if ctx.has_extra[i] else None)
        return grad_z, None, None, None, *grad_units, *grad_extras


def reflect_outputs(
    z: torch.Tensor,
    bias: torch.Tensor | None,
    slices: Sequence[tuple[int, int]],
    reflections: Sequence["Reflection"],
    extras: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``z[..., a:b] <- (z[..., a:b] + extra) @ H`` for each slice, then ``+ bias``; ``z`` is overwritten."""
    if (kernels := fused_kernels(z)) is not None and all(type(r) is Reflection for r in reflections):
        return kernels.reflect_outputs_(z, bias, slices, [(r.u, r.v) for r in reflections], extras)
    if not torch.is_grad_enabled() and all(hasattr(r, "reflect_") for r in reflections):  # serve's adapter tables
        for (a, b), table, extra in zip(slices, reflections, extras or [None] * len(slices)):
            if extra is not None:
                z[..., a:b] += extra
            table.reflect_(z[..., a:b])
        return z if bias is None else z.add_(bias)
    coefs = reflections[0].coefs
    units = [r.units(z.dtype) for r in reflections]
    extras = list(extras) if extras is not None else [None] * len(slices)
    if not torch.is_grad_enabled():  # inference (generate, chat, serve): nothing to save for a backward
        _reflect_slices_(z, bias, slices, coefs, units, extras, keep_inputs=False)
        return z
    # e.g. out of bitsandbytes' int8 matmul on CUDA, a Function: autograd forbids writing into it
    if not torch.compiler.is_compiling() and z._is_view():
        z = z.clone()
    return _ReflectOutputs.apply(z, bias, tuple(slices), coefs, *units, *extras)


KERNEL_MODES = ("auto", "torch", "triton")


def kernel_mode() -> str:
    """``LITGPT_ETHER_KERNELS``: ``torch`` (never the fused kernels), ``triton`` (the kernels of ``kernels`` on CUDA
    tensors, and on CPU ones under Triton's interpreter, ``TRITON_INTERPRET=1``), or ``auto``, the default: for now
    the torch path everywhere, since the kernels have not yet passed the CUDA suite on a real GPU."""
    value = os.environ.get("LITGPT_ETHER_KERNELS", "auto").strip().lower() or "auto"
    if value not in KERNEL_MODES:
        raise ConfigError(f"LITGPT_ETHER_KERNELS must be one of {', '.join(KERNEL_MODES)}, got {value!r}")
    return value


def fused_kernels(t: torch.Tensor) -> Any:
    """The ``kernels`` module if the fused kernels are to reflect ``t``, else None (the torch path)."""
    if kernel_mode() != "triton":
        return None
    if t.device.type != "cuda" and not (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return None
    try:
        from litgpt_ether import kernels
    except ImportError as err:
        raise ConfigError(f"LITGPT_ETHER_KERNELS=triton needs Triton ({err}): pip install triton") from None
    return kernels


def unit_vectors(u: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """A side's vectors ``u`` (and ``v``), each ``(n, k)``, as unit vectors ``(n, j, k)`` in at least fp32.

    Scaled by the largest entry first, so any nonzero vector, however tiny, becomes exactly unit (as ETHER's
    backward, which relies on H² = I, needs) and a zero vector stays zero: H = I instead of NaN. The scale is a
    constant to autograd: normalising is scale-invariant, so the gradient is the same and less is saved.
    """
    w = u[:, None] if v is None else torch.stack([u, v], dim=1)
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    w = w / w.detach().abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return F.normalize(w, dim=-1)


class Reflection(nn.Module):
    """The trainable vectors of one side: ``u`` (and ``v`` for ETHER+), each ``(n, size // n)``."""

    def __init__(
        self,
        size: int,
        n_blocks: int,
        plus: bool,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.empty(n_blocks, size // n_blocks, device=device, dtype=dtype))
        self.v = nn.Parameter(torch.empty_like(self.u)) if plus else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # like a Kaiming-uniform weight (a=√5), as the reference; ETHER+ starts at H = I with v = -u
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5), generator=generator)
        if self.v is not None:
            with torch.no_grad():
                self.v.copy_(-self.u)

    @property
    def coefs(self) -> tuple[float, ...]:
        """ETHER: ``I - 2 û ûᵀ``; ETHER+: ``I - û ûᵀ + v̂ v̂ᵀ``."""
        return (-2.0,) if self.v is None else (-1.0, 1.0)

    def units(self, dtype: torch.dtype) -> torch.Tensor:
        """The unit vectors, ``(n, j, k)``, normalised in at least fp32, then cast to ``dtype``."""
        return unit_vectors(self.u, self.v).to(dtype)

    def forward(self, z: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``z @ H`` (``H`` is symmetric: ``transpose`` changes nothing)."""
        if (kernels := fused_kernels(z)) is not None:
            return kernels.reflect_input(z, self.u, self.v)
        return reflect(z, self.units(z.dtype), self.coefs)


class BlockMatrix(nn.Module):
    """OFT's or Naive's trainable blocks of one side: ``R``, ``(n, k, k)``, zero at the start (``H = I``).

    OFT (as the reference code): ``Q = (R - Rᵀ) / 2``, ``H_b = (I + Q)(I - Q)⁻¹``, orthogonal. Naive: ``H_b = I + R``,
    unconstrained. The blocks are built once per forward in fp32 (``O(n·k³)``) and applied to the activations as
    ``(..., n, k) x (n, k, k)`` (``O(tokens·size·k)``): ``W'`` is never built.
    """

    def __init__(self, size: int, n_blocks: int, cayley: bool, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__()
        k = size // n_blocks
        self.R = nn.Parameter(torch.zeros(n_blocks, k, k, device=device, dtype=dtype))
        self.cayley = cayley

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.R)

    def blocks(self, dtype: torch.dtype) -> torch.Tensor:
        """``H``'s diagonal blocks, ``(n, k, k)``, computed in at least fp32, then cast to ``dtype``."""
        r = self.R.to(torch.promote_types(self.R.dtype, torch.float32))
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        if self.cayley:
            q = (r - r.transpose(1, 2)) / 2
            # (I - Q)⁻¹(I + Q) = (I + Q)(I - Q)⁻¹: both are functions of Q. I - Q is never singular (Q is skew), so no
            # error check: on CUDA, linalg.solve's would synchronize the device at every call
            h = torch.linalg.solve_ex(eye - q, eye + q, check_errors=False).result
        else:
            h = eye + r
        return h.to(dtype)

    def forward(self, z: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``z @ Hᵀ`` per block (``H z`` for column vectors, what a layer's input or output goes through), or
        ``z @ H`` with ``transpose`` (the rows of ``W`` in ``W H``, for merging)."""
        h = self.blocks(z.dtype)
        n, k, _ = h.shape
        pattern = "...nk,nkm->...nm" if transpose else "...nk,nmk->...nm"
        return torch.einsum(pattern, z.reshape(*z.shape[:-1], n, k), h).reshape(z.shape)


def transform_outputs(
    z: torch.Tensor, bias: torch.Tensor | None, slices: Sequence[tuple[int, int]], transforms: Sequence[nn.Module],
    extras: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Each slice ``z[..., a:b]`` of a matmul's output through its side's transform, then ``+ bias``.

    Reflections go in place (``reflect_outputs``: no activation saved for ETHER); OFT and Naive blocks through
    autograd, out of place.
    """
    if not isinstance(transforms[0], BlockMatrix):  # reflections, or serve's tables of them
        return reflect_outputs(z, bias, slices, transforms, extras)
    pieces, end = [], 0
    for (a, b), transform in zip(slices, transforms):
        pieces += [z[..., end:a], transform(z[..., a:b])]
        end = b
    z = torch.cat([*pieces, z[..., end:]], dim=-1)
    return z if bias is None else z + bias


def _new_transform(config: Config, size: int, linear: nn.Module, where: str) -> Reflection | BlockMatrix:
    n = config.ether_nb
    if size % n:
        raise ConfigError(f"ether_nb={n} does not divide {where} (size {size})")
    k = size // n
    if config.ether_matrix and k > MAX_MATRIX_BLOCK:
        gib = n * k * k * 16 / 2**30  # fp32 R, its gradient and AdamW's two moments
        raise ConfigError(
            f"ether_method={config.ether_method} with ether_nb={n} makes {k}x{k} blocks in {where}: {n * k * k:,}"
            f" trainable numbers, {gib:.2f} GiB with gradients and AdamW state in fp32 for this side alone; raise"
            f" ether_nb to at least {-(-size // MAX_MATRIX_BLOCK)} (blocks of at most {MAX_MATRIX_BLOCK})"
        )
    weight = linear.weight  # a quantized weight (integer storage) leaves the vectors in the compute dtype
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.get_default_dtype()
    if config.ether_matrix:
        return BlockMatrix(size, n, cayley=config.ether_method == "oft", device=weight.device, dtype=dtype)
    return Reflection(size, n, config.ether_plus, device=weight.device, dtype=dtype)


def _to_base_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict hook: ``qkv.linear.weight`` -> ``qkv.weight``, so checkpoints keep the base model's layout."""
    inner = prefix + "linear."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _to_wrapped_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: the inverse of ``_to_base_keys`` (``weight`` and any quantization state keys)."""
    for key in [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]:
        state_dict[prefix + "linear." + key[len(prefix) :]] = state_dict.pop(key)


class ETHERLayer(nn.Module):
    """Base of the ETHER layers: wraps a frozen linear of any kind (``nn.Linear`` or a bitsandbytes quantized one)
    and acts on the activations around it, so quantized weights are used as they are.

    The layer takes over the linear's bias, which comes after an output-side reflection; state-dict keys stay the
    base model's (``qkv.weight``, ``qkv.bias``), so base checkpoints load as they are.
    """

    def __init__(self, linear: nn.Linear, config: Config) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("bias", linear.bias)
        linear.bias = None
        self.linear = linear
        self.ether_dropout = nn.Dropout(config.ether_dropout) if config.ether_dropout > 0 else nn.Identity()
        self.register_state_dict_post_hook(_to_base_keys)
        self.register_load_state_dict_pre_hook(_to_wrapped_keys)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def reset_parameters(self) -> None:
        """For meta-device materialization (FSDP); the base checkpoint overwrites the bias anyway."""
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def project(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        """``x Wᵀ`` (``+ b`` with ``bias``): one fused call for a plain linear, the layer's own for a quantized one."""
        b = self.bias if bias else None
        if type(self.linear) is nn.Linear:
            return F.linear(x, self.linear.weight, b)
        z = self.linear(x)
        return z if b is None else z + b

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight with the reflections folded in, computed in fp32 and cast to ``dtype`` (default: the weight's)."""
        raise NotImplementedError

    def _dense_weight(self) -> torch.Tensor:
        if not self.weight.dtype.is_floating_point:
            raise ConfigError("cannot merge into quantized weights: merge into the full-precision base checkpoint")
        return self.weight.float()


class ETHERLinear(ETHERLayer):
    """A linear with reflections on its input and/or output."""

    def __init__(self, linear: nn.Linear, config: Config, name: str, in_side: bool, out_side: bool) -> None:
        super().__init__(linear, config)
        self.ether_in = _new_transform(config, self.in_features, linear, f"{name} input") if in_side else None
        self.ether_out = _new_transform(config, self.out_features, linear, f"{name} output") if out_side else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ether_dropout(x)
        if self.ether_in is not None:
            x = self.ether_in(x)
        if self.ether_out is None:
            return self.project(x, bias=True)
        return transform_outputs(self.project(x, bias=False), self.bias, [(0, self.out_features)], [self.ether_out])

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``H_out W H_in`` computed in fp32."""
        w = self._dense_weight()
        if self.ether_in is not None:
            w = self.ether_in(w, transpose=True)  # W H: rows live on the input side
        if self.ether_out is not None:
            w = self.ether_out(w.T).T  # H W: columns live on the output side
        return w.to(dtype or self.weight.dtype)


class ETHERQKVLinear(ETHERLayer):
    """litgpt's fused ``[q | k | v]`` projection with a separate reflection per targeted segment.

    Output side: each targeted segment's slice of the fused matmul is reflected, in place. Input side
    (two-sided ETHER+): each targeted segment gets a low-rank correction, so one matmul serves all.
    """

    def __init__(self, linear: nn.Linear, config: Config, name: str) -> None:
        super().__init__(linear, config)
        q_size = config.n_head * config.head_size
        kv_size = config.n_query_groups * config.head_size
        self.sizes = (q_size, kv_size, kv_size)
        self.bounds = [(0, q_size), (q_size, q_size + kv_size), (q_size + kv_size, q_size + 2 * kv_size)]
        self.segments = [(i, s) for i, (s, on) in enumerate(zip("qkv", config.ether_qkv)) if on]
        self.ether_out = nn.ModuleDict(
            {s: _new_transform(config, self.sizes[i], linear, f"{name} ({s}) output") for i, s in self.segments}
        )
        self.ether_in = None
        if config.ether_two_sided:
            self.ether_in = nn.ModuleDict(
                {s: _new_transform(config, self.in_features, linear, f"{name} ({s}) input") for _, s in self.segments}
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ether_dropout(x)
        slices = [self.bounds[i] for i, _ in self.segments]
        kernels = fused_kernels(x) if self.ether_in is not None and type(self.linear) is nn.Linear else None
        if kernels is not None and all(
            type(r) is Reflection for r in [*self.ether_in.values(), *self.ether_out.values()]
        ):
            sides = [
                [(r.u, r.v) for r in (side[s] for _, s in self.segments)] for side in (self.ether_out, self.ether_in)
            ]
            return kernels.qkv_two_sided(x, self.linear.weight, self.bias, slices, *sides)
        extras = None
        if self.ether_in is not None:  # each segment's input reflection as a low-rank correction to its slice
            reflections = [self.ether_in[s] for _, s in self.segments]
            units = [r.units(x.dtype) for r in reflections]
            projs = weight_units(self.linear, slices, units)
            extras = [reflect_through(x, u, r.coefs, p) for u, r, p in zip(units, reflections, projs)]
        transforms = [self.ether_out[s] for _, s in self.segments]
        return transform_outputs(self.project(x, bias=False), self.bias, slices, transforms, extras)

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self._dense_weight().clone()
        for i, s in self.segments:
            a, b = self.bounds[i]
            if self.ether_in is not None:
                w[a:b] = self.ether_in[s](w[a:b], transpose=True)
            w[a:b] = self.ether_out[s](w[a:b].T).T
        return w.to(dtype or self.weight.dtype)


# --------------------------------------------------------------------------------------------------
# Surgery: one walk over any litgpt architecture replaces the targeted linears.


def _targets(model: litgpt.model.GPT, config: Config) -> Iterator[tuple[nn.Module, str, str]]:
    """Yield ``(parent, child_name, kind)`` for every linear to reflect; kind is "qkv" or "linear"."""
    if config.ether_head:
        yield model, "lm_head", "linear"
    for block in model.transformer.h:
        attn = block.attn
        if any(config.ether_qkv):
            if not isinstance(attn, litgpt.model.CausalSelfAttention):
                raise ConfigError(
                    f"ether_query/key/value are not supported for {type(attn).__name__} ({config.name});"
                    " target ether_projection or ether_mlp instead"
                )
            yield attn, "qkv", "qkv"
        if config.ether_projection:
            yield attn, "proj", "linear"
        if config.ether_mlp:
            for module in block.mlp.modules():
                for child_name, child in module.named_children():
                    if type(child) is nn.Linear:
                        yield module, child_name, "linear"


def add_ether(model: litgpt.model.GPT, config: Config) -> None:
    """Replace the linears that ``config`` targets with ETHER layers, in place."""
    if not (any(config.ether_qkv) or config.ether_projection or config.ether_mlp or config.ether_head):
        raise ConfigError(
            "no ETHER target enabled: set at least one of ether_query, ether_key, ether_value,"
            " ether_projection, ether_mlp, ether_head"
        )
    if config.ether_two_sided and config.ether_flip_side:
        raise ConfigError("ether_flip_side only applies to one-sided methods; two-sided ETHER+ reflects both sides")
    names = {id(m): n for n, m in model.named_modules()}
    for parent, child_name, kind in list(_targets(model, config)):
        linear = getattr(parent, child_name)
        name = f"{names[id(parent)]}.{child_name}".lstrip(".")
        if kind == "qkv":
            layer = ETHERQKVLinear(linear, config, name)
        else:
            two, flip = config.ether_two_sided, config.ether_flip_side
            layer = ETHERLinear(linear, config, name, in_side=two or not flip, out_side=two or flip)
        setattr(parent, child_name, layer)


class GPT(litgpt.model.GPT):
    """litgpt's GPT with the targeted linears swapped for ETHER layers; loads base checkpoints as is."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        add_ether(self, config)

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> Self:
        return cls(Config.from_name(name, **kwargs))


def ether_layers(model: nn.Module) -> Iterator[tuple[str, ETHERLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, ETHERLayer):
            yield name, module


def ether_filter(key: str, value: Any) -> bool:
    """For ``fabric.save(..., filter=...)`` and friends: keep ETHER tensors only."""
    return "ether_" in key


def mark_only_ether_as_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = ether_filter(name, param)


def ether_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ETHER tensors, whole: FSDP shards are gathered, so every process must call it on a sharded model."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()
            if ether_filter(k, v)}  # fmt: skip


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], assign: bool = False) -> Any:
    """``model.load_state_dict(state_dict, strict=False, assign=assign)`` for a whole or an FSDP-sharded model:
    every process passes the whole tensors and keeps its own shard of each. Returns the missing and unexpected
    keys."""
    targets = model.state_dict()
    local = {}
    for key, value in state_dict.items():
        target = targets.get(key)
        if isinstance(target, DTensor):
            value = value.to(device=target.device, dtype=target.dtype)
            value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        local[key] = value
    return model.load_state_dict(local, strict=False, assign=assign)


def initial_ether_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Fresh ETHER tensors for ``model`` (on any device, "meta" included), drawn on the CPU from ``seed`` alone.

    So a run starts from the same adapter whatever the device, precision or number of processes: a sharded
    model cannot draw its vectors the way a whole one does.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = ether_state_dict(model)
    state = {}
    for key, value in shapes.items():
        prefix, _, name = key.rpartition(".")
        if name == "u":
            n, k = value.shape
            fresh = Reflection(n * k, n, plus=f"{prefix}.v" in shapes, generator=generator)
            state.update({f"{prefix}.{p}": t.detach().to(value.dtype) for p, t in fresh.named_parameters()})
        elif name == "R":  # OFT and Naive start at H = I
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    return state


def stored_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The shape a checkpoint stores for ``t``: a quantized 4-bit bitsandbytes weight is packed into ``(n, 1)`` bytes,
    and its ``quant_state`` keeps the shape it stands for."""
    quant_state = getattr(t, "quant_state", None)
    return tuple(t.shape if quant_state is None else quant_state.shape)


def load_base_checkpoint(model: nn.Module, checkpoint_path: Path, assign: bool = False) -> None:
    """Load an unmodified litgpt ``lit_model.pth``: every key must match, except the ETHER ones.

    ``assign=True`` adopts the (memory-mapped) tensors instead of copying: for a model built on "meta". A sharded
    (FSDP) model keeps its shard of each tensor; a quantized one quantizes the weights as they load.
    """
    try:
        state_dict = torch.load(checkpoint_path, mmap=True, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ConfigError(f"{str(checkpoint_path)!r} does not exist") from None
    except Exception as err:  # truncated or corrupt: torch raises RuntimeError, OSError, pickle errors, ...
        raise ConfigError(
            f"{str(checkpoint_path)!r} is not a readable checkpoint, truncated or corrupt? ({type(err).__name__}:"
            f" {' '.join(str(err).split())[:200]})"
        ) from None
    state_dict = state_dict.get("model", state_dict) if isinstance(state_dict, dict) else state_dict
    if not isinstance(state_dict, dict):
        raise ConfigError(f"{str(checkpoint_path)!r} holds no state dict (a {type(state_dict).__name__})")
    shapes = {k: stored_shape(v) for k, v in model.state_dict(keep_vars=True).items()}  # the parameters themselves
    wrong = [k for k, v in state_dict.items() if k in shapes and tuple(getattr(v, "shape", ())) != shapes[k]]
    if wrong:
        raise ConfigError(
            f"{checkpoint_path} does not match the model config: {wrong[0]} has shape"
            f" {tuple(state_dict[wrong[0]].shape)}, the model wants {shapes[wrong[0]]} ({len(wrong)} tensors differ)"
        )
    missing, unexpected = load_state(model, state_dict, assign=assign)
    missing = [k for k in missing if not ether_filter(k, None)]
    if missing or unexpected:
        raise ConfigError(
            f"{checkpoint_path} does not match the model config: missing {missing[:3]}, unexpected {unexpected[:3]}"
            f" ({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )


@torch.no_grad()
def merge_ether(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every ETHER layer into a plain ``nn.Linear`` holding ``H_out W H_in`` (fp32 math, cast to ``dtype``,
    default the weight's), in place.

    Afterwards the model costs exactly what the base model costs, and its state dict has only base keys.
    """
    for name, layer in list(ether_layers(model)):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(layer.merged_weight(dtype), requires_grad=False)
        linear.bias = layer.bias
        setattr(parent, child_name, linear)
    return model

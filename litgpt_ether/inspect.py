"""``litgpt_ether inspect``: how far an adapter moves each layer, and what it does to the geometry of its neurons.

Per ETHER layer (per targeted q/k/v segment of the fused QKV): ``||H - I||_F`` of each side's reflection, the
relative weight change ``||W' - W||_F / ||W||_F`` and the hyperspherical energy of the neurons before and after,
the quantities the ETHER paper analyses.
"""

import json
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from litgpt_ether.checkpoint import ADAPTER_FILE, load_model, resolve
from litgpt_ether.ether import BlockMatrix, ConfigError, ETHERLayer, ETHERQKVLinear, Reflection, ether_layers


@dataclass
class LayerReport:
    """One row of the table: a layer, or one q/k/v segment of the fused QKV."""

    layer: str
    segment: str | None  # "q", "k" or "v" for the fused QKV
    sides: str  # "in", "out" or "in+out"
    n_blocks: int
    h_in_minus_i: float | None  # ||H_in - I||_F; None when the input side is not reflected
    h_out_minus_i: float | None
    relative_change: float  # ||W' - W||_F / ||W||_F
    he_before: float
    he_after: float


def distance_from_identity(transform: Reflection | BlockMatrix) -> float:
    """``||H - I||_F``: for OFT and Naive from the blocks, in fp64; for ETHER and ETHER+ from the vectors alone,
    without building ``H``.

    Per block ``H_b - I = sum_j c_j w_j w_jᵀ`` is symmetric, so ``||H_b - I||_F² = tr((H_b - I)²) =
    sum_{j,l} c_j c_l (w_j · w_l)²``. With unit vectors, ETHER (``c = -2``) gives 4 per block, so ``2√n`` in all,
    and ETHER+ (``c = -1, +1``) gives ``2 - 2 (û · v̂)²``. The products run in fp64: near ETHER+'s start
    (``v̂ ≈ -û``) fp32 cancellation would leave only rounding noise of order 1e-3.
    """
    if isinstance(transform, BlockMatrix):
        h = transform.blocks(torch.float64)
        return (h - torch.eye(h.shape[-1], dtype=h.dtype)).norm().item()
    w = transform.units(torch.float32).double()  # (n, j, k): the unit vectors the layer itself uses
    c = torch.tensor(transform.coefs, dtype=torch.float64)
    gram = w @ w.transpose(1, 2)  # (n, j, j)
    return (c[:, None] * c[None, :] * gram**2).sum().clamp(min=0).sqrt().item()


def hyperspherical_energy(weight: torch.Tensor, chunk_elements: int = 2**22) -> float:
    """OFT's hyperspherical energy ``HE(W) = sum_{i≠j} 1 / ||ŵ_i - ŵ_j||`` (power s = 1, ordered pairs).

    The neurons ``w_i`` are the rows of ``W`` (one per output, a vector over the inputs), scaled to unit length;
    zero rows have no direction and are left out. Rows are compared a chunk at a time, so memory stays at
    ``chunk_elements`` per temporary however many neurons the layer has.
    """
    w = weight.float()
    norms = w.norm(dim=1)
    w = w[norms > 0] / norms[norms > 0, None]
    rows = w.shape[0]
    chunk = max(1, chunk_elements // max(rows, 1))
    total = 0.0
    for start in range(0, rows, chunk):
        cos = w[start : start + chunk] @ w.T  # (chunk, rows)
        dist = (2 - 2 * cos).clamp_(min=0).sqrt_()  # ||a - b||² = 2 - 2 a·b for unit a, b
        i = torch.arange(cos.shape[0])
        dist[i, start + i] = math.inf  # i = j is not a pair
        total += dist.reciprocal_().sum(dtype=torch.float64).item()
    return total


Transform = Reflection | BlockMatrix


def segments(layer: ETHERLayer) -> Iterator[tuple[str | None, slice, Transform | None, Transform | None]]:
    """``(segment, rows of W, input reflection, output reflection)``: the whole layer, or each targeted q/k/v."""
    if not isinstance(layer, ETHERQKVLinear):
        yield None, slice(None), layer.ether_in, layer.ether_out
        return
    for i, s in layer.segments:
        h_in = layer.ether_in[s] if layer.ether_in is not None else None
        yield s, slice(*layer.bounds[i]), h_in, layer.ether_out[s]


@torch.no_grad()
def inspect_layer(name: str, layer: ETHERLayer) -> list[LayerReport]:
    weight, merged = (
        layer.weight.float(),
        layer.merged_weight(torch.float32),
    )  # fp32: a bf16 cast would blur small changes
    reports = []
    for segment, rows, h_in, h_out in segments(layer):
        w, w_new = weight[rows], merged[rows]
        any_side = h_in if h_in is not None else h_out
        reports.append(
            LayerReport(
                layer=name,
                segment=segment,
                sides="+".join(side for side, h in (("in", h_in), ("out", h_out)) if h is not None),
                n_blocks=next(any_side.parameters()).shape[0],
                h_in_minus_i=distance_from_identity(h_in) if h_in is not None else None,
                h_out_minus_i=distance_from_identity(h_out) if h_out is not None else None,
                relative_change=((w_new - w).norm() / w.norm()).item(),
                he_before=hyperspherical_energy(w),
                he_after=hyperspherical_energy(w_new),
            )
        )
    return reports


def format_table(reports: list[LayerReport]) -> str:
    header = ["layer", "sides", "n", "||H_in-I||", "||H_out-I||", "rel. change", "HE before", "HE after"]
    number = lambda x, spec: "-" if x is None else format(x, spec)
    rows = [
        [
            r.layer if r.segment is None else f"{r.layer} ({r.segment})",
            r.sides,
            str(r.n_blocks),
            number(r.h_in_minus_i, ".4f"),
            number(r.h_out_minus_i, ".4f"),
            number(r.relative_change, ".4f"),
            number(r.he_before, ".8g"),
            number(r.he_after, ".8g"),
        ]
        for r in reports
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))])
    return "\n".join(line(row) for row in [header, *rows])


def to_json(reports: list[LayerReport]) -> str:
    """Strict JSON: a non-finite figure (an energy with two identical neurons) becomes ``null``."""
    finite = lambda x: None if isinstance(x, float) and not math.isfinite(x) else x
    return json.dumps([{k: finite(v) for k, v in asdict(r).items()} for r in reports], indent=2)


def inspect(checkpoint_dir: Path, *, base_checkpoint_dir: Path | None = None, json: bool = False) -> None:
    """Report, per ETHER layer, how far the adapter moves it from the base model.

    One row per layer, or per targeted q/k/v segment of the fused QKV: ``||H_in - I||_F`` and ``||H_out - I||_F``
    of the reflections (ETHER: always ``2√n``), the relative weight change ``||W' - W||_F / ||W||_F`` and the
    hyperspherical energy ``sum_{i≠j} 1 / ||ŵ_i - ŵ_j||`` of the layer's neurons (the rows of ``W``, at unit
    length) before and after. Everything is computed in fp32 (the vector products in fp64).

    Arguments:
        checkpoint_dir: A finetune ``out_dir``, its ``final/`` or ``step-*`` directory, or an adapter file
            (``lit_model.pth.ether``).
        base_checkpoint_dir: The base model's checkpoint directory. Defaults to the one recorded in the adapter's
            ``hyperparameters.yaml``; set it if the base model has moved.
        json: Print a JSON list of per-layer records instead of the table (nothing else goes to stdout).
    """
    resolved = resolve(checkpoint_dir, base_checkpoint_dir, prefer_adapter=True)
    if resolved.adapter is None:
        raise ConfigError(f"{str(checkpoint_dir)!r} holds no ETHER adapter ({ADAPTER_FILE})")
    print(f"Inspecting {str(resolved.adapter)!r} on base model {str(resolved.base_dir)!r}", file=sys.stderr)
    model = load_model(resolved)
    reports = [report for name, layer in ether_layers(model) for report in inspect_layer(name, layer)]
    print(to_json(reports) if json else format_table(reports))

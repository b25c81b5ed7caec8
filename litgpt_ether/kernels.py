"""Fused Triton kernels for ETHER's and ETHER+'s reflections: one launch per layer side, forward and backward.

On a GPU a training step of this package is bound by the CPU issuing small operators, not by arithmetic: the torch
path (``ether.reflect`` and friends) spends about 40 operators per reflected side on normalising the vectors, the
dot products, the update and their gradients. Here each layer side is one kernel in the forward and two in the
backward, whatever the number of blocks or of fused q/k/v segments:

- ``_reflect_fwd``: each program takes a tile of rows of one block of one segment, normalises the block's one or
  two vectors in fp32 (so no separate normalisation runs), and writes ``z + sum_j c_j (z·w_j) w_j`` (in place on an
  output side, where it also adds the bias);
- ``_reflect_bwd``: reads the incoming gradient and either the saved input or, for ETHER (``H² = I``), the output
  it recomputes the input from; writes ``H g`` as the input gradient and keeps per-program partial sums of the
  vectors' gradient in fp32;
- ``_reflect_finish``: sums the partials and takes them through the normalisation's backward into ``u``'s (and
  ``v``'s) own gradient.

Registered as PyTorch custom ops, so eager mode, ``torch.compile`` and FSDP2 see one operator each. The torch code in
``ether`` stays the CPU implementation and the test oracle; ``LITGPT_ETHER_KERNELS`` chooses (``ether.kernel_mode``).
The tests run these kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1`` before this module is
imported), which needs fixed launch configurations: there is no autotuning here, only the heuristics in ``_launch``.
"""

import functools
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

# One layer side covers at most the fused QKV's three segments
MAX_SEGMENTS = 3
# A program holds at most this many elements of a tile (fp32 registers); the rows per tile follow from the block size
TILE_ELEMENTS = 4096


# --------------------------------------------------------------------------------------------------
# The kernels. A layer side is up to three segments of columns (the fused QKV's q, k and v; one for any other
# linear). Segment s starts at column C_s, has S_s columns and is split into ``n`` programs' blocks of K_s columns;
# R_s says whether it is reflected (with vectors U_s, V_s of shape (n, K_s)) or passed through (bias, gradient).


@triton.jit
def _segment(pid_c, n, C0, C1, C2, K0, K1, K2, S0, S1, S2, R0, R1, R2, Z0, Z1, Z2):
    """``(block, first column, block width, segment width, reflected, saved-tensor column)`` of program ``pid_c``."""
    seg = pid_c // n
    blk = pid_c % n
    if seg == 0:
        col, k, size, refl, zcol = C0, K0, S0, R0, Z0
    elif seg == 1:
        col, k, size, refl, zcol = C1, K1, S1, R1, Z1
    else:
        col, k, size, refl, zcol = C2, K2, S2, R2, Z2
    return seg, blk, col, k, size, refl, zcol


@triton.jit
def _pick(seg, P0, P1, P2):
    if seg == 0:
        p = P0
    elif seg == 1:
        p = P1
    else:
        p = P2
    return p


@triton.jit
def _unit(U, blk, k, offs, mask, ACC: tl.constexpr):
    """Block ``blk``'s vector, unit length in ``ACC`` (scaled by its largest entry first, as ``ether.unit_vectors``:
    a zero vector stays zero), and the raw vector's norm."""
    u = tl.load(U + blk * k + offs, mask=mask, other=0.0).to(ACC)
    amax = tl.maximum(tl.max(tl.abs(u), axis=0), 1e-37)
    u = u / amax
    norm = tl.maximum(tl.sqrt(tl.sum(u * u, axis=0)), 1e-12)
    return u / norm, norm * amax


@triton.jit
def _reflect_fwd(
    X, Y, KEEP, BIAS, T,
    sxt, sxc, syt, syc, skt,
    n, C0, C1, C2, K0, K1, K2, S0, S1, S2, R0, R1, R2, Z0, Z1, Z2,
    U0, U1, U2, V0, V1, V2,
    PLUS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, ACC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``Y = X @ H (+ bias)`` on one tile of rows of one block; ``KEEP`` gets the reflected columns' input."""
    pid_t, pid_c = tl.program_id(0), tl.program_id(1)
    seg, blk, col, k, size, refl, zcol = _segment(pid_c, n, C0, C1, C2, K0, K1, K2, S0, S1, S2, R0, R1, R2, Z0, Z1, Z2)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = (offs_k < k) & (blk * k + offs_k < size)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = (rows[:, None] < T) & kmask[None, :]
    cols = col + blk * k + offs_k
    z = tl.load(X + rows[:, None] * sxt + cols[None, :] * sxc, mask=mask, other=0.0).to(ACC)
    vmask = kmask & (offs_k < k * refl)  # a passed-through segment (refl 0) reflects by zero vectors: H = I
    wu, _ = _unit(_pick(seg, U0, U1, U2), blk, k, offs_k, vmask, ACC)
    if HAS_KEEP:
        kcols = zcol + blk * k + offs_k
        tl.store(KEEP + rows[:, None] * skt + kcols[None, :], z.to(KEEP.dtype.element_ty), mask=mask & vmask[None, :])
    if PLUS:
        wv, _ = _unit(_pick(seg, V0, V1, V2), blk, k, offs_k, vmask, ACC)
        du = tl.sum(z * wu[None, :], axis=1)
        dv = tl.sum(z * wv[None, :], axis=1)
        out = z - du[:, None] * wu[None, :] + dv[:, None] * wv[None, :]
    else:
        du = tl.sum(z * wu[None, :], axis=1)
        out = z - 2.0 * du[:, None] * wu[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + cols, mask=kmask, other=0.0).to(ACC)[None, :]
    tl.store(Y + rows[:, None] * syt + cols[None, :] * syc, out.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _reflect_bwd(
    G, Z, BIAS, DZ, P, T, tiles, programs,
    sgt, sgc, szt, szc, sdt, sdc,
    n, C0, C1, C2, K0, K1, K2, S0, S1, S2, R0, R1, R2, Z0, Z1, Z2,
    U0, U1, U2, V0, V1, V2,
    PLUS: tl.constexpr, RECOMPUTE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``DZ = G @ H`` (``H`` is symmetric) over the rows of every ``programs``-th tile, and this program's partial sums
    of the vectors' gradient, ``c_j sum_t [(z_t·w_j) g_t + (g_t·w_j) z_t]``, into ``P[pid_t, pid_c, j]``.

    ``Z`` holds the reflection's input (``zcol``: its column), or with ``RECOMPUTE`` (ETHER, ``H² = I``) its output,
    from which the input is ``H (y - bias)``.
    """
    pid_t, pid_c = tl.program_id(0), tl.program_id(1)
    seg, blk, col, k, size, refl, zcol = _segment(pid_c, n, C0, C1, C2, K0, K1, K2, S0, S1, S2, R0, R1, R2, Z0, Z1, Z2)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = (offs_k < k) & (blk * k + offs_k < size)
    cols = col + blk * k + offs_k
    zcols = zcol + blk * k + offs_k
    vmask = kmask & (offs_k < k * refl)
    wu, _ = _unit(_pick(seg, U0, U1, U2), blk, k, offs_k, vmask, ACC)
    wv = wu
    if PLUS:
        wv, _ = _unit(_pick(seg, V0, V1, V2), blk, k, offs_k, vmask, ACC)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=kmask, other=0.0).to(ACC)
    acc_u = tl.zeros((BLOCK_K,), dtype=ACC)
    acc_v = tl.zeros((BLOCK_K,), dtype=ACC)
    for tile in range(pid_t, tiles, programs):
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = (rows[:, None] < T) & kmask[None, :]
        g = tl.load(G + rows[:, None] * sgt + cols[None, :] * sgc, mask=mask, other=0.0).to(ACC)
        gu = tl.sum(g * wu[None, :], axis=1)
        if refl != 0:
            z = tl.load(Z + rows[:, None] * szt + zcols[None, :] * szc, mask=mask, other=0.0).to(ACC)
            if RECOMPUTE:
                if HAS_BIAS:
                    z -= bias[None, :]
                z = z - 2.0 * tl.sum(z * wu[None, :], axis=1)[:, None] * wu[None, :]
            zu = tl.sum(z * wu[None, :], axis=1)
            if PLUS:
                gv = tl.sum(g * wv[None, :], axis=1)
                zv = tl.sum(z * wv[None, :], axis=1)
                dz = g - gu[:, None] * wu[None, :] + gv[:, None] * wv[None, :]
                acc_u -= tl.sum(zu[:, None] * g + gu[:, None] * z, axis=0)
                acc_v += tl.sum(zv[:, None] * g + gv[:, None] * z, axis=0)
            else:
                dz = g - 2.0 * gu[:, None] * wu[None, :]
                acc_u -= 2.0 * tl.sum(zu[:, None] * g + gu[:, None] * z, axis=0)
        else:
            dz = g
        tl.store(DZ + rows[:, None] * sdt + cols[None, :] * sdc, dz.to(DZ.dtype.element_ty), mask=mask)
    base = P + (pid_t * tl.num_programs(1) + pid_c) * 2 * BLOCK_K
    tl.store(base + offs_k, acc_u)
    if PLUS:
        tl.store(base + BLOCK_K + offs_k, acc_v)


@triton.jit
def _reflect_finish(
    P, programs,
    n, C0, C1, C2, K0, K1, K2, S0, S1, S2, R0, R1, R2, Z0, Z1, Z2,
    U0, U1, U2, V0, V1, V2, GU0, GU1, GU2, GV0, GV1, GV2,
    PLUS: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Sum the partials of block ``pid_c``'s unit vectors' gradient and take it through the normalisation:
    ``du = (dw - ŵ (ŵ·dw)) / ||u||``, written in the vector's own dtype."""
    pid_c, j = tl.program_id(0), tl.program_id(1)
    seg, blk, col, k, size, refl, zcol = _segment(pid_c, n, C0, C1, C2, K0, K1, K2, S0, S1, S2, R0, R1, R2, Z0, Z1, Z2)
    if refl != 0:
        offs_k = tl.arange(0, BLOCK_K)
        kmask = offs_k < k
        if j == 0:
            w, norm = _unit(_pick(seg, U0, U1, U2), blk, k, offs_k, kmask, ACC)
            out = _pick(seg, GU0, GU1, GU2)
        else:
            w, norm = _unit(_pick(seg, V0, V1, V2), blk, k, offs_k, kmask, ACC)
            out = _pick(seg, GV0, GV1, GV2)
        dw = tl.zeros((BLOCK_K,), dtype=ACC)
        for r in range(programs):
            dw += tl.load(P + ((r * tl.num_programs(0) + pid_c) * 2 + j) * BLOCK_K + offs_k)
        du = (dw - w * tl.sum(w * dw, axis=0)) / norm
        tl.store(out + blk * k + offs_k, du.to(out.dtype.element_ty), mask=kmask)


@triton.jit
def _rows_of(seg, RS0, RS1, RS2, RE0, RE1, RE2):
    if seg == 0:
        start, end = RS0, RE0
    elif seg == 1:
        start, end = RS1, RE1
    else:
        start, end = RS2, RE2
    return start, end


@triton.jit
def _dots_fwd(
    X, OUT, sxt, sxc, sot,
    n, k, RS0, RS1, RS2, RE0, RE1, RE2,
    U0, U1, U2, V0, V1, V2,
    PLUS: tl.constexpr, SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``OUT[t, seg, blk, j] = c_j (X[t, blk] · w_seg,blk,j)`` for the rows ``RS:RE`` of segment ``seg``.

    The two-sided QKV's input reflections as ``x H_s W_sᵀ = x W_sᵀ + sum_j c_j (x·w_j) (W_s w_j)ᵀ``: on the layer's
    input (every row for every segment, ``SCALE``: times the coefficients ``c_j``) it makes the dots, on the weight
    (each segment's own rows) the projections ``W_s w_j``; one matmul of the two is then every segment's correction.
    """
    pid_t, pid_c = tl.program_id(0), tl.program_id(1)
    seg = pid_c // n
    blk = pid_c % n
    start, end = _rows_of(seg, RS0, RS1, RS2, RE0, RE1, RE2)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    rows = start + pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < end
    x = tl.load(X + rows[:, None] * sxt + (blk * k + offs_k)[None, :] * sxc, mask=rmask[:, None] & kmask[None, :],
                other=0.0).to(ACC)  # fmt: skip
    out = OUT + rows * sot + (seg * n + blk) * (2 if PLUS else 1)
    wu, _ = _unit(_pick(seg, U0, U1, U2), blk, k, offs_k, kmask, ACC)
    du = tl.sum(x * wu[None, :], axis=1)
    if PLUS:
        wv, _ = _unit(_pick(seg, V0, V1, V2), blk, k, offs_k, kmask, ACC)
        dv = tl.sum(x * wv[None, :], axis=1)
        if SCALE:
            du = -du
        tl.store(out + 1, dv.to(OUT.dtype.element_ty), mask=rmask)
    elif SCALE:
        du = -2.0 * du
    tl.store(out, du.to(OUT.dtype.element_ty), mask=rmask)


@triton.jit
def _dots_bwd_segment(x, GD, rows, rmask, sgt, seg_n, blk, wu, wv, PLUS: tl.constexpr, SCALE: tl.constexpr,
                      ACC: tl.constexpr):  # fmt: skip
    """One segment's share of ``_dots_bwd`` on a tile: ``(dx, du, dv)``, the input's gradient through the dots and
    the sums for the unit vectors' gradient."""
    g = GD + rows * sgt + (seg_n + blk) * (2 if PLUS else 1)
    gu = tl.load(g, mask=rmask, other=0.0).to(ACC)
    if PLUS:
        gv = tl.load(g + 1, mask=rmask, other=0.0).to(ACC)
        if SCALE:
            gu = -gu
    else:
        gv = gu * 0.0
        if SCALE:
            gu = -2.0 * gu
    dx = gu[:, None] * wu[None, :] + gv[:, None] * wv[None, :]
    return dx, tl.sum(gu[:, None] * x, axis=0), tl.sum(gv[:, None] * x, axis=0)


@triton.jit
def _dots_bwd(
    X, GD, DX, P, tiles, programs, p_first, sxt, sxc, sgt, sdt, sdc,
    n, k, RS0, RS1, RS2, RE0, RE1, RE2,
    U0, U1, U2, V0, V1, V2,
    NSEG: tl.constexpr, PLUS: tl.constexpr, SCALE: tl.constexpr, ALL_ROWS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The backward of ``_dots_fwd`` given ``GD``, the gradient of its output: partial sums of the unit vectors'
    gradient into ``P[p_first + pid_t, seg * n + blk, j]`` (the layout ``_reflect_finish`` reads), and with
    ``ALL_ROWS`` (the layer's input: every row serves all ``NSEG`` segments, one program per block) ``DX``, the
    input's gradient. Without it (the weight, frozen) one program per segment and block, over that segment's rows.
    """
    pid_t, pid_c = tl.program_id(0), tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    if ALL_ROWS:
        seg = 0
        blk = pid_c
    else:
        seg = pid_c // n
        blk = pid_c % n
    start, end = _rows_of(seg, RS0, RS1, RS2, RE0, RE1, RE2)
    w0u, _ = _unit(_pick(seg, U0, U1, U2), blk, k, offs_k, kmask, ACC)
    w0v = w0u
    if PLUS:
        w0v, _ = _unit(_pick(seg, V0, V1, V2), blk, k, offs_k, kmask, ACC)
    w1u, w1v, w2u, w2v = w0u, w0v, w0u, w0v
    if ALL_ROWS:
        if NSEG > 1:
            w1u, _ = _unit(U1, blk, k, offs_k, kmask, ACC)
            w1v = w1u
            if PLUS:
                w1v, _ = _unit(V1, blk, k, offs_k, kmask, ACC)
        if NSEG > 2:
            w2u, _ = _unit(U2, blk, k, offs_k, kmask, ACC)
            w2v = w2u
            if PLUS:
                w2v, _ = _unit(V2, blk, k, offs_k, kmask, ACC)
    a0u = tl.zeros((BLOCK_K,), dtype=ACC)
    a0v = tl.zeros((BLOCK_K,), dtype=ACC)
    a1u = tl.zeros((BLOCK_K,), dtype=ACC)
    a1v = tl.zeros((BLOCK_K,), dtype=ACC)
    a2u = tl.zeros((BLOCK_K,), dtype=ACC)
    a2v = tl.zeros((BLOCK_K,), dtype=ACC)
    cols = blk * k + offs_k
    for tile in range(pid_t, tiles, programs):
        rows = start + tile * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < end
        mask = rmask[:, None] & kmask[None, :]
        x = tl.load(X + rows[:, None] * sxt + cols[None, :] * sxc, mask=mask, other=0.0).to(ACC)
        dx, du, dv = _dots_bwd_segment(x, GD, rows, rmask, sgt, seg * n, blk, w0u, w0v, PLUS, SCALE, ACC)
        a0u += du
        a0v += dv
        if ALL_ROWS:
            if NSEG > 1:
                dx1, du, dv = _dots_bwd_segment(x, GD, rows, rmask, sgt, n, blk, w1u, w1v, PLUS, SCALE, ACC)
                dx += dx1
                a1u += du
                a1v += dv
            if NSEG > 2:
                dx2, du, dv = _dots_bwd_segment(x, GD, rows, rmask, sgt, 2 * n, blk, w2u, w2v, PLUS, SCALE, ACC)
                dx += dx2
                a2u += du
                a2v += dv
            tl.store(DX + rows[:, None] * sdt + cols[None, :] * sdc, dx.to(DX.dtype.element_ty), mask=mask)
    base = P + ((p_first + pid_t) * n * NSEG + seg * n + blk) * 2 * BLOCK_K
    tl.store(base + offs_k, a0u)
    tl.store(base + BLOCK_K + offs_k, a0v)
    if ALL_ROWS:
        if NSEG > 1:
            tl.store(base + n * 2 * BLOCK_K + offs_k, a1u)
            tl.store(base + n * 2 * BLOCK_K + BLOCK_K + offs_k, a1v)
        if NSEG > 2:
            tl.store(base + 2 * n * 2 * BLOCK_K + offs_k, a2u)
            tl.store(base + 2 * n * 2 * BLOCK_K + BLOCK_K + offs_k, a2v)


@triton.jit
def _reflect_rows_fwd(
    X, Y, TABLE, INDEX, BIAS, R, tokens, seg_w, sxs, sxt, sxc, sys, syt, syc,
    n, k, j, c_even, c_odd,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Serving: ``Y = X @ H_a (+ bias)`` where each batch row ``b`` (``tokens`` rows of ``X`` each) has its own
    adapter ``a = INDEX[b]``, whose block's ``j`` unit vectors sit in ``TABLE[a, blk]`` (``(adapters, n, j, k)``,
    normalised when the table was built); vector ``i`` has the coefficient ``c_even`` or ``c_odd`` by its parity.

    Column ``c`` of a row is element ``c % seg_w`` of segment ``c // seg_w``, segments ``sxs`` (``sys``) apart: a
    fused QKV's ``[q | k | v]`` read from, or written to, three stacked matrices (a stride of 0 reads one input for
    all three)."""
    pid_t, blk = tl.program_id(0), tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < k
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < R
    mask = rmask[:, None] & kmask[None, :]
    seg = (blk * k) // seg_w
    cols = blk * k - seg * seg_w + offs_k
    z = tl.load(X + seg * sxs + rows[:, None] * sxt + cols[None, :] * sxc, mask=mask, other=0.0).to(ACC)
    adapter = tl.load(INDEX + rows // tokens, mask=rmask, other=0)
    out = z
    for i in range(j):
        w = tl.load(TABLE + ((adapter[:, None] * n + blk) * j + i) * k + offs_k[None, :], mask=mask, other=0.0)
        w = w.to(ACC)
        c = c_even + (c_odd - c_even) * (i % 2)
        out += c * tl.sum(z * w, axis=1)[:, None] * w
    if HAS_BIAS:
        out += tl.load(BIAS + blk * k + offs_k, mask=kmask, other=0.0).to(ACC)[None, :]
    tl.store(Y + seg * sys + rows[:, None] * syt + cols[None, :] * syc, out.to(Y.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launching


def _torch_acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation type: fp32, or fp64 for fp64 tensors (the tests' dense references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if _torch_acc(dtype) == torch.float64 else tl.float32


def _layout(
    cols: Sequence[int], sizes: Sequence[int], zcols: Sequence[int], n_reflected: int, n: int
) -> tuple[list[int], int, int]:
    """The segment arguments, padded to ``MAX_SEGMENTS`` (padding segments have no programs), the number of column
    programs and the block size (a power of two at least the widest block)."""
    segs = len(cols)
    if not 1 <= segs <= MAX_SEGMENTS:
        raise ValueError(f"a layer side has 1 to {MAX_SEGMENTS} segments, got {segs}")
    widths = [-(-s // n) for s in sizes]  # a passed-through segment need not divide into n blocks
    pad = MAX_SEGMENTS - segs
    args = [*cols, *[0] * pad, *widths, *[1] * pad, *sizes, *[0] * pad]
    args += [int(i < n_reflected) for i in range(segs)] + [0] * pad + [*zcols, *[0] * pad]
    return [n, *args], segs * n, triton.next_power_of_2(max(widths))


def _pad(tensors: Sequence[torch.Tensor], fill: torch.Tensor) -> list[torch.Tensor]:
    return [*tensors, *[fill] * (MAX_SEGMENTS - len(tensors))]


def _warps(block_t: int, block_k: int) -> int:
    return 4 if block_t * block_k <= 2048 else 8


def _tiles(t: int, block_k: int) -> tuple[int, int]:
    block_t = max(1, min(64, TILE_ELEMENTS // block_k))
    return block_t, triton.cdiv(t, block_t)


# Kernel launches since import, memsets included: ``scripts/benchmark.py ops`` counts a step's launches with it
launches = 0


def _launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    global launches
    launches += 1
    kernel[grid](*args, **kwargs)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(rows, columns)`` without copying if its leading dims can merge (a copy otherwise)."""
    return x.reshape(-1, x.shape[-1])


def _keep_columns(sizes: Sequence[int], reflected: int) -> list[int]:
    """Where each of the first ``reflected`` segments sits in the buffer that keeps their inputs side by side."""
    return [sum(sizes[:i]) for i in range(reflected)]


def _forward(
    x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None, bias: torch.Tensor | None,
    us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], cols: Sequence[int], sizes: Sequence[int], n: int,
) -> None:  # fmt: skip
    """Launch ``_reflect_fwd``: segments ``cols``/``sizes``, the first ``len(us)`` reflected, the rest passed through
    (bias only). ``keep``, if given, gets the reflected columns' input, side by side."""
    x2, y2 = _rows(x), _rows(y)
    zcols = _keep_columns(sizes, len(us)) + [0] * (len(cols) - len(us))
    seg_args, programs_c, block_k = _layout(cols, sizes, zcols, len(us), n)
    block_t, tiles = _tiles(x2.shape[0], block_k)
    if tiles == 0 or programs_c == 0:
        return
    u_fill = us[0]
    _launch(
        _reflect_fwd, (tiles, programs_c),
        x2, y2, keep if keep is not None else y2, bias if bias is not None else y2, x2.shape[0],
        x2.stride(0), x2.stride(1), y2.stride(0), y2.stride(1), keep.stride(0) if keep is not None else 0,
        *seg_args, *_pad(us, u_fill), *_pad(vs or us, u_fill),
        PLUS=bool(vs), HAS_BIAS=bias is not None, HAS_KEEP=keep is not None, ACC=_acc(x.dtype),
        BLOCK_T=block_t, BLOCK_K=block_k, num_warps=_warps(block_t, block_k),
    )  # fmt: skip


@functools.cache
def _target_programs(device: int | None) -> int:
    """About four programs per streaming multiprocessor of the GPU (a few on the CPU's interpreter)."""
    return 8 if device is None else 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _programs_per_column(tiles: int, programs_c: int, device: torch.device) -> int:
    """Row programs of the backward: enough to fill a GPU (the partials then take ``rows x blocks x k`` fp32)."""
    target = _target_programs(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else _target_programs(None)  # fmt: skip
    return max(1, min(tiles, -(-target // programs_c)))


# --------------------------------------------------------------------------------------------------
# The custom ops. Segments: ``cols`` and ``sizes`` (first column and width of each), the first ``len(us)`` reflected
# by the vectors ``us`` (and ``vs`` for ETHER+, empty for ETHER), each ``(n, size // n)``; the others are passed
# through. Only what a backward needs is saved, by the autograd wrappers below.


@torch.library.custom_op("litgpt_ether::reflect_", mutates_args=("z", "keep"))
def reflect_(
    z: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor | None, us: list[torch.Tensor],
    vs: list[torch.Tensor], cols: list[int], sizes: list[int], n: int,
) -> None:  # fmt: skip
    """In place: ``z[..., c:c+s] <- z[..., c:c+s] @ H (+ bias)`` for every segment; ``keep`` (rows, reflected
    columns) gets the reflected segments' input for a backward that cannot recompute it."""
    _forward(z, z, keep, bias, us, vs, cols, sizes, n)


@reflect_.register_fake
def _(z, bias, keep, us, vs, cols, sizes, n) -> None:
    return None


@torch.library.custom_op("litgpt_ether::reflect", mutates_args=())
def reflect(x: torch.Tensor, us: list[torch.Tensor], vs: list[torch.Tensor], n: int) -> torch.Tensor:
    """``x @ H`` over the last dim, into a new tensor: an input side."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _forward(x, y, None, None, us, vs, [0], [x.shape[-1]], n)
    return y


@reflect.register_fake
def _(x, us, vs, n) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("litgpt_ether::reflect_backward", mutates_args=())
def reflect_backward(
    g: torch.Tensor, z: torch.Tensor, bias: torch.Tensor | None, us: list[torch.Tensor], vs: list[torch.Tensor],
    cols: list[int], sizes: list[int], zcols: list[int], n: int, recompute: bool,
) -> list[torch.Tensor]:  # fmt: skip
    """``[g @ H, *du, *dv]``: the gradient of a layer side's input (every segment: reflected ones through ``H``, the
    others as they are) and of the vectors. ``z`` holds the reflected segments' input at columns ``zcols``, or
    with ``recompute`` (ETHER) the output, at the segments' own columns."""
    g2 = _rows(g)
    z2 = _rows(z)
    dz = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    dz2 = dz.view(-1, dz.shape[-1])
    grads_u = [torch.empty_like(u) for u in us]
    grads_v = [torch.empty_like(v) for v in vs]
    seg_args, programs_c, block_k = _layout(cols, sizes, [*zcols, *[0] * (len(cols) - len(zcols))], len(us), n)
    block_t, tiles = _tiles(g2.shape[0], block_k)
    programs_t = _programs_per_column(tiles, programs_c, g.device)
    acc = _acc(g.dtype)
    # every program writes its whole slot (zeros where it has nothing): no memset needed
    partials = torch.empty(programs_t, programs_c, 2, block_k, dtype=_torch_acc(g.dtype), device=g.device)
    fill = us[0]
    if tiles > 0:
        _launch(
            _reflect_bwd, (programs_t, programs_c),
            g2, z2, bias if bias is not None else g2, dz2, partials, g2.shape[0], tiles, programs_t,
            g2.stride(0), g2.stride(1), z2.stride(0), z2.stride(1), dz2.stride(0), dz2.stride(1),
            *seg_args, *_pad(us, fill), *_pad(vs or us, fill),
            PLUS=bool(vs), RECOMPUTE=recompute, HAS_BIAS=recompute and bias is not None, ACC=acc,
            BLOCK_T=block_t, BLOCK_K=block_k, num_warps=_warps(block_t, block_k),
        )  # fmt: skip
    _launch(
        _reflect_finish, (programs_c, 2 if vs else 1),
        partials, programs_t if tiles > 0 else 0, *seg_args, *_pad(us, fill), *_pad(vs or us, fill),
        *_pad(grads_u, fill), *_pad(grads_v or grads_u, fill),
        PLUS=bool(vs), ACC=acc, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return [dz, *grads_u, *grads_v]


@reflect_backward.register_fake
def _(g, z, bias, us, vs, cols, sizes, zcols, n, recompute) -> list[torch.Tensor]:
    return [
        torch.empty(g.shape, dtype=g.dtype, device=g.device),
        *map(torch.empty_like, us),
        *map(torch.empty_like, vs),
    ]


def _row_args(starts: Sequence[int], ends: Sequence[int]) -> list[int]:
    pad = MAX_SEGMENTS - len(starts)
    return [*starts, *[0] * pad, *ends, *[0] * pad]


@torch.library.custom_op("litgpt_ether::input_dots", mutates_args=())
def input_dots(
    x: torch.Tensor, weight: torch.Tensor, us: list[torch.Tensor], vs: list[torch.Tensor], starts: list[int],
    ends: list[int], n: int,
) -> list[torch.Tensor]:  # fmt: skip
    """``[dots, proj]`` for the input reflections of a fused QKV's segments (rows ``starts:ends`` of ``weight``):
    ``dots[t, s, b, j] = c_j (x_t,b · w_sbj)`` and ``proj[f, s, b, j] = W[f, b] · w_sbj`` for ``f`` in segment
    ``s`` (zero elsewhere), both flattened to ``(rows, segments·n·j)``, in ``x``'s dtype: then
    ``x Wᵀ + dots @ projᵀ`` is every segment's ``x H_s W_sᵀ``."""
    x2 = _rows(x)
    segs, j, k = len(us), 2 if vs else 1, x.shape[-1] // n
    width = segs * n * j
    dots = torch.empty(x2.shape[0], width, dtype=x.dtype, device=x.device)
    proj = torch.zeros(weight.shape[0], width, dtype=x.dtype, device=x.device)
    global launches
    launches += 1  # the memset
    block_k = triton.next_power_of_2(k)
    fill = us[0]
    for out, rows, starts_, ends_, scale in ((dots, x2, [0] * segs, [x2.shape[0]] * segs, True),
                                             (proj, weight, starts, ends, False)):  # fmt: skip
        block_t, tiles = _tiles(max(e - s for s, e in zip(starts_, ends_)), block_k)
        if tiles == 0:
            continue
        _launch(
            _dots_fwd, (tiles, segs * n),
            rows, out, rows.stride(0), rows.stride(1), out.stride(0), n, k, *_row_args(starts_, ends_),
            *_pad(us, fill), *_pad(vs or us, fill),
            PLUS=bool(vs), SCALE=scale, ACC=_acc(x.dtype), BLOCK_T=block_t, BLOCK_K=block_k,
            num_warps=_warps(block_t, block_k),
        )  # fmt: skip
    return [dots, proj]


@input_dots.register_fake
def _(x, weight, us, vs, starts, ends, n) -> list[torch.Tensor]:
    width = len(us) * n * (2 if vs else 1)
    rows = x.numel() // x.shape[-1]
    return [x.new_empty(rows, width), x.new_empty(weight.shape[0], width)]


@torch.library.custom_op("litgpt_ether::input_dots_backward", mutates_args=())
def input_dots_backward(
    x: torch.Tensor, weight: torch.Tensor, grad_dots: torch.Tensor, grad_proj: torch.Tensor, us: list[torch.Tensor],
    vs: list[torch.Tensor], starts: list[int], ends: list[int], n: int,
) -> list[torch.Tensor]:  # fmt: skip
    """``[dx, *du, *dv]`` of ``input_dots``: both outputs' gradients reach the vectors through one normalisation."""
    x2, gd, gp = _rows(x), grad_dots, grad_proj
    segs, k = len(us), x.shape[-1] // n
    block_k = triton.next_power_of_2(k)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(-1, dx.shape[-1])
    grads_u = [torch.empty_like(u) for u in us]
    grads_v = [torch.empty_like(v) for v in vs]
    block_t, tiles_x = _tiles(x2.shape[0], block_k)
    programs_x = _programs_per_column(tiles_x, n, x.device)
    _, tiles_w = _tiles(max(e - s for s, e in zip(starts, ends)), block_k)
    programs_w = _programs_per_column(tiles_w, segs * n, x.device)
    partials = torch.empty(programs_x + programs_w, segs * n, 2, block_k, dtype=_torch_acc(x.dtype), device=x.device)
    fill, acc = us[0], _acc(x.dtype)
    common = dict(PLUS=bool(vs), ACC=acc, BLOCK_T=block_t, BLOCK_K=block_k, num_warps=_warps(block_t, block_k))
    vectors = [*_pad(us, fill), *_pad(vs or us, fill)]
    _launch(
        _dots_bwd, (programs_x, n),
        x2, gd, dx2, partials, tiles_x, programs_x, 0, x2.stride(0), x2.stride(1), gd.stride(0), dx2.stride(0),
        dx2.stride(1), n, k, *_row_args([0] * segs, [x2.shape[0]] * segs), *vectors,
        NSEG=segs, SCALE=True, ALL_ROWS=True, **common,
    )  # fmt: skip
    _launch(
        _dots_bwd, (programs_w, segs * n),
        weight, gp, dx2, partials, tiles_w, programs_w, programs_x, weight.stride(0), weight.stride(1),
        gp.stride(0), 0, 0, n, k, *_row_args(starts, ends), *vectors,
        NSEG=segs, SCALE=False, ALL_ROWS=False, **common,
    )  # fmt: skip
    seg_args, programs_c, _ = _layout([0] * segs, [n * k] * segs, [0] * segs, segs, n)
    _launch(
        _reflect_finish, (programs_c, 2 if vs else 1),
        partials, programs_x + programs_w, *seg_args, *vectors, *_pad(grads_u, fill), *_pad(grads_v or grads_u, fill),
        PLUS=bool(vs), ACC=acc, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return [dx, *grads_u, *grads_v]


@input_dots_backward.register_fake
def _(x, weight, grad_dots, grad_proj, us, vs, starts, ends, n) -> list[torch.Tensor]:
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device), *map(torch.empty_like, us),
            *map(torch.empty_like, vs)]  # fmt: skip


def _rows_forward(
    x: torch.Tensor, y: torch.Tensor, table: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None,
    coefs: Sequence[float], seg_w: int, x_seg_stride: int = 0, y_seg_stride: int = 0,
) -> None:  # fmt: skip
    """Launch ``_reflect_rows_fwd`` on ``x`` and ``y`` seen as ``(rows, columns)`` (their last two dims)."""
    _, n, j, k = table.shape
    rows = x.shape[-2]
    block_k = triton.next_power_of_2(k)
    block_t, tiles = _tiles(rows, block_k)
    if tiles > 0:
        _launch(
            _reflect_rows_fwd, (tiles, n),
            x, y, table, index, bias if bias is not None else x, rows, rows // index.shape[0], seg_w,
            x_seg_stride, x.stride(-2), x.stride(-1), y_seg_stride, y.stride(-2), y.stride(-1),
            n, k, j, coefs[0], coefs[1 % len(coefs)],
            HAS_BIAS=bias is not None, ACC=_acc(x.dtype), BLOCK_T=block_t, BLOCK_K=block_k,
            num_warps=_warps(block_t, block_k),
        )  # fmt: skip


@torch.library.custom_op("litgpt_ether::reflect_rows", mutates_args=())
def reflect_rows(
    x: torch.Tensor, table: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None, coefs: list[float]
) -> torch.Tensor:
    """Serving (inference only): ``x[b] @ H_{index[b]} (+ bias)`` for ``x`` of shape ``(B, T, n·k)``, every batch row
    with its own adapter's unit vectors from ``table`` (``(adapters, n, j, k)``, coefficients ``coefs`` per block:
    ``(-2,)`` or ``(-1, 1)`` repeated)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _rows_forward(_rows(x), y.view(-1, x.shape[-1]), table, index, bias, coefs, x.shape[-1])
    return y


@reflect_rows.register_fake
def _(x, table, index, bias, coefs) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("litgpt_ether::reflect_rows_", mutates_args=("x",))
def reflect_rows_(x: torch.Tensor, table: torch.Tensor, index: torch.Tensor, coefs: list[float]) -> None:
    """``reflect_rows`` in place (a fused QKV's output segment)."""
    x2 = _rows(x)
    _rows_forward(x2, x2, table, index, None, coefs, x.shape[-1])


@reflect_rows_.register_fake
def _(x, table, index, coefs) -> None:
    return None


@torch.library.custom_op("litgpt_ether::reflect_rows_stacked", mutates_args=())
def reflect_rows_stacked(x: torch.Tensor, table: torch.Tensor, index: torch.Tensor, coefs: list[float]) -> torch.Tensor:
    """``(S, rows, d)``: ``x`` (``(rows, d)``) reflected by each of the ``S`` segments of ``table`` (``S·n`` blocks
    over ``S·d`` columns; zeros: ``H = I``), the inputs of a fused QKV's segments, stacked for one batched matmul."""
    segments = table.shape[1] * table.shape[-1] // x.shape[-1]
    y = torch.empty(segments, *x.shape, dtype=x.dtype, device=x.device)
    _rows_forward(x, y, table, index, None, coefs, x.shape[-1], 0, y.stride(0))
    return y


@reflect_rows_stacked.register_fake
def _(x, table, index, coefs) -> torch.Tensor:
    return x.new_empty(table.shape[1] * table.shape[-1] // x.shape[-1], *x.shape)


@torch.library.custom_op("litgpt_ether::reflect_rows_unstacked", mutates_args=())
def reflect_rows_unstacked(
    z: torch.Tensor, table: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None, coefs: list[float]
) -> torch.Tensor:
    """``(rows, S·f)``: the ``S`` stacked outputs ``z`` (``(S, rows, f)``) side by side, each reflected by its
    segment of ``table``, then ``+ bias``: the fused QKV's output as one matrix again."""
    y = torch.empty(z.shape[1], z.shape[0] * z.shape[2], dtype=z.dtype, device=z.device)
    _rows_forward(z, y, table, index, bias, coefs, z.shape[-1], z.stride(0), z.shape[-1])
    return y


@reflect_rows_unstacked.register_fake
def _(z, table, index, bias, coefs) -> torch.Tensor:
    return z.new_empty(z.shape[1], z.shape[0] * z.shape[2])


# --------------------------------------------------------------------------------------------------
# Autograd


def _setup_reflect(ctx, inputs, output) -> None:
    x, us, vs, n = inputs
    ctx.save_for_backward(x, *us, *vs)
    ctx.n, ctx.j = n, len(us)


def _backward_reflect(ctx, g):
    x, *vectors = ctx.saved_tensors
    us, vs = vectors[: ctx.j], vectors[ctx.j :]
    dx, *grads = reflect_backward(g, x, None, us, vs, [0], [x.shape[-1]], [0], ctx.n, False)
    return dx, grads[: ctx.j], grads[ctx.j :], None


reflect.register_autograd(_backward_reflect, setup_context=_setup_reflect)


def reflect_input(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """``x @ H`` for one side's raw vectors ``u`` (and ``v``), each ``(n, k)``: the kernel form of
    ``Reflection.forward``."""
    return reflect(x, [u], [v] if v is not None else [], u.shape[0])


def _segments(width: int, slices: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Columns and widths: the reflected ``slices`` first, then the gaps between them (passed through)."""
    cols, sizes = [a for a, _ in slices], [b - a for a, b in slices]
    bounds = [0, *[x for ab in sorted(slices) for x in ab], width]  # gap i: bounds[2i] to bounds[2i + 1]
    for a, b in zip(bounds[::2], bounds[1::2]):
        if b > a:
            cols.append(a)
            sizes.append(b - a)
    return cols, sizes


def _reflect_segments_(
    z: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor | None, slices: Sequence[tuple[int, int]],
    us: list[torch.Tensor], vs: list[torch.Tensor], n: int,
) -> tuple[list[int], list[int]]:  # fmt: skip
    """``reflect_`` over ``slices`` of ``z``; returns every segment's columns and widths (the backward's layout). The
    passed-through segments get programs only for the bias."""
    cols, sizes = _segments(z.shape[-1], slices)
    n_segs = len(cols) if bias is not None else len(slices)
    reflect_(z, bias, keep, us, vs, cols[:n_segs], sizes[:n_segs], n)
    return cols, sizes


class _ReflectOutputs(torch.autograd.Function):
    """The kernel form of ``ether._ReflectOutputs``: column slices of a matmul's output reflected in place, then the
    bias added; ETHER saves nothing but the output (its input is recomputed), ETHER+ the reflected slices' input."""

    @staticmethod
    def forward(ctx, z, bias, slices, n, j, *tensors):  # noqa: ANN001, ANN205
        us, vs = list(tensors[:j]), list(tensors[j:])
        reflected = sum(b - a for a, b in slices)
        keep = z.new_empty(z.numel() // z.shape[-1], reflected) if vs else None
        cols, sizes = _reflect_segments_(z, bias, keep, slices, us, vs, n)
        ctx.mark_dirty(z)
        ctx.save_for_backward(keep if vs else z, bias, *us, *vs)
        ctx.cols, ctx.sizes, ctx.n, ctx.j = cols, sizes, n, j
        return z

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        saved, bias, *vectors = ctx.saved_tensors
        us, vs = vectors[: ctx.j], vectors[ctx.j :]
        plus = bool(vs)
        zcols = _keep_columns(ctx.sizes, len(us)) if plus else ctx.cols[: len(us)]
        dz, *grads = reflect_backward(g, saved, bias, us, vs, ctx.cols, ctx.sizes, zcols, ctx.n, not plus)
        return dz, None, None, None, None, *grads


def reflect_outputs_(
    z: torch.Tensor, bias: torch.Tensor | None, slices: Sequence[tuple[int, int]],
    vectors: Sequence[tuple[torch.Tensor, torch.Tensor | None]], extras: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:  # fmt: skip
    """``z[..., a:b] <- (z[..., a:b] + extra) @ H`` for each slice and its side's raw ``(u, v)``, then ``+ bias``, in
    place: the kernel form of ``ether.reflect_outputs``. Returns ``z``."""
    # autograd forbids writing into a view made inside another Function (bitsandbytes' int8 matmul on CUDA)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and z._is_view():
        z = z.clone()
    for (a, b), extra in zip(slices, extras or ()):  # the two-sided QKV's input sides, as low-rank corrections
        if extra is not None:
            z[..., a:b] += extra
    us = [u for u, _ in vectors]
    vs = [v for _, v in vectors if v is not None]
    n = us[0].shape[0]
    if not torch.is_grad_enabled() or not (z.requires_grad or any(t.requires_grad for t in (*us, *vs))):
        _reflect_segments_(z, bias, None, slices, us, vs, n)
        return z
    return _ReflectOutputs.apply(z, bias, tuple(slices), n, len(us), *us, *vs)


def _setup_input_dots(ctx, inputs, output) -> None:
    x, weight, us, vs, starts, ends, n = inputs
    ctx.save_for_backward(x, weight, *us, *vs)
    ctx.starts, ctx.ends, ctx.n, ctx.j = starts, ends, n, len(us)


def _backward_input_dots(ctx, grads):
    x, weight, *vectors = ctx.saved_tensors
    us, vs = vectors[: ctx.j], vectors[ctx.j :]
    width = len(vectors) * ctx.n
    shapes = ((x.numel() // x.shape[-1], width), (weight.shape[0], width))
    grad_dots, grad_proj = (g if g is not None else x.new_zeros(shape) for g, shape in zip(grads, shapes))
    dx, *grad_vectors = input_dots_backward(x, weight, grad_dots, grad_proj, us, vs, ctx.starts, ctx.ends, ctx.n)
    return dx, None, grad_vectors[: ctx.j], grad_vectors[ctx.j :], None, None, None


input_dots.register_autograd(_backward_input_dots, setup_context=_setup_input_dots)


def qkv_two_sided(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slices: Sequence[tuple[int, int]],
    out_vectors: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    in_vectors: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
) -> torch.Tensor:  # fmt: skip
    """A fused QKV with two-sided reflections per segment (``W'_s = H_s,out W_s H_s,in``) on a float weight: one
    matmul, the input sides as one low-rank correction (``input_dots`` and one ``addmm``), the output sides in place.
    """
    x2 = _rows(x)
    us = [u for u, _ in in_vectors]
    vs = [v for _, v in in_vectors if v is not None]
    dots, proj = input_dots(x2, weight, us, vs, [a for a, _ in slices], [b for _, b in slices], us[0].shape[0])
    z = torch.addmm(x2 @ weight.T, dots, proj.T)
    return reflect_outputs_(z, bias, slices, out_vectors).view(*x.shape[:-1], weight.shape[0])

"""The fused Triton kernels (``litgpt_ether.kernels``) against the dense reference that builds ``H`` entry by entry,
and against the torch path they replace.

On a machine without CUDA they run on CPU tensors through Triton's interpreter (``conftest`` sets
``TRITON_INTERPRET=1`` before anything imports them); with CUDA, on the GPU, compiled. Block sizes that are not
powers of two (k = 24, 48, 80), n in {1, 4, 32}, fp32 and bf16 activations (fp32 accumulation), strided inputs,
outputs and incoming gradients.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILIES
from test_ether import dense_h, ether_model, with_reference

from litgpt_ether import ConfigError, ether, mark_only_ether_as_trainable

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the kernels run on CPU tensors only under TRITON_INTERPRET=1", allow_module_level=True)
from litgpt_ether import kernels  # noqa: E402

# relative error allowed against the fp64 dense reference: bf16 activations are rounded once more on the way out
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    monkeypatch.setenv("LITGPT_ETHER_KERNELS", "triton")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def vectors(n: int, k: int, plus: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A side's raw ``(u, v)``, fp32 as finetuning keeps them, requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, k, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(n, k, generator=gen).to(DEVICE).requires_grad_() if plus else None
    return u, v


def h_of(u: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """The dense reference ``H`` in fp64 on the CPU, differentiable in ``u`` and ``v``."""
    return dense_h(u.cpu().double(), None if v is None else v.cpu().double())


def leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    return [t for t in tensors if t is not None]


def target_like(shape: tuple[int, ...], dtype: torch.dtype, seed: int, strided: bool) -> torch.Tensor:
    """A loss weight representable in ``dtype`` (so the incoming gradient is exact), laid out with strides when
    ``strided``: autograd then hands the kernels a non-contiguous gradient."""
    gen = torch.Generator().manual_seed(seed)
    if strided:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)
    else:
        t = torch.randn(*shape, generator=gen)
    return t.to(dtype).to(DEVICE)


def check_grads(out, ref, inputs, ref_inputs, target, tolerance) -> None:
    """Outputs and the gradients of ``sum(out * target)`` against the reference's."""
    assert out.dtype == inputs[0].dtype
    assert relative_error(out, ref) < tolerance
    grads = torch.autograd.grad((out * target).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * target.cpu().double()).sum(), ref_inputs)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == inputs[i].dtype and g.shape == inputs[i].shape
        assert relative_error(g, r) < tolerance, f"gradient {i}"


# ---------------------------------------------------------------------- one input side


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [24, 48, 80])
@pytest.mark.parametrize("n, layout", [(1, "contiguous"), (4, "contiguous"), (4, "strided"), (32, "contiguous")])
@pytest.mark.parametrize("plus", [False, True], ids=["ether", "etherplus"])
def test_input_side_matches_the_dense_reference_and_the_torch_path(plus, n, layout, k, dtype):
    u, v = vectors(n, k, plus, seed=n + k)
    gen = torch.Generator().manual_seed(1)
    if layout == "strided":  # (B, T, m) seen through a transpose: neither rows nor columns contiguous
        x = torch.randn(5, 2, n * k, generator=gen).to(dtype).to(DEVICE).transpose(0, 1)
    else:
        x = torch.randn(2, 5, n * k, generator=gen).to(dtype).to(DEVICE)
    x.requires_grad_()
    x_ref = x.detach().cpu().double().requires_grad_()
    u_ref, v_ref = (None if t is None else t.detach().cpu().requires_grad_() for t in (u, v))
    out = kernels.reflect_input(x, u, v)
    ref = x_ref @ h_of(u_ref, v_ref)
    target = target_like(out.shape, dtype, seed=2, strided=layout == "strided")
    check_grads(out, ref, leaves(x, u, v), leaves(x_ref, u_ref, v_ref), target, TOLERANCE[dtype])

    # the torch path it replaces (bf16: its unit vectors are rounded to bf16 too)
    reflection = ether.Reflection(n * k, n, plus).to(DEVICE)
    with torch.no_grad():
        reflection.u.copy_(u)
        if plus:
            reflection.v.copy_(v)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LITGPT_ETHER_KERNELS", "torch")
        torch_out = reflection(x)
    assert relative_error(out, torch_out) < 3 * TOLERANCE[dtype]


# ---------------------------------------------------------------------- a fused QKV's output side

# widths of the (q, k, v) blocks: multi-head, grouped-query (k and v half as wide) and multi-query attention
LAYOUTS = {"mha": (48, 48, 48), "gqa": (48, 24, 24), "mqa": (80, 24, 24)}
SEGMENTS = {"q": (0,), "k": (1,), "v": (2,), "qv": (0, 2), "qkv": (0, 1, 2)}


def bounds(layout: str, n: int) -> list[tuple[int, int]]:
    sizes = [n * k for k in LAYOUTS[layout]]
    return [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(3)]


def output_reference(z, bias, slices, sides) -> torch.Tensor:
    """Each slice of ``z`` times its dense ``H``, the rest as it is, then the bias: fp64 on the CPU."""
    z = z.cpu().double()
    pieces, end = [], 0
    for (a, b), (u, v) in sorted(zip(slices, sides), key=lambda s: s[0]):
        pieces += [z[..., end:a], z[..., a:b] @ h_of(u, v)]
        end = b
    out = torch.cat([*pieces, z[..., end:]], dim=-1)
    return out if bias is None else out + bias.cpu().double()


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("targets", list(SEGMENTS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("plus", [False, True], ids=["ether", "etherplus"])
def test_qkv_output_side_matches_the_dense_reference(plus, layout, targets, bias):
    check_output_side(plus, layout, targets, bias, n=4, dtype=torch.float32)


@pytest.mark.parametrize("n, dtype", [(1, torch.float32), (32, torch.float32), (4, torch.bfloat16)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("plus", [False, True], ids=["ether", "etherplus"])
def test_qkv_output_side_block_counts_and_bf16(plus, layout, n, dtype):
    check_output_side(plus, layout, "qv", True, n=n, dtype=dtype)


def check_output_side(plus: bool, layout: str, targets: str, bias: bool, n: int, dtype: torch.dtype) -> None:
    all_bounds = bounds(layout, n)
    slices = [all_bounds[i] for i in SEGMENTS[targets]]
    sides = [vectors(n, LAYOUTS[layout][i], plus, seed=10 + i) for i in SEGMENTS[targets]]
    width = all_bounds[-1][1]
    gen = torch.Generator().manual_seed(3)
    z0 = torch.randn(2, 3, width, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    b = torch.randn(width, generator=gen).to(dtype).to(DEVICE) if bias else None
    out = kernels.reflect_outputs_(z0 * 1, b, slices, sides)  # a fresh, non-leaf output, as a matmul's
    ref_z = z0.detach().cpu().double().requires_grad_()
    ref_sides = [tuple(None if t is None else t.detach().cpu().requires_grad_() for t in side) for side in sides]
    ref = output_reference(ref_z, b, slices, ref_sides)
    target = target_like(out.shape, dtype, seed=4, strided=True)
    inputs = leaves(z0, *[t for side in sides for t in side])
    ref_inputs = leaves(ref_z, *[t for side in ref_sides for t in side])
    check_grads(out, ref, inputs, ref_inputs, target, TOLERANCE[dtype])


@pytest.mark.parametrize("plus", [False, True], ids=["ether", "etherplus"])
def test_output_side_writes_into_a_strided_output_and_nowhere_else(plus):
    """Without autograd the reflection goes straight into the given tensor, here every other column of a wider one:
    the columns in between must come out untouched."""
    n, layout = 4, "gqa"
    all_bounds = bounds(layout, n)
    width = all_bounds[-1][1]
    slices = [all_bounds[0], all_bounds[2]]
    sides = [vectors(n, LAYOUTS[layout][i], plus, seed=i) for i in (0, 2)]
    wide = torch.randn(6, 2 * width, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    before = wide.clone()
    b = torch.randn(width, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    z = wide[:, ::2]
    with torch.no_grad():
        out = kernels.reflect_outputs_(z, b, slices, sides)
    assert out.data_ptr() == wide.data_ptr()
    torch.testing.assert_close(wide[:, 1::2], before[:, 1::2], rtol=0, atol=0)
    ref = output_reference(before[:, ::2], b, slices, [tuple(t.detach() if t is not None else None for t in s)
                                                         for s in sides])  # fmt: skip
    assert relative_error(wide[:, ::2], ref) < TOLERANCE[torch.float32]


# ---------------------------------------------------------------------- a two-sided QKV (input and output sides)


TWO_SIDED = [(layout, targets, 4, torch.float32) for layout in LAYOUTS for targets in ("qv", "qkv")]
TWO_SIDED += [("gqa", "q", 1, torch.float32), ("mqa", "v", 1, torch.float32), ("gqa", "qv", 32, torch.float32)]
TWO_SIDED += [("mha", "qv", 4, torch.bfloat16), ("mqa", "qkv", 4, torch.bfloat16)]


@pytest.mark.parametrize("layout, targets, n, dtype", TWO_SIDED)
def test_two_sided_qkv_matches_the_dense_reference(layout, targets, n, dtype):
    k_in = 24
    d = n * k_in
    all_bounds = bounds(layout, n)
    width = all_bounds[-1][1]
    idx = SEGMENTS[targets]
    slices = [all_bounds[i] for i in idx]
    outs = [vectors(n, LAYOUTS[layout][i], True, seed=20 + i) for i in idx]
    ins = [vectors(n, k_in, True, seed=30 + i) for i in idx]
    gen = torch.Generator().manual_seed(7)
    weight = (torch.randn(width, d, generator=gen) / d**0.5).to(dtype).to(DEVICE)
    bias = torch.randn(width, generator=gen).to(dtype).to(DEVICE)
    x = torch.randn(2, 3, d, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    out = kernels.qkv_two_sided(x, weight, bias, slices, outs, ins)

    # reference: W'_s = H_out W_s H_in per targeted segment, then x W'ᵀ + b
    x_ref = x.detach().cpu().double().requires_grad_()
    ref_outs = [tuple(t.detach().cpu().requires_grad_() for t in side) for side in outs]
    ref_ins = [tuple(t.detach().cpu().requires_grad_() for t in side) for side in ins]
    w = weight.cpu().double()
    pieces = []
    for i, (a, b) in enumerate(all_bounds):
        w_s = w[a:b]
        if i in idx:
            j = idx.index(i)
            w_s = h_of(*ref_outs[j]) @ w_s @ h_of(*ref_ins[j])
        pieces.append(w_s)
    ref = x_ref @ torch.cat(pieces).T + bias.cpu().double()
    target = target_like(out.shape, dtype, seed=8, strided=False)
    inputs = leaves(x, *[t for side in outs + ins for t in side])
    ref_inputs = leaves(x_ref, *[t for side in ref_outs + ref_ins for t in side])
    check_grads(out, ref, inputs, ref_inputs, target, 2 * TOLERANCE[dtype])


# ---------------------------------------------------------------------- serving: a reflection per batch row


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("coefs", [(-2.0,), (-1.0, 1.0), (-1.0, 1.0, -1.0, 1.0)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_per_row_reflections_match_each_rows_dense_h(tokens, coefs, bias):
    """``serve``'s table of every adapter's unit vectors, a row -> adapter index, one launch for the whole batch."""
    batch, adapters, n, k = 4, 3, 2, 24
    gen = torch.Generator().manual_seed(9)
    table = torch.nn.functional.normalize(torch.randn(adapters, n, len(coefs), k, generator=gen), dim=-1)
    index = torch.tensor([2, 0, 1, 2])
    x = torch.randn(batch, tokens, n * k, generator=gen)
    b = torch.randn(n * k, generator=gen) if bias else None
    dense = []
    for row in range(batch):
        blocks = [sum(c * torch.outer(w[i], w[i]) for i, c in enumerate(coefs)) for w in table[index[row]].double()]
        h = torch.eye(n * k, dtype=torch.float64) + torch.block_diag(*blocks)
        dense.append(x[row].double() @ h + (0 if b is None else b.double()))
    dense = torch.stack(dense)
    args = (table.to(DEVICE), index.to(DEVICE))
    out = kernels.reflect_rows(x.to(DEVICE), *args, None if b is None else b.to(DEVICE), list(coefs))
    assert relative_error(out, dense) < TOLERANCE[torch.float32]
    if bias:
        return
    wide = torch.randn(batch, tokens, 3 * n * k, generator=gen).to(DEVICE)  # in place, on a slice of a wider output
    before = wide.clone()
    wide[..., n * k : 2 * n * k] = x.to(DEVICE)
    kernels.reflect_rows_(wide[..., n * k : 2 * n * k], *args, list(coefs))
    assert relative_error(wide[..., n * k : 2 * n * k], dense) < TOLERANCE[torch.float32]
    torch.testing.assert_close(wide[..., : n * k], before[..., : n * k], rtol=0, atol=0)
    torch.testing.assert_close(wide[..., 2 * n * k :], before[..., 2 * n * k :], rtol=0, atol=0)


# ---------------------------------------------------------------------- whole models


# ETHER+ one-sided without the flip runs the kernels ETHER does; the mixture of experts (slow here: a launch per
# expert and linear) the kernels two-sided ETHER+ runs, every one of them
MODEL_CASES = [(f, m) for f in FAMILIES if f != "moe" for m in ("ether", "ether-flip", "etherplus",
               "etherplus-one-sided-flip")] + [("moe", "etherplus")]  # fmt: skip


@pytest.mark.skipif(DEVICE == "cuda", reason="test_cuda runs the models on the GPU against this reference")
@pytest.mark.parametrize("family, method", MODEL_CASES)
def test_models_with_the_kernels_match_the_dense_reference(family, method):
    """test_ether's equivalence test with the kernels doing every reflection (fp64, as the reference): every target
    at once, q, k and v on the fused QKV and one input or output side on the projection, the MLP and the head."""
    model = ether_model(family, method, "qkv", 4, ether_projection=True, ether_mlp=True, ether_head=True)
    mark_only_ether_as_trainable(model)
    results = []
    assert count_kernel_ops(lambda: results.extend(with_reference(model))), "no kernel ran"
    out, grads, ref, ref_grads = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def count_kernel_ops(fn) -> dict[str, int]:
    """How often each of this package's custom ops runs during ``fn()``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "litgpt_ether":
                name = func.overloadpacket.__name__
                self.calls[name] = self.calls.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        fn()
    return counter.calls


@pytest.mark.parametrize("method", ["ether", "etherplus", "etherplus-one-sided"])
def test_one_kernel_per_layer_side_forward_and_one_op_backward(method):
    """Every targeted layer side is one op in the forward, whatever the number of segments or blocks, and one in the
    backward: q and v of both layers, and for two-sided ETHER+ their input sides too (one ``input_dots`` each)."""
    model = ether_model("llama-gqa", method, "qv", 4).float().to(DEVICE)
    mark_only_ether_as_trainable(model)
    idx = torch.randint(0, 48, (2, 8), device=DEVICE)
    calls = count_kernel_ops(lambda: model(idx).sum().backward())
    layers = model.config.n_layer
    two_sided = method == "etherplus"
    expected = {"reflect_": layers, "reflect_backward": layers}
    if two_sided:
        expected |= {"input_dots": layers, "input_dots_backward": layers}
    assert calls == expected


def test_a_bf16_model_with_the_kernels_stays_close_to_the_reference():
    model = ether_model("llama-gqa", "etherplus", "qkv", 4, ether_mlp=True, ether_projection=True)
    idx = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(1))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LITGPT_ETHER_KERNELS", "torch")
        with torch.no_grad():
            ref = model(idx)
    model = model.to(DEVICE).bfloat16()
    out = model(idx.to(DEVICE))
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref) < 3e-2
    with torch.no_grad():  # the inference path (no autograd, reflections straight into the output)
        assert relative_error(model(idx.to(DEVICE)), out) < 1e-2


# ---------------------------------------------------------------------- choosing the path


def test_the_kernel_mode_is_checked_and_torch_turns_the_kernels_off(monkeypatch):
    model = ether_model("llama-mha", "ether", "qv", 2).float().to(DEVICE)
    idx = torch.randint(0, 48, (2, 8), device=DEVICE)
    monkeypatch.setenv("LITGPT_ETHER_KERNELS", "fast")
    with pytest.raises(ConfigError, match="LITGPT_ETHER_KERNELS must be one of auto, torch, triton, got 'fast'"):
        model(idx)
    for mode in ("torch", "auto"):  # auto: opt-in until the CUDA suite has passed with the kernels on a real GPU
        monkeypatch.setenv("LITGPT_ETHER_KERNELS", mode)
        assert count_kernel_ops(lambda: model(idx).sum().backward()) == {}
    if DEVICE == "cpu":  # CPU tensors without the interpreter: the torch path, the CPU implementation
        monkeypatch.setenv("LITGPT_ETHER_KERNELS", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert count_kernel_ops(lambda: model(idx).sum().backward()) == {}


@pytest.mark.parametrize("method", ["ether", "etherplus"])
def test_a_compiled_block_has_no_graph_break_and_matches_eager(monkeypatch, method):
    # a cached graph could keep serving an old backward of a custom op
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    monkeypatch.setenv("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    from torch._dynamo.utils import counters

    model = ether_model("llama-gqa", method, "qv", 4).float().to(DEVICE)
    mark_only_ether_as_trainable(model)
    block = model.transformer.h[0]
    x = torch.randn(2, 8, 16, device=DEVICE, requires_grad=True)
    cos, sin = model.cos[:8].unsqueeze(0), model.sin[:8].unsqueeze(0)
    results = []
    torch._dynamo.reset()
    counters.clear()
    for fn in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        out = fn(x, cos, sin)
        out.sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in block.parameters() if p.requires_grad]))
        block.zero_grad()
    assert not counters["graph_break"]
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b)


COMPILE_FOR_CUDA = """
import itertools, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from litgpt_ether import kernels as K

VECTORS = {"P": "*fp32", **{f"{p}{i}": "*fp32" for p in ("U", "V", "GU", "GV") for i in range(3)}}
ACTIVATIONS = {"X", "Y", "KEEP", "BIAS", "G", "Z", "DZ", "DX", "GD", "OUT"}
def build(fn, dtype, **constexprs):
    sig = {a: "constexpr" if a in constexprs else VECTORS.get(a, f"*{dtype}" if a in ACTIVATIONS else "i32")
           for a in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
B = dict(ACC=tl.float32, BLOCK_K=64, BLOCK_T=64)
for plus, bias, keep in itertools.product([False, True], repeat=3):
    build(K._reflect_fwd, "bf16", PLUS=plus, HAS_BIAS=bias, HAS_KEEP=keep, **B)
for plus, recompute, bias in itertools.product([False, True], repeat=3):
    build(K._reflect_bwd, "bf16", PLUS=plus, RECOMPUTE=recompute, HAS_BIAS=bias, **B)
for plus, scale in itertools.product([False, True], repeat=2):
    build(K._dots_fwd, "bf16", PLUS=plus, SCALE=scale, **B)
for nseg, plus, all_rows in itertools.product([1, 2, 3], [False, True], [False, True]):
    build(K._dots_bwd, "bf16", NSEG=nseg, PLUS=plus, SCALE=all_rows, ALL_ROWS=all_rows, **B)
for plus in (False, True):
    build(K._reflect_finish, "fp32", PLUS=plus, ACC=tl.float32, BLOCK_K=64)
for dtype in ("fp16", "fp32"):  # the other activation dtypes: every kernel once
    build(K._reflect_fwd, dtype, PLUS=True, HAS_BIAS=True, HAS_KEEP=True, **B)
    build(K._reflect_bwd, dtype, PLUS=True, RECOMPUTE=False, HAS_BIAS=True, **B)
    build(K._dots_fwd, dtype, PLUS=True, SCALE=True, **B)
    build(K._dots_bwd, dtype, NSEG=3, PLUS=True, SCALE=True, ALL_ROWS=True, **B)
print("compiled")
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the CUDA run compiles them for its own GPU")
def test_every_kernel_compiles_for_cuda():
    """The interpreter runs the kernels' Python; this compiles each variant to a CUDA binary (sm_90: H100, H200) as on
    a GPU, with Triton's own ptxas, so what only the compiler refuses is found without one."""
    from importlib.util import find_spec

    if find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(COMPILE_FOR_CUDA)], capture_output=True, text=True,
                            env=env | {"TRITON_DEFAULT_FP_FUSION": "1"}, timeout=600)  # fmt: skip
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]

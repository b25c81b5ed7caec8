"""Numerics: reflection vectors of zero or tiny norm, and training at a large learning rate, stay finite."""

import copy
import csv
import math

import litgpt.model
import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, finetune_args, run_main

from litgpt_ether import GPT, Config, mark_only_ether_as_trainable, merge_ether
from litgpt_ether.checkpoint import ADAPTER_FILE, load_adapter
from litgpt_ether.ether import Reflection, reflect_outputs, unit_vectors

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = dict(
    ether_query=True, ether_key=True, ether_value=True, ether_projection=True, ether_mlp=True, ether_head=True
)
METHODS = {"ether": {}, "etherplus": {}, "etherplus-one-sided": {"ether_one_sided": True}}


def distance_from_identity(reflection: Reflection) -> float:
    """``||H - I||_F`` with ``H`` built explicitly, in fp32: ``I @ H`` through the layer's own forward."""
    n, k = reflection.u.shape
    eye = torch.eye(n * k)
    with torch.no_grad():
        return torch.linalg.matrix_norm(reflection.float()(eye) - eye).item()


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-20, 5e-13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_vectors_of_zero_or_tiny_norm_are_finite_and_only_their_direction_counts(method, dtype, scale):
    """A zero vector gives H = I; a tiny one is a direction like any other: the same model as at unit scale."""
    torch.manual_seed(0)
    config = Config(
        **FAMILIES["llama-gqa"], ether_method=method.split("-")[0], ether_nb=2, **TARGETS, **METHODS[method]
    )
    model = GPT(config).to(dtype)
    mark_only_ether_as_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:
            p.copy_(torch.randn_like(p) * scale)
    assert all(p.abs().max() <= 10 * scale for p in trainable) and (
        scale == 0 or any(p.abs().max() > 0 for p in trainable)
    )

    if scale == 0:
        reference = litgpt.model.GPT(litgpt.config.Config(**FAMILIES["llama-gqa"])).to(dtype)
        reference.load_state_dict(model.state_dict(), strict=False)
    else:
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for p in reference.parameters():
                if p.requires_grad:
                    p.copy_((p.double() / scale).to(dtype))
    idx = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    logits = model(idx)
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        tol = 1e-5 if dtype == torch.float32 else 5e-2  # bf16: the rescaled copy of the vectors rounds differently
        torch.testing.assert_close(logits, reference(idx), rtol=0 if scale == 0 else tol, atol=0 if scale == 0 else tol)

    F.cross_entropy(logits.float().flatten(0, 1), idx.roll(-1, dims=1).flatten()).backward()
    for p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all()

    merged = merge_ether(copy.deepcopy(model)).state_dict()
    assert all(torch.isfinite(v).all() for v in merged.values())
    expected = merge_ether(copy.deepcopy(reference)).state_dict() if scale else reference.state_dict()
    for name, w in expected.items():
        torch.testing.assert_close(merged[name], w, rtol=0, atol=0 if scale == 0 else 1e-2)


@pytest.mark.parametrize("scale", [1e-20, 5e-13, 1e-11, 1.0])
@pytest.mark.parametrize("method", ["ether", "etherplus"])
def test_in_place_output_reflection_has_autograds_gradient_at_any_norm(method, scale):
    """ETHER's output side recomputes its input from its output (``H² = I``): exact only if the vectors are unit."""
    torch.manual_seed(0)
    reflection = Reflection(8, 2, plus=method == "etherplus").double()
    with torch.no_grad():
        for p in reflection.parameters():
            p.mul_(scale)
    z, g = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    (reflect_outputs(z.clone(), None, [(0, 8)], [reflection]) * g).sum().backward()
    fast = [p.grad.clone() for p in reflection.parameters()]
    reflection.zero_grad()
    (reflection(z) * g).sum().backward()
    for a, b in zip(fast, (p.grad for p in reflection.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0)


def logged_losses(out_dir) -> list[float]:
    with open(out_dir / "logs" / "csv" / "version_0" / "metrics.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f) if row.get("loss")]


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "16-true"])
@pytest.mark.parametrize("method", ["ether", "etherplus"])
def test_training_at_learning_rate_0_1_stays_finite_and_bounded(
    checkpoint_dir, dataset_path, tmp_path, method, precision
):
    out_dir = tmp_path / "out"
    extra = ["--ether_method", method, "--precision", precision, "--optimizer.lr", "0.1", "--train.max_steps", "6"]
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, *extra))
    assert result.returncode == 0, result.stderr[-3000:]  # a non-finite loss would have stopped the run

    losses = logged_losses(out_dir)
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    state, ether_args = load_adapter(out_dir / "final" / ADAPTER_FILE)
    # 16-true trains the vectors in fp32 (AdamW's state in float16 is NaN from its second step)
    assert {v.dtype for v in state.values()} == {torch.bfloat16 if precision == "bf16-true" else torch.float32}
    assert all(torch.isfinite(v).all() for v in state.values())
    merged = torch.load(out_dir / "final" / "lit_model.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in merged.values())

    model = GPT(Config.from_file(checkpoint_dir / "model_config.yaml", **ether_args))
    model.load_state_dict(state, strict=False)
    reflections = [m for m in model.modules() if isinstance(m, Reflection)]
    assert reflections
    for reflection in reflections:
        n = reflection.u.shape[0]
        if method == "ether":  # I - 2 û ûᵀ per block, whatever û
            assert distance_from_identity(reflection) == pytest.approx(2 * math.sqrt(n), abs=1e-4)
        else:  # ||v̂ v̂ᵀ - û ûᵀ||_F² = 2 - 2 (û · v̂)² per block
            assert distance_from_identity(reflection) <= math.sqrt(2 * n) + 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e20])
def test_unit_vectors_gradient_matches_the_plain_formula(dtype, plus, scale):
    """``unit_vectors`` divides by a detached scale before normalising: its gradient must still be the plain
    formula's, ``w / |w|`` through autograd in fp64, for tiny, ordinary and huge vectors."""
    generator = torch.Generator().manual_seed(0)
    u, v = (torch.randn(4, 8, dtype=torch.float64, generator=generator) * scale for _ in range(2))
    u, v = u.to(dtype).requires_grad_(), v.to(dtype).requires_grad_() if plus else None
    params = [p for p in (u, v) if p is not None]
    g = torch.randn(4, len(params), 8, dtype=torch.float64, generator=generator)
    out = unit_vectors(u, v).double()
    grads = torch.autograd.grad((out * g).sum(), params)

    exact = [p.detach().double().requires_grad_() for p in params]
    w = torch.stack(exact, dim=1)
    ref = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)  # fp64 holds 1e-30 squared; no eps clamp needed
    ref_grads = torch.autograd.grad((ref * g).sum(), exact)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # bf16: the gradient is rounded to bf16 at the end
    torch.testing.assert_close(out, ref.detach(), rtol=tol, atol=tol)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == dtype
        assert ((grad.double() - ref_grad).norm() / ref_grad.norm()).item() < tol

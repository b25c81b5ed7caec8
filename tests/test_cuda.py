"""The layers on CUDA against the dense reference built on the CPU: the same math whichever device runs it.

The CPU suite proves the layers against ``H`` built entry by entry; these tests run the same models on a GPU
(fp64, then bf16 as finetuning runs them), where attention, matmuls and the inference fast path take other
kernels. They skip without CUDA.
"""

import warnings

import pytest
import torch
from conftest import FAMILIES
from test_ether import METHODS, base_model, ether_grads, ether_model, reference_forward

from litgpt_ether import mark_only_ether_as_trainable, merge_ether

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the layers on a CUDA device")

ALL_TARGETS = dict(ether_projection=True, ether_mlp=True, ether_head=True)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=["torch", "triton"])
def kernels(request, monkeypatch) -> str:
    """Both paths: the torch code, and the fused Triton kernels (``LITGPT_ETHER_KERNELS=triton``, compiled for this
    GPU; OFT and Naive have none and stay on the torch path)."""
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("LITGPT_ETHER_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("method", list(METHODS))
def test_cuda_matches_the_cpu_dense_reference(family, method, n, kernels):
    model = ether_model(family, method, "qkv", n, **ALL_TARGETS)
    mark_only_ether_as_trainable(model)
    idx = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 8, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = reference_forward(model, idx)  # on the CPU, from the layers' raw parameters
    (ref * target).sum().backward()
    ref_grads = ether_grads(model)
    model.zero_grad()

    model.cuda()
    out = model(idx.cuda())
    (out * target.cuda()).sum().backward()
    grads = ether_grads(model)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:  # litgpt's norms compute in fp32, with other kernels than the CPU's: per-tensor tolerance
        difference = (grads[name].cpu() - ref_grads[name]).norm()
        assert difference <= 1e-5 * ref_grads[name].norm() + 1e-10, name  # some are 0 (a block of size 1)

    # bf16 as finetuning runs it: the training path, then the inference fast path (no autograd). Not for the
    # mixture of experts: bf16 rounding can flip a near-tie in its top-k routing, a discontinuous change.
    if family == "moe":
        return
    model.zero_grad()
    model.bfloat16()
    out = model(idx.cuda())
    assert relative_error(out, ref) < 3e-2
    with torch.no_grad():
        assert relative_error(model(idx.cuda()), out) < 1e-2


@pytest.mark.parametrize("family", ["llama-gqa", "neox-bias"])
@pytest.mark.parametrize("method", ["ether", "etherplus", "oft"])
def test_cuda_merge_in_bf16_matches_the_unmerged_model(family, method):
    model = ether_model(family, method, "qkv", 2, **ALL_TARGETS).cuda().bfloat16()
    idx = torch.randint(0, 48, (2, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        before = model(idx)
        merge_ether(model)
        after = model(idx)
    assert after.dtype == torch.bfloat16
    assert relative_error(after, before) < 2e-2


def synchronizations(step) -> int:
    """How many times ``step()`` makes the CPU wait for the GPU (``torch.cuda.set_sync_debug_mode`` warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # only torch's per-sync warning: the notice it gives once per process on entering the mode ("... does not yet
    # detect all synchronizing operations") counted too, and failed whichever test a worker ran first
    return sum(str(w.message).startswith("called a synchronizing CUDA operation") for w in caught)


@pytest.mark.parametrize("method", ["ether", "etherplus", "etherplus-one-sided", "oft", "naive"])
def test_a_training_step_synchronizes_no_more_than_the_base_model(method, kernels):
    """A synchronization drains the GPU's queue: the CPU then issues the next kernels while the GPU waits. ETHER+
    once made one at every reflection (a tensor of its coefficients built from Python numbers)."""
    model = ether_model("llama-gqa", method, "qkv", 2, **ALL_TARGETS)
    mark_only_ether_as_trainable(model)
    base = base_model(model).cuda().float()
    model = model.cuda().float()
    idx = torch.randint(0, 48, (2, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    counts = []
    for m in (model, base):
        m(idx).sum().backward()  # warm-up: what the first call caches
        counts.append(synchronizations(lambda m=m: m(idx).sum().backward()))
    assert counts[0] == counts[1]

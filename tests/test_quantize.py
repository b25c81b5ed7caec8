"""Quantized base weights: ETHER acts on the activations around a bitsandbytes layer, never on its weight.

bitsandbytes quantizes and multiplies 4-bit weights on the CPU too, so the layers are checked here against the
dense reference built from the weights the quantized layers really use. Fabric's plugin quantizes on CUDA only:
the finetune run with ``--quantize`` needs a GPU and skips without one.
"""

import copy

import pytest
import torch
from conftest import finetune_args, run_main
from test_ether import METHODS, ether_grads, ether_model, reference_forward, with_reference

from litgpt_ether.checkpoint import ADAPTER_FILE, MODEL_FILE, Resolved, load_adapter, merge_adapter
from litgpt_ether.ether import (
    ConfigError,
    ether_filter,
    ether_layers,
    load_base_checkpoint,
    mark_only_ether_as_trainable,
    merge_ether,
)

bnb = pytest.importorskip("bitsandbytes", reason="the quant extra installs bitsandbytes")


def quantize_ether_linears(model: torch.nn.Module, quant_type: str) -> dict[str, torch.Tensor]:
    """Swap the linear inside every ETHER layer for a bitsandbytes 4-bit one, quantized on the CPU. Returns the
    dense weights those layers now compute with: the identity run through each, keyed like the base model."""
    dense = {}
    for name, layer in ether_layers(model):
        weight = layer.linear.weight.detach().float()
        linear = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False, compute_dtype=torch.float32,
                                   quant_type=quant_type)  # fmt: skip
        linear.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type)
        layer.linear = linear.to("cpu")  # quantizes
        assert layer.weight.dtype == torch.uint8
        with torch.no_grad():
            dense[f"{name}.weight"] = layer.linear(torch.eye(layer.in_features)).T.double()
        assert not torch.equal(dense[f"{name}.weight"], weight.double())  # 4 bits changed the weight
    return dense


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
# every method, each side once: the flipped OFT and Naive add nothing around a quantized layer that ether-flip does not
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("oft-flip", "naive-flip")])
@pytest.mark.parametrize("family", ["llama-gqa", "neox-bias"])
def test_ether_around_a_quantized_linear_matches_the_dense_reference(family, method, quant_type):
    twin = ether_model(family, method, "qkv", 2, ether_projection=True, ether_mlp=True, ether_head=True)
    model = copy.deepcopy(twin).float()
    twin.load_state_dict(quantize_ether_linears(model, quant_type), strict=False)  # the weights model computes with
    mark_only_ether_as_trainable(model)
    mark_only_ether_as_trainable(twin)
    idx = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 8, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    out = model(idx)
    (out.double() * target).sum().backward()
    ref = reference_forward(twin, idx)
    (ref * target).sum().backward()

    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    grads, ref_grads = ether_grads(model), ether_grads(twin)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name].double(), ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


class _ViewOutput(torch.autograd.Function):
    """``x Wᵀ`` returned as a view made inside the Function, as bitsandbytes' int8 matmul does on CUDA."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return (x.reshape(-1, x.shape[-1]) @ weight.T).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad @ weight, None


class ViewOutputLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ViewOutput.apply(x, self.weight)


@pytest.mark.parametrize("method", ["ether", "etherplus", "etherplus-one-sided-flip"])
def test_an_output_side_on_a_linear_that_returns_a_view_matches_the_dense_reference(method):
    """Autograd forbids writing into a view made inside another Function: the output side must not (int8 on CUDA)."""
    model = ether_model("neox-bias", method, "qkv", 2, ether_projection=True, ether_mlp=True, ether_head=True)
    for _, layer in ether_layers(model):
        linear = ViewOutputLinear(layer.in_features, layer.out_features, bias=False, device="meta")
        linear.weight = layer.linear.weight
        layer.linear = linear
    mark_only_ether_as_trainable(model)
    out, grads, ref, ref_grads = with_reference(model)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_quantized_model_checks_a_checkpoint_against_the_shapes_its_packed_weights_stand_for(tmp_path):
    model = ether_model("llama-gqa", "etherplus", "qkv", 2, ether_mlp=True).float()
    base = {k: v for k, v in model.state_dict().items() if not ether_filter(k, v)}
    quantize_ether_linears(model, "nf4")  # 4-bit weights are stored packed, (n, 1)
    base["lm_head.weight"] = base["lm_head.weight"][:, :-1].clone()  # the one tensor that really differs
    torch.save(base, tmp_path / "lit_model.pth")
    with pytest.raises(
        ConfigError, match=r"lm_head.weight has shape \(48, 15\), the model wants \(48, 16\) \(1 tensors"
    ):
        load_base_checkpoint(model, tmp_path / "lit_model.pth")


def test_a_quantized_layer_is_not_merged_in_place():
    model = ether_model("llama-mha", "etherplus", "qv", 2).float()
    quantize_ether_linears(model, "nf4")
    with pytest.raises(ConfigError, match="merge into the full-precision base checkpoint"):
        merge_ether(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Fabric's bitsandbytes plugin quantizes on CUDA only")
@pytest.mark.parametrize("quantize", ["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8-training"])
def test_finetune_on_a_quantized_base_merges_into_full_precision_weights(
    checkpoint_dir, dataset_path, tmp_path, quantize
):
    out_dir = tmp_path / "out"
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, "--quantize", quantize,
                                     "--precision", "16-true" if "int8" in quantize else "bf16-true",
                                     "--train.max_steps", "4", "--accelerator", "cuda"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    final = out_dir / "final"
    state, _ = load_adapter(final / ADAPTER_FILE)
    assert all(torch.isfinite(v).all() for v in state.values())
    # the merged weights are the full-precision base's, reflected: the same as merging the adapter afresh
    again = merge_adapter(Resolved(final, checkpoint_dir, final / ADAPTER_FILE), tmp_path / "again")
    merged, expected = torch.load(final / MODEL_FILE), torch.load(again)
    assert merged.keys() == expected.keys()
    for key in merged:
        assert merged[key].dtype == expected[key].dtype and torch.equal(merged[key], expected[key]), key

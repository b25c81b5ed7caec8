"""The activation-side layers against an independent dense reference that builds H explicitly."""

import dataclasses
import math
from functools import partial

import litgpt.config
import litgpt.model
import pytest
import torch
import torch.nn as nn
from conftest import FAMILIES
from torch.func import functional_call

from litgpt_ether import (
    GPT,
    Config,
    ConfigError,
    ETHERLinear,
    ETHERQKVLinear,
    ether_filter,
    load_base_checkpoint,
    mark_only_ether_as_trainable,
    merge_ether,
)

# method name -> Config fields
METHODS = {
    "ether": dict(ether_method="ether"),
    "ether-flip": dict(ether_method="ether", ether_flip_side=True),
    "etherplus": dict(ether_method="etherplus"),
    "etherplus-one-sided": dict(ether_method="etherplus", ether_one_sided=True),
    "etherplus-one-sided-flip": dict(ether_method="etherplus", ether_one_sided=True, ether_flip_side=True),
    "oft": dict(ether_method="oft"),
    "oft-flip": dict(ether_method="oft", ether_flip_side=True),
    "naive": dict(ether_method="naive"),
    "naive-flip": dict(ether_method="naive", ether_flip_side=True),
}
TARGETS = {
    "q": dict(ether_query=True),
    "k": dict(ether_key=True),
    "v": dict(ether_value=True),
    "qv": dict(ether_query=True, ether_value=True),
    "qkv": dict(ether_query=True, ether_key=True, ether_value=True),
    "proj": dict(ether_projection=True),
    "mlp": dict(ether_mlp=True),
    "head": dict(ether_head=True),
}


def ether_model(family: str, method: str, targets: str, n: int, **extra) -> GPT:
    config = Config(**FAMILIES[family], **METHODS[method], **TARGETS[targets], ether_nb=n, **extra)
    torch.manual_seed(0)
    model = GPT(config).double()
    with torch.no_grad():  # random (u, v) and R: ETHER+, OFT and Naive start at H = I, which would hide side mix-ups
        for name, p in model.named_parameters():
            if ether_filter(name, p):
                p.copy_(torch.randn_like(p) * (0.3 if name.endswith(".R") else 1.0))
    return model


# ---------------------------------------------------------------------- the independent reference


def dense_h(u: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """blockdiag_i(I - 2 û ûᵀ) for ETHER, blockdiag_i(I - û ûᵀ + v̂ v̂ᵀ) for ETHER+, built entry by entry."""
    blocks = []
    for i in range(u.shape[0]):
        uh = u[i] / u[i].norm()
        eye = torch.eye(u.shape[1], dtype=u.dtype)
        if v is None:
            blocks.append(eye - 2 * torch.outer(uh, uh))
        else:
            vh = v[i] / v[i].norm()
            blocks.append(eye - torch.outer(uh, uh) + torch.outer(vh, vh))
    return torch.block_diag(*blocks)


def dense_matrix(r: torch.Tensor, method: str) -> torch.Tensor:
    """blockdiag_i((I + Q_i)(I - Q_i)⁻¹) with Q_i = (R_i - R_iᵀ)/2 for OFT, blockdiag_i(I + R_i) for Naive."""
    eye = torch.eye(r.shape[1], dtype=r.dtype)
    if method == "naive":
        return torch.block_diag(*[eye + r_i for r_i in r])
    return torch.block_diag(*[(eye + (r_i - r_i.T) / 2) @ torch.linalg.inv(eye - (r_i - r_i.T) / 2) for r_i in r])


def dense(transform: nn.Module, method: str) -> torch.Tensor:
    """The reference ``H`` of one side, from the layer's raw parameters."""
    if method in ("oft", "naive"):
        return dense_matrix(transform.R, method)
    return dense_h(transform.u, transform.v)


def expected_sides(config: Config, is_qkv: bool) -> tuple[bool, bool]:
    """(input side, output side) as the method defines them, derived from the config alone."""
    if config.ether_method == "etherplus" and not config.ether_one_sided:
        return True, True
    if is_qkv:
        return False, True
    return (not config.ether_flip_side), config.ether_flip_side


def reference_weights(model: GPT) -> dict[str, torch.Tensor]:
    """``H_out W H_in`` for every ETHER layer, differentiable in (u, v), keyed like the base model."""
    config = model.config
    method = config.ether_method
    weights = {}
    for name, layer in model.named_modules():
        if isinstance(layer, ETHERQKVLinear):
            in_side, out_side = expected_sides(config, is_qkv=True)
            q = config.n_head * config.head_size
            kv = config.n_query_groups * config.head_size
            segments = dict(zip("qkv", layer.weight.split((q, kv, kv))))
            enabled = [s for s, on in zip("qkv", (config.ether_query, config.ether_key, config.ether_value)) if on]
            assert set(layer.ether_out) == set(enabled) and (layer.ether_in is not None) == in_side
            for s in enabled:
                w = dense(layer.ether_out[s], method) @ segments[s]
                if in_side:
                    w = w @ dense(layer.ether_in[s], method)
                segments[s] = w
            weights[f"{name}.weight"] = torch.cat(list(segments.values()))
        elif isinstance(layer, ETHERLinear):
            in_side, out_side = expected_sides(config, is_qkv=False)
            assert (layer.ether_in is not None, layer.ether_out is not None) == (in_side, out_side)
            w = layer.weight
            if out_side:
                w = dense(layer.ether_out, method) @ w
            if in_side:
                w = w @ dense(layer.ether_in, method)
            weights[f"{name}.weight"] = w
    return weights


def base_model(model: GPT) -> litgpt.model.GPT:
    base_fields = {f.name for f in dataclasses.fields(litgpt.config.Config) if f.init}
    base_config = litgpt.config.Config(**{k: v for k, v in vars(model.config).items() if k in base_fields})
    base = litgpt.model.GPT(base_config).double()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not ether_filter(k, v)})
    return base


def reference_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The base litgpt model run with dense ``W'`` substituted for every targeted weight."""
    return functional_call(base_model(model), reference_weights(model), (idx,))


def ether_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if ether_filter(n, p)}


def with_reference(model: GPT) -> tuple[torch.Tensor, dict, torch.Tensor, dict]:
    """Outputs and ETHER gradients of ``model``, then of the dense reference, on one fixed batch and loss."""
    idx = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 8, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for forward in (model, partial(reference_forward, model)):
        out = forward(idx)
        (out.double() * target).sum().backward()
        results += [out, ether_grads(model)]
        model.zero_grad()
    return tuple(results)


# ---------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("method", list(METHODS))
def test_matches_dense_reference_outputs_and_gradients(family, method, targets, n):
    model = ether_model(family, method, targets, n)
    mark_only_ether_as_trainable(model)
    out, grads, ref, ref_grads = with_reference(model)
    assert grads, "no ETHER parameter was created"
    # fp64 everywhere except litgpt's norms, which compute in fp32: hence fp32-level tolerances
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(METHODS))
def test_merged_model_matches_unmerged(family, method):
    model = ether_model(family, method, "qkv", 2, ether_projection=True, ether_mlp=True, ether_head=True)
    idx = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(idx)
        merge_ether(model)
        after = model(idx)
    assert not any(isinstance(m, (ETHERLinear, ETHERQKVLinear)) for m in model.modules())
    assert not any(ether_filter(k, v) for k, v in model.state_dict().items())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    # the merged state dict is a plain litgpt checkpoint
    base = base_model(model)
    torch.testing.assert_close(base(idx), before, rtol=1e-5, atol=1e-6)


def test_merge_computes_in_fp32_and_keeps_the_base_dtype():
    model = ether_model("llama-mha", "etherplus", "qv", 2)
    reference = reference_weights(model)
    model = model.to(torch.bfloat16)
    merge_ether(model)
    for name, w in reference.items():
        merged = model.get_parameter(name)
        assert merged.dtype == torch.bfloat16
        # reference from fp64 (u, v) and W; the merge saw bf16 inputs but did its math in fp32
        torch.testing.assert_close(merged.double(), w.detach(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------- properties


def layer_h(reflection: nn.Module, size: int) -> torch.Tensor:
    """The package's H, obtained by reflecting the rows of the identity."""
    return reflection(torch.eye(size, dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_ether_h_is_an_orthogonal_involution_at_fixed_distance(n):
    model = ether_model("llama-mha", "ether", "proj", n)
    reflection = model.transformer.h[0].attn.proj.ether_in
    h = layer_h(reflection, 16)
    eye = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(h @ h.T, eye)
    torch.testing.assert_close(h @ h, eye)
    torch.testing.assert_close(torch.linalg.matrix_norm(h - eye), torch.tensor(2 * math.sqrt(n), dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_oft_blocks_are_orthogonal_and_naive_blocks_are_not(n):
    for method in ("oft", "naive"):
        model = ether_model("llama-mha", method, "proj", n)
        h = layer_h(model.transformer.h[0].attn.proj.ether_in, 16)
        orthogonal = torch.allclose(h @ h.T, torch.eye(16, dtype=torch.float64))
        assert orthogonal == (method == "oft"), method
        # block-diagonal: nothing leaks between blocks
        k = 16 // n
        mask = torch.block_diag(*[torch.ones(k, k, dtype=torch.bool)] * n)
        assert not h[~mask].any()


@pytest.mark.parametrize("n", [1, 2, 4])
def test_etherplus_distance_is_bounded(n):
    model = ether_model("llama-mha", "etherplus", "proj", n)
    for reflection in (model.transformer.h[0].attn.proj.ether_in, model.transformer.h[0].attn.proj.ether_out):
        h = layer_h(reflection, 16)
        assert torch.linalg.matrix_norm(h - torch.eye(16, dtype=torch.float64)) <= math.sqrt(2 * n) + 1e-9


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["etherplus", "etherplus-one-sided", "oft", "naive"])
def test_etherplus_oft_and_naive_start_at_the_base_model(family, method):
    config = Config(**FAMILIES[family], **METHODS[method], ether_nb=2, ether_query=True, ether_key=True,
                    ether_value=True, ether_projection=True, ether_mlp=True, ether_head=True)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config)
    idx = torch.randint(0, 48, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), base_model(model.double()).float()(idx), rtol=1e-5, atol=1e-5)


def test_ether_starts_as_a_reflection_not_the_identity():
    model = GPT(Config(**FAMILIES["llama-mha"], ether_method="ether", ether_query=True))
    idx = torch.randint(0, 48, (2, 8))
    with torch.no_grad():
        assert not torch.allclose(model(idx), base_model(model.double()).float()(idx), atol=1e-3)


def test_zero_vectors_give_the_identity_not_nan():
    model = ether_model("llama-mha", "etherplus", "qkv", 2, ether_mlp=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ether_filter(name, p):
                p.zero_()
    idx = torch.randint(0, 48, (2, 8))
    out = model(idx)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base_model(model)(idx))


@pytest.mark.parametrize("n", [1, 4, 32])
@pytest.mark.parametrize(("method", "expected"), [("ether", 262_144), ("etherplus", 1_048_576)])
def test_llama2_7b_parameter_counts_do_not_depend_on_n(method, expected, n):
    with torch.device("meta"):
        model = GPT.from_name("Llama-2-7b-hf", ether_method=method, ether_nb=n, ether_query=True, ether_value=True)
    mark_only_ether_as_trainable(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert all(ether_filter(n, p) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("n", [4, 32, 256])
@pytest.mark.parametrize("method", ["oft", "naive"])
def test_llama2_7b_oft_and_naive_parameter_counts_follow_n_k_squared(method, n):
    """n·k² per reflected side and segment: q and v are each a 4096-wide output side in all 32 blocks."""
    with torch.device("meta"):
        model = GPT.from_name("Llama-2-7b-hf", ether_method=method, ether_nb=n, ether_query=True, ether_value=True)
    mark_only_ether_as_trainable(model)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    k = 4096 // n
    assert count == 32 * 2 * n * k * k
    print(f"Llama-2-7B q+v, {method}, n={n}: {count:,} trainable parameters (ETHER: 262,144; LoRA r=8: 4,194,304)")


def test_a_block_too_large_for_oft_names_the_layer_and_its_memory_before_allocating():
    with torch.device("meta"), pytest.raises(ConfigError) as err:
        GPT.from_name("Llama-2-7b-hf", ether_method="oft", ether_nb=1, ether_query=True)
    assert str(err.value) == (
        "ether_method=oft with ether_nb=1 makes 4096x4096 blocks in transformer.h.0.attn.qkv (q) output: 16,777,216"
        " trainable numbers, 0.25 GiB with gradients and AdamW state in fp32 for this side alone; raise ether_nb to"
        " at least 2 (blocks of at most 2048)"
    )


def test_base_checkpoint_keys_are_unchanged():
    model = ether_model("neox-bias", "etherplus", "qkv", 2, ether_projection=True, ether_mlp=True, ether_head=True)
    base_keys = set(base_model(model).state_dict())
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert all(ether_filter(k, None) for k in keys - base_keys)


# ---------------------------------------------------------------------- bad configurations


def test_nb_not_dividing_a_targeted_dimension_names_the_layer_and_sizes():
    with pytest.raises(ConfigError, match=r"ether_nb=3 does not divide transformer\.h\.0\.attn\.qkv \(q\) output"):
        GPT(Config(**FAMILIES["llama-gqa"], ether_nb=3, ether_query=True))
    with pytest.raises(ConfigError, match=r"ether_nb=5 does not divide lm_head input \(size 16\)"):
        GPT(Config(**FAMILIES["llama-gqa"], ether_nb=5, ether_head=True))


def test_no_target_is_an_error():
    with pytest.raises(ConfigError, match="no ETHER target enabled"):
        GPT(Config(**FAMILIES["llama-mha"]))


@pytest.mark.parametrize(
    "option, message",
    [
        ({"ether_nb": 0}, "ether_nb must be an integer >= 1, got 0"),
        ({"ether_nb": -2}, "ether_nb must be an integer >= 1, got -2"),
        ({"ether_nb": 2.0}, "ether_nb must be an integer >= 1, got 2.0"),
        ({"ether_dropout": 1.0}, r"ether_dropout must be in \[0, 1\), got 1.0"),
        ({"ether_dropout": -0.1}, r"ether_dropout must be in \[0, 1\), got -0.1"),
        ({"ether_dropout": float("nan")}, r"ether_dropout must be in \[0, 1\), got nan"),
        ({"ether_method": "foo"}, "ether_method must be one of 'ether', 'etherplus', 'oft', 'naive', got 'foo'"),
        ({"ether_method": "ETHER"}, "ether_method must be one of 'ether', 'etherplus', 'oft', 'naive', got 'ETHER'"),
    ],
)
def test_config_refuses_bad_ether_options_when_made(option, message):
    """The Python API: ``Config`` refuses at once, before any model is built (an unknown method used to build ETHER)."""
    with pytest.raises(ConfigError, match=f"^{message}$"):
        Config(**FAMILIES["llama-mha"], ether_query=True, **option)


def test_flip_side_with_two_sided_etherplus_is_an_error():
    with pytest.raises(ConfigError, match="ether_flip_side"):
        GPT(Config(**FAMILIES["llama-mha"], ether_method="etherplus", ether_flip_side=True, ether_query=True))


def test_base_checkpoint_loads_strictly_except_for_ether_keys(tmp_path):
    model = ether_model("llama-gqa", "etherplus", "qv", 2)
    base = base_model(model)
    torch.save(base.state_dict(), tmp_path / "lit_model.pth")
    fresh = ether_model("llama-gqa", "etherplus", "qv", 2)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_base_checkpoint(fresh, tmp_path / "lit_model.pth")
    for name, p in base.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], p)

    incomplete = {k: v for k, v in base.state_dict().items() if k != "transformer.h.1.mlp.proj.weight"}
    torch.save(incomplete, tmp_path / "incomplete.pth")
    with pytest.raises(ConfigError, match=r"missing \['transformer\.h\.1\.mlp\.proj\.weight'\]"):
        load_base_checkpoint(fresh, tmp_path / "incomplete.pth")
    torch.save(base.state_dict() | {"transformer.h.9.attn.qkv.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ConfigError, match=r"unexpected \['transformer\.h\.9\.attn\.qkv\.weight'\]"):
        load_base_checkpoint(fresh, tmp_path / "extra.pth")


def python_number_tensors(fn) -> int:
    """How many tensors ``fn`` makes from Python numbers (``torch.tensor(...)``: ``aten::lift_fresh``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "aten::lift_fresh")


@pytest.mark.parametrize("method", ["ether", "etherplus", "etherplus-one-sided", "oft", "naive"])
def test_a_step_makes_no_more_tensors_from_python_numbers_than_the_base_model(method):
    """On CUDA each such tensor is a host-to-device copy that synchronizes the stream, draining the GPU's queue: the
    layers must add none to what litgpt's own model makes, in training or inference (the first call may cache)."""
    model = ether_model("llama-gqa", method, "qkv", 2, ether_projection=True, ether_mlp=True, ether_head=True)
    mark_only_ether_as_trainable(model)
    base = base_model(model)
    idx = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(1))

    def train_step(m):
        m(idx).sum().backward()

    def inference(m):
        with torch.inference_mode():
            m(idx)

    for step in (inference, train_step):  # inference first: what it caches must serve training as well
        step(model)
        made = [python_number_tensors(partial(step, m)) for m in (model, base)]
        assert made[0] == made[1], step.__name__

"""``litgpt_ether inspect`` against direct computations: dense ``H``, explicit ``H_out W H_in``, all neuron pairs."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_main
from test_ether import dense_h, dense_matrix

from litgpt_ether import GPT, Config, ether_state_dict
from litgpt_ether.checkpoint import ADAPTER_FILE, save_adapter
from litgpt_ether.inspect import hyperspherical_energy, inspect

# every kind of ETHER layer: fused QKV segments (q, v; k left alone), attention output, MLP, head
TARGETS = dict(ether_query=True, ether_value=True, ether_projection=True, ether_mlp=True, ether_head=True)


def write_adapter(
    directory: Path, checkpoint_dir: Path, v_offset: float | None = None, **ether
) -> dict[str, torch.Tensor]:
    """An adapter for the tiny base model with random ``u`` and ``v``; returns its tensors.

    With ``v_offset``, ``v = -u + v_offset * noise``: ETHER+ at (0) or near its initialisation ``H = I``.
    """
    config = Config.from_file(checkpoint_dir / "model_config.yaml", **TARGETS, **ether)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ether_state_dict(GPT(config)).items()}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}
    if v_offset is not None:
        state = {k: -state[k[:-1] + "u"] + v_offset * t if k.endswith(".v") else t for k, t in state.items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_adapter(directory / ADAPTER_FILE, state, config)
    return state


def targeted(state: dict[str, torch.Tensor]) -> list[tuple[str, str | None]]:
    """``(layer, q/k/v segment or None)`` read off the adapter's keys, e.g. ``h.0.attn.qkv.ether_out.q.u``."""
    found = set()
    for key in state:
        layer, rest = key.split(".ether_")
        parts = rest.split(".")  # [side, u] or [side, segment, u]
        found.add((layer, parts[1] if len(parts) == 3 else None))
    return sorted(found, key=str)


def rows_of(reports: list[dict]) -> list[tuple[str, str | None]]:
    return sorted(((r["layer"], r["segment"]) for r in reports), key=str)


def inspect_json(path: Path, capsys, **kwargs) -> list[dict]:
    inspect(path, json=True, **kwargs)
    return json.loads(capsys.readouterr().out)


def brute_force_he(weight: torch.Tensor) -> float:
    w = weight.double()
    w = w / w.norm(dim=1, keepdim=True)
    dist = (w[:, None, :] - w[None, :, :]).norm(dim=-1)  # (rows, rows)
    return (1 / dist[~torch.eye(len(w), dtype=torch.bool)]).sum().item()


def segment_rows(checkpoint_dir: Path, segment: str | None) -> slice:
    c = yaml.safe_load((checkpoint_dir / "model_config.yaml").read_text())
    q, kv = c["n_head"] * c["head_size"], c["n_query_groups"] * c["head_size"]
    return {None: slice(None), "q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}[segment]


def dense_side(
    state: dict[str, torch.Tensor], layer: str, side: str, segment: str | None, method: str = "ether"
) -> torch.Tensor | None:
    prefix = ".".join(p for p in (layer, f"ether_{side}", segment) if p is not None)
    if f"{prefix}.R" in state:
        return dense_matrix(state[f"{prefix}.R"].double(), method)
    if f"{prefix}.u" not in state:
        return None
    v = state.get(f"{prefix}.v")
    return dense_h(state[f"{prefix}.u"].double(), None if v is None else v.double())


@pytest.mark.parametrize("n", [1, 2, 4])
def test_ether_reflections_are_exactly_two_sqrt_n_from_identity(checkpoint_dir, tmp_path, capsys, n):
    state = write_adapter(tmp_path, checkpoint_dir, ether_method="ether", ether_nb=n)
    reports = inspect_json(tmp_path / ADAPTER_FILE, capsys, base_checkpoint_dir=checkpoint_dir)
    assert rows_of(reports) == targeted(state)
    for r in reports:
        is_qkv = r["segment"] is not None  # the fused QKV reflects its segments' outputs, the rest their inputs
        assert (r["sides"], r["n_blocks"]) == ("out" if is_qkv else "in", n)
        distance = r["h_out_minus_i"] if is_qkv else r["h_in_minus_i"]
        assert (r["h_in_minus_i"] if is_qkv else r["h_out_minus_i"]) is None
        assert distance == pytest.approx(2 * math.sqrt(n), rel=1e-6)


def test_ether_input_reflection_keeps_the_hyperspherical_energy(checkpoint_dir, tmp_path, capsys):
    """An orthogonal ``H`` on the input side rotates every neuron alike: their pairwise angles, hence HE, stay."""
    write_adapter(tmp_path, checkpoint_dir, ether_method="ether", ether_nb=2)
    reports = inspect_json(tmp_path / ADAPTER_FILE, capsys, base_checkpoint_dir=checkpoint_dir)
    input_side = [r for r in reports if r["sides"] == "in"]
    assert input_side
    for r in input_side:
        assert r["relative_change"] > 0.1
        assert r["he_after"] == pytest.approx(r["he_before"], rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_etherplus_figures_match_a_dense_computation(checkpoint_dir, tmp_path, capsys, dtype):
    """Dense ``H`` from the saved vectors, explicit ``H_out W H_in``, energy over all pairs; a bf16 base is
    inspected in fp32 (a bf16 round trip of ``W'`` would be off by ~1e-3)."""
    base = tmp_path / "base"
    shutil.copytree(checkpoint_dir, base)
    base_state = {k: v.to(dtype) for k, v in torch.load(checkpoint_dir / "lit_model.pth", weights_only=True).items()}
    torch.save(base_state, base / "lit_model.pth")
    adapter_dir = tmp_path / "step-000010"
    state = write_adapter(adapter_dir, base, ether_method="etherplus", ether_nb=2)
    (adapter_dir / "hyperparameters.yaml").write_text(yaml.safe_dump({"checkpoint_dir": str(base)}))

    reports = inspect_json(adapter_dir, capsys)
    assert rows_of(reports) == targeted(state)
    for r in reports:
        w = base_state[f"{r['layer']}.weight"].double()[segment_rows(base, r["segment"])]
        h_in, h_out = (dense_side(state, r["layer"], side, r["segment"]) for side in ("in", "out"))
        w_new = h_out @ w @ h_in
        assert (r["sides"], r["n_blocks"]) == ("in+out", 2)
        assert r["h_in_minus_i"] == pytest.approx((h_in - torch.eye(len(h_in))).norm().item(), rel=1e-5)
        assert r["h_out_minus_i"] == pytest.approx((h_out - torch.eye(len(h_out))).norm().item(), rel=1e-5)
        assert r["relative_change"] == pytest.approx(((w_new - w).norm() / w.norm()).item(), rel=1e-5)
        assert r["he_before"] == pytest.approx(brute_force_he(w), rel=1e-5)
        assert r["he_after"] == pytest.approx(brute_force_he(w_new), rel=1e-5)


@pytest.mark.parametrize("method", ["oft", "naive"])
def test_oft_and_naive_figures_match_a_dense_computation(checkpoint_dir, tmp_path, capsys, method):
    """OFT's blocks are orthogonal: on the input side the neurons' angles, hence HE, stay; Naive's are not."""
    state = write_adapter(tmp_path, checkpoint_dir, ether_method=method, ether_nb=2)
    reports = inspect_json(tmp_path / ADAPTER_FILE, capsys, base_checkpoint_dir=checkpoint_dir)
    assert rows_of(reports) == targeted(state)
    base_state = torch.load(checkpoint_dir / "lit_model.pth", weights_only=True)
    for r in reports:
        w = base_state[f"{r['layer']}.weight"].double()[segment_rows(checkpoint_dir, r["segment"])]
        side = "out" if r["segment"] is not None else "in"
        h = dense_side(state, r["layer"], side, r["segment"], method)
        w_new = h @ w if side == "out" else w @ h
        assert (r["sides"], r["n_blocks"]) == (side, 2)
        assert r[f"h_{side}_minus_i"] == pytest.approx((h - torch.eye(len(h))).norm().item(), rel=1e-5)
        assert r["relative_change"] == pytest.approx(((w_new - w).norm() / w.norm()).item(), rel=1e-5)
        assert r["he_after"] == pytest.approx(brute_force_he(w_new), rel=1e-5)
        if side == "in":
            same = r["he_after"] == pytest.approx(r["he_before"], rel=1e-5)
            assert same if method == "oft" else not same


@pytest.mark.parametrize("v_offset", [0.0, 1e-4])
def test_etherplus_at_and_near_its_initialisation_is_measured_beyond_rounding(
    checkpoint_dir, tmp_path, capsys, v_offset
):
    """At init (``v = -u``) ``H = I``; just after, ``||H - I||`` is ~1e-4, below what fp32 cancellation leaves."""
    state = write_adapter(tmp_path, checkpoint_dir, v_offset=v_offset, ether_method="etherplus", ether_nb=4)
    for r in inspect_json(tmp_path / ADAPTER_FILE, capsys, base_checkpoint_dir=checkpoint_dir):
        for side in ("in", "out"):
            h = dense_side(state, r["layer"], side, r["segment"])
            expected = (h - torch.eye(len(h))).norm().item()
            assert r[f"h_{side}_minus_i"] == pytest.approx(expected, rel=1e-3, abs=1e-9)
            assert expected <= 1e-3
        assert r["relative_change"] <= (1e-3 if v_offset else 1e-6)


@pytest.mark.parametrize("chunk_elements", [1, 7 * 50, 50 * 50])
def test_hyperspherical_energy_in_chunks_matches_all_pairs_and_skips_zero_rows(chunk_elements):
    w = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    with_zero_row = torch.cat([w, torch.zeros(1, 8)])
    he = hyperspherical_energy(with_zero_row, chunk_elements=chunk_elements)
    assert he == pytest.approx(brute_force_he(w), rel=1e-5)


def test_table_has_a_row_per_layer_and_segment(checkpoint_dir, tmp_path, capsys):
    state = write_adapter(tmp_path, checkpoint_dir, ether_method="etherplus", ether_nb=2)
    inspect(tmp_path / ADAPTER_FILE, base_checkpoint_dir=checkpoint_dir)
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:3] == ["layer", "sides", "n"]
    labels = sorted(row.split("  ")[0] for row in rows)  # the label column is padded: two spaces end it
    assert labels == sorted(layer + (f" ({s})" if s else "") for layer, s in targeted(state))


def test_cli_json_lists_every_targeted_layer_and_segment(checkpoint_dir, tmp_path):
    state = write_adapter(tmp_path, checkpoint_dir, ether_method="ether", ether_nb=4)
    result = run_main("inspect", str(tmp_path / ADAPTER_FILE), "--base_checkpoint_dir", str(checkpoint_dir), "--json",
                     "true")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout)  # stdout holds the JSON alone
    assert rows_of(reports) == targeted(state)
    assert "Inspecting" in result.stderr


def test_cli_directory_without_an_adapter_is_a_one_line_error(checkpoint_dir):
    result = run_main("inspect", str(checkpoint_dir))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("litgpt_ether: error: ")
    assert "holds no ETHER adapter" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""

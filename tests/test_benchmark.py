"""scripts/benchmark.py: the FLOP counts behave as the method predicts, the reference form it measures is the
same function as the package's layers, and the timing and generation modes run (on a CPU, fp32)."""

import dataclasses
import json

import benchmark
import litgpt.config
import litgpt.model
import pytest
import torch
from conftest import FAMILIES

from litgpt_ether import ether

# Llama-2-7B's widths with 2 layers: real proportions for the FLOP relations, fast on the meta device
LLAMA_2L = dict(dataclasses.asdict(litgpt.config.Config.from_name("Llama-2-7b-hf")), n_layer=2)
MB, SEQ = 1, 256


def run_json(capsys: pytest.CaptureFixture, *args: str) -> list[dict]:
    """``benchmark.py ARGS`` through its command line, in-process; the JSON lines it printed."""
    capsys.readouterr()
    benchmark.main(list(args))
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.fixture(scope="module")
def llama_counts() -> dict[str, tuple[int, int]]:
    """``(FLOPs, saved-activation bytes)`` of every variant."""
    return {v: benchmark.count_flops(v, LLAMA_2L, MB, SEQ) for v in benchmark.VARIANTS}


@pytest.fixture(scope="module")
def llama_flops(llama_counts) -> dict[str, int]:
    return {v: flops for v, (flops, _) in llama_counts.items()}


def test_saved_activations(llama_counts):
    """Activation memory kept for backward: the package's layers keep no more than LoRA, but for tensors the size
    of the adapter (fp32 unit vectors, their norms) and ETHER+'s ``W_s w`` projections (``f_s x 2n`` per segment),
    and far less than the weight-side form."""
    saved = {v: b for v, (_, b) in llama_counts.items()}
    c = litgpt.config.Config(**LLAMA_2L)
    adapter = 2 * c.n_layer * 2 * 2 * c.n_embd  # two-sided ETHER+ on q and v: the most vectors of any variant
    for n in (1, 4, 32):
        projections = c.n_layer * 2 * c.n_embd * 2 * n * 2  # q and v, bf16
        assert saved[f"ether-n{n}"] <= saved["lora-r8"] + 16 * adapter
        assert saved[f"etherplus-n{n}"] <= saved["lora-r8"] + 16 * adapter + projections
        for method in ("ether", "etherplus"):
            assert saved[f"reference-{method}-n{n}"] > 1.5 * saved[f"{method}-n{n}"]


def test_flops_cli_json(capsys):
    rows = run_json(capsys, "flops", "--model", "pythia-14m", "--seq_len", "32", "--json",
                    "--variants", "frozen", "lora-r8", "ether-n4")  # fmt: skip
    assert [r["variant"] for r in rows] == ["frozen", "lora-r8", "ether-n4"]
    assert all(r["tflops"] == pytest.approx(r["flops"] / 1e12) and r["flops"] > 0 for r in rows)


def test_flops_relations(llama_flops):
    f = llama_flops
    lora = f["lora-r8"]
    for m in ("ether", "etherplus"):
        for n in (1, 4, 32):
            assert f[f"{m}-n{n}"] <= 1.01 * lora, (m, n, f[f"{m}-n{n}"] / lora)
            assert f[f"reference-{m}-n{n}"] > f[f"{m}-n{n}"]
        assert f[f"reference-{m}-n1"] > f[f"reference-{m}-n4"] > f[f"reference-{m}-n32"]
    # OFT and Naive on activations: within 5% of LoRA at n = 32, cheaper with more blocks, below the weight side
    for m in ("oft", "naive"):
        assert f[f"{m}-n32"] <= 1.05 * lora, (m, f[f"{m}-n32"] / lora)
        assert f[f"{m}-n4"] > f[f"{m}-n32"]
    assert f["naive-n4"] < f["oft-n4"]  # no Cayley solve
    for n in (4, 32):
        assert f[f"reference-oft-n{n}"] > f[f"oft-n{n}"]
    # frozen is the floor, except that it alone computes the first layer's QKV input gradient
    c = litgpt.config.Config(**LLAMA_2L)
    first_qkv_dx = 2 * MB * SEQ * c.n_embd * (c.n_head + 2 * c.n_query_groups) * c.head_size
    assert min(f.values()) >= f["frozen"] - first_qkv_dx


def reference_extra_flops(c: litgpt.config.Config, plus: bool, n: int, tokens: int) -> int:
    """What the weight-side form adds to the frozen model's count, derived by hand.

    Per layer and targeted segment (f_s rows, k_s = f_s / n, k_in = d / n): ``H_out W_s`` costs 2·f_s·d·k_s
    forward and again backward (dH_out; W is detached). Two-sided also ``(H_out W_s) H_in``: 2·f_s·d·k_in forward
    and twice that backward (d(H_out W_s) and dH_in). Every layer then needs the weight gradient of the whole
    fused ``W'`` (2·tokens·F·d), while the first layer's QKV input gradient is no longer needed.
    """
    d = c.n_embd
    fused = (c.n_head + 2 * c.n_query_groups) * c.head_size
    per_layer = 2 * tokens * fused * d
    for f_s in (c.n_head * c.head_size, c.n_query_groups * c.head_size):  # q, v
        per_layer += 4 * f_s * d * (f_s // n)
        if plus:
            per_layer += 6 * f_s * d * (d // n)
    return c.n_layer * per_layer - 2 * tokens * fused * d


@pytest.mark.parametrize("plus", [False, True], ids=["ether", "etherplus"])
@pytest.mark.parametrize("n", [1, 2])
def test_reference_flops_analytic(plus, n):
    tiny = FAMILIES["llama-gqa"]
    mb, seq = 2, 8
    method = "etherplus" if plus else "ether"
    counted = benchmark.count_flops(f"reference-{method}-n{n}", tiny, mb, seq)[0]
    frozen = benchmark.count_flops("frozen", tiny, mb, seq)[0]
    assert counted - frozen == reference_extra_flops(litgpt.config.Config(**tiny), plus, n, mb * seq)


@pytest.mark.parametrize("method", ["ether", "etherplus", "oft"])
def test_reference_matches_package(method):
    """The weight-side form this script measures is the package's function, for the same vectors."""
    n = 2
    fields = dict(ether_method=method, ether_nb=n, ether_query=True, ether_value=True)
    torch.manual_seed(0)
    package = ether.GPT(ether.Config(**FAMILIES["llama-gqa"], **fields))
    with torch.no_grad():  # random (u, v) and R: ETHER+ and OFT start at H = I, which would hide mistakes
        for name, p in package.named_parameters():
            if ether.ether_filter(name, p):
                p.copy_(torch.randn_like(p))
    config = litgpt.config.Config(**FAMILIES["llama-gqa"])
    reference = litgpt.model.GPT(config)
    reference.load_state_dict({k: v for k, v in package.state_dict().items() if not ether.ether_filter(k, v)})
    plus = method == "etherplus"
    with torch.no_grad():
        for ref_block, pkg_block in zip(reference.transformer.h, package.transformer.h):
            qkv = pkg_block.attn.qkv
            ref_qkv = benchmark.ReferenceQKV(ref_block.attn.qkv, config, method, n)
            for s in "qv":
                sides = [("out", qkv.ether_out[s])] + ([("in", qkv.ether_in[s])] if plus else [])
                for side, transform in sides:
                    for name, p in transform.named_parameters():
                        ref_qkv.vecs[f"{s}_{side}_{name}"].copy_(p)
            ref_block.attn.qkv = ref_qkv
    x = torch.randint(0, config.vocab_size, (2, 12))
    torch.testing.assert_close(reference(x), package(x), atol=1e-5, rtol=0)
    # the trainable vectors have the package's counts
    assert sum(p.numel() for p in ref_qkv.vecs.parameters()) == sum(
        p.numel() for name, p in qkv.named_parameters() if ether.ether_filter(name, p)
    )


TIME_VARIANTS = ["frozen", "lora-r8", "reference-ether-n4", "reference-etherplus-n4", "ether-n4", "etherplus-n4"]


def test_time_cpu(capsys):
    rows = run_json(capsys, "time", "--model", "pythia-14m", "--device", "cpu", "--seq_len", "16", "--steps", "2",
                    "--warmup", "1", "--json", "--variants", *TIME_VARIANTS)  # fmt: skip
    assert [r["variant"] for r in rows] == TIME_VARIANTS
    for r in rows:
        assert r["step_ms"] > 0 and r["peak_mem_gib"] is None
        assert r["ratio_lora"] == pytest.approx(r["step_ms"] / rows[1]["step_ms"])
        assert r["ratio_frozen"] == pytest.approx(r["step_ms"] / rows[0]["step_ms"])
        with torch.device("meta"):
            model = benchmark.build(r["variant"], "pythia-14m")
        assert r["trainable_params"] == benchmark.trainable_params(model)
    by_name = {r["variant"]: r["trainable_params"] for r in rows}
    c = litgpt.config.Config.from_name("pythia-14m")
    q_plus_v = (c.n_head + c.n_query_groups) * c.head_size
    assert by_name["frozen"] == 0
    assert by_name["ether-n4"] == by_name["reference-ether-n4"] == c.n_layer * q_plus_v
    assert by_name["etherplus-n4"] == by_name["reference-etherplus-n4"] == c.n_layer * 2 * (q_plus_v + 2 * c.n_embd)


def test_time_cuda_unavailable(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["time", "--model", "pythia-14m"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_generate_cpu(capsys):
    (row,) = run_json(capsys, "generate", "--model", "pythia-14m", "--device", "cpu", "--prompt_len", "8",
                      "--new_tokens", "8", "--json")  # fmt: skip
    assert row["base_tokens_per_s"] > 0 and row["merged_tokens_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["merged_tokens_per_s"] / row["base_tokens_per_s"])
    # the merged model is a plain litgpt model again: no ETHER layer, not one parameter more
    assert row["merged_ether_layers"] == 0
    assert row["merged_params"] == row["base_params"]


SERVE_PRESETS = ["config_hub/finetune/demo/ether.yaml", "config_hub/finetune/demo/etherplus.yaml"]


def test_serve_cpu(capsys, checkpoint_dir):
    """The serve mode decodes K mixed adapters of each preset's kind and one merged model with the same engine."""
    rows = run_json(capsys, "serve", "--checkpoint_dir", str(checkpoint_dir), "--presets", *SERVE_PRESETS,
                    "--adapters", "1", "3", "--batch_size", "3", "--prompt_len", "4", "--new_tokens", "3",
                    "--repeats", "2", "--threads", "1", "--json")  # fmt: skip
    assert [(r["preset"], r["adapters"]) for r in rows] == [(p, k) for p in SERVE_PRESETS for k in (1, 3)]
    for row in rows:
        assert row["threads"] == 1 and row["repeats"] == 2
        for name in ("mixed", "merged"):
            low, high = row[f"{name}_range"]
            assert 0 < low <= row[f"{name}_tokens_per_s"] <= high
        low, high = row["ratio_range"]
        assert low <= row["ratio"] <= high
        assert low <= row["mixed_range"][1] / row["merged_range"][0]  # a ratio of two runs it made
    ops = {(r["preset"], r["adapters"]): (r["mixed_ops_per_step"], r["merged_ops_per_step"]) for r in rows}
    for mixed, merged in ops.values():
        assert 0 < merged < mixed  # each reflection is operators of its own
    assert len({merged for _, merged in ops.values()}) == 1  # the same plain litgpt model whatever the preset
    # two-sided ETHER+ reflects both sides of every linear, with two vectors each: more than ETHER's output sides
    assert ops[(SERVE_PRESETS[1], 3)][0] > ops[(SERVE_PRESETS[0], 3)][0]


@pytest.mark.parametrize("preset", ["missing.yaml", "- a list", "ether_nb: 5"])
def test_serve_refuses_a_preset_before_timing(capsys, checkpoint_dir, tmp_path, preset):
    """A preset that is not a file, not a YAML mapping, or whose block count does not divide the model, stops the
    run in one line."""
    if preset.startswith("- "):
        (tmp_path / "list.yaml").write_text(preset + "\n")
        preset = str(tmp_path / "list.yaml")
    elif ":" in preset:
        (tmp_path / "bad.yaml").write_text(f"ether_method: ether\nether_query: true\n{preset}\n")
        preset = str(tmp_path / "bad.yaml")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["serve", "--checkpoint_dir", str(checkpoint_dir), "--presets", SERVE_PRESETS[0], preset])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == ""  # not even the first, good preset was timed
    assert err.count("\n") == 1 and err.startswith(f"error: preset {preset!r}")


def test_time_cpu_quantized(capsys):
    """``--quantize``: lora-r8 becomes QLoRA; the reference variants, which need the weight itself, are skipped."""
    pytest.importorskip("bitsandbytes", reason="the quant extra installs bitsandbytes")
    rows = run_json(capsys, "time", "--model", "pythia-14m", "--device", "cpu", "--seq_len", "16", "--steps", "1",
                    "--warmup", "0", "--json", "--quantize", "bnb.nf4", "--variants", *TIME_VARIANTS)  # fmt: skip
    assert [r["variant"] for r in rows] == ["frozen", "lora-r8", "ether-n4", "etherplus-n4"]
    assert all(r["step_ms"] > 0 for r in rows)
    # what was timed: every base linear is a quantized bitsandbytes layer (4-bit storage), the adapters are not
    with benchmark.materialize_on(torch.device("cpu"), torch.float32, "bnb.nf4"):
        model = benchmark.build("etherplus-n4", "pythia-14m")
    model = model.to("cpu")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.uint8 for m in linears)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_time_rounds_interleave_the_paths_and_report_medians_and_ranges(capsys):
    rows = run_json(capsys, "time", "--model", "pythia-14m", "--device", "cpu", "--seq_len", "8", "--steps", "1",
                    "--warmup", "1", "--json", "--repeats", "3", "--kernels", "torch", "triton",
                    "--variants", "lora-r8", "ether-n4")  # fmt: skip
    assert [(r["variant"], r["kernels"]) for r in rows] == [("lora-r8", "auto"), ("ether-n4", "torch"),
                                                           ("ether-n4", "triton")]  # fmt: skip
    for r in rows:
        assert r["rounds"] == 3
        lo, hi = r["step_ms_range"]
        assert lo <= r["step_ms"] <= hi
    assert rows[0]["ratio_lora_range"] == [1.0, 1.0]  # each round against its own LoRA


def test_combine_rounds_takes_medians_ranges_and_the_highest_peak():
    runs = [[{"variant": "v", "kernels": "torch", "step_ms": ms, "ratio_lora": ms / 10, "ratio_frozen": None,
              "peak_mem_gib": peak}] for ms, peak in ((12.0, 1.0), (10.0, 3.0), (30.0, 2.0))]  # fmt: skip
    (row,) = benchmark.combine_rounds(runs)
    assert row["step_ms"] == 12.0 and row["step_ms_range"] == [10.0, 30.0]
    assert row["ratio_lora"] == pytest.approx(1.2) and row["peak_mem_gib"] == 3.0 and row["ratio_frozen"] is None


def test_ops_counts_fewer_operators_with_the_kernels(capsys):
    """The operator count of a training step (fwd + bwd): the fused path dispatches one op per layer side where the
    torch path dispatches dozens, and its launches are counted apart."""
    rows = run_json(capsys, "ops", "--n_embd", "64", "--seq_len", "8", "--json", "--variants", "frozen", "lora-r8",
                    "ether-n4", "etherplus-n4")  # fmt: skip
    by = {(r["variant"], r["kernels"]): r for r in rows}
    assert set(by) == {("frozen", "-"), ("lora-r8", "-"), *((v, p) for v in ("ether-n4", "etherplus-n4")
                                                           for p in ("torch", "triton"))}  # fmt: skip
    for variant in ("ether-n4", "etherplus-n4"):
        fused, plain = by[(variant, "triton")], by[(variant, "torch")]
        assert fused["operators"] < by[("lora-r8", "-")]["operators"] < plain["operators"]
        assert fused["launches"] > fused["operators"]  # a fused backward is two launches
        assert plain["launches"] <= plain["operators"]  # allocations launch nothing
        assert fused["operators_lora-r8"] == pytest.approx(fused["operators"] / by[("lora-r8", "-")]["operators"])

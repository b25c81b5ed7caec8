"""``litgpt_ether export``: a run as a Hugging Face directory that transformers loads with no other argument, computing
what litgpt computes, encoding and templating prompts as litgpt does."""

import json

import litgpt.config
import litgpt.prompts
import pytest
import torch
from conftest import family_base, make_adapter, run_main
from litgpt.prompts import Alpaca, PromptStyle
from litgpt.tokenizer import Tokenizer

from litgpt_ether.checkpoint import load_model, resolve
from litgpt_ether.checks import ConfigError
from litgpt_ether.ether import merge_ether
from litgpt_ether.export import architecture, chat_template

transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")

EVERY_TARGET = dict(ether_query=True, ether_key=True, ether_value=True, ether_projection=True, ether_mlp=True)
# The suite's families (conftest.FAMILIES), and the variants that make each Hugging Face architecture: the family's
# name, then overrides to its config. LLaMA-style architectures rotate whole heads (litgpt's tiny default rotates a
# quarter, which GPT-NeoX and Phi can express and Llama cannot)
WHOLE = dict(rotary_percentage=1.0)
EXPORTED = {
    "llama-mha": ("llama-mha", WHOLE),
    "llama-gqa": ("llama-gqa", WHOLE),
    "gemma-mqa": ("gemma-mqa", WHOLE),  # Gemma's MLP, plain norms: Llama with GELU
    "gemma": ("gemma-mqa", dict(WHOLE, name="Gemma-tiny", scale_embeddings=True, gelu_approximate="tanh")),
    "mistral": ("llama-gqa", dict(WHOLE, sliding_window_size=8)),
    "llama-3": ("llama-gqa", dict(WHOLE, rope_base=500000, rope_adjustments=dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=16))),
    "neox": ("neox-bias", dict(lm_head_bias=False)),
    "phi": ("neox-bias", dict(shared_attention_norm=True, gelu_approximate="tanh")),
    "moe": ("moe", WHOLE),
}  # fmt: skip


def litgpt_logits(run, idx: torch.Tensor) -> torch.Tensor:
    """The merged model's logits, computed by litgpt."""
    resolved = resolve(run)
    model = load_model(resolved)
    if resolved.adapter is not None:
        merge_ether(model)
    with torch.no_grad():
        return model(idx)


def hf_logits(directory, idx: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize("name", list(EXPORTED))
def test_every_family_exports_with_the_merged_models_logits(name, tmp_path):
    family, overrides = EXPORTED[name]
    base = family_base(tmp_path / "base", family, **overrides)
    run = make_adapter(base, tmp_path / "run", 0, ether_method="etherplus", ether_nb=2, **EVERY_TARGET)
    (run / "hyperparameters.yaml").write_text(f"checkpoint_dir: {base}\n")
    result = run_main("export", str(run), "--out_dir", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-2000:]

    idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))  # past the sliding window
    torch.testing.assert_close(hf_logits(tmp_path / "hf", idx), litgpt_logits(run, idx), rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == "float32" and not any((tmp_path / "hf").glob("*.pth"))


@pytest.mark.parametrize(
    "name, wanted",
    [("Llama-2-7b-hf", "LlamaForCausalLM"), ("Llama-3.1-8B", "LlamaForCausalLM"), ("phi-1_5", "PhiForCausalLM"),
     ("phi-2", "PhiForCausalLM"), ("pythia-160m", "GPTNeoXForCausalLM"), ("Mistral-7B-v0.1", "MistralForCausalLM"),
     ("Gemma-2b", "GemmaForCausalLM"), ("Mixtral-8x7B-v0.1", "MixtralForCausalLM"),
     ("Gemma-2-2b", "post_attention_norm"), ("Qwen2.5-0.5B", "biases")],
)  # fmt: skip
def test_litgpts_named_models_get_their_architecture_or_a_reason(name, wanted):
    """The presets' models (Llama 2, Phi-1.5) and their neighbours, by litgpt's own configs: the structure picks the
    architecture (litgpt's converter picks by name, and sends Gemma-2b to Gemma 2's mapping)."""
    config = litgpt.config.Config.from_name(name)
    if wanted.endswith("ForCausalLM"):
        assert architecture(config).name == wanted
    else:
        with pytest.raises(ConfigError, match=wanted):
            architecture(config)


def test_a_run_exports_to_what_transformers_loads_alone_and_generates_as_litgpt(finetune_out, tmp_path):
    """The run's adapter (merged on the way) with its tokenizer, prompt style and stops: transformers' chat template
    encodes a prompt to the ids litgpt encodes, and greedy decoding gives ``litgpt_ether generate``'s tokens."""
    run = finetune_out / "step-000020"  # an adapter only: export merges it
    out = tmp_path / "hf"
    result = run_main("export", str(run), "--out_dir", str(out), "--max_shard_size", "20KB")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    lit_tokenizer = Tokenizer(finetune_out / "final")
    prompt = "reverse red green blue"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, return_dict=False)
    assert ids == lit_tokenizer.encode(Alpaca().apply(prompt)).tolist() and ids[0] == lit_tokenizer.bos_id
    assert tokenizer(prompt)["input_ids"] == lit_tokenizer.encode(prompt).tolist()  # BOS as litgpt adds it
    torch.testing.assert_close(hf_logits(out, torch.tensor([ids])), litgpt_logits(run, torch.tensor([ids])),
                               rtol=0, atol=1e-5)  # fmt: skip

    generated = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0].tolist()
    if generated[-1] == lit_tokenizer.eos_id:  # litgpt prints up to its stop token, not the token itself
        generated = generated[:-1]
    litgpt = run_main("generate", str(run), "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "6",
                      "--precision", "32-true")  # fmt: skip
    assert litgpt.returncode == 0, litgpt.stderr[-2000:]
    assert litgpt.stdout.strip() == lit_tokenizer.decode(torch.tensor(generated)).strip()
    assert len(generated) > len(ids)  # it generated something to compare


@pytest.mark.parametrize("name", sorted(litgpt.prompts.prompt_styles))
def test_the_chat_template_renders_the_prompt_style(name, checkpoint_dir, tmp_path):
    """Every litgpt prompt style whose text is the prompt and system prompt in a frame: transformers renders the
    template to what ``style.apply`` gives (and ``litgpt_ether serve`` encodes for a chat request)."""
    style: PromptStyle = litgpt.prompts.prompt_styles[name]()
    template = chat_template(style, "<s>")
    assert template is not None
    (tmp_path / "tokenizer.json").write_bytes((checkpoint_dir / "tokenizer.json").read_bytes())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for prompt, system in [("Name the {{ capital }} of vogi.\n", None), ("hi  ", "You are terse.")]:
        messages = [{"role": "user", "content": prompt}]
        want = style.apply(prompt)
        got = tokenizer.apply_chat_template(messages, tokenize=False)
        assert got == ("" if want.startswith("<s>") else "<s>") + want
        if system is not None and "{{ system }}" in template:  # a style that reworks its system prompt has none
            got = tokenizer.apply_chat_template([{"role": "system", "content": system}, *messages], tokenize=False)
            assert got == ("" if want.startswith("<s>") else "<s>") + style.apply(prompt, sys_prompt=system)


def test_a_style_that_is_not_text_around_the_prompt_has_no_template():
    class Shouting(PromptStyle):
        def apply(self, prompt: str, **kwargs) -> str:
            return prompt.upper()

    assert chat_template(Shouting(), "<s>") is None


def test_dtype_casts_the_weights_and_says_so(finetune_out, tmp_path):
    result = run_main("export", str(finetune_out), "--out_dir", str(tmp_path / "hf"), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_what_cannot_be_exported_is_refused_in_one_line_with_nothing_written(finetune_out, tmp_path):
    out = tmp_path / "hf"
    for family, why in [("neox-bias", "GPT-NeoX has no bias in its output head"),  # and no shared norm, as Phi
                        ("llama-gqa", "partial rotary embeddings (0.25)")]:  # fmt: skip
        base = family_base(tmp_path / family, family)
        result = run_main("export", str(base), "--out_dir", str(out))
        assert result.returncode == 1 and why in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_main("export", str(finetune_out), "--out_dir", str(out))
    assert result.returncode == 1 and "is not empty" in result.stderr and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["keep.txt"]
    assert run_main("export", str(finetune_out), "--out_dir", str(out), "--overwrite", "true").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()

    broken = tmp_path / "broken"  # a plain checkpoint whose weights hold a NaN
    family_base(broken, "llama-gqa", rotary_percentage=1.0)
    state = torch.load(broken / "lit_model.pth")
    state["transformer.h.0.attn.proj.weight"][0, 0] = float("nan")
    torch.save(state, broken / "lit_model.pth")
    result = run_main("export", str(broken), "--out_dir", str(tmp_path / "nan"))
    assert result.returncode == 1 and "not finite" in result.stderr and not (tmp_path / "nan").exists()
    state["transformer.h.0.attn.proj.weight"][0, 0] = 1e5  # finite in float32, beyond float16's range
    torch.save(state, broken / "lit_model.pth")
    result = run_main("export", str(broken), "--out_dir", str(tmp_path / "fp16"), "--dtype", "float16")
    assert result.returncode == 1 and "not finite" in result.stderr and not (tmp_path / "fp16").exists()

    result = run_main("export", str(finetune_out))
    assert result.returncode == 1 and "--out_dir is required" in result.stderr
    result = run_main("export", str(finetune_out), "--out_dir", str(tmp_path / "x"), "--max_shard_size", "5 gigs")
    assert result.returncode == 1 and "--max_shard_size must be a size" in result.stderr
    assert not (tmp_path / "x").exists()

"""``litgpt_ether export``: a tuned run as a Hugging Face model directory that transformers, vLLM and TGI load as is.

litgpt's converter maps the weights (its ``copy_weights_*`` functions, called on the merged state dict in memory);
this module writes what the converter leaves out: ``config.json`` for the architecture (chosen from the model's
structure, not its name), safetensors shards, a ``tokenizer.json`` that adds BOS exactly when litgpt does (transformers
ignores ``add_bos_token`` beside a ``tokenizer.json``, so the rule lives in its post-processor),
``generation_config.json`` with the prompt style's stop tokens, and the prompt style as the tokenizer's chat template,
rendering what ``litgpt_ether serve`` renders for a chat request.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import litgpt.config
import torch
from huggingface_hub import save_torch_state_dict
from jinja2.sandbox import ImmutableSandboxedEnvironment
from litgpt.prompts import PromptStyle
from litgpt.scripts.convert_lit_checkpoint import copy_weights_gpt_neox, copy_weights_llama, copy_weights_phi
from litgpt.tokenizer import Tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from litgpt_ether.checkpoint import (
    Resolved,
    check_free_space,
    exclusive,
    load_model,
    load_tokenizer,
    nbytes,
    read_model_config,
    read_prompt_style,
    resolve,
    staged_dir,
)
from litgpt_ether.checks import ConfigError
from litgpt_ether.ether import merge_ether
from litgpt_ether.merge import check_apart, refuse_nonempty

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# litgpt features no Hugging Face architecture here reproduces: refused by name rather than exported wrong
UNSUPPORTED = (
    "norm_qk",
    "post_attention_norm",
    "post_mlp_norm",
    "attention_logit_softcapping",
    "final_logit_softcapping",
    "attention_scores_scalar",
    "latent_attention",
    "rope_local_base_freq",
)


@dataclass
class Architecture:
    """A Hugging Face architecture for a litgpt model: ``config.json``'s fields and litgpt's weight mapping."""

    name: str  # the transformers class, e.g. "LlamaForCausalLM"
    fields: dict[str, Any]  # config.json, without the fields every architecture shares
    copy: Callable[..., None]  # litgpt's ``copy_weights_*``: (config, hf_state, lit_state, ...)

    def copy_weights(self, config: litgpt.config.Config, state: dict[str, torch.Tensor], tied: bool) -> dict:
        """The Hugging Face state dict; a head ``tied`` to the embedding is left out (Llama's mapping only: the
        others write their head whatever it is)."""
        hf_state: dict[str, torch.Tensor] = {}
        self.copy(config, hf_state, state, **({"untie_weights": tied} if self.copy is copy_weights_llama else {}))
        return hf_state


def architecture(config: litgpt.config.Config) -> Architecture:
    """The Hugging Face architecture that computes what ``config`` computes, from the model's structure.

    Raises ``ConfigError`` naming what has no faithful counterpart.
    """
    c = config

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"cannot export {c.name or 'this model'!r} to Hugging Face: {why}")

    used = [f for f in UNSUPPORTED if getattr(c, f, None) not in (None, False, 0)]
    if used:
        raise refuse(f"litgpt's {used[0]} has no counterpart in the supported architectures")
    if not (c.norm_1 and c.norm_2) or c.rope_condense_ratio != 1 or getattr(c, "rope_interleave", False):
        raise refuse("norms left out, condensed or interleaved RoPE are not supported")
    if c.sliding_window_size is not None and not all(c.sliding_window_indices[: c.n_layer]):
        raise refuse("a sliding window in some layers only")
    act = "gelu_pytorch_tanh" if c.gelu_approximate == "tanh" else "gelu"
    rope = {"rope_type": "default", "rope_theta": float(c.rope_base)}
    if c.mlp_class_name in ("LLaMAMLP", "GemmaMLP", "LLaMAMoE") and c.norm_class_name == "RMSNorm":
        if c.parallel_residual or c.bias or c.attn_bias or c.lm_head_bias:
            raise refuse("a LLaMA-style model with biases or a parallel residual")
        if c.rotary_percentage != 1.0:
            raise refuse(f"a LLaMA-style model with partial rotary embeddings ({c.rotary_percentage})")
        if c.rope_adjustments:
            a = c.rope_adjustments
            if set(a) != {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}:
                raise refuse(f"RoPE adjustments {sorted(a)} (only Llama 3's are supported)")
            rope = {**rope, "rope_type": "llama3", "factor": a["factor"], "low_freq_factor": a["low_freq_factor"],
                    "high_freq_factor": a["high_freq_factor"],
                    "original_max_position_embeddings": a["original_max_seq_len"]}  # fmt: skip
        fields = {"head_dim": c.head_size, "rms_norm_eps": c.norm_eps, "num_key_value_heads": c.n_query_groups,
                  "rope_parameters": rope, "attention_bias": False, "mlp_bias": False}  # fmt: skip
        gemma_norm = "Gemma" in c.name  # litgpt's RMSNorm adds 1 to its weight for these, as Hugging Face's Gemma
        if gemma_norm or c.scale_embeddings:
            if not (gemma_norm and c.scale_embeddings and c.mlp_class_name == "GemmaMLP"):
                raise refuse("scaled embeddings and unit-offset norms come only together, with Gemma's MLP")
            if c.sliding_window_size is not None:
                raise refuse("Gemma with a sliding window")
            fields["hidden_activation"] = fields["hidden_act"] = act
            return Architecture("GemmaForCausalLM", {"model_type": "gemma", **fields}, copy_weights_llama)
        fields["hidden_act"] = act if c.mlp_class_name == "GemmaMLP" else "silu"
        if c.mlp_class_name == "LLaMAMoE":
            fields.update(model_type="mixtral", num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token,
                          intermediate_size=c.moe_intermediate_size, sliding_window=c.sliding_window_size)  # fmt: skip
            return Architecture("MixtralForCausalLM", fields, copy_weights_llama)
        if c.sliding_window_size is not None:
            fields = {"model_type": "mistral", **fields, "sliding_window": c.sliding_window_size}
            return Architecture("MistralForCausalLM", fields, copy_weights_llama)
        return Architecture("LlamaForCausalLM", {"model_type": "llama", **fields}, copy_weights_llama)
    if c.mlp_class_name == "GptNeoxMLP" and c.norm_class_name == "LayerNorm":
        if c.n_query_groups != c.n_head:
            raise refuse("GPT-NeoX and Phi have no grouped-query attention")
        if not c.bias:
            raise refuse("GPT-NeoX and Phi layers always have biases")
        rope = {**rope, "partial_rotary_factor": c.rotary_percentage}
        if c.shared_attention_norm:
            if not (c.parallel_residual and c.lm_head_bias):
                raise refuse("a shared attention norm (Phi) needs a parallel residual and a biased output head")
            fields = {"layer_norm_eps": c.norm_eps, "hidden_act": act, "rope_parameters": rope,
                      "partial_rotary_factor": c.rotary_percentage, "num_key_value_heads": c.n_head}  # fmt: skip
            return Architecture("PhiForCausalLM", {"model_type": "phi", **fields}, copy_weights_phi)
        if c.lm_head_bias:
            raise refuse("GPT-NeoX has no bias in its output head (Phi has, with a shared attention norm)")
        fields = {"layer_norm_eps": c.norm_eps, "hidden_act": act, "rope_parameters": rope,
                  "rotary_pct": c.rotary_percentage, "rotary_emb_base": c.rope_base,
                  "use_parallel_residual": c.parallel_residual, "attention_bias": True}  # fmt: skip
        return Architecture("GPTNeoXForCausalLM", {"model_type": "gpt_neox", **fields}, copy_weights_gpt_neox)
    raise refuse(f"no supported architecture has a {c.mlp_class_name} with {c.norm_class_name}")


def hf_config(config: litgpt.config.Config, arch: Architecture, dtype: torch.dtype, tokenizer: Tokenizer,
              tied: bool) -> dict[str, Any]:  # fmt: skip
    """``config.json``: the fields every architecture shares, the architecture's own, and the keys transformers 4
    readers (vLLM builds on them) still look for beside transformers 5's ``rope_parameters``."""
    rope = arch.fields.get("rope_parameters", {})
    legacy = {"rope_theta": rope.get("rope_theta")}
    if rope.get("rope_type", "default") != "default":
        legacy["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": [arch.name],
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "max_position_embeddings": config.block_size,
        "tie_word_embeddings": tied,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        **arch.fields,  # after the shared fields: Mixtral's intermediate size is its experts'
        **legacy,
    }


# --------------------------------------------------------------------------------------------------
# The tokenizer, its chat template and the generation config


def uses_bos(tokenizer: Tokenizer, config: litgpt.config.Config) -> bool:
    """Whether litgpt prepends BOS: its tokenizer's rule, plus Llama 3, which litgpt recognises by the directory's name
    (so a run's ``final/`` would lose it)."""
    return bool(tokenizer.use_bos or config.name.startswith(("Llama-3", "Meta-Llama-3")))


def bos_post_processor(hf: HFTokenizer, bos: str | None, bos_id: int | None) -> Any:
    """A post-processor that adds ``bos`` (if any) and never EOS, as litgpt's ``encode``; a byte-level step the
    original had is kept (it fixes the offsets)."""
    old = json.loads(hf.to_str()).get("post_processor") or {}
    steps = old.get("processors", [old]) if old else []
    byte_level = [processors.ByteLevel(**{k: v for k, v in p.items() if k != "type"}) for p in steps
                  if p.get("type") == "ByteLevel"]  # fmt: skip
    if bos is None:
        template = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    else:
        template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                 special_tokens=[(bos, bos_id)])  # fmt: skip
    return processors.Sequence([*byte_level, template]) if byte_level else template


PROMPT, SYSTEM = "\x00prompt\x00", "\x00system\x00"


def _literal(text: str) -> str:
    """Jinja printing ``text`` verbatim (braces, newlines and all)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _fill(text: str) -> str:
    """``style.apply``'s output with the placeholders as Jinja variables and the rest as literals."""
    out = []
    for i, part in enumerate(text.split(PROMPT)):
        out.append("{{ prompt }}" if i else "")
        for j, piece in enumerate(part.split(SYSTEM)):
            out.append(("{{ system }}" if j else "") + _literal(piece))
    return "".join(out)


def chat_template(style: PromptStyle, bos: str | None) -> str | None:
    """The prompt style as a chat template rendering what ``litgpt_ether serve`` renders for a chat request: the last
    message (the user's) in the style, the system messages joined by newlines as its system prompt, earlier turns
    left out. ``None`` when ``style.apply`` is more than text around the prompt; a style that transforms its system
    prompt gets a template that leaves system messages out. Each is checked against ``apply`` itself."""
    plain, with_system = style.apply(PROMPT), style.apply(PROMPT, sys_prompt=SYSTEM)
    if plain.count(PROMPT) != 1 or SYSTEM in plain:
        return None
    head = "{{ bos_token }}" if bos and not plain.startswith(bos) else ""
    start = ("{%- if not messages or messages[-1]['role'] != 'user' -%}"
             "{{ raise_exception('the last message must be the user\\'s prompt') }}{%- endif -%}"
             "{%- set prompt = messages[-1]['content'] -%}") + head  # fmt: skip
    probes = [("Name the {{ capital }} of {% x %}.\n", None), ("a  ", "Be brief.\n"), ("q", "line one\nline two")]
    candidates = [(start + _fill(plain), [p for p in probes if p[1] is None])]  # the fallback: no system prompt
    if with_system.count(PROMPT) == 1 and with_system.count(SYSTEM) == 1:
        system = ("{%- set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content')"
                  " | join('\\n') -%}{%- if system -%}" + _fill(with_system) + "{%- else -%}" + _fill(plain)
                  + "{%- endif -%}")  # fmt: skip
        candidates.insert(0, (start + system, probes))
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    for template, checks in candidates:
        render = environment.from_string(template).render
        if all(
            render(messages=[*([{"role": "system", "content": s}] if s else []), {"role": "user", "content": p}],
                   bos_token=bos) == (bos if head else "") + style.apply(p, sys_prompt=s)
            for p, s in checks
        ):  # fmt: skip
            return template
    return None


def tokenizer_files(files_dir: Path, tokenizer: Tokenizer, style: PromptStyle, config: litgpt.config.Config,
                    ) -> tuple[HFTokenizer, dict[str, Any], dict[str, Any]]:  # fmt: skip
    """``tokenizer.json`` (BOS as litgpt adds it), ``tokenizer_config.json`` (with the chat template) and
    ``generation_config.json`` (the prompt style's single-token stops), checked before anything is written."""
    path = files_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"{str(files_dir)!r} has no tokenizer.json (a sentencepiece tokenizer.model only): save it as one first,"
            " e.g. transformers' AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
        )
    hf = HFTokenizer.from_file(str(path))
    bos = hf.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None
    eos = hf.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else None
    add_bos = uses_bos(tokenizer, config) and bos is not None
    hf.post_processor = bos_post_processor(hf, bos if add_bos else None, tokenizer.bos_id)
    original = files_dir / "tokenizer_config.json"
    extra = json.loads(original.read_text(encoding="utf-8")) if original.is_file() else {}
    template = chat_template(style, bos if add_bos else None)
    tokenizer_config = {
        **{k: v for k, v in extra.items() if k not in ("auto_map", "chat_template", "tokenizer_file")},
        # the generic class uses tokenizer.json as it is; a model's own class rebuilds it from the vocabulary
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "add_bos_token": add_bos,  # for litgpt, which reads it; transformers follows tokenizer.json
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.block_size,
        **({"chat_template": template} if template is not None else {}),
    }
    stops = [s[0] for s in style.stop_tokens(tokenizer) if len(s) == 1]
    stops = list(dict.fromkeys([tokenizer.eos_id, *stops] if tokenizer.eos_id is not None else stops))
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
                  "pad_token_id": tokenizer.eos_id}  # fmt: skip
    return hf, tokenizer_config, {k: v for k, v in generation.items() if v not in (None, [])}


# --------------------------------------------------------------------------------------------------
# The verb


def merged_state(resolved: Resolved, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The merged model's litgpt state dict (the adapter folded in, fp32 math), in ``dtype`` (default: as stored)."""
    model = load_model(resolved)  # the stored tensors, memory-mapped, checked against the config
    state = (merge_ether(model, dtype) if resolved.adapter is not None else model).state_dict()
    state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # checked in the dtype written: a weight beyond float16's range is refused, not saved as inf
        where = str(resolved.files_dir)
        raise ConfigError(f"the merged weights of {where!r} are not finite ({bad[0]}); nothing written")
    return state


def export(
    checkpoint_dir: Path,
    out_dir: Path | None = None,
    base_checkpoint_dir: Path | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> None:
    """Write a Hugging Face model directory that ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` (and vLLM, TGI) load with no other argument: the model with its adapter merged,
    its tokenizer (BOS as litgpt adds it), the prompt style it was tuned with as the chat template, and the style's
    stop tokens in ``generation_config.json``. Checks everything before writing; writes the directory whole or not at
    all.

    Arguments:
        checkpoint_dir: A finetune ``out_dir``, its ``final/`` or ``step-*`` directory, a merged checkpoint or an
            adapter file; an adapter is merged on the way (``H_out W H_in`` in fp32).
        out_dir: Where to write (required): a new or empty directory (or any, with ``overwrite``).
        base_checkpoint_dir: The base model, if not the one the adapter's ``hyperparameters.yaml`` records.
        dtype: The weights' dtype. Default: the base model's.
        max_shard_size: Safetensors files are split above this size (as the Hugging Face Hub does: "5GB").
        overwrite: Replace a non-empty ``out_dir`` as a whole, once everything is ready.
    """
    if out_dir is None:
        raise ConfigError("--out_dir is required: the directory to write the Hugging Face model to")
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", max_shard_size, flags=re.IGNORECASE):
        raise ConfigError(f"--max_shard_size must be a size such as '5GB', '500MB' or '20KB', got {max_shard_size!r}")
    resolved = resolve(checkpoint_dir, base_checkpoint_dir)
    out_dir = Path(out_dir)
    check_apart(out_dir, resolved, "checkpoint")
    config = read_model_config(resolved.base_dir / "model_config.yaml")
    style = read_prompt_style(resolved.files_dir, config)
    tokenizer = load_tokenizer(resolved.base_dir)
    arch = architecture(config)  # refused before the weights are read
    hf_tokenizer, tokenizer_config, generation = tokenizer_files(resolved.base_dir, tokenizer, style, config)

    refuse_nonempty(out_dir, overwrite)
    state = merged_state(resolved, DTYPES[dtype] if dtype else None)
    tied = torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    hf_state = arch.copy_weights(config, state, tied)
    # q, k and v are views of one fused tensor: safetensors stores whole tensors
    hf_state = {k: v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
                for k, v in hf_state.items()}  # fmt: skip
    weights_dtype = next(v.dtype for v in hf_state.values() if v.is_floating_point())

    with exclusive(out_dir, lambda: refuse_nonempty(out_dir, overwrite)):
        with staged_dir(out_dir) as tmp:
            check_free_space(tmp, nbytes(hf_state))
            save_torch_state_dict(hf_state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
            files = {
                "config.json": hf_config(config, arch, weights_dtype, tokenizer, tied),
                "tokenizer_config.json": tokenizer_config,
                "generation_config.json": generation,
            }
            for name, value in files.items():
                (tmp / name).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            hf_tokenizer.save(str(tmp / "tokenizer.json"))
    template = "as its chat template" if "chat_template" in tokenizer_config else "not expressible as a chat template"
    dtype_name = str(weights_dtype).removeprefix("torch.")
    print(f"Saved {arch.name} ({dtype_name}; prompt style {type(style).__name__} {template}) to {str(out_dir)!r}")

"""``litgpt_ether evaluate``: lm-eval's model interface over the litgpt model, checked against the model itself,
against lm-eval's own ``hf`` model on the exported checkpoint, and end to end through the CLI on the local tasks
in ``tests/lm_eval_tasks``."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_main
from litgpt.tokenizer import Tokenizer

pytest.importorskip("lm_eval", reason="the eval extra installs lm-eval")
from lm_eval.api.instance import Instance  # noqa: E402

from litgpt_ether.checkpoint import LOCK_FILE, load_model, resolve  # noqa: E402
from litgpt_ether.evaluate import LitGPTLM, evaluate  # noqa: E402

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASK_NAMES = ("colours_reverse_mc", "colours_reverse_gen")


def alpaca(instruction: str) -> str:
    """The prompt style the tiny model is finetuned with; every word is in its vocabulary."""
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )


PROMPT = alpaca("reverse red green blue")
LONG = " ".join(["red green blue"] * 50)  # 150 tokens: longer than the tiny model's context of 128
PAIRS = [
    (PROMPT, "blue green red"),
    (PROMPT, "red"),
    ("", "red green blue"),  # empty context: conditioned on BOS alone
    ("reverse", " blue"),
    ("reverse", " cyan gold pink"),
    (LONG, " blue green red"),  # truncated from the left
]
GEN_PROMPTS = [PROMPT, alpaca("reverse gold pink cyan"), "reverse", "### Response: blue", "red"]


def loglikelihood_requests(pairs: list[tuple[str, str]]) -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def generate_requests(prompts: list[str], until: list[str], max_gen_toks: int = 6) -> list[Instance]:
    kwargs = {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", {}, (prompt, dict(kwargs)), i) for i, prompt in enumerate(prompts)]


@torch.no_grad()
def direct_loglikelihood(model, tokenizer: Tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of the continuation's log-softmax, on the last ``max_seq_length`` + 1 tokens; greedy: every argmax hits."""
    context_ids = tokenizer.encode(context).tolist()  # BOS, as the checkpoint's tokenizer_config asks
    continuation_ids = tokenizer.encode(continuation, bos=False).tolist()
    tokens = torch.tensor(context_ids + continuation_ids)[-(model.max_seq_length + 1) :]
    logprobs = torch.log_softmax(model(tokens[None, :-1])[0], dim=-1)[-len(continuation_ids) :]
    target = torch.tensor(continuation_ids)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


@torch.no_grad()
def direct_greedy(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding by full forward passes (no KV cache), stopping at EOS."""
    tokens, new = tokenizer.encode(prompt).tolist(), []
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([tokens]))[0, -1].argmax())
        if token == tokenizer.eos_id:
            break
        tokens.append(token)
        new.append(token)
    return tokenizer.decode(torch.tensor(new, dtype=torch.long))


@pytest.fixture(scope="module")
def merged(finetune_out) -> tuple[torch.nn.Module, Tokenizer]:
    resolved = resolve(finetune_out / "final")
    assert resolved.adapter is None
    return load_model(resolved), Tokenizer(resolved.files_dir)


def test_loglikelihoods_equal_a_direct_computation_with_the_model_at_any_batch_size(merged):
    model, tokenizer = merged
    assert len(tokenizer.encode(LONG)) > model.max_seq_length + 1  # the truncation case is one
    pairs = PAIRS + [(PROMPT, direct_greedy(model, tokenizer, PROMPT, 2))]  # greedy by construction
    expected = [direct_loglikelihood(model, tokenizer, *pair) for pair in pairs]
    assert {greedy for _, greedy in expected} == {True, False}  # both outcomes of is_greedy are exercised

    by_batch_size = {}
    for batch_size in (1, 4):
        got = LitGPTLM(model, tokenizer, batch_size=batch_size).loglikelihood(loglikelihood_requests(pairs))
        for (logprob, greedy), (want_logprob, want_greedy) in zip(got, expected, strict=True):
            assert logprob == pytest.approx(want_logprob, abs=1e-4)
            assert greedy == want_greedy
        by_batch_size[batch_size] = got
    assert [lp for lp, _ in by_batch_size[1]] == pytest.approx([lp for lp, _ in by_batch_size[4]], abs=1e-5)


def test_rolling_loglikelihood_scores_every_token_once_conditioned_on_bos(merged):
    model, tokenizer = merged
    texts = ["red green blue", "### Response: gold pink"]
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    got = LitGPTLM(model, tokenizer, batch_size=2).loglikelihood_rolling(requests)
    # the whole text as the continuation of an empty context: BOS, then every token of the text
    expected = [direct_loglikelihood(model, tokenizer, "", text)[0] for text in texts]
    assert got == pytest.approx(expected, abs=1e-4)


def test_greedy_generation_equals_direct_decoding_and_stops_at_until_and_eos(merged):
    model, tokenizer = merged
    full = [direct_greedy(model, tokenizer, prompt, 6) for prompt in GEN_PROMPTS]
    # a stop string inside a greedy text, past its first word: the text must be cut there, not emptied
    stop = next(words[1] for words in map(str.split, full) if len(words) > 1 and words[1] != words[0])
    # the random-weight model never ends a text itself: call a word it does generate (not first) the end of text
    eos_tokenizer = copy.copy(tokenizer)
    eos_tokenizer.eos_id = next(token for words in map(str.split, full) for w in words[1:]
                                if (token := tokenizer.processor.token_to_id(w)) is not None)  # fmt: skip
    ended = [direct_greedy(model, eos_tokenizer, prompt, 6) for prompt in GEN_PROMPTS]
    assert ended != full
    for batch_size in (1, 3):  # 3: the two Alpaca prompts have the same length and share a batch
        lm = LitGPTLM(model, tokenizer, batch_size=batch_size)
        assert lm.generate_until(generate_requests(GEN_PROMPTS, until=[])) == full
        assert lm.generate_until(generate_requests(GEN_PROMPTS, until=[stop])) == [t.split(stop)[0] for t in full]
        eos_lm = LitGPTLM(model, eos_tokenizer, batch_size=batch_size)
        assert eos_lm.generate_until(generate_requests(GEN_PROMPTS, until=[])) == ended


def test_unmerged_adapter_scores_like_its_merged_model(merged, finetune_out, checkpoint_dir):
    model, tokenizer = merged
    unmerged = load_model(resolve(finetune_out / "final", prefer_adapter=True))
    base = load_model(resolve(checkpoint_dir))
    requests = loglikelihood_requests(PAIRS)
    want = [lp for lp, _ in LitGPTLM(model, tokenizer, batch_size=3).loglikelihood(requests)]
    got = [lp for lp, _ in LitGPTLM(unmerged, tokenizer, batch_size=3).loglikelihood(requests)]
    untuned = [lp for lp, _ in LitGPTLM(base, tokenizer, batch_size=3).loglikelihood(requests)]
    assert got == pytest.approx(want, abs=1e-4)
    assert untuned != pytest.approx(want, abs=1e-2)  # the adapter matters: the comparison above can fail


def test_scores_and_generations_equal_lm_evals_own_hf_model_on_the_exported_checkpoint(merged, finetune_out, tmp_path):
    pytest.importorskip("transformers", reason="the test extra installs transformers")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (the test extra)")
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = merged
    hf_dir = tmp_path / "hf"
    assert run_main("export", str(finetune_out), "--out_dir", str(hf_dir)).returncode == 0
    # no add_bos_token: the exported tokenizer adds BOS where litgpt's does, so both models see the same token ids
    hf = HFLM(pretrained=str(hf_dir), backend="causal", device="cpu", dtype="float32", batch_size=2)
    lm = LitGPTLM(model, tokenizer, batch_size=2)
    for context, continuation in PAIRS:
        assert hf.tok_encode(context + continuation) == lm.tok_encode(context + continuation)
    assert hf.max_length == lm.max_length  # same left truncation

    for (logprob, greedy), (hf_logprob, hf_greedy) in zip(
        lm.loglikelihood(loglikelihood_requests(PAIRS)), hf.loglikelihood(loglikelihood_requests(PAIRS)), strict=True
    ):
        assert logprob == pytest.approx(hf_logprob, abs=1e-4)
        assert greedy == hf_greedy
    requests = generate_requests(GEN_PROMPTS, until=["###"])
    assert lm.generate_until(requests) == hf.generate_until(requests)


def cli_evaluate(checkpoint: Path, out_dir: Path, *extra: str):
    return run_main(
        "evaluate", str(checkpoint), "--tasks", ",".join(TASK_NAMES), "--include_path", str(TASKS_DIR),
        "--limit", "4", "--num_fewshot", "1", "--batch_size", "3", "--precision", "32-true", "--out_dir", str(out_dir),
        *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cli_runs(finetune_out, tmp_path_factory) -> dict[str, tuple]:
    """The CLI on the merged ``final/`` and on the adapter-only ``step-000020/``: (process, results.json)."""
    out = tmp_path_factory.mktemp("evaluate")
    runs = {}
    for name, checkpoint in (("merged", finetune_out / "final"), ("unmerged", finetune_out / "step-000020")):
        result = cli_evaluate(checkpoint, out / name)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (result, json.loads((out / name / "results.json").read_text()))
    return runs


@pytest.mark.parametrize("name", ["merged", "unmerged"])
def test_cli_writes_lm_evals_results_json_and_prints_its_table(cli_runs, name):
    result, results = cli_runs[name]
    assert {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"} <= set(results)
    assert set(results["results"]) == set(TASK_NAMES)
    assert {"acc,none", "acc_norm,none"} <= set(results["results"]["colours_reverse_mc"])
    assert "exact_match,none" in results["results"]["colours_reverse_gen"]
    for task in TASK_NAMES:
        assert results["n-samples"][task]["effective"] == 4  # --limit
        assert results["n-shot"][task] == 1  # --num_fewshot
    adapter = results["config"]["model_args"]["adapter"]
    assert (adapter is None) if name == "merged" else adapter.endswith("step-000020/lit_model.pth.ether")
    assert "|       Tasks       |Version|Filter|n-shot|  Metric   |" in result.stdout
    for task in TASK_NAMES:
        assert f"|{task}" in result.stdout


def test_final_adapter_applied_to_its_base_gives_the_merged_metrics(cli_runs, finetune_out, tmp_path):
    """The adapter-only copy of ``final/`` (no merged weights) evaluated through the Python API."""
    unmerged = tmp_path / "final-unmerged"
    shutil.copytree(finetune_out / "final", unmerged, ignore=shutil.ignore_patterns("lit_model.pth", "eval"))
    results = evaluate(
        unmerged, tasks=",".join(TASK_NAMES), include_path=TASKS_DIR, limit=4, num_fewshot=1, batch_size=3,
        precision="32-true",
    )  # fmt: skip
    assert results["config"]["model_args"]["adapter"] == str(unmerged / "lit_model.pth.ether")
    assert json.loads((unmerged / "eval" / "results.json").read_text())["results"] == results["results"]  # default
    assert results["results"] == cli_runs["merged"][1]["results"]


def test_unknown_task_is_a_one_line_error_and_nothing_is_written(checkpoint_dir, tmp_path):
    out_dir = tmp_path / "eval"
    result = run_main(
        "evaluate", str(checkpoint_dir), "--tasks", "colours_reverse_mc,no_such_task", "--include_path",
        str(TASKS_DIR), "--out_dir", str(out_dir),
    )  # fmt: skip
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("litgpt_ether: error:") and "no_such_task" in last and "colours_reverse_mc" not in last
    assert "Traceback" not in result.stderr
    assert not out_dir.exists()


def test_existing_results_are_kept_unless_overwrite(finetune_out, tmp_path):
    """A second evaluation into the same ``out_dir`` is refused before it runs, the first results intact;
    ``--overwrite true`` replaces them, leaving no temporary file behind."""
    out_dir = tmp_path / "eval"
    out_dir.mkdir()
    (out_dir / "results.json").write_text('{"earlier": true}')
    result = cli_evaluate(finetune_out / "final", out_dir)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("or pass --overwrite true to replace it")
    assert (out_dir / "results.json").read_text() == '{"earlier": true}'
    result = cli_evaluate(finetune_out / "final", out_dir, "--overwrite", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(json.loads((out_dir / "results.json").read_text())["results"]) == set(TASK_NAMES)
    assert sorted(p.name for p in out_dir.iterdir()) == [LOCK_FILE, "results.json"]  # the lock, no temporary file

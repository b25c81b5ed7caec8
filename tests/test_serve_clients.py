"""``litgpt_ether serve`` as a drop-in OpenAI backend: real third-party clients against a real server on 127.0.0.1.

lm-eval's ``local-completions`` (generation and log-likelihood tasks) and ``local-chat-completions`` score the tuned
adapter exactly as ``litgpt_ether evaluate`` does; litellm and LangChain's ``ChatOpenAI`` get the adapter's own
answers, with ``stop``.
"""

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from litgpt.prompts import Alpaca
from litgpt.tokenizer import Tokenizer
from test_serve import alone, free_port, start_server, stop_server

from litgpt_ether.checkpoint import ADAPTER_FILE, load_model, resolve
from litgpt_ether.engine import Request, Sampling

pytest.importorskip("litserve", reason="the serve extra installs LitServe")
lm_eval = pytest.importorskip("lm_eval", reason="the eval extra installs lm-eval")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

REPO = Path(__file__).parents[1]
DEMO_TASKS = REPO / "demo" / "lm_eval"
LOCAL_TASKS = Path(__file__).parent / "lm_eval_tasks"
LIMIT = 6


@pytest.fixture(scope="module")
def tuned_server(checkpoint_dir, finetune_out, tmp_path_factory):
    """The tiny base with the tuned ETHER+ adapter of ``finetune_out``, greedy by default."""
    port = free_port()
    log = tmp_path_factory.mktemp("clients") / "server.log"
    process = start_server(checkpoint_dir, {"tuned": finetune_out / "final" / ADAPTER_FILE}, port, log,
                           "--max_new_tokens", "8")  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", checkpoint_dir, finetune_out / "final" / ADAPTER_FILE
    finally:
        assert stop_server(process, signal.SIGTERM) == 0, log.read_text()[-3000:]


def outcome(results: dict) -> tuple[dict[str, float], dict[str, list]]:
    """The scores, and per task each sample's responses (log-likelihoods, or generated text) in document order."""
    scores = {f"{task}/{name}": float(value) for task, metrics in results["results"].items()
              for name, value in metrics.items() if isinstance(value, float) and "stderr" not in name}  # fmt: skip
    samples = {
        task: [[r[0] for r in s["resps"]] for s in sorted(rows, key=lambda s: s["doc_id"])]
        for task, rows in results["samples"].items()
    }  # one response per request of the document
    return scores, samples


def run(model: object, model_args: str | None, tasks: list[str], include_path: Path, chat: bool = False) -> tuple:
    from lm_eval.tasks import TaskManager

    seeds = {f"{name}_seed": 1234 for name in ("random", "numpy_random", "torch_random", "fewshot_random")}
    return outcome(lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=LIMIT,
                                           task_manager=TaskManager(include_path=str(include_path)),
                                           apply_chat_template=chat, log_samples=True, **seeds))  # fmt: skip


def through_evaluate(base: Path, adapter: Path, tasks: list[str], include_path: Path) -> tuple:
    """What ``litgpt_ether evaluate`` runs: lm-eval over ``LitGPTLM``, the adapter applied on the fly."""
    from litgpt_ether.evaluate import LitGPTLM

    model = load_model(resolve(adapter, base_checkpoint_dir=base))
    return run(LitGPTLM(model, Tokenizer(base), batch_size=1), None, tasks, include_path)


def through_server(model: str, url: str, tasks: list[str], include_path: Path, **args: str) -> tuple:
    chat = model == "local-chat-completions"
    settings = {"model": "tuned", "base_url": f"{url}/v1/{'chat/completions' if chat else 'completions'}",
                "max_length": "128", "max_retries": "1", **args}  # fmt: skip
    return run(model, ",".join(f"{k}={v}" for k, v in settings.items()), tasks, include_path, chat)


def assert_same(got: tuple, want: tuple) -> None:
    """The same scores; the same generated texts; log-likelihoods equal to float precision, the same greedy flags."""
    assert got[0] == want[0] and want[0], (got[0], want[0])
    assert got[1].keys() == want[1].keys()
    for task in want[1]:
        for ours, theirs in zip(got[1][task], want[1][task], strict=True):
            if isinstance(theirs[0], (list, tuple)):  # (log-likelihood, is_greedy) per choice
                assert [g for _, g in ours] == [g for _, g in theirs]
                assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=1e-4)
            else:  # generated text
                assert ours == theirs


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint_dir, tmp_path_factory) -> Path:
    """The base's tokenizer as a Hugging Face tokenizer that adds BOS when asked (``add_special_tokens``), as Llama's
    does: what lm-eval's client encodes prompts with, as litgpt does (the checkpoint's ``add_bos_token``)."""
    from tokenizers import Tokenizer as HFTokenizer

    from litgpt_ether.export import bos_post_processor

    directory = tmp_path_factory.mktemp("hf_tokenizer")
    tokenizer = HFTokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
    tokenizer.post_processor = bos_post_processor(tokenizer, "<s>", Tokenizer(checkpoint_dir).bos_id)
    tokenizer.save(str(directory / "tokenizer.json"))
    shutil.copy(checkpoint_dir / "tokenizer_config.json", directory / "tokenizer_config.json")
    return directory


def test_lm_eval_local_completions_scores_as_evaluate(tuned_server, hf_tokenizer):
    """The shipped ``ether_demo`` (generation) and the local multiple-choice and generation tasks (log-likelihoods
    from ``echo`` and ``logprobs``) give ``litgpt_ether evaluate``'s scores and samples on the same adapter and
    limit."""
    url, base, adapter = tuned_server
    client = {"tokenizer_backend": "huggingface", "tokenizer": str(hf_tokenizer), "add_bos_token": "True"}
    assert Tokenizer(base).use_bos  # so evaluate conditions on BOS, and the client must send it
    for tasks, include_path in ((["ether_demo"], DEMO_TASKS), (["colours_reverse_mc", "colours_reverse_gen"],
                                                               LOCAL_TASKS)):  # fmt: skip
        want = through_evaluate(base, adapter, tasks, include_path)
        assert_same(through_server("local-completions", url, tasks, include_path, **client), want)
    mc = want[1]["colours_reverse_mc"]
    assert len({round(lp, 3) for doc in mc for lp, _ in doc}) > 10  # real, different log-likelihoods


def test_lm_eval_local_chat_completions_scores_as_evaluate(tuned_server, tmp_path):
    """A chat-form copy of ``ether_demo`` (the raw instruction: the server applies the adapter's prompt style, which
    is the task's own prompt) scores as ``ether_demo`` through ``evaluate``."""
    url, base, adapter = tuned_server
    chat_tasks = tmp_path / "chat_tasks"
    chat_tasks.mkdir()
    shutil.copy(DEMO_TASKS / "demo_tasks.py", chat_tasks / "demo_tasks.py")
    text = (DEMO_TASKS / "ether_demo.yaml").read_text()
    prompt = text.split("doc_to_text: ")[1].splitlines()[0]
    (chat_tasks / "ether_demo_chat.yaml").write_text(
        text.replace("task: ether_demo", "task: ether_demo_chat").replace(prompt, '"{{instruction}}"')
    )
    (chat_tasks.parent / "data").mkdir()  # the task reads the demo's data next to its own folder
    for split in ("val", "test"):
        shutil.copy(REPO / "demo" / "data" / f"{split}.json", chat_tasks.parent / "data" / f"{split}.json")
    want = through_evaluate(base, adapter, ["ether_demo"], DEMO_TASKS)
    got = through_server("local-chat-completions", url, ["ether_demo_chat"], chat_tasks)
    renamed = ({k.replace("ether_demo", "ether_demo_chat"): v for k, v in want[0].items()},
               {"ether_demo_chat": want[1]["ether_demo"]})  # fmt: skip
    assert_same(got, renamed)


def reference(base: Path, adapter: Path, prompt: str, max_new_tokens: int) -> str:
    """The adapter's greedy answer, merged into its base, with its prompt style."""
    tokenizer = Tokenizer(base)
    model = load_model(resolve(adapter, base_checkpoint_dir=base))
    request = Request(1, tokenizer.encode(Alpaca().apply(prompt)), max_new_tokens, Sampling(),
                      Alpaca().stop_tokens(tokenizer))  # fmt: skip
    return tokenizer.decode(torch.tensor(alone(model, request), dtype=torch.long))


def test_litellm_and_langchain_get_the_adapters_answers_with_stop(tuned_server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of litellm's price list
    litellm = pytest.importorskip("litellm")
    langchain_openai = pytest.importorskip("langchain_openai")
    url, base, adapter = tuned_server
    question = "reverse red green blue"
    answer = reference(base, adapter, question, 8)
    words = answer.split()
    assert len(words) >= 2, answer
    stop = words[1]
    cut = answer[: answer.index(stop)]

    reply = litellm.completion(model="openai/tuned", api_base=f"{url}/v1", api_key="unused", max_tokens=8,
                               messages=[{"role": "user", "content": question}])  # fmt: skip
    assert reply.choices[0].message.content == answer
    reply = litellm.completion(model="openai/tuned", api_base=f"{url}/v1", api_key="unused", max_tokens=8,
                               messages=[{"role": "user", "content": question}], stop=[stop])  # fmt: skip
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"

    chat = langchain_openai.ChatOpenAI(model="tuned", base_url=f"{url}/v1", api_key="unused", max_tokens=8,
                                       temperature=0, max_retries=0)  # fmt: skip
    assert chat.invoke(question).content == answer
    assert chat.invoke(question, stop=[stop]).content == cut
    assert "".join(chunk.content for chunk in chat.stream(question, stop=[stop])) == cut
    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"

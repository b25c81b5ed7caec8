"""``litgpt_ether serve``: many adapters in one batch give what each adapter's merged model gives alone.

The decoding tests run the batch engine in this process; the HTTP tests start the real server (a subprocess on
127.0.0.1) and talk to it with the ``openai`` client and ``httpx``.
"""

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import litgpt.config
import litgpt.model
import pytest
import torch
from conftest import family_base, make_adapter, run_main
from litgpt.generate.base import generate_fn
from litgpt.prompts import Alpaca
from litgpt.tokenizer import Tokenizer

from litgpt_ether.__main__ import adapters_as_list
from litgpt_ether.checkpoint import load_adapter, load_model, resolve, save_adapter
from litgpt_ether.checks import check_temperature
from litgpt_ether.engine import Engine, Request, Rows, RowsKVCache, Sampling, run_all
from litgpt_ether.ether import (
    GPT,
    Config,
    merge_ether,
    reflect,
    reflect_through,
    weight_units,
)
from litgpt_ether.serve import build_model, load_adapters

# Every kind of adapter the server mixes: methods, sides, block counts (1, 2, 4: a table of gcd 1) and targets
ADAPTERS = {
    "ether-qv-n2": dict(ether_method="ether", ether_nb=2, ether_query=True, ether_value=True),
    "plus-two-sided-n4": dict(ether_method="etherplus", ether_nb=4, ether_query=True, ether_key=True,
                              ether_value=True, ether_projection=True, ether_mlp=True),
    "ether-flip-n1": dict(ether_method="ether", ether_nb=1, ether_flip_side=True, ether_projection=True,
                          ether_mlp=True),
    "plus-one-sided-n1": dict(ether_method="etherplus", ether_one_sided=True, ether_nb=1, ether_key=True,
                              ether_head=True),
}  # fmt: skip
PROMPTS = ["reverse red green blue", "reverse gold pink cyan red green"]


# --------------------------------------------------------------------------------------------------
# The per-row math against H built explicitly


def dense_h(units: torch.Tensor, coefs: tuple[float, ...]) -> torch.Tensor:
    """``blockdiag_b(I + sum_j c_j w_bj w_bjᵀ)`` for one row's ``(n, j, k)`` units."""
    blocks = [torch.eye(u.shape[-1]) + sum(c * torch.outer(w, w) for c, w in zip(coefs, u)) for u in units]
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("tokens", [1, 3])
def test_rows_kv_cache_writes_each_row_at_its_own_positions_as_litgpts_does(tokens):
    cache_rows, rows, groups, length, size = 5, 4, 2, 10, 3  # a batch smaller than the cache, as after rows finish
    ours = litgpt.model.KVCache((cache_rows, groups, length, size), (cache_rows, groups, length, size + 1))
    ours.k.normal_(), ours.v.normal_()
    theirs = litgpt.model.KVCache(ours.k.shape, ours.v.shape)
    theirs.k.copy_(ours.k), theirs.v.copy_(ours.v)
    ours.__class__ = RowsKVCache
    positions = torch.stack([torch.randperm(length)[:tokens] for _ in range(rows)])  # a different place per row
    k, v = torch.randn(rows, groups, tokens, size), torch.randn(rows, groups, tokens, size + 1)
    for got, want in zip(ours(positions, k, v), theirs(positions, k, v), strict=True):  # litgpt: row by row
        assert torch.equal(got, want) and got.shape[0] == rows
    assert torch.equal(ours.k, theirs.k) and torch.equal(ours.v, theirs.v)  # the rows beyond the batch untouched
    for b in range(rows):
        assert torch.equal(ours.k[b][:, positions[b]], k[b]) and torch.equal(ours.v[b][:, positions[b]], v[b])


class Int8Linear(torch.nn.Module):
    """A linear whose weight is not floating point, as bitsandbytes' are: only its forward may touch it."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.scale = weight.abs().max() / 127
        self.weight = torch.round(weight / self.scale).to(torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight.float() * self.scale).T


@pytest.mark.parametrize("coefs", [(-2.0,), (-1.0, 1.0), (-1.0, 1.0, -1.0, 1.0)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_per_row_reflections_equal_each_rows_dense_h(coefs, tokens):
    rows, n, k, out = 3, 2, 4, 6
    units = torch.nn.functional.normalize(torch.randn(rows, n, len(coefs), k), dim=-1)
    x = torch.randn(rows, tokens, n * k)
    dense = torch.stack([x[b] @ dense_h(units[b], coefs) for b in range(rows)])
    torch.testing.assert_close(reflect(x, units[:, None], coefs), dense)
    weight = torch.randn(out, n * k)
    for linear in (torch.nn.Linear(n * k, out, bias=False), Int8Linear(weight)):
        if isinstance(linear, torch.nn.Linear):
            linear.weight.data = weight
        w = weight if isinstance(linear, torch.nn.Linear) else linear.weight.float() * linear.scale
        (proj,) = weight_units(linear, [(0, out)], [units[:, None]])
        correction = torch.stack([(dense[b] - x[b]) @ w.T for b in range(rows)])  # x H Wᵀ - x Wᵀ, row by row
        torch.testing.assert_close(reflect_through(x, units[:, None], coefs, proj), correction)


def merged(base: Path, adapter: Path | None) -> litgpt.model.GPT:
    """The adapter folded into the base weights (or the base alone): what ``litgpt_ether merge`` writes."""
    if adapter is None:
        return load_model(resolve(base))
    return merge_ether(load_model(resolve(adapter / "lit_model.pth.ether", base_checkpoint_dir=base))).eval()


def alone(model: litgpt.model.GPT, request: Request) -> list[int]:
    """litgpt's own generation with a batch of one: what ``litgpt_ether generate`` returns."""
    model.max_seq_length = request.prompt.numel() + request.max_new_tokens
    model.set_kv_cache(batch_size=1)
    s = request.sampling
    out = generate_fn(model, request.prompt, model.max_seq_length, temperature=s.temperature, top_k=s.top_k,
                      top_p=s.top_p, stop_tokens=request.stop_tokens, include_prompt=False,
                      include_eos=False)  # fmt: skip
    tokens = [int(t) for chunk in out for t in chunk.reshape(-1)]
    model.clear_kv_cache()
    return tokens


def served(model: GPT, rows: Rows, requests: list[Request], batch: int | None = None) -> list[list[int] | str]:
    """Each request's tokens through the server's engine (all admitted at once unless ``batch`` is smaller), or the
    error that ended it."""
    return run_all(Engine(model, rows, batch or max(1, len(requests)), model.config.block_size), requests)


def requests_for(base: Path, names: list[str], max_new_tokens: int = 6, **sampling) -> list[Request]:
    """Every adapter (row 1..) and the base (row 0) on every prompt, interleaved."""
    tokenizer, style = Tokenizer(base), Alpaca()
    return [Request(row, tokenizer.encode(style.apply(p)), max_new_tokens, Sampling(**sampling),
                    style.stop_tokens(tokenizer)) for p in PROMPTS for row in range(len(names) + 1)]  # fmt: skip


def resampled(request: Request, **sampling) -> Request:
    return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, **sampling))


@pytest.fixture(scope="module", params=["llama-mha", "llama-gqa", "neox-bias", "gemma-mqa"])
def served_family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    base = family_base(directory / "base", request.param)
    adapters = {name: make_adapter(base, directory / name, seed, **args)
                for seed, (name, args) in enumerate(ADAPTERS.items())}  # fmt: skip
    rows = Rows()
    model = build_model(base, load_adapters(base, [f"{n}={p}" for n, p in adapters.items()]), rows)
    return base, adapters, model, rows


def test_a_mixed_batch_gives_each_request_what_its_merged_model_gives_alone(served_family):
    base, adapters, model, rows = served_family
    requests = requests_for(base, list(adapters))
    mixed = served(model, rows, requests)
    paths = [None, *adapters.values()]
    references = {row: merged(base, path) for row, path in enumerate(paths)}
    expected = [alone(references[r.row], r) for r in requests]
    assert mixed == expected
    assert sum(len(t) for t in expected) > len(requests)  # not all empty: the comparison has content
    assert len({tuple(t) for t in expected}) > len(PROMPTS)  # the adapters change the answers
    assert mixed == [served(model, rows, [r])[0] for r in requests]  # one by one, through the server's engine


def test_a_mixed_batch_through_the_fused_kernels_decodes_as_through_the_torch_path(served_family, monkeypatch):
    """``LITGPT_ETHER_KERNELS=triton``: every per-row reflection is one kernel driven by the rows' adapter index (on a
    CPU through Triton's interpreter), and the tokens are those of the torch path."""
    pytest.importorskip("triton")
    from test_kernels import count_kernel_ops

    base, adapters, model, rows = served_family
    requests = requests_for(base, list(adapters))[: 2 * (len(adapters) + 1)]  # two prompts: the interpreter is slow
    expected = served(model, rows, requests)
    monkeypatch.setenv("LITGPT_ETHER_KERNELS", "triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    results = []
    calls = count_kernel_ops(lambda: results.append(served(model, rows, requests)))
    assert results[0] == expected
    assert calls and set(calls) <= {"reflect_rows", "reflect_rows_", "reflect_rows_stacked", "reflect_rows_unstacked"}


def test_requests_joining_a_running_batch_decode_as_alone_greedy_and_seeded(served_family):
    """Continuous batching: requests added one per step into a batch of 3 slots (so they queue, join at different
    steps and positions, and leave at different ones) give each request's tokens alone, greedy and with a seed."""
    base, adapters, model, rows = served_family
    greedy = requests_for(base, list(adapters))
    seeded = [resampled(r, temperature=1.5, seed=100 + i) for i, r in enumerate(greedy)]
    for requests in (greedy, seeded):
        expected = [served(model, rows, [r])[0] for r in requests]
        engine = Engine(model, rows, 3, model.config.block_size)
        got: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
        pending = list(enumerate(requests))
        while pending or engine.has_work():
            if pending:
                i, r = pending.pop(0)
                engine.add(str(i), r)
            assert engine.active() <= 3
            for event in engine.step():
                assert event.error is None
                got[event.uid] += event.tokens
        assert [got[str(i)] for i in range(len(requests))] == expected
    assert expected != [served(model, rows, [r])[0] for r in greedy]  # the seeded ones sampled


def test_sampled_rows_decode_from_their_own_adapter(served_family):
    base, adapters, model, rows = served_family
    greedy = served(model, rows, requests_for(base, list(adapters)))
    # top_k = 1 samples the most probable token: a row that sampled another row's logits would differ
    assert served(model, rows, requests_for(base, list(adapters), temperature=1.0, top_k=1)) == greedy
    torch.manual_seed(0)
    sampled = served(model, rows, requests_for(base, list(adapters), temperature=1.5, max_new_tokens=5))
    assert all(len(t) <= 5 for t in sampled) and sampled != greedy


def test_a_row_whose_logits_become_nan_fails_alone_and_the_others_decode_as_alone(served_family):
    """An adapter whose activations overflow (here: NaN vectors in one layer's table) ends its own requests; sampling
    them would have raised for the whole batch."""
    base, adapters, model, rows = served_family
    requests = requests_for(base, list(adapters))
    failing = 2  # plus-two-sided-n4's table row
    table = model.transformer.h[0].attn.proj.ether_in.table  # every row of every batch passes through it
    kept = table[failing].clone()
    table[failing] = float("nan")
    try:
        mixed = served(model, rows, requests)
        expected = [served(model, rows, [r])[0] for r in requests]
    finally:
        table[failing] = kept  # the fixture is shared by the module
    for request, got, want in zip(requests, mixed, expected, strict=True):
        if request.row == failing:
            assert isinstance(got, str) and isinstance(want, str)
            assert "non-finite (NaN or inf) at token 1" in got and "temperature" not in got
        else:
            assert got == want and isinstance(got, list)
    assert sum(isinstance(t, str) for t in mixed) == len(PROMPTS)
    assert sum(len(t) for t in mixed if isinstance(t, list)) > len(requests)  # the others got content


def first_logits(model: GPT, rows: Rows, request: Request) -> torch.Tensor:
    """The logits a request's first token is drawn from (computed without a KV cache)."""
    rows.set(torch.tensor([request.row]))
    model.max_seq_length = model.config.block_size
    with torch.inference_mode():
        return model(request.prompt[None])[0, -1]


def test_a_temperature_that_overflows_its_rows_logits_fails_that_row_alone(served_family):
    """A temperature the request check lets through (its reciprocal is finite in float32) can still divide the
    logits past float32's range: that row fails; greedy and sampled rows beside it decode as without it."""
    base, adapters, model, rows = served_family
    greedy = requests_for(base, list(adapters))[: len(adapters) + 1]  # the first prompt on every row
    sampled = [resampled(r, temperature=1.5) for r in greedy]
    tiny = resampled(greedy[0], temperature=3e-39)
    check_temperature(tiny.sampling.temperature, torch.float32)  # accepted when the request arrives
    assert not torch.isfinite(first_logits(model, rows, tiny) / tiny.sampling.temperature).all()  # above ~1.02

    torch.manual_seed(0)
    got = served(model, rows, [*greedy, tiny, *sampled])
    torch.manual_seed(0)
    without = served(model, rows, [*greedy, *sampled])
    failed = got.pop(len(greedy))
    assert isinstance(failed, str) and "at token 1 once divided by its temperature 3e-39" in failed
    assert got == without
    assert got[: len(greedy)] == [served(model, rows, [r])[0] for r in greedy]
    assert got[len(greedy) :] != got[: len(greedy)]  # the sampled rows did sample
    assert isinstance(served(model, rows, [tiny])[0], str)


def test_cli_argument_forms_of_adapters():
    assert adapters_as_list(["serve", "b", "--adapters", "x=1", "y=2", "--port", "9"]) == [
        "serve", "b", "--adapters", '["x=1", "y=2"]', "--port", "9"]  # fmt: skip
    assert adapters_as_list(["serve", "b", "--adapters", "[x=1]"]) == ["serve", "b", "--adapters", "[x=1]"]
    assert adapters_as_list(["generate", "--adapters", "x=1", "y=2"]) == ["generate", "--adapters", "x=1", "y=2"]


# --------------------------------------------------------------------------------------------------
# Refused at startup, in one line, before anything listens


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    base = family_base(directory / "base", "llama-gqa")
    names = ["ether-qv-n2", "plus-two-sided-n4"]
    return base, {n: make_adapter(base, directory / n, i, **ADAPTERS[n]) for i, n in enumerate(names)}


def one_line_error(*args: str) -> str:
    result = run_main("serve", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and lines[-1].startswith("litgpt_ether: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return lines[-1]


def test_adapters_that_cannot_be_served_are_refused_naming_them(two_adapters, tmp_path):
    base, adapters = two_adapters
    good = f"good={adapters['ether-qv-n2']}"
    oft = make_adapter(base, tmp_path / "oft", 0, ether_method="oft", ether_nb=4, ether_query=True)
    assert "'o': ether_method oft" in one_line_error(str(base), "--adapters", good, f"o={oft}")
    other = family_base(tmp_path / "other", "neox-bias")
    foreign = make_adapter(other, tmp_path / "foreign", 0, **ADAPTERS["plus-two-sided-n4"])
    assert "'f'" in one_line_error(str(base), "--adapters", good, f"f={foreign}")
    assert "does not exist" in one_line_error(str(base), "--adapters", good, f"m={tmp_path / 'missing'}")
    assert "name=path" in one_line_error(str(base), "--adapters", str(adapters["ether-qv-n2"]))
    assert "reserved" in one_line_error(str(base), "--adapters", f"base={adapters['ether-qv-n2']}")
    assert "twice" in one_line_error(str(base), "--adapters", good, good)
    assert "holds no ETHER adapter" in one_line_error(str(base), "--adapters", f"b={base}")
    diverged = make_adapter(base, tmp_path / "diverged", 0, **ADAPTERS["ether-qv-n2"])
    state = {k: v.clone() for k, v in load_adapter(diverged / "lit_model.pth.ether")[0].items()}
    state[next(k for k in state if k.endswith(".u"))].view(-1)[0] = float("nan")
    config = Config.from_file(base / "model_config.yaml", **ADAPTERS["ether-qv-n2"])
    save_adapter(diverged / "lit_model.pth.ether", state, config)
    error = one_line_error(str(base), "--adapters", good, f"d={diverged}")
    assert "'d'" in error and "non-finite" in error


def test_a_port_in_use_a_bad_host_and_missing_devices_are_refused(two_adapters):
    base, adapters = two_adapters
    spec = f"a={adapters['ether-qv-n2']}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert f"127.0.0.1:{port}" in one_line_error(str(base), "--adapters", spec, "--port", str(port))
    assert "--host" in one_line_error(str(base), "--adapters", spec, "--host", "localhost")
    assert "max_batch_size" in one_line_error(str(base), "--adapters", spec, "--max_batch_size", "0")
    for temperature in ("1e39", "1e-39"):  # infinite, or with an infinite reciprocal, in the logits' dtype
        assert "overflows" in one_line_error(str(base), "--adapters", spec, "--temperature", temperature)
    block_size = Config.from_file(base / "model_config.yaml").block_size
    no_room = one_line_error(str(base), "--adapters", spec, "--max_new_tokens", str(block_size))
    assert f"--max_new_tokens {block_size}" in no_room and f"context of {block_size}" in no_room
    assert "--devices" in one_line_error(str(base), "--adapters", spec, "--devices", "0")
    if not torch.cuda.is_available():
        assert "no CUDA device" in one_line_error(str(base), "--adapters", spec, "--accelerator", "cuda")


# --------------------------------------------------------------------------------------------------
# Over HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, adapters: dict[str, Path], port: int, log: Path, *options: str) -> subprocess.Popen:
    """The real server in its own process group (LitServe starts workers), once it answers ``/health``."""
    cmd = [sys.executable, "-m", "litgpt_ether", "serve", str(base), "--adapters",
           *(f"{n}={p}" for n, p in adapters.items()), "--port", str(port), "--temperature", "0",
           "--precision", "32-true", *options]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(240):
        if process.poll() is not None:
            pytest.fail(f"the server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    stop_server(process, signal.SIGKILL, ("group",))
    pytest.fail(f"the server did not start: {log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen, signum: int, to: tuple[str, ...] = ("main",)) -> int | None:
    """Send ``signum`` to the main process (as ``kill PID`` does) and/or its whole group (as Ctrl-C in a terminal
    does), half a second apart, the second during the shutdown; return its exit status once every process it
    started is gone, None if any outlived it (then killed)."""
    for i, target in enumerate(to):
        time.sleep(0.5 * (i > 0))
        with contextlib.suppress(ProcessLookupError):  # a shutdown quicker than that
            (os.killpg if target == "group" else os.kill)(process.pid, signum)
    try:
        code = process.wait(timeout=60)
        for _ in range(60):
            os.killpg(process.pid, 0)
            time.sleep(0.5)
        return None
    except ProcessLookupError:
        return code
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(two_adapters, tmp_path_factory):
    pytest.importorskip("litserve")
    base, adapters = two_adapters
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = start_server(base, adapters, port, log, "--max_new_tokens", "6", "--max_batch_size", "8")
    try:
        yield f"http://127.0.0.1:{port}", base, adapters
    finally:
        assert stop_server(process, signal.SIGTERM) == 0, log.read_text()[-3000:]  # as `kill PID`
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_ctrl_c_or_kill_stops_the_server_quietly_and_it_restarts_on_its_port_at_once(two_adapters, tmp_path):
    """No traceback from any of its processes, none left behind, and the port free for a restart although the
    connections it closed linger (TIME_WAIT). systemd sends SIGTERM to every process of the service; GNU timeout
    to the process, then its group, so the main process gets it twice. (``kill PID``: the ``server`` fixture.)"""
    pytest.importorskip("litserve")
    base, adapters = two_adapters
    one = {"a": adapters["ether-qv-n2"]}
    port = free_port()
    stops = [(signal.SIGINT, ("group",)), (signal.SIGTERM, ("main", "group"))]
    for run, (signum, to) in enumerate(stops):
        log = tmp_path / f"server-{run}.log"
        process = start_server(base, one, port, log)
        with httpx.Client(headers={"Connection": "close"}) as client:  # the server closes: TIME_WAIT on its port
            assert client.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200
        assert stop_server(process, signum, to) == 0, log.read_text()[-3000:]
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def expected_text(base: Path, adapter: Path | None, prompt: str, max_new_tokens: int = 6) -> str:
    tokenizer, style = Tokenizer(base), Alpaca()
    prompt_tokens = tokenizer.encode(style.apply(prompt))
    request = Request(0, prompt_tokens, max_new_tokens, Sampling(), style.stop_tokens(tokenizer))
    return tokenizer.decode(torch.tensor(alone(merged(base, adapter), request), dtype=torch.long))


def test_openai_client_gets_each_adapters_own_answer_streamed_or_not(server):
    openai = pytest.importorskip("openai")
    url, base, adapters = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["base", *adapters]
    answers = set()
    for name, path in {"base": None, **adapters}.items():
        want = expected_text(base, path, PROMPTS[0])
        messages = [{"role": "user", "content": PROMPTS[0]}]
        reply = client.chat.completions.create(model=name, messages=messages)
        assert reply.choices[0].message.content == want
        stream = client.chat.completions.create(model=name, messages=messages, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
        answers.add(want)
    assert len(answers) > 1


def test_concurrent_requests_for_different_adapters_are_answered_as_alone(server):
    url, base, adapters = server
    jobs = [(name, prompt) for prompt in PROMPTS for name in ["base", *adapters]] * 2

    def ask(job):
        body = {"model": job[0], "messages": [{"role": "user", "content": job[1]}]}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = [m["content"] for m in pool.map(ask, jobs)]
    paths = {"base": None, **adapters}
    assert got == [expected_text(base, paths[name], prompt) for name, prompt in jobs]


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server):
    url, base, adapters = server
    post = lambda body: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    user = [{"role": "user", "content": PROMPTS[0]}]
    unknown = post({"model": "nope", "messages": user})
    assert unknown.status_code == 404
    assert all(name in unknown.json()["error"]["message"] for name in ["base", *adapters])
    missing = post({"model": "base"})  # no messages: a 400 with OpenAI's error object, as every error
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages", missing.text
    assert post({"model": "base", "messages": user, "temperature": -1}).status_code == 400
    for field in ("max_tokens", "max_completion_tokens"):
        zero = post({"model": "base", "messages": user, field: 0})
        assert zero.status_code == 400 and zero.json()["error"]["message"].startswith(f"{field} must be"), zero.text
    assert post({"model": "base", "messages": [{"role": "assistant", "content": "hi"}]}).status_code == 400
    too_long = post({"model": "base", "messages": [{"role": "user", "content": "red " * 200}]})
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]["message"]
    streamed_unknown = post({"model": "nope", "messages": user, "stream": True})
    assert streamed_unknown.status_code == 404
    ok = post({"model": "base", "messages": user})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == expected_text(
        base, None, PROMPTS[0]
    )


def test_a_request_that_fails_while_decoding_gets_an_openai_error_and_its_batch_goes_on(server):
    """A temperature accepted on arrival that overflows the logits in decoding: that request gets a 500 (streamed:
    an error event instead of the stream's end); the requests batched with it are answered as alone."""
    url, base, adapters = server
    post = lambda body: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    user = [{"role": "user", "content": PROMPTS[0]}]
    jobs = [(name, prompt) for prompt in PROMPTS for name in ["base", *adapters]]
    overflowing = {"model": "base", "messages": user, "temperature": 3e-39}  # the base's logits exceed ~1.02
    bodies = [{"model": n, "messages": [{"role": "user", "content": p}]} for n, p in jobs]
    bodies += [overflowing, {**overflowing, "stream": True}, {**overflowing, "temperature": 1e39}]
    with ThreadPoolExecutor(len(bodies)) as pool:  # all at once: the failing ones share a batch with good ones
        *good, failed, streamed, refused = pool.map(post, bodies)

    paths = {"base": None, **adapters}
    assert [r.json()["choices"][0]["message"]["content"] for r in good] == [
        expected_text(base, paths[name], prompt) for name, prompt in jobs
    ]
    assert failed.status_code == 500, failed.text
    error = failed.json()["error"]
    assert error["type"] == "server_error" and "non-finite" in error["message"] and "3e-39" in error["message"]
    assert streamed.status_code == 200  # the stream had started
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert "non-finite" in json.loads(events[-1])["error"]["message"], streamed.text
    assert "[DONE]" not in events and '"finish_reason":"stop"' not in streamed.text
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "temperature", refused.text
    ok = post({"model": "base", "messages": user, "temperature": None})  # null: the server's default (greedy)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == expected_text(
        base, None, PROMPTS[0]
    )


# --------------------------------------------------------------------------------------------------
# The rest of OpenAI's API: completions, stop strings, finish reasons, seeds, log-probabilities, n, shapes


def completion_reference(base: Path, adapter: Path | None, prompt: str, max_new_tokens: int) -> tuple[list[int], str]:
    """What a raw-text completion must give: the merged model's greedy tokens after the prompt as the tokenizer
    encodes it, to EOS or ``max_new_tokens``, and their text."""
    tokenizer = Tokenizer(base)
    request = Request(0, tokenizer.encode(prompt), max_new_tokens, Sampling(), ([tokenizer.eos_id],))
    tokens = alone(merged(base, adapter), request)
    return tokens, tokenizer.decode(torch.tensor(tokens, dtype=torch.long))


@torch.no_grad()
def reference_logprobs(base: Path, adapter: Path | None, tokens: list[int]) -> list[float]:
    """log p(token i | tokens before i) under the merged model, for i >= 1."""
    logprobs = torch.log_softmax(merged(base, adapter)(torch.tensor([tokens]))[0].float(), dim=-1)
    return [float(logprobs[i - 1, t]) for i, t in enumerate(tokens) if i > 0]


def test_completions_stop_strings_finish_reasons_and_n(server):
    openai = pytest.importorskip("openai")
    url, base, adapters = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    prompt, path = "reverse red green blue", adapters["plus-two-sided-n4"]
    tokens, text = completion_reference(base, path, prompt, 6)
    got = client.completions.create(model="plus-two-sided-n4", prompt=prompt, max_tokens=6)
    assert got.choices[0].text == text and got.object == "text_completion"
    assert got.choices[0].finish_reason == ("stop" if len(tokens) < 6 else "length")
    assert got.usage.prompt_tokens == Tokenizer(base).encode(prompt).numel() and got.usage.completion_tokens == 6

    words = text.split()
    assert len(words) >= 2, text  # a stop string to find: the answer's second word
    stopped = client.completions.create(model="plus-two-sided-n4", prompt=prompt, max_tokens=6, stop=[words[1]])
    assert stopped.choices[0].text == text[: text.index(words[1])] and stopped.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        n=3,
        stop=["nothing like this", expected_text(base, None, PROMPTS[0])[:3]],
    )
    assert [c.message.content for c in chat.choices] == [""] * 3 and chat.choices[2].index == 2
    assert {c.finish_reason for c in chat.choices} == {"stop"}
    alone_usage = client.chat.completions.create(model="base", messages=[{"role": "user", "content": PROMPTS[0]}]).usage
    assert chat.usage.prompt_tokens == alone_usage.prompt_tokens  # the prompt counted once for n = 3

    batch = client.completions.create(model="base", prompt=[prompt, "reverse gold"], max_tokens=3, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == completion_reference(base, None, prompt, 3)[1]
    ids = Tokenizer(base).encode("reverse gold").tolist()
    by_ids = client.completions.create(model="base", prompt=ids, max_tokens=3)
    assert by_ids.choices[0].text == batch.choices[2].text


def test_seeded_sampling_repeats_alone_and_in_a_mixed_batch(server):
    url, base, adapters = server
    post = lambda body: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    seeded = {"model": "ether-qv-n2", "messages": [{"role": "user", "content": PROMPTS[1]}], "temperature": 1.5,
              "seed": 7, "max_tokens": 8}  # fmt: skip
    first = post(seeded)["choices"][0]["message"]["content"]
    others = [{**seeded, "model": m, "seed": None} for m in ("base", "plus-two-sided-n4")] * 3
    with ThreadPoolExecutor(len(others) + 2) as pool:  # sent with unseeded sampled requests for other adapters
        replies = list(pool.map(post, [seeded, *others, seeded]))
    assert replies[0]["choices"][0]["message"]["content"] == first == replies[-1]["choices"][0]["message"]["content"]
    different = {post({**seeded, "seed": s})["choices"][0]["message"]["content"] for s in range(8)}
    assert len(different) > 1  # the seed matters: sampling really samples
    three = post({**seeded, "n": 3})["choices"]
    assert three[0]["message"]["content"] == first  # choice i samples with seed + i
    assert len({c["message"]["content"] for c in three}) > 1


def test_logprobs_are_the_merged_models(server):
    openai = pytest.importorskip("openai")
    url, base, adapters = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    path = adapters["ether-qv-n2"]
    tokenizer = Tokenizer(base)
    prompt_ids = tokenizer.encode(Alpaca().apply(PROMPTS[0])).tolist()
    reply = client.chat.completions.create(model="ether-qv-n2", messages=[{"role": "user", "content": PROMPTS[0]}],
                                           logprobs=True, top_logprobs=2, max_tokens=4)  # fmt: skip
    content = reply.choices[0].logprobs.content
    generated = alone(merged(base, path), Request(1, torch.tensor(prompt_ids), 4, Sampling(),
                                                  Alpaca().stop_tokens(tokenizer)))  # fmt: skip
    want = reference_logprobs(base, path, prompt_ids + generated)[len(prompt_ids) - 1 :]
    assert len(content) == len(generated) > 0
    for entry, logprob in zip(content, want):
        assert entry.logprob == pytest.approx(logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == entry.logprob  # greedy: the top

    # echo with max_tokens 0 (lm-eval's log-likelihood requests): every prompt token's log-probability
    ids = tokenizer.encode("reverse red green blue", bos=False).tolist()
    echo = client.completions.create(model="ether-qv-n2", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    logprobs = echo.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and echo.choices[0].text == tokenizer.decode(torch.tensor(ids))
    assert logprobs.token_logprobs[1:] == pytest.approx(reference_logprobs(base, path, ids), abs=1e-4)
    assert all(max(top.values()) >= lp for top, lp in zip(logprobs.top_logprobs[1:], logprobs.token_logprobs[1:]))

    # token texts add up to the text (this tokenizer decodes a word alone without the space before it), offsets too
    assert "".join(c.token for c in content) == reply.choices[0].message.content
    for stream in (False, True):
        answer = client.completions.create(model="ether-qv-n2", prompt=ids, max_tokens=3, echo=True, logprobs=2,
                                           stream=stream)  # fmt: skip
        choices = list(answer) if stream else [answer]
        text = "".join(c.choices[0].text for c in choices)
        tokens = [t for c in choices for t in c.choices[0].logprobs.tokens]
        offsets = [o for c in choices for o in c.choices[0].logprobs.text_offset]
        assert "".join(tokens) == text and len(tokens) == len(ids) + 3 and " " in text
        assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]


def sse(response: httpx.Response) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", response.text
    return [json.loads(line) for line in lines[:-1]]


def test_streams_have_one_id_the_role_first_and_usage_only_when_asked(server):
    url, base, adapters = server
    body = {"model": "base", "messages": [{"role": "user", "content": PROMPTS[0]}], "stream": True, "n": 2}
    chunks = sse(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60))
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"][0]["index"] == index]
        assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
        assert "".join(d.get("content", "") for d in deltas) == expected_text(base, None, PROMPTS[0])
    assert all("usage" not in c or c["usage"] is None for c in chunks)
    with_usage = sse(httpx.post(f"{url}/v1/chat/completions", timeout=60,
                                json={**body, "stream_options": {"include_usage": True}}))  # fmt: skip
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] > 0
    finishes = [c["choices"][0]["finish_reason"] for c in with_usage[:-1] if c["choices"][0]["finish_reason"]]
    assert len(finishes) == 2


def test_models_retrieve_metrics_and_refused_fields(server):
    openai = pytest.importorskip("openai")
    url, base, adapters = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve("ether-qv-n2").id == "ether-qv-n2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    user = [{"role": "user", "content": PROMPTS[0]}]
    for field, value in [("tools", [{"type": "function", "function": {"name": "f"}}]),
                         ("response_format", {"type": "json_object"}), ("logit_bias", {"99999": 1}),
                         ("top_logprobs", 2), ("stop", ["a", "b", "c", "d", "e"]), ("n", 0)]:  # fmt: skip
        refused = httpx.post(f"{url}/v1/chat/completions", json={"model": "base", "messages": user, field: value})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field, (field, refused.text)
    suffix = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "red", "suffix": "x"})
    assert suffix.status_code == 400 and suffix.json()["error"]["param"] == "suffix"
    not_json = httpx.post(f"{url}/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "error" in not_json.json()
    assert client.completions.create(model="base", prompt="red", max_tokens=1).usage.completion_tokens == 1
    metrics = httpx.get(f"{url}/metrics").text
    assert 'litgpt_ether_requests_total{model="base"}' in metrics and "litgpt_ether_batch_occupancy" in metrics
    tokenized = httpx.post(f"{url}/tokenize", json={"prompt": "red green", "add_special_tokens": False}).json()
    assert tokenized["tokens"] == Tokenizer(base).encode("red green", bos=False).tolist()
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokenized["tokens"]}).json()["prompt"] == "red green"


def test_a_request_sent_while_a_long_one_decodes_finishes_first(server):
    """Continuous batching: the short request joins the running batch at its next step and leaves it when done; its
    stream closes while the long one still decodes."""
    url, base, adapters = server
    eos = Tokenizer(base).eos_id
    long_body = {"model": "base", "prompt": "reverse red", "max_tokens": 100, "stream": True,
                 "logit_bias": {str(eos): -100}}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=long_body, timeout=120) as long:
        lines = long.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the long one is decoding
        short = httpx.post(f"{url}/v1/completions", json={"model": "ether-qv-n2", "prompt": "red", "max_tokens": 2})
        assert short.status_code == 200 and short.json()["choices"][0]["finish_reason"] == "length"
        running = httpx.get(f"{url}/metrics").text
        assert "litgpt_ether_requests_running 1\n" in running  # the long one, still decoding
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"

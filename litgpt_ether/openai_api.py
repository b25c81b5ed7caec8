"""OpenAI's HTTP API for ``litgpt_ether serve``, on LitServe: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models`` (and ``/v1/models/{id}``) and ``/metrics``.

Three parts, each in the process that needs it:

- **Checking** (HTTP process): a request body becomes ``Job``s (one per prompt and choice) or a 4xx with OpenAI's
  error object, before anything is queued, so a bad request never reaches the batch.
- **Streams** (inference worker): ``Stream`` turns a job's engine events into text deltas, holding back what could
  still be the start of a stop string or of a character, and cancels the job at a stop string.
- **Answers** (HTTP process): ``OpenAISpec`` queues the jobs, reads their deltas and answers in OpenAI's shapes,
  streamed (server-sent events, one ``id`` per stream) or not; ``ServeLoop`` is LitServe's continuous-batching loop,
  which sleeps while there is nothing to decode.

Where OpenAI's API leaves room, this follows vLLM's OpenAI-compatible server.
"""

import asyncio
import collections
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from litgpt.prompts import PromptStyle
from litgpt.tokenizer import Tokenizer

from litgpt_ether.checks import ConfigError, check_temperature
from litgpt_ether.engine import Event, Request, Sampling, TokenLogprob

try:  # the `serve` extra
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop
    from litserve.specs.base import LitSpec
    from litserve.utils import LitAPIStatus, LoopResponseType
    from starlette.requests import ClientDisconnect
except ImportError:
    ContinuousBatchingLoop = LitSpec = object
    HTTPRequest = Any

BASE = "base"  # the model name that asks for no adapter
MAX_STOPS = 4  # stop strings per request, as OpenAI
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI
MAX_N = 16  # choices per request
KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list",
              dict: "an object"}  # fmt: skip
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "suffix")  # refused when set: never ignored


# --------------------------------------------------------------------------------------------------
# Checking: request bodies into jobs


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> "JSONResponse":
        kind = {404: "not_found_error", 500: "server_error"}.get(self.status, "invalid_request_error")
        return JSONResponse(status_code=self.status, content=error_body(str(self), kind, self.param, self.code))


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: what OpenAI clients parse into their exception."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Options:
    """What the server needs to check requests and turn them into jobs: picklable, shared by both processes."""

    names: list[str]  # table rows 1..: adapter names; row 0 is ``base``
    prompt_styles: dict[str, PromptStyle]
    tokenizer: Tokenizer
    context: int  # prompt plus completion, in tokens
    vocab_size: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    dtype: torch.dtype  # the logits' (``compute_dtype``): what a temperature must not overflow
    max_batch_size: int
    created: int = field(default_factory=lambda: int(time.time()))

    def row(self, model: Any) -> int:
        if not isinstance(model, str) or model not in self.prompt_styles:
            known = ", ".join(repr(n) for n in [BASE, *self.names])
            raise APIError(404, f"The model {model!r} does not exist: this server has {known}", "model",
                           "model_not_found")  # fmt: skip
        return 0 if model == BASE else self.names.index(model) + 1


@dataclass
class Job:
    """One choice of one prompt, as the inference worker decodes it."""

    request: Request
    stop: tuple[str, ...]  # stop strings: the text ends before the first one
    echo: list[int] | None = None  # completions' ``echo``: the prompt's tokens come back first


@dataclass
class Cancel:
    """Queued in a job's place: ends the job ``uid`` (its client went away)."""

    uid: str


@dataclass
class Parsed:
    """A checked request: its jobs (``n`` per prompt, prompt by prompt), and how to answer."""

    kind: str  # "chat" or "completion"
    model: str
    jobs: list[Job]
    stream: bool
    include_usage: bool
    logprobs: bool
    prompt_tokens: list[int]  # per prompt


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any = None, check: Callable[[Any], bool] = None,
         rule: str = "") -> Any:  # fmt: skip
    """``body[name]`` if given and not null, checked for type (booleans are no numbers) and ``check``; else
    ``default``."""
    value = body.get(name)
    if value is None:
        return default
    bad_type = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
    if bad_type or (isinstance(value, float) and not math.isfinite(value)) or (check and not check(value)):
        names = " or ".join(KIND_NAMES[k] for k in kinds if k in KIND_NAMES)
        raise APIError(400, f"{name} must be {rule or names}, got {value!r}", name)
    return value


def _number(body: dict, name: str, low: float, high: float, default: Any, integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    return _get(body, name, kinds, default, lambda v: low <= v <= high, f"{'an integer' if integer else 'a number'}"
                f" in [{low:g}, {high:g}]")  # fmt: skip


def _sampling(body: dict, options: Options, logprobs: int | None) -> Sampling:
    """The sampling options every endpoint shares, checked, with the server's defaults for what is left out."""
    temperature = _number(body, "temperature", 0, 2, options.temperature)
    try:
        check_temperature(temperature, options.dtype)
    except ConfigError as err:
        raise APIError(400, str(err), "temperature") from None
    bias = _get(body, "logit_bias", (dict,), {})
    logit_bias = {}
    for key, value in bias.items():
        if not (str(key).isdigit() and int(key) < options.vocab_size):
            raise APIError(400, f"logit_bias keys must be token ids below {options.vocab_size}, got {key!r}",
                           "logit_bias")  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias values must be numbers in [-100, 100], got {value!r}", "logit_bias")
        logit_bias[int(key)] = float(value)
    return Sampling(
        temperature=float(temperature),
        top_k=options.top_k,
        top_p=float(_number(body, "top_p", 0, 1, options.top_p)),
        seed=_number(body, "seed", 0, 2**63 - 1, None, integer=True),
        logit_bias=logit_bias,
        presence_penalty=float(_number(body, "presence_penalty", -2, 2, 0.0)),
        frequency_penalty=float(_number(body, "frequency_penalty", -2, 2, 0.0)),
        logprobs=logprobs,
    )


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(400, f"stop must be a string or a list of up to {MAX_STOPS} strings, got {stop!r}", "stop")
    return tuple(s for s in stops if s)  # an empty one stops nothing (lm-eval sends one for a tokenizer's EOS)


def _common(body: Any, options: Options) -> tuple[int, int, bool, bool]:
    """What both endpoints check first: a JSON object, fields this server would have to ignore, the model, ``n``,
    ``stream`` and ``stream_options``. Returns the adapter row, ``n``, ``stream`` and ``include_usage``."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise APIError(400, f"{name} is not supported by this server", name)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise APIError(400, "response_format: only {'type': 'text'} is supported by this server", "response_format")
    row = options.row(body.get("model"))
    n = _number(body, "n", 1, MAX_N, 1, integer=True)
    if body.get("best_of") not in (None, n):
        raise APIError(400, "best_of other than n is not supported by this server", "best_of")
    stream = _get(body, "stream", (bool,), False)
    stream_options = _get(body, "stream_options", (dict,), None)
    if stream_options is not None and not stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
    include_usage = bool(_get(stream_options or {}, "include_usage", (bool,), False))
    return row, n, stream, include_usage


def _max_tokens(body: dict, options: Options, prompt_length: int, minimum: int) -> int:
    names = [f for f in ("max_completion_tokens", "max_tokens") if body.get(f) is not None]
    name = names[0] if names else "max_tokens"
    value = _number(body, name, minimum, options.context, options.max_new_tokens, integer=True)
    if prompt_length + value > options.context:
        room = options.context - prompt_length
        hint = f"lower {name} to {room} or less" if room >= minimum else "shorten the prompt"
        total = prompt_length + value
        raise APIError(400, f"the prompt is {prompt_length} tokens and {name} is {value}: {total} tokens do not fit"
                       f" in the model's context of {options.context}; {hint}", "messages")  # fmt: skip
    return value


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts (images and audio are refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise APIError(400, "a message's content must be a string or a list of parts", "messages")
    other = [p for p in content if p.get("type") != "text" or not isinstance(p.get("text"), str)]
    if other:
        raise APIError(400, f"only text content is supported, got a {other[0].get('type')!r} part", "messages")
    return "".join(p["text"] for p in content)


def parse_chat(body: Any, options: Options) -> Parsed:
    """``/v1/chat/completions``: the last message is the prompt (a user message) in the adapter's prompt style, with
    the system messages as its system prompt; earlier turns are not part of it (as in ``litgpt_ether chat``)."""
    row, n, stream, include_usage = _common(body, options)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise APIError(400, "messages must be a non-empty list of messages", "messages")
    if messages[-1].get("role") != "user":
        raise APIError(400, "the last message must be the user's prompt", "messages")
    logprobs = _get(body, "logprobs", (bool,), False)
    top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
    if top is not None and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    system = "\n".join(_text(m.get("content")) for m in messages if m.get("role") == "system") or None
    style = options.prompt_styles[body["model"]]
    prompt = options.tokenizer.encode(style.apply(_text(messages[-1].get("content")), sys_prompt=system))
    max_new_tokens = _max_tokens(body, options, prompt.numel(), 1)
    sampling = _sampling(body, options, (top or 0) if logprobs else None)
    stops = _stops(body)
    request = Request(row, prompt, max_new_tokens, sampling, style.stop_tokens(options.tokenizer))
    jobs = [Job(_with_seed(request, choice), stops) for choice in range(n)]
    return Parsed("chat", body["model"], jobs, stream, include_usage, logprobs, [prompt.numel()])


def _with_seed(request: Request, choice: int) -> Request:
    """Choice ``i`` of a seeded request samples with ``seed + i``: ``n`` choices are not ``n`` copies of one."""
    if request.sampling.seed is None or choice == 0:
        return request
    sampling = Sampling(**{**request.sampling.__dict__, "seed": request.sampling.seed + choice})
    return Request(request.row, request.prompt, request.max_new_tokens, sampling, request.stop_tokens,
                   request.prompt_logprobs)  # fmt: skip


def _prompts(prompt: Any, options: Options) -> list[torch.Tensor]:
    """``prompt`` as OpenAI's completions take it: a string, a list of strings, a list of token ids, or a list of
    lists of token ids; each encoded as is (no prompt style, no BOS beyond the tokenizer's own)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, "prompt must be a string, a list of strings or a list of token ids", "prompt")
    encoded = []
    for p in prompt:
        if isinstance(p, str):
            encoded.append(options.tokenizer.encode(p))
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < options.vocab_size for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {options.vocab_size})", "prompt")
            encoded.append(torch.tensor(p, dtype=torch.long))
        else:
            raise APIError(400, "prompt must be a string, a list of strings or a list of token ids", "prompt")
        if encoded[-1].numel() == 0:
            raise APIError(400, "a prompt is empty once tokenized", "prompt")
    return encoded


def parse_completion(body: Any, options: Options) -> Parsed:
    """``/v1/completions``: raw text (or token ids) continued as is, no prompt style; only the model's EOS stops it
    besides ``stop`` and ``max_tokens``. ``echo`` returns the prompt first (with ``logprobs``, its tokens'
    log-probabilities: ``max_tokens: 0`` asks for those alone, as lm-eval's log-likelihood requests do)."""
    row, n, stream, include_usage = _common(body, options)
    prompts = _prompts(body.get("prompt"), options)
    logprobs = _number(body, "logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
    echo = _get(body, "echo", (bool,), False)
    sampling = _sampling(body, options, logprobs)
    stops = _stops(body)
    eos = options.tokenizer.eos_id
    jobs = []
    for prompt in prompts:
        max_new_tokens = _max_tokens(body, options, prompt.numel(), 0 if echo else 1)
        request = Request(row, prompt, max_new_tokens, sampling, ([eos],) if eos is not None else (),
                          prompt_logprobs=echo and logprobs is not None)  # fmt: skip
        jobs += [Job(_with_seed(request, c), stops, prompt.tolist() if echo else None) for c in range(n)]
    return Parsed("completion", body["model"], jobs, stream, include_usage, logprobs is not None,
                  [p.numel() for p in prompts])  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Streams: a job's tokens into text, in the inference worker


class Stream:
    """One job's text as it decodes: deltas of whole characters, held back while the text could still be the start
    of a stop string; at a stop string, the text ends before it and the job is cancelled (``finish``: "stop")."""

    def __init__(self, job: Job, tokenizer: Tokenizer) -> None:
        self.job, self.tokenizer = job, tokenizer
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.sent = ""  # the text sent so far
        self.done = self.echoed = False
        self.reported = 0  # tokens whose log-probabilities have been sent

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(torch.tensor(tokens, dtype=torch.long)) if tokens else ""

    def piece(self, before: list[int], token: int) -> str:
        """``token``'s text where it stands: what it adds to the text of the few tokens ``before`` it (in its part,
        the prompt or the answer), so that the pieces of a part add up to its text, spaces included (a token decoded
        alone may lose its leading space). A token that completes a character split across tokens: alone."""
        prefix, text = self.decode(before), self.decode([*before, token])
        if text.startswith(prefix) and not prefix.endswith("\ufffd"):
            return text[len(prefix) :]
        return self.decode([token])

    def update(self, event: Event) -> tuple[dict[str, Any] | None, bool]:
        """The output for ``event`` (None: nothing to send yet) and whether the job must be cancelled (a stop
        string)."""
        if event.error is not None:
            self.done = True
            return {"error": event.error}, False
        out: dict[str, Any] = {}
        if self.job.echo is not None and not self.echoed:  # the prompt first, with its log-probabilities if asked
            out.update(self._echo(event.prompt_logprobs))
            self.echoed = True
        self.tokens += event.tokens
        if event.logprobs is not None:
            self.logprobs += event.logprobs
        finish, cancel = event.finish, False
        text = self.decode(self.tokens)
        cut = self._stop_at(text)
        if cut is not None:
            text, finish, cancel = text[:cut], "stop", event.finish is None
        elif finish is None:
            text = text[: len(text) - self._held(text)]
        if text.startswith(self.sent) and len(text) > len(self.sent):
            out["text"] = text[len(self.sent) :]
            self.sent = text
        if self.job.request.sampling.logprobs is not None:  # the tokens whose text is out (at the end: all of them)
            covered = len(self.logprobs) if finish is not None and cut is None else self._covered(len(self.sent))
            if covered > self.reported:
                out["logprobs"] = [self._entry(self.logprobs[k], self.tokens[max(0, k - 4) : k], self.tokens[k])
                                   for k in range(self.reported, covered)]  # fmt: skip
                self.reported = covered
        if finish is not None:
            self.done = True
            out["finish_reason"] = finish
            out["usage"] = {"prompt_tokens": self.job.request.prompt.numel(), "completion_tokens": len(self.tokens)}
        return out or None, cancel

    def _stop_at(self, text: str) -> int | None:
        found = [i for s in self.job.stop if (i := text.find(s, max(0, len(self.sent) - len(s)))) >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` not yet safe to send: a partial character, or the start of a stop."""
        if text.endswith("\ufffd"):
            return len(text)  # wait for the character's other bytes
        return max((n for s in self.job.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

    def _covered(self, chars: int) -> int:
        """How many tokens (from the first) decode to at most ``chars`` characters: those whose text is out."""
        k = self.reported
        while k < len(self.logprobs) and len(self.decode(self.tokens[: k + 1])) <= chars:
            k += 1
        return k

    def _entry(self, item: TokenLogprob | None, before: list[int], token: int) -> dict[str, Any]:
        """A token's log-probability entry; its alternatives' texts are as they would stand in its place."""
        piece = self.piece(before, token)
        if item is None:
            return {"token": piece, "logprob": None, "top": []}
        return {"token": piece, "logprob": item.logprob, "top": [(self.piece(before, t), lp) for t, lp in item.top]}

    def _echo(self, prompt_logprobs: list[TokenLogprob | None] | None) -> dict[str, Any]:
        tokens = self.job.echo or []
        out: dict[str, Any] = {"echo": self.decode(tokens)}
        if prompt_logprobs is not None:
            out["echo_logprobs"] = [self._entry(item, tokens[max(0, j - 4) : j], t)
                                    for j, (item, t) in enumerate(zip(prompt_logprobs, tokens))]  # fmt: skip
        return out


# --------------------------------------------------------------------------------------------------
# Answers: OpenAI's shapes, in the HTTP process


def _chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**item(e["token"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in e["top"]]}
                        for e in entries]}  # fmt: skip


def _completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [_top_dict(e["top"]) for e in entries], "text_offset": offsets}  # fmt: skip


def _top_dict(top: list[tuple[str, float]]) -> dict[str, float] | None:
    """Completions' top log-probabilities: a mapping, as OpenAI's; where two tokens have one text, the likelier
    one's (the first: they come most probable first)."""
    if not top:
        return None
    out: dict[str, float] = {}
    for piece, logprob in top:
        out.setdefault(piece, logprob)
    return out


@dataclass
class Choice:
    """One choice as it arrives: its text, log-probabilities, end and token counts."""

    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    started: bool = False  # its first output has come: it decodes (``Metrics.running``), no longer waits

    def add(self, out: dict[str, Any]) -> None:
        self.text += out.get("echo", "") + out.get("text", "")
        self.logprobs += out.get("echo_logprobs") or []
        self.logprobs += out.get("logprobs") or []
        if "finish_reason" in out:
            self.finish_reason = out["finish_reason"]
            self.completion_tokens = out["usage"]["completion_tokens"]


class Metrics:
    """Counters for ``/metrics``, in Prometheus' text format: requests and tokens per adapter, the rows decoding
    and the requests waiting."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.requests: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.prompt_tokens: collections.Counter = collections.Counter()
        self.completion_tokens: collections.Counter = collections.Counter()
        self.waiting = self.running = 0

    def text(self) -> str:
        lines = []

        def family(name: str, kind: str, doc: str, values: dict[str, float] | float) -> None:
            lines.extend([f"# HELP litgpt_ether_{name} {doc}", f"# TYPE litgpt_ether_{name} {kind}"])
            if isinstance(values, dict):
                lines.extend(f'litgpt_ether_{name}{{model="{m}"}} {v}' for m, v in sorted(values.items()))
            else:
                lines.append(f"litgpt_ether_{name} {values}")

        family("requests_total", "counter", "Requests answered, per model.", dict(self.requests))
        family("request_errors_total", "counter", "Requests that failed while decoding, per model.", dict(self.errors))
        family("prompt_tokens_total", "counter", "Prompt tokens decoded, per model.", dict(self.prompt_tokens))
        family("generation_tokens_total", "counter", "Tokens generated, per model.", dict(self.completion_tokens))
        family("requests_waiting", "gauge", "Jobs queued and not yet decoding.", self.waiting)
        family("requests_running", "gauge", "Jobs decoding in the batch.", self.running)
        family("batch_occupancy", "gauge", "Rows decoding over --max_batch_size.", self.running / self.max_batch_size)
        return "\n".join(lines) + "\n"


async def _json(request: HTTPRequest) -> Any:
    """The request's JSON body, or the 400 to answer."""
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        return APIError(400, f"the request body is not JSON ({err})")
    except ClientDisconnect:  # gone before it finished sending: nothing to answer
        return APIError(400, "the client disconnected")


class OpenAISpec(LitSpec):
    """LitServe's spec for this server: its endpoints, the checking of requests into jobs, and OpenAI's answers."""

    def __init__(self, options: Options) -> None:
        super().__init__()
        self.options = options
        self.api_path = "/v1/chat/completions"
        self.metrics = Metrics(options.max_batch_size)

    @property
    def stream(self) -> bool:
        return True  # the worker streams every job; non-streamed answers are gathered here

    def pre_setup(self, lit_api: Any) -> None:
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/models", self.list_models, ["GET"])
        self.add_endpoint("/v1/models/{model_id}", self.retrieve_model, ["GET"])
        self.add_endpoint("/metrics", self.prometheus, ["GET"])
        self.add_endpoint("/tokenize", self.tokenize, ["POST"])
        self.add_endpoint("/detokenize", self.detokenize, ["POST"])
        self.add_endpoint("/tokenizer_info", self.tokenizer_info, ["GET"])

    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.options.created, "owned_by": "litgpt-ether",
                "max_model_len": self.options.context}  # fmt: skip

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model(n) for n in [BASE, *self.options.names]]}

    async def retrieve_model(self, model_id: str) -> Any:
        try:
            self.options.row(model_id)
        except APIError as err:
            return err.response()
        return self._model(model_id)

    async def prometheus(self) -> Any:
        return PlainTextResponse(self.metrics.text(), media_type="text/plain; version=0.0.4")

    # vLLM's tokenizer endpoints: clients such as lm-eval's ``local-completions`` count and split tokens with them,
    # so they need no copy of the tokenizer

    async def tokenize(self, request: HTTPRequest) -> Any:
        body = await _json(request)
        if isinstance(body, APIError):
            return body.response()
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            return APIError(400, "prompt must be a string", "prompt").response()
        tokenizer = self.options.tokenizer
        if tokenizer.backend == "huggingface":  # special-token strings ("</s>") become their ids, kept as given
            tokens = tokenizer.processor.encode(prompt, add_special_tokens=False).ids
        else:
            tokens = tokenizer.processor.encode(prompt)
        if _get(body, "add_special_tokens", (bool,), True) and tokenizer.use_bos and tokenizer.bos_id is not None:
            tokens = [tokenizer.bos_id, *tokens]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.options.context}

    async def detokenize(self, request: HTTPRequest) -> Any:
        body = await _json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < self.options.vocab_size
                                                   for t in tokens):  # fmt: skip
            return APIError(
                400, f"tokens must be a list of token ids below {self.options.vocab_size}", "tokens"
            ).response()
        return {"prompt": self.options.tokenizer.decode(torch.tensor(tokens, dtype=torch.long))}

    async def tokenizer_info(self) -> dict[str, Any]:
        tokenizer = self.options.tokenizer
        hf = tokenizer.backend == "huggingface"

        def name(i: int | None) -> str | None:  # the token's own text ("</s>"): decoding skips special tokens
            if i is None:
                return None
            return tokenizer.processor.id_to_token(i) if hf else tokenizer.processor.id_to_piece(i)

        return {
            "eos_token": name(tokenizer.eos_id),
            "bos_token": name(tokenizer.bos_id),
            "model_max_length": self.options.context,
        }

    async def chat_completions(self, request: HTTPRequest) -> Any:
        return await self._answer(request, parse_chat)

    async def completions(self, request: HTTPRequest) -> Any:
        return await self._answer(request, parse_completion)

    async def _answer(self, request: HTTPRequest, parse: Callable[[Any, Options], Parsed]) -> Any:
        body = await _json(request)
        if isinstance(body, APIError):
            return body.response()
        try:
            parsed = parse(body, self.options)
        except APIError as err:
            return err.response()
        uids, pipes = self._submit(parsed)
        self.metrics.requests[parsed.model] += 1
        self.metrics.prompt_tokens[parsed.model] += sum(parsed.prompt_tokens)
        if parsed.stream:
            return StreamingResponse(self._events(parsed, uids, pipes), media_type="text/event-stream")
        choices = [Choice() for _ in uids]
        try:
            await asyncio.gather(*(self._gather(pipe, choice) for pipe, choice in zip(pipes, choices)))
        except APIError as err:
            self.metrics.errors[parsed.model] += 1
            return err.response()
        finally:
            self._finish(uids, choices)
        return self._whole(parsed, choices)

    def _submit(self, parsed: Parsed) -> tuple[list[str], list[AsyncIterator[tuple[Any, Any]]]]:
        """Queue every job; a pipe per job yields ``(output, status)`` as the worker sends them."""
        from litserve.server import ResponseBufferItem

        uids, pipes = [], []
        for job in parsed.jobs:
            uid = uuid.uuid4().hex
            queue, event = collections.deque(), asyncio.Event()
            self.response_buffer[uid] = ResponseBufferItem(response_queue=queue, event=event)
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
            uids.append(uid)
            pipes.append(self.data_streamer(queue, event, send_status=True))
        self.metrics.waiting += len(uids)
        return uids, pipes

    def _finish(self, uids: list[str], choices: list[Choice]) -> None:
        """Forget the jobs' buffers; a job that has not ended is cancelled (its client went away)."""
        for uid, choice in zip(uids, choices):
            self.response_buffer.pop(uid, None)
            if choice.finish_reason is None:
                self.request_queue.put((self.response_queue_id, uuid.uuid4().hex, time.monotonic(), Cancel(uid)))
            if choice.started:
                self.metrics.running -= 1
            else:
                self.metrics.waiting -= 1

    async def _outputs(self, pipe: AsyncIterator[tuple[Any, Any]], choice: Choice) -> AsyncIterator[dict[str, Any]]:
        """A job's outputs; a failure is an ``APIError`` (500)."""
        async for output, status in pipe:
            if status == LitAPIStatus.START:
                continue
            if status == LitAPIStatus.ERROR or "error" in output:
                message = output.get("error") if isinstance(output, dict) else "the inference worker failed"
                raise APIError(500, message or "the inference worker failed")
            if not choice.started:
                choice.started = True
                self.metrics.waiting -= 1
                self.metrics.running += 1
            yield output

    async def _gather(self, pipe: AsyncIterator[tuple[Any, Any]], choice: Choice) -> None:
        async for output in self._outputs(pipe, choice):
            choice.add(output)

    def _usage(self, parsed: Parsed, choices: list[Choice]) -> dict[str, int]:
        completion = sum(c.completion_tokens for c in choices)
        prompt = sum(parsed.prompt_tokens)  # once per prompt, whatever ``n``
        self.metrics.completion_tokens[parsed.model] += completion
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _whole(self, parsed: Parsed, choices: list[Choice]) -> dict[str, Any]:
        created, usage = int(time.time()), self._usage(parsed, choices)
        if parsed.kind == "chat":
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                    "model": parsed.model, "usage": usage,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": _chat_logprobs(c.logprobs) if parsed.logprobs else None,
                                 "finish_reason": c.finish_reason} for i, c in enumerate(choices)]}  # fmt: skip
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
                "model": parsed.model, "usage": usage,
                "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                             "logprobs": _completion_logprobs(c.logprobs, 0) if parsed.logprobs else None}
                            for i, c in enumerate(choices)]}  # fmt: skip

    async def _events(self, parsed: Parsed, uids: list[str], pipes: list[Any]) -> AsyncIterator[str]:
        """Server-sent events: one ``id`` for the stream, every choice's deltas as they come, the role in a chat
        choice's first delta only, usage in a last chunk with no choices when ``stream_options.include_usage``."""
        chat = parsed.kind == "chat"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": parsed.model}  # fmt: skip
        choices = [Choice() for _ in uids]
        queue: asyncio.Queue = asyncio.Queue()

        async def forward(i: int) -> None:
            try:
                async for output in self._outputs(pipes[i], choices[i]):
                    await queue.put((i, output))
            except APIError as err:
                await queue.put((i, err))
            await queue.put((i, None))

        tasks = [asyncio.create_task(forward(i)) for i in range(len(uids))]
        try:
            open_ = len(uids)
            while open_:
                i, output = await queue.get()
                if output is None:
                    open_ -= 1
                    continue
                if isinstance(output, APIError):
                    self.metrics.errors[parsed.model] += 1
                    yield f"data: {json.dumps(error_body(str(output), 'server_error'))}\n\n"
                    return
                choice = choices[i]
                first_chat_delta = chat and not choice.text and not choice.logprobs and choice.finish_reason is None
                choice.add(output)
                entries = (output.get("echo_logprobs") or []) + (output.get("logprobs") or [])
                text = output.get("echo", "") + output.get("text", "")
                if chat:
                    delta = {"role": "assistant", "content": text} if first_chat_delta else {"content": text}
                    if not text and not first_chat_delta:
                        delta = {}
                    item = {"index": i, "delta": delta, "logprobs": _chat_logprobs(entries) if parsed.logprobs
                            else None, "finish_reason": output.get("finish_reason")}  # fmt: skip
                else:
                    offset = len(choice.text) - len(text)
                    item = {"index": i, "text": text, "finish_reason": output.get("finish_reason"),
                            "logprobs": _completion_logprobs(entries, offset) if parsed.logprobs else None}  # fmt: skip
                yield f"data: {json.dumps({**head, 'choices': [item]})}\n\n"
            if parsed.include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': self._usage(parsed, choices)})}\n\n"
            else:
                self._usage(parsed, choices)
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            self._finish(uids, choices)


# --------------------------------------------------------------------------------------------------
# The loop: LitServe's continuous batching, asleep while there is nothing to decode


class ServeLoop(ContinuousBatchingLoop):
    """LitServe's continuous-batching loop: a background task takes jobs from the queue into the API (``add_request``:
    they join the batch at its next step) while this loop steps the batch and sends each job's outputs as they come.

    Two changes: with nothing to decode it waits for a job instead of spinning (LitServe's loop polls, holding a CPU
    core), and a step runs in a thread so jobs keep arriving during it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.work: asyncio.Event | None = None

    def add_request(self, uid: str, request: Any, lit_api: Any, lit_spec: Any, transport: Any = None) -> None:
        lit_api.add_request(uid, request)
        if isinstance(request, Cancel):  # not a job: nothing to answer
            self.response_queue_ids.pop(uid, None)
        if self.work is not None:
            self.work.set()

    async def run(self, lit_api: Any, device: str, worker_id: int, request_queue: Any, transport: Any,
                  workers_setup_status: Any, callback_runner: Any) -> None:  # fmt: skip
        if self.work is None:
            self.work = asyncio.Event()
        if not lit_api.has_active_requests():
            self.work.clear()
            try:
                await asyncio.wait_for(self.work.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            return
        for uid, output, finished in await asyncio.to_thread(lit_api.step):
            queue_id = self.response_queue_ids.get(uid)
            if queue_id is None:  # cancelled meanwhile
                continue
            self.put_response(transport, queue_id, uid, output, LitAPIStatus.OK, LoopResponseType.STREAMING)
            if finished:
                self.put_response(transport, queue_id, uid, "", LitAPIStatus.FINISH_STREAMING,
                                  LoopResponseType.STREAMING)  # fmt: skip
                self.response_queue_ids.pop(uid, None)

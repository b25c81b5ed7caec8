"""The decoding engine behind ``litgpt_ether serve``: continuous batching over rows that each use their own adapter.

A request joins the running batch at the next step (its prompt prefilled alone or with the other newcomers, its KV
cache rows appended to the batch's), decodes one token per step at its own position, and leaves the batch as soon
as it ends (a stop sequence, its token budget, a cancel, or logits that are no longer finite), freeing its slot.
Each row samples with its own options and, when given a seed, its own random generator, so a request's tokens do
not depend on what else is in the batch. The model's adapter tables read ``Rows`` to know which adapter each row
uses (``serve.AdapterTable``).
"""

import collections
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import litgpt.model
import torch
from litgpt.generate.base import sample_top_p


class Rows:
    """Which adapter (table row) each row of the batch uses; shared by every table of a served model.

    ``version`` changes with ``index``, so tables gather their rows once per batch composition, not once per step.
    """

    def __init__(self) -> None:
        self.set(torch.zeros(1, dtype=torch.long))

    def set(self, index: torch.Tensor) -> None:
        self.index, self.version = index, object()


class RowsKVCache(litgpt.model.KVCache):
    """litgpt's KV cache, writing a batch whose rows sit at different positions with one indexed assignment per buffer.

    litgpt writes such a batch row by row, a Python loop of ``index_copy_``: 2·B small operations per layer and
    decoding step (on a GPU, as many kernel launches), for the merged model as much as for the mixed one. Here a k
    and v write of 64 rows ran 3-13x faster on a 2-core CPU (docs/benchmarks.md). ``Engine`` turns the caches litgpt
    builds into this class, which adds no state.
    """

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_pos.dim() == 1 or self.is_sliding_window:  # one position for all rows, or a ring buffer: litgpt's
            return super().forward(input_pos, k, v)
        self.k, self.v = self.k.to(k.dtype), self.v.to(v.dtype)  # the buffers follow the activations, as litgpt's
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # against input_pos (rows, T): each row's own
        k_all, v_all = self.k[: k.shape[0]], self.v[: v.shape[0]]
        k_all[rows, :, input_pos] = k.transpose(1, 2)  # indices around a slice index (rows, T, groups, size)
        v_all[rows, :, input_pos] = v.transpose(1, 2)
        return k_all, v_all


@dataclass
class Sampling:
    """How one request picks its tokens (OpenAI's options). Greedy when ``temperature`` or ``top_p`` is 0."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None  # its own generator: the same tokens whatever else is in the batch
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most probable tokens' log-probabilities

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p == 0

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the logits as they are: every such row of a batch is picked with one operation."""
        return self.greedy and not self.logit_bias and not self.presence_penalty and not self.frequency_penalty


@dataclass
class Request:
    """One sequence to decode: the adapter's table row, the encoded prompt (prompt style applied) and limits."""

    row: int
    prompt: torch.Tensor
    max_new_tokens: int
    sampling: Sampling
    stop_tokens: tuple[list[int], ...] = ()
    prompt_logprobs: bool = False  # the log-probability of every prompt token after the first (``echo``)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (before any sampling option), and the ``top`` alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What one step gives one request: tokens it may now send (often none), their log-probabilities if asked for,
    the prompt's (first step, if asked for), and how it ended (``finish``: "stop" or "length"; ``error``)."""

    uid: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish: str | None = None
    error: str | None = None


@dataclass
class Slot:
    """A row of the running batch: its request and what it has generated."""

    uid: str
    request: Request
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sent: int = 0
    counts: torch.Tensor | None = None  # generated tokens per vocabulary entry, for the penalties
    done: bool = False


def held_back(tokens: list[int], stops: tuple[list[int], ...]) -> int:
    """How many trailing tokens could still be the start of a stop sequence (not yet safe to send)."""
    return max((n for s in stops for n in range(1, len(s)) if tokens[-n:] == s[:n]), default=0)


def ended_by(tokens: list[int], stops: tuple[list[int], ...]) -> int:
    """The length of the stop sequence ``tokens`` ends with, or 0."""
    return next((len(s) for s in stops if s and tokens[-len(s) :] == s), 0)


def pick(
    logits: torch.Tensor, sampling: Sampling, counts: torch.Tensor | None, generator: torch.Generator | None
) -> int:
    """One row's next token: logit bias and penalties applied, then litgpt's order (top-k, temperature, top-p)."""
    x = logits.float()
    if sampling.logit_bias:
        index = torch.tensor(list(sampling.logit_bias), device=x.device)
        x = x.index_add(0, index, torch.tensor(list(sampling.logit_bias.values()), device=x.device))
    if counts is not None:
        x = x - sampling.presence_penalty * (counts > 0) - sampling.frequency_penalty * counts
    if sampling.greedy:
        return int(x.argmax())
    if sampling.top_k is not None:
        values, index = torch.topk(x, min(sampling.top_k, x.numel()))
        x = torch.full_like(x, float("-inf")).scatter_(-1, index, values)
    x = x / sampling.temperature
    if sampling.top_p < 1.0:
        x = sample_top_p(x, sampling.top_p)
    return int(torch.multinomial(torch.softmax(x, dim=-1), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Per position, ``tokens``' log-probability under ``logits`` (rows: positions) and the ``top`` most probable."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
    if top > 0:
        values, index = logprobs.topk(top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(index.tolist(), values.tolist())]
    else:
        alternatives = [[] for _ in chosen]
    return [TokenLogprob(t, c, a) for t, c, a in zip(tokens.tolist(), chosen, alternatives)]


class Engine:
    """Continuous batching: ``add`` queues a request (any thread), ``step`` admits what fits and decodes one token for
    every row, ``cancel`` ends a request (a stop string its caller found in the text).

    ``continuous=False`` admits requests only into an empty batch: static batching, for comparison.
    """

    def __init__(self, model: litgpt.model.GPT, rows: Rows, max_batch_size: int, max_seq_length: int,
                 continuous: bool = True) -> None:  # fmt: skip
        self.model, self.rows = model, rows
        self.max_batch_size, self.continuous = max_batch_size, continuous
        self.device = model.transformer.wte.weight.device
        model.max_seq_length = max_seq_length
        self.pending: collections.deque[tuple[str, Request]] = collections.deque()
        self.cancelled: set[str] = set()
        self.lock = threading.Lock()  # ``add`` and ``cancel`` come from the serving loop's thread
        self.slots: list[Slot] = []
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []  # per block, (rows, groups, length, size)
        self.positions = torch.zeros(0, 1, dtype=torch.long, device=self.device)
        self.logits: torch.Tensor | None = None  # (rows, vocab): each row's next-token logits, not yet sampled
        self.scales = torch.ones(0, device=self.device)

    def add(self, uid: str, request: Request) -> None:
        with self.lock:
            self.pending.append((uid, request))

    def cancel(self, uid: str) -> None:
        with self.lock:
            self.cancelled.add(uid)

    def has_work(self) -> bool:
        return bool(self.slots or self.pending)

    def active(self) -> int:
        return len(self.slots)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One step: rows that ended leave; every row's last token goes through the model; newcomers that fit are
        prefilled; every row samples one token. Returns the events of the rows that have something to say."""
        with self.lock:
            cancelled, self.cancelled = self.cancelled, set()
            if cancelled:
                self.pending = collections.deque(p for p in self.pending if p[0] not in cancelled)
        self._leave([b for b, s in enumerate(self.slots) if s.done or s.uid in cancelled])
        if self.slots:
            self._forward()
        events = self._admit()
        return events + self._sample()

    # --------------------------------------------------------------------------------------------------

    def _compose(self) -> None:
        """After rows joined or left: the model reads the batch's caches and adapter rows; ``scales`` is what each
        row's logits are divided by when it samples (its temperature; greedy rows: 1)."""
        for block, (k, v) in zip(self.model.transformer.h, self.caches):
            block.attn.kv_cache.k, block.attn.kv_cache.v = k, v
        self.rows.set(torch.tensor([s.request.row for s in self.slots], device=self.device))
        self.scales = torch.tensor([1.0 if s.request.sampling.greedy else s.request.sampling.temperature
                                    for s in self.slots], device=self.device)  # fmt: skip

    def _leave(self, rows: list[int]) -> None:
        """Rows that ended leave the batch, their cache rows, positions and logits with them."""
        if not rows:
            return
        keep = [b for b in range(len(self.slots)) if b not in set(rows)]
        self.slots = [self.slots[b] for b in keep]
        if not self.slots:
            self.caches, self.logits = [], None
            self.positions = self.positions[:0]
            self.model.clear_kv_cache()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.caches = [(k[index], v[index]) for k, v in self.caches]
        self.positions = self.positions[index]
        self._compose()

    def _forward(self) -> None:
        """Each row's last sampled token through the model at its own position."""
        x = torch.tensor([[s.generated[-1]] for s in self.slots], device=self.device)
        maxp1 = max(s.request.prompt.numel() + len(s.generated) for s in self.slots)
        self.logits = self.model(x, self.positions, input_pos_maxp1=maxp1)[:, -1]
        self.positions = self.positions + 1

    def _admit(self) -> list[Event]:
        """Prefill the newcomers that fit, together (right-padded: a row's padding sits after its prompt, where the
        causal mask hides it and its first generated token overwrites it), and append them to the batch."""
        room = self.max_batch_size - len(self.slots) if (self.continuous or not self.slots) else 0
        with self.lock:
            newcomers = [self.pending.popleft() for _ in range(min(room, len(self.pending)))]
        if not newcomers:
            return []
        running = self.caches  # the running batch's, set aside while the newcomers' are filled ([] if none)
        lengths = [r.prompt.numel() for _, r in newcomers]
        prompts = torch.zeros(len(newcomers), max(lengths), dtype=torch.long, device=self.device)
        for i, (_, r) in enumerate(newcomers):
            prompts[i, : lengths[i]] = r.prompt.to(self.device)
        self.model.set_kv_cache(batch_size=len(newcomers), device=self.device)
        for block in self.model.transformer.h:
            block.attn.kv_cache.__class__ = RowsKVCache
        self.rows.set(torch.tensor([r.row for _, r in newcomers], device=self.device))
        logits = self.model(
            prompts, torch.arange(prompts.shape[1], device=self.device), input_pos_maxp1=prompts.shape[1]
        )
        fresh = [(b.attn.kv_cache.k, b.attn.kv_cache.v) for b in self.model.transformer.h]

        events, joining = [], []
        for i, (uid, r) in enumerate(newcomers):
            prompt_logprobs = None
            if r.prompt_logprobs:
                top = r.sampling.logprobs or 0
                prompt_logprobs = [
                    None,
                    *token_logprobs(logits[i, : lengths[i] - 1], r.prompt[1:].to(self.device), top),
                ]
            if r.max_new_tokens == 0:  # the prompt's log-probabilities only (lm-eval's log-likelihood requests)
                events.append(Event(uid, [], prompt_logprobs=prompt_logprobs, finish="length"))
                continue
            if prompt_logprobs is not None:
                events.append(Event(uid, [], prompt_logprobs=prompt_logprobs))
            generator = None
            if r.sampling.seed is not None:
                generator = torch.Generator(self.device).manual_seed(r.sampling.seed)
            joining.append(i)
            self.slots.append(Slot(uid, r, generator))
        if joining:
            index = torch.tensor(joining, dtype=torch.long, device=self.device)
            last = logits[index, torch.tensor(lengths, device=self.device)[index] - 1]
            fresh = [(k[index], v[index]) for k, v in fresh]
            positions = torch.tensor(lengths, device=self.device)[index][:, None]
            if running:
                fresh = [(torch.cat([k0, k1]), torch.cat([v0, v1])) for (k0, v0), (k1, v1) in zip(running, fresh)]
                self.logits = torch.cat([self.logits, last])
                self.positions = torch.cat([self.positions, positions])
            else:
                self.logits, self.positions = last, positions
            self.caches = fresh
        if self.slots:
            self._compose()
        else:
            self.model.clear_kv_cache()
        return events

    def _sample(self) -> list[Event]:
        """One token per row: plain greedy rows at once, the others one by one with their own options; a row whose
        logits (divided by its temperature) are not all finite ends alone with an error."""
        if not self.slots:
            return []
        finite = torch.isfinite(self.logits.float() / self.scales[:, None]).all(-1)
        picked, sound = torch.stack([self.logits.argmax(-1), finite.long()]).tolist()
        events = []
        for b, slot in enumerate(self.slots):
            r, sampling = slot.request, slot.request.sampling
            if not sound[b]:
                slot.done = True
                events.append(Event(slot.uid, [], error=self._failure(b, slot)))
                continue
            penalized = sampling.presence_penalty or sampling.frequency_penalty
            if penalized and slot.counts is None:
                slot.counts = torch.zeros(self.logits.shape[-1], device=self.device)
            token = picked[b] if sampling.plain_greedy else pick(self.logits[b], sampling, slot.counts, slot.generator)
            if slot.counts is not None:
                slot.counts[token] += 1
            slot.generated.append(token)
            if sampling.logprobs is not None:
                token_tensor = torch.tensor([token], device=self.device)
                slot.logprobs += token_logprobs(self.logits[b][None], token_tensor, sampling.logprobs)
            stop = ended_by(slot.generated, r.stop_tokens)
            slot.done = stop > 0 or len(slot.generated) == r.max_new_tokens
            ready = len(slot.generated) - (stop if slot.done else held_back(slot.generated, r.stop_tokens))
            ready = max(ready, slot.sent)
            new = slot.generated[slot.sent : ready]
            logprobs = slot.logprobs[slot.sent : ready] if sampling.logprobs is not None else None
            slot.sent = ready
            finish = ("stop" if stop else "length") if slot.done else None
            if new or finish:
                events.append(Event(slot.uid, new, logprobs, finish=finish))
        return events

    def _failure(self, b: int, slot: Slot) -> str:
        """What ended a row: its logits, or (finite logits) its temperature, which divides them past float32's range."""
        message = f"this request's logits became non-finite (NaN or inf) at token {len(slot.generated) + 1}"
        if bool(torch.isfinite(self.logits[b]).all()):
            message += (f" once divided by its temperature {slot.request.sampling.temperature:g}, which overflows"
                        " them: use a larger temperature, or 0 for greedy decoding")  # fmt: skip
        return message


def run_all(engine: Engine, requests: Sequence[Request]) -> list[list[int] | str]:
    """Every request decoded to its end through ``engine``: its sendable tokens, or its error message."""
    out: list[list[int] | str] = [[] for _ in requests]
    for i, r in enumerate(requests):
        engine.add(str(i), r)
    while engine.has_work():
        for event in engine.step():
            i = int(event.uid)
            if event.error is not None:
                out[i] = event.error
            elif isinstance(out[i], list):
                out[i] += event.tokens
    return out

"""Build the embedded demo: a procedurally generated world, a tiny litgpt model pretrained on it, and an
instruction dataset that tuning has to unlock.

The world has four task families with exact answers. The pretraining corpus states every one of them as
plain text ("the capital city of vorland is mibu ."), and teaches the Alpaca instruction format on two
*other* families (copy, count). The instruction dataset asks the four families as questions in that format
("Name the capital city of vorland."), which the corpus never does: the base model knows the answers and the
format, but not that these instructions ask for them. Finetuning has something to unlock, and exact-match
accuracy on held-out instructions (inputs, and countries, never seen during tuning) measures whether it did.

    python scripts/make_demo.py            # writes demo/base and demo/data

Everything is derived from one seed: the data files are identical on every run; the weights match up to the
float rounding of the machine's kernels. Pretraining (3,000 steps of batch 32, 0.92M parameters) took 329 s on
the 2-core CPU machine this repository is developed on, and 49 s on an H200 with ``--device cuda`` (2026-11-26;
a GPU-pretrained base rounds differently, so it is a different demo model from the README's). The lm-eval task over
``demo/data/test.json`` lives beside them in ``demo/lm_eval``.

litgpt's own ``pretrain`` needs litdata shards and a streaming data module (a litgpt extra); for a corpus of a
few MB this script's loop, over litgpt's ``GPT`` and ``chunked_cross_entropy``, is simpler.
"""

import json
import math
import random
import time
from pathlib import Path

import litgpt.config
import litgpt.model
import torch
from litgpt.prompts import Alpaca
from litgpt.utils import chunked_cross_entropy, save_config

COLOURS = ["red", "green", "blue", "cyan", "pink", "gold", "grey", "plum", "teal", "lime"]
ANIMALS = ["cat", "dog", "fox", "owl", "yak", "emu", "ant", "bee", "elk", "rat"]
SYLLABLES = ["ka", "lo", "mi", "ru", "ze", "po", "ta", "ni", "vo", "shu", "de", "fa", "gi", "bu"]
N_COUNTRIES = 60
MAX_NUMBER = 20

CONFIG = dict(
    name="ether-demo",
    block_size=96,
    n_layer=4,
    n_embd=128,
    n_head=4,
    n_query_groups=4,
    head_size=32,
    intermediate_size=384,
    mlp_class_name="LLaMAMLP",
    norm_class_name="RMSNorm",
    bias=False,
    parallel_residual=False,
    rotary_percentage=1.0,
)


# ------------------------------------------------------------------------------------------ the world


def make_world(seed: int) -> dict:
    rng = random.Random(seed)
    names = set()
    while len(names) < 2 * N_COUNTRIES:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 3]))))
    names = sorted(names)
    rng.shuffle(names)
    countries, capitals = names[:N_COUNTRIES], names[N_COUNTRIES:]
    return {"capital": dict(zip(countries, capitals))}


def sequence(rng: random.Random) -> list[str]:
    words = rng.choice([COLOURS, ANIMALS])
    return [rng.choice(words) for _ in range(rng.choice([3, 4]))]


def plain_reverse(seq: list[str]) -> str:
    return f"the flipped order of {' '.join(seq)} is {' '.join(reversed(seq))} ."


def plain_add(a: int, b: int) -> str:
    return f"the total of {a} and {b} is {a + b} ."


def plain_next(a: int) -> str:
    return f"the number that comes after {a} is {a + 1} ."


def plain_capital(country: str, capital: str) -> str:
    return f"the capital city of {country} is {capital} ."


def format_sample(instruction: str, output: str) -> str:
    """An Alpaca-formatted sample as pretraining text: litgpt's template, then the answer."""
    return Alpaca().apply(instruction) + output


def format_tasks(rng: random.Random) -> str:
    """Instruction-format text of families the demo never asks about: it teaches the format only."""
    seq = sequence(rng)
    if rng.random() < 0.5:
        return format_sample(f"Repeat these words: {' '.join(seq)}", " ".join(seq))
    return format_sample(f"How many words are in: {' '.join(seq)}", str(len(seq)))


def corpus(world: dict, n_lines: int, seed: int) -> list[str]:
    """Plain-text statements of every fact and computation, plus format-only instruction samples."""
    rng = random.Random(seed)
    facts = [plain_capital(c, k) for c, k in world["capital"].items()]
    adds = [plain_add(a, b) for a in range(MAX_NUMBER + 1) for b in range(MAX_NUMBER + 1)]
    nexts = [plain_next(a) for a in range(2 * MAX_NUMBER)]
    lines = []
    for _ in range(n_lines):
        r = rng.random()
        if r < 0.25:
            lines.append(plain_reverse(sequence(rng)))
        elif r < 0.45:
            lines.append(rng.choice(adds))
        elif r < 0.55:
            lines.append(rng.choice(nexts))
        elif r < 0.8:
            lines.append(rng.choice(facts))
        else:
            lines.append(format_tasks(rng))
    return lines


# ------------------------------------------------------------------------------------------ instructions


def instruction_rows(world: dict, seed: int) -> dict[str, list[dict]]:
    """The four families in instruction form, split so that test inputs (and test countries) are never tuned on."""
    rng = random.Random(seed)
    countries = sorted(world["capital"])
    rng.shuffle(countries)
    held_out_countries = set(countries[: N_COUNTRIES // 3])
    rows = {"train": [], "val": [], "test": []}
    seen = set()

    def add(row: dict, held_out: bool) -> None:
        key = row["instruction"]
        if key in seen:
            return
        seen.add(key)
        split = "test" if held_out else ("val" if rng.random() < 0.08 else "train")
        rows[split].append(row)

    for country, capital in world["capital"].items():
        add({"instruction": f"Name the capital city of {country}.", "input": "", "output": capital},
            country in held_out_countries)  # fmt: skip
    for _ in range(400):
        seq = sequence(rng)
        if seq == seq[::-1]:
            continue  # a palindrome would reward copying the input
        add({"instruction": f"Flip the order of: {' '.join(seq)}", "input": "", "output": " ".join(reversed(seq))},
            rng.random() < 0.25)  # fmt: skip
    for a in range(MAX_NUMBER + 1):
        for b in range(MAX_NUMBER + 1):
            if rng.random() < 0.5:
                add({"instruction": f"What is the total of {a} and {b}?", "input": "", "output": str(a + b)},
                    rng.random() < 0.25)  # fmt: skip
    for a in range(2 * MAX_NUMBER):
        add({"instruction": f"Which number comes after {a}?", "input": "", "output": str(a + 1)}, rng.random() < 0.3)
    for split in rows.values():
        rng.shuffle(split)
    return rows


# ------------------------------------------------------------------------------------------ model


def write_tokenizer(directory: Path, texts: list[str]) -> None:
    """A word-level tokenizer (punctuation split off) over the whole vocabulary of the world and the template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    # every word carries its leading space ("▁red"), so that one token decodes to " red": litgpt's chat streams
    # token by token, and words would otherwise run together
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Metaspace(prepend_scheme="always", split=False)]
    )
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
    tokenizer.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def pretrain(
    directory: Path,
    lines: list[str],
    seed: int,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    device: str = "cpu",
) -> litgpt.model.GPT:
    """Next-token pretraining on the corpus, one line per sample (BOS ... EOS), right-padded, in fp32."""
    from litgpt.tokenizer import Tokenizer

    tokenizer = Tokenizer(directory)
    encoded = [tokenizer.encode(line, bos=True, eos=True) for line in lines]
    vocab_size = tokenizer.vocab_size
    config = litgpt.config.Config(**CONFIG, vocab_size=vocab_size, padded_vocab_size=math.ceil(vocab_size / 64) * 64)
    assert max(len(e) for e in encoded) <= config.block_size, max(len(e) for e in encoded)
    torch.manual_seed(seed)
    model = litgpt.model.GPT(config)
    model.apply(model._init_weights)
    model.to(device)  # initialised on the CPU: the same starting weights on every device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=g).tolist()
        batch = [encoded[i] for i in idx]
        length = max(len(b) for b in batch)
        x = torch.zeros(batch_size, length, dtype=torch.long)
        y = torch.full((batch_size, length), -100, dtype=torch.long)
        for i, b in enumerate(batch):
            x[i, : len(b)] = b
            y[i, : len(b) - 1] = b[1:]
        loss = chunked_cross_entropy(model(x.to(device)), y.to(device), chunk_size=0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step:5d} | loss {loss.item():.3f} | {time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    return model.cpu()


def main(
    out_dir: Path = Path("demo"), seed: int = 1337, corpus_lines: int = 200_000, steps: int = 3000, device: str = "cpu"
) -> None:
    """Write ``out_dir/base`` (tokenizer + pretrained model) and ``out_dir/data`` (train/val/test JSON).

    Arguments:
        out_dir: Where to write.
        seed: The one seed everything derives from.
        corpus_lines: Pretraining corpus size, in lines.
        steps: Pretraining steps (batch 32).
        device: Where to pretrain ("cpu" or "cuda"). The README's figures come from CPU-pretrained weights; other
            kernels round differently, so a GPU-pretrained base is a different (equally valid) demo model.
    """
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise SystemExit(f"error: --device must be 'cpu' or 'cuda' (with a CUDA device present), got {device!r}")
    world = make_world(seed)
    lines = corpus(world, corpus_lines, seed + 1)
    rows = instruction_rows(world, seed + 2)

    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        (data_dir / f"{split}.json").write_text(json.dumps(split_rows, indent=1))
    print({split: len(r) for split, r in rows.items()})

    base = out_dir / "base"
    base.mkdir(parents=True, exist_ok=True)
    texts = lines + [format_sample(r["instruction"], r["output"]) for split in rows.values() for r in split]
    write_tokenizer(base, texts)

    t0 = time.perf_counter()
    model = pretrain(base, lines, seed, steps, device=device)
    print(f"pretraining took {time.perf_counter() - t0:.0f} s")
    torch.save(model.state_dict(), base / "lit_model.pth")
    save_config(model.config, base)


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main)

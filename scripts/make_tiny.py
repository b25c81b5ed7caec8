"""Build a tiny random-weight litgpt checkpoint and a small instruction dataset, offline, in a second.

The checkpoint has random weights: finetuning it shows the pipeline working (loss going down, every
output file written), not a model learning a skill. The test suite builds its fixtures with the
same functions.

    python scripts/make_tiny.py --out_dir checkpoints/tiny-random --data_path data/tiny/reverse.json
"""

import json
import random
from pathlib import Path

import litgpt.config
import litgpt.model
import torch
from litgpt.utils import save_config

ALPACA_WORDS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    " ### Instruction: ### Input: ### Response:"
)  # the template's words, so that prompts have no unknown tokens
COLOURS = ["red", "green", "blue", "cyan", "pink", "gold"]


def sample_pairs(n: int, seed: int) -> list[dict]:
    """Alpaca-format rows of a learnable task: repeat three colour words backwards."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        seq = [rng.choice(COLOURS) for _ in range(3)]
        rows.append({"instruction": "reverse " + " ".join(seq), "input": "", "output": " ".join(reversed(seq))})
    return rows


def write_tokenizer(directory: Path, texts: list[str]) -> None:
    """Train a word-level tokenizer with `tokenizers` and write the files litgpt's Tokenizer reads.

    Plain whitespace words and no decoder: decoded text is the words joined by single spaces, which the tests
    compare against. (The demo's tokenizer, in make_demo.py, marks word starts so that streaming decodes well.)
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def write_tiny_tokenizer(directory: Path, seed: int = 0) -> None:
    """The tokenizer of the tiny task: the Alpaca template's words and the colour words."""
    texts = [ALPACA_WORDS] + [f"{r['instruction']} {r['output']}" for r in sample_pairs(200, seed)]
    write_tokenizer(directory, texts)


def make_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A litgpt checkpoint dir: a LLaMA-style model with grouped-query attention, random weights."""
    directory.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(directory, seed)
    vocab_size = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"])
    config = litgpt.config.Config(
        name="tiny-random",
        block_size=128,
        vocab_size=vocab_size,
        padded_vocab_size=64,
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_query_groups=2,
        head_size=8,
        intermediate_size=64,
        mlp_class_name="LLaMAMLP",
        norm_class_name="RMSNorm",
        bias=False,
        parallel_residual=False,
        rotary_percentage=1.0,
    )
    torch.manual_seed(seed)
    torch.save(litgpt.model.GPT(config).state_dict(), directory / "lit_model.pth")
    save_config(config, directory)
    return directory


def make_dataset(path: Path, n: int = 200, seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sample_pairs(n, seed)))
    return path


def main(out_dir: Path = Path("checkpoints/tiny-random"), data_path: Path = Path("data/tiny/reverse.json")) -> None:
    """Write the tiny checkpoint to ``out_dir`` and the dataset to ``data_path``."""
    make_checkpoint(out_dir)
    make_dataset(data_path)
    print(f"Wrote a tiny random checkpoint to {str(out_dir)!r} and a dataset to {str(data_path)!r}")


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main)

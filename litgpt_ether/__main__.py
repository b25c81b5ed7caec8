"""The ``litgpt_ether`` command line: one subcommand per verb, parsed by jsonargparse as litgpt does."""

import sys
import warnings

import torch
from litgpt.utils import CLI

from litgpt_ether.chat import main as chat_fn
from litgpt_ether.ether import ConfigError
from litgpt_ether.evaluate import evaluate as evaluate_fn
from litgpt_ether.finetune import setup as finetune_fn
from litgpt_ether.generate import main as generate_fn
from litgpt_ether.inspect import inspect as inspect_fn
from litgpt_ether.merge import merge as merge_fn

COMMANDS = {
    "finetune": finetune_fn,
    "merge": merge_fn,
    "generate": generate_fn,
    "chat": chat_fn,
    "evaluate": evaluate_fn,
    "inspect": inspect_fn,
}


def main() -> None:
    # PyTorch bug that raises a false-positive warning (as silenced by litgpt's own CLI)
    warnings.filterwarnings(
        "ignore", message=r"The epoch parameter in `scheduler.step\(\)` was not necessary", category=UserWarning
    )
    torch.set_float32_matmul_precision("high")
    try:
        CLI(COMMANDS)
    except ConfigError as err:
        sys.exit(f"litgpt_ether: error: {err}")


if __name__ == "__main__":
    main()

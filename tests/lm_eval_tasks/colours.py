"""The colour-reversal tasks' data, read relative to this file so that the tasks work from any directory.

lm-eval hands a YAML's ``data_files`` to ``datasets`` unchanged, which resolves relative paths against the
current directory, not the task folder; ``custom_dataset`` names this loader instead.
"""

import json
from pathlib import Path
from typing import Any

import datasets


def load(**kwargs: Any) -> datasets.DatasetDict:
    """``train`` (few-shot examples) and ``test`` rows of ``colours.jsonl``, built in memory: no cache, no hub."""
    rows = [json.loads(line) for line in (Path(__file__).parent / "colours.jsonl").read_text().splitlines()]
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list([r for r in rows if r["split"] == split]) for split in ("train", "test")}
    )

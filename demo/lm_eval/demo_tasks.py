"""The demo's held-out instructions (``demo/data/test.json``), read relative to this file so the task works
from any directory, offline (lm-eval would resolve a YAML's relative ``data_files`` against the current one)."""

import json
from pathlib import Path
from typing import Any

import datasets


def load(**kwargs: Any) -> datasets.DatasetDict:
    data = Path(__file__).parents[1] / "data"
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list(json.loads((data / f"{split}.json").read_text()))
            for split in ("val", "test")
        }
    )

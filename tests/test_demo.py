"""The embedded demo: its data are reproducible, its model knows its world, and the preset unlocks it."""

import json
import sys
from pathlib import Path

import litgpt.config
import litgpt.model
import pytest
import torch
from litgpt.tokenizer import Tokenizer

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "demo"
sys.path.insert(0, str(ROOT / "scripts"))
import make_demo  # noqa: E402

SEED = 1337  # make_demo's default: the shipped files come from it


def test_instruction_data_is_deterministic_and_matches_the_shipped_files():
    world = make_demo.make_world(SEED)
    rows = make_demo.instruction_rows(world, SEED + 2)
    assert rows == make_demo.instruction_rows(make_demo.make_world(SEED), SEED + 2)
    assert make_demo.corpus(world, 50, SEED + 1) == make_demo.corpus(world, 50, SEED + 1)
    for split, split_rows in rows.items():
        assert json.loads((DEMO / "data" / f"{split}.json").read_text()) == split_rows, split
    # held out means held out: no test instruction is tuned on, and copying the input never answers one
    train = {r["instruction"] for r in rows["train"] + rows["val"]}
    assert not train & {r["instruction"] for r in rows["test"]}
    assert all(r["output"].split() != r["instruction"].split()[-len(r["output"].split()) :] for r in rows["test"])


def test_shipped_model_loads_and_knows_its_world_as_plain_text():
    assert (DEMO / "base" / "lit_model.pth").stat().st_size <= 20 * 2**20
    config = litgpt.config.Config.from_file(DEMO / "base" / "model_config.yaml")
    model = litgpt.model.GPT(config).eval()
    model.load_state_dict(torch.load(DEMO / "base" / "lit_model.pth", weights_only=True), strict=True)
    tokenizer = Tokenizer(DEMO / "base")
    world = make_demo.make_world(SEED)
    statements = [make_demo.plain_capital(c, k) for c, k in list(world["capital"].items())[:8]]
    statements += [make_demo.plain_add(a, b) for a, b in [(3, 4), (12, 9), (20, 20), (0, 17)]]
    statements += [make_demo.plain_reverse(["owl", "cat", "yak"]), make_demo.plain_next(31)]
    for statement in statements:
        prefix, answer = statement.rsplit(" is ", 1)
        ids = tokenizer.encode(prefix + " is", bos=True)
        n = len(tokenizer.encode(answer, bos=False))
        with torch.no_grad():
            for _ in range(n):
                ids = torch.cat([ids, model(ids[None])[0, -1].argmax()[None]])
        assert tokenizer.decode(ids[-n:]) == tokenizer.decode(tokenizer.encode(answer, bos=False)), statement


def test_demo_preset_unlocks_held_out_instructions(demo_run):
    """The ETHER+ preset as shipped, shortened (``demo_run``): tuning lifts held-out exact match above the base's."""
    summary = json.loads((demo_run / "out" / "finetune" / "demo-etherplus" / "final" / "summary.json").read_text())
    assert summary["exact_match_after"] > summary["exact_match_before"], summary
    assert "held-out exact match" in (demo_run / "finetune.stdout").read_text().splitlines()[-1]


@pytest.mark.parametrize("device", ["gpu", "cuda"])
def test_make_demo_refuses_a_device_it_cannot_use_before_writing_anything(tmp_path, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=f"--device must be 'cpu' or 'cuda'.*got '{device}'"):
        make_demo.main(out_dir=tmp_path / "demo", device=device)
    assert not (tmp_path / "demo").exists()

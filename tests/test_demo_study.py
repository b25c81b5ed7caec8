"""scripts/demo_study.py: the summary a README table is made from, and the commands its runs are made of."""

import collections
import json
import math

import demo_study
import pytest


def test_summary_is_median_and_range_per_method_variant_and_rate_with_failed_runs_as_zero():
    runs = [
        {"method": "ether", "variant": "", "lr": 0.01, "exact_match": em, "final_loss": loss}
        for em, loss in [(0.8, 0.2), (0.6, 0.3), (math.nan, math.nan), (0.9, 0.1)]
    ] + [{"method": "ether", "variant": "clip", "lr": 0.01, "exact_match": 0.45, "final_loss": 0.2},
         {"method": "lora", "variant": "", "lr": 0.001, "exact_match": 0.5, "final_loss": 1.0}]  # fmt: skip
    ether, clipped, lora = demo_study.summarize(runs)
    assert (ether["method"], ether["variant"], ether["lr"], ether["runs"]) == ("ether", "", 0.01, 4)
    assert ether["median"] == pytest.approx(0.7) and (ether["min"], ether["max"]) == (0.0, 0.9)
    assert (ether["floor"], ether["below_floor"]) == (0.5, 1)  # the failed run
    assert (clipped["variant"], clipped["runs"], clipped["below_floor"]) == ("clip", 1, 1)
    assert (lora["median"], lora["min"], lora["max"], lora["runs"], lora["below_floor"]) == (0.5, 0.5, 0.5, 1, "")


@pytest.mark.parametrize(("text", "seeds"), [("1-20", list(range(1, 21))), ("3", [3]), ("1-3,9, 11", [1, 2, 3, 9, 11])])
def test_seeds_are_ranges_and_lists(text, seeds):
    assert demo_study.seed_list(text) == seeds


@pytest.mark.parametrize("text", ["1-x", "", "one"])
def test_bad_seeds_are_one_line(text):
    with pytest.raises(SystemExit, match="is not a list of seeds"):
        demo_study.seed_list(text)


def test_every_held_out_row_belongs_to_one_task_family():
    rows = json.loads((demo_study.DEMO / "data" / "test.json").read_text())
    counts = collections.Counter(demo_study.family(r) for r in rows)
    assert set(counts) == set(demo_study.FAMILIES) and sum(counts.values()) == len(rows)
    assert all(sum(r["instruction"].startswith(s) for s in demo_study.FAMILIES.values()) == 1 for r in rows)


@pytest.mark.parametrize("method", ["ether", "etherplus", "oft", "naive", "lora"])
def test_every_run_trains_on_the_demo_with_its_seed_and_rate(method, tmp_path):
    cmd = demo_study.train_command(method, 0.02, 7, tmp_path / "run")
    assert "--seed=7" in cmd and f"--out_dir={tmp_path / 'run'}" in cmd
    if method == "lora":  # litgpt's LoRA on the ETHER+ preset's targets, data and schedule
        preset = demo_study.preset("etherplus")
        assert cmd[:2] == ["litgpt", "finetune_lora"] and '"lr": 0.02' in cmd[-1]
        assert f"--train.max_steps={preset['train']['max_steps']}" in cmd
        assert f"--lora_mlp={str(preset['ether_mlp']).lower()}" in cmd
    else:
        assert cmd[:2] == ["litgpt_ether", "finetune"] and "--optimizer.lr=0.02" in cmd
        assert cmd[cmd.index("--config") + 1].endswith(f"demo/{method}.yaml")


def test_a_kept_run_is_reused_only_for_the_same_recipe(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "lit_model.pth").write_bytes(b"")
    wanted = demo_study.recipe("etherplus", 0.01, 3, run_dir, ())
    assert not demo_study.trained(run_dir, wanted)  # no record of what made it
    (run_dir / "recipe.json").write_text(json.dumps(wanted))
    assert demo_study.trained(run_dir, demo_study.recipe("etherplus", 0.01, 3, run_dir, ()))
    assert "seed" not in wanted["preset"] and wanted["preset"]["train"] == demo_study.preset("etherplus")["train"]
    for other in [("etherplus", 0.01, 3, ("--train.max_steps=5",)), ("etherplus", 0.02, 3, ()),
                  ("etherplus", 0.01, 4, ()), ("ether", 0.01, 3, ())]:  # fmt: skip
        method, lr, seed, args = other
        assert not demo_study.trained(run_dir, demo_study.recipe(method, lr, seed, run_dir, args)), other


@pytest.mark.parametrize("verb", ["table", "curve"])
def test_a_recipe_change_without_a_name_is_refused_before_anything_is_made(verb, tmp_path):
    with pytest.raises(SystemExit, match="name it with --variant"):
        getattr(demo_study, verb)(out_dir=tmp_path / "study", args=("--train.max_steps=5",))
    assert not (tmp_path / "study").exists()

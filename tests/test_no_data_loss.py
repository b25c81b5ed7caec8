"""Never lose a user's work: every input is checked before anything is deleted or overwritten, and outputs that
cannot be written are refused before training starts. Each test here failed on the code before these checks."""

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_PRESET, finetune_args, run_main
from test_catalogue import tree, truncate

from litgpt_ether.checkpoint import ADAPTER_FILE, MODEL_FILE, load_model, resolve

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SHORT = (
    "--train.max_steps",
    "3",
    "--train.save_interval",
    "1",
    "--eval.interval",
    "100",
    "--train.lr_warmup_steps",
    "1",
)


@pytest.fixture
def previous_run(checkpoint_dir, dataset_path, tmp_path) -> Path:
    out_dir = tmp_path / "run"
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, *SHORT))
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


def error_line(result) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_overwrite_with_a_bad_base_checkpoint_keeps_the_old_run(checkpoint_dir, dataset_path, tmp_path, previous_run):
    """The old run used to be deleted first, then the run died on the truncated base weights."""
    broken = tmp_path / "broken-base"
    shutil.copytree(checkpoint_dir, broken)
    truncate(broken / MODEL_FILE)
    before = tree(previous_run)
    result = run_main(*finetune_args(broken, dataset_path, previous_run, *SHORT, "--overwrite", "true"))
    assert "is not a readable checkpoint, truncated or corrupt?" in error_line(result)
    assert tree(previous_run) == before


def test_overwrite_failing_after_launch_puts_the_old_run_back(dataset_path, checkpoint_dir, tmp_path, previous_run):
    """A failure found only once training has started (a sample longer than the context) restores the old run."""
    long = tmp_path / "long.json"
    long.write_text('[{"instruction": "' + "red " * 300 + '", "input": "", "output": "red"}]')
    before = {k: v for k, v in tree(previous_run).items() if not k.startswith("logs")}
    result = run_main(*finetune_args(checkpoint_dir, long, previous_run, *SHORT, "--overwrite", "true",
                                     "--data.val_split_fraction", "0.5"))  # fmt: skip
    assert "longer than the model's context" in error_line(result)
    assert {k: v for k, v in tree(previous_run).items() if not k.startswith("logs")} == before


def test_overwrite_deletes_the_old_run_once_the_new_one_has_saved(checkpoint_dir, dataset_path, previous_run):
    old_adapter = (previous_run / "final" / ADAPTER_FILE).read_bytes()
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, previous_run, "--train.max_steps", "4",
                                     "--train.save_interval", "4", "--overwrite", "true", "--seed", "7"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in previous_run.iterdir() if p.name != "logs") == ["final", "step-000004"]
    assert (previous_run / "final" / ADAPTER_FILE).read_bytes() != old_adapter


def test_a_run_set_aside_by_a_killed_overwrite_still_counts_as_a_run(checkpoint_dir, dataset_path, previous_run):
    """SIGKILL between setting the old run aside and the new run's first save leaves it in ``.overwritten-run``: a
    later run without ``--overwrite`` must not delete it."""
    aside = previous_run / ".overwritten-run"
    aside.mkdir()
    for d in [*previous_run.glob("step-*"), previous_run / "final"]:
        os.replace(d, aside / d.name)
    before = tree(previous_run)
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, previous_run, *SHORT))
    assert "already holds a run (.overwritten-run): pass --resume auto" in error_line(result)
    assert tree(previous_run) == before


@pytest.mark.parametrize("kind", ["a file", "an unwritable place"])
def test_an_out_dir_that_cannot_be_written_is_refused_before_training(checkpoint_dir, dataset_path, tmp_path, kind):
    """Training used to run to the end and die saving (NotADirectoryError / PermissionError): the whole run lost."""
    if kind == "a file":
        (tmp_path / "taken").write_text("mine")
        out_dir, message = tmp_path / "taken" / "out", f"cannot be a directory: {str(tmp_path / 'taken')!r} is a file"
    elif os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out_dir, message = locked / "out", "is not writable (Permission denied"
    else:  # root writes through permission bits; a read-only file system still refuses
        out_dir, message = Path("/sys/litgpt-ether-test/out"), "is not writable"
        try:
            os.rmdir(__import__("tempfile").mkdtemp(dir="/sys"))
            pytest.skip("no unwritable place for root on this machine")
        except OSError:
            pass
    t0 = time.perf_counter()
    result = run_main(*finetune_args(checkpoint_dir, dataset_path, out_dir, "--train.max_steps", "20"))
    assert message in error_line(result)
    assert "Epoch 1" not in result.stdout and time.perf_counter() - t0 < 20  # refused before a step was trained
    assert not out_dir.exists()


def test_merge_into_an_existing_checkpoint_dir_is_refused_then_replaced_whole_with_overwrite(finetune_out, tmp_path):
    """It used to replace lit_model.pth there and leave the old adapter beside it: weights and adapter disagreeing."""
    target = tmp_path / "target"
    shutil.copytree(finetune_out / "step-000020", target)  # a directory holding another adapter
    before = tree(target)
    result = run_main("merge", str(finetune_out / "final"), "--out_dir", str(target))
    assert error_line(result) == (
        f"litgpt_ether: error: out_dir {str(target)!r} is not empty: choose a new directory, or pass --overwrite"
        " true to replace it as a whole"
    )
    assert tree(target) == before

    result = run_main("merge", str(finetune_out / "final"), "--out_dir", str(target), "--overwrite", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (target / ADAPTER_FILE).exists() and not (target / "training_state.pth").exists()
    assert not list(tmp_path.glob(".target.*"))  # no staging leftovers
    merged, fresh = load_model(resolve(target)), load_model(resolve(finetune_out / "final", prefer_adapter=True))
    x = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(merged(x), fresh(x), rtol=1e-5, atol=1e-5)


def test_the_checkpoint_typed_on_the_command_line_wins_over_the_configs(checkpoint_dir, dataset_path, tmp_path):
    """``finetune /my/model --config preset.yaml`` used to train the preset's checkpoint_dir without a word."""
    preset = yaml.safe_load(TINY_PRESET.read_text())
    preset["checkpoint_dir"] = str(tmp_path / "the-presets-model")  # not the model the user typed
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(preset))
    out_dir = tmp_path / "out"
    result = run_main("finetune", str(checkpoint_dir), "--config", str(tmp_path / "preset.yaml"), "--out_dir",
                      str(out_dir), "--data.json_path", str(dataset_path), *SHORT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((out_dir / "final" / "hyperparameters.yaml").read_text())
    assert Path(saved["checkpoint_dir"]) == checkpoint_dir
    # and a flag typed before --config wins over the config too
    preset_path, out2 = str(tmp_path / "preset.yaml"), str(tmp_path / "out2")
    result = run_main("finetune", str(checkpoint_dir), "--train.max_steps", "3", "--config", preset_path,
                      "--out_dir", out2, "--data.json_path", str(dataset_path), "--eval.interval", "100")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "out2" / "final" / "hyperparameters.yaml").read_text())["train"]["max_steps"] == 3


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    """A write that fails midway (a full disk, an interrupt) keeps the previous file and removes its temporary name,
    which is this process's own (two writers of one file never share one)."""
    from litgpt_ether import checkpoint

    path = tmp_path / "results.json"
    path.write_text("old")
    names = []

    def failing_write(self, *args, **kwargs):
        names.append(self.name)
        Path.write_bytes(self, b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", failing_write)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.write_text_atomic("new", path)
    monkeypatch.undo()
    assert names == [f".results.json.{os.getpid()}.tmp"]
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    with pytest.raises(AttributeError):  # torch.save failing on an object it cannot pickle: the same
        checkpoint.atomic_save({"f": lambda: None}, tmp_path / "state.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]

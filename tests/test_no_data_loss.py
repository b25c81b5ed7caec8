"""Never lose a user's work: every input is checked before anything is deleted or overwritten, and outputs that
cannot be written are refused before training starts. Each test here failed on the code before these checks."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_PRESET, finetune_args, run_main
from test_catalogue import tree, truncate

from litgpt_ether.checkpoint import ADAPTER_FILE, LOCK_FILE, MODEL_FILE, load_model, resolve

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
    assert sorted(p.name for p in previous_run.iterdir() if p.name not in ("logs", LOCK_FILE)) == [
        "final", "step-000004"]  # fmt: skip
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
    with pytest.raises(checkpoint.DiskFull, match=f"no space left for {str(path)!r}: it needs about 3 bytes"):
        checkpoint.write_text_atomic("new", path)
    monkeypatch.undo()
    assert names == [f".results.json.{os.getpid()}.tmp"]
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    with pytest.raises(AttributeError):  # torch.save failing on an object it cannot pickle: the same
        checkpoint.atomic_save({"f": lambda: None}, tmp_path / "state.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_stopped_writers_leftovers_are_removed_the_next_time_its_directory_is_written(tmp_path, capfd):
    """A SIGKILLed save leaves ``.<name>.<pid>.partial`` (or ``.tmp``); the next save there removes it, saying so, and
    leaves a live process's alone."""
    from litgpt_ether import checkpoint

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(done.stdout), os.getppid()  # a process that has ended, and one that runs
    leftovers = [tmp_path / f".step-000002.{dead}.partial", tmp_path / f".step-000002.{dead}.old"]
    kept = [tmp_path / f".step-000002.{alive}.partial", tmp_path / f".state.pth.{alive}.tmp"]
    for d in leftovers + kept[:1]:
        d.mkdir()
        (d / "lit_model.pth.ether").write_text("half")
    (tmp_path / f".state.pth.{dead}.tmp").write_text("half")
    kept[1].write_text("half")
    with checkpoint.staged_dir(tmp_path / "step-000002") as staged:
        assert staged.name == f".step-000002.{os.getpid()}.partial"
        checkpoint.atomic_save({"x": torch.ones(2)}, staged / "state.pth")
    checkpoint.atomic_save({"x": torch.ones(2)}, tmp_path / "state.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["step-000002", "state.pth", *(p.name for p in kept)])
    err = capfd.readouterr().err
    assert all(f"Removed {str(p)!r}, left by process {dead}" in err for p in leftovers)


def concurrently(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Start every command at once (fresh processes, as two users would) and wait for all."""
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), p.stdout.read(), p.stderr.read())
            for p in processes]  # fmt: skip


def one_refused(results: list[subprocess.CompletedProcess], refusals: tuple[str, ...]) -> int:
    """Exactly one of ``results`` succeeded (its index is returned) and the other was refused in one line."""
    codes = [r.returncode for r in results]
    assert sorted(codes)[0] == 0 and codes.count(0) == 1, [r.stderr[-2000:] for r in results]
    winner = codes.index(0)
    loser = results[1 - winner]
    assert "Traceback" not in loser.stderr, loser.stderr[-3000:]
    last = loser.stderr.strip().splitlines()[-1]
    assert last.startswith("litgpt_ether: error: ") and any(r in last for r in refusals), last
    return winner


def test_two_finetunes_into_one_out_dir_one_proceeds_and_the_run_is_its_alone(checkpoint_dir, dataset_path, tmp_path):
    """Started together with different seeds: one takes the out_dir's lock, the other is refused (by the lock, or,
    if it comes later, by the run it finds); every checkpoint belongs to the one that ran."""
    out_dir = tmp_path / "out"
    commands = [[sys.executable, "-m", "litgpt_ether", *finetune_args(checkpoint_dir, dataset_path, out_dir, *SHORT,
                                                                       "--seed", str(seed))]
                for seed in (11, 22)]  # fmt: skip
    results = concurrently(*commands)
    winner = one_refused(results, ("is being written by process", "already holds a run"))
    seed = (11, 22)[winner]
    assert yaml.safe_load((out_dir / "final" / "hyperparameters.yaml").read_text())["seed"] == seed
    steps = sorted(out_dir.glob("step-*"))
    assert [d.name for d in steps] == ["step-000001", "step-000002", "step-000003"]
    for step in steps:
        state = torch.load(step / "training_state.pth", weights_only=True)
        assert state["run"]["seed"] == seed
        assert yaml.safe_load((step / "hyperparameters.yaml").read_text())["seed"] == seed
    assert not [p.name for p in out_dir.iterdir() if p.name.endswith((".partial", ".tmp", ".old"))]


def test_two_merges_into_one_out_dir_one_proceeds_and_the_result_is_its_alone(finetune_out, tmp_path):
    out_dir = tmp_path / "merged"
    sources = [finetune_out / "step-000020", finetune_out / "final" / ADAPTER_FILE]
    results = concurrently(*([sys.executable, "-m", "litgpt_ether", "merge", str(s), "--out_dir", str(out_dir)]
                             for s in sources))  # fmt: skip
    winner = one_refused(results, ("is being written by process", "is not empty"))
    expected = load_model(resolve(sources[winner], prefer_adapter=True))
    from litgpt_ether.ether import merge_ether

    merged = torch.load(out_dir / MODEL_FILE, weights_only=True)
    for key, value in merge_ether(expected).state_dict().items():
        torch.testing.assert_close(merged[key], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no partial or old directory beside it
    assert not [p.name for p in out_dir.iterdir() if p.name.endswith((".partial", ".tmp"))]


# --------------------------------------------------------------------------------------------------
# A full disk: a tmpfs of a chosen size, in a private mount namespace (``unshare``), where the test can make one

IN_TMPFS = """
import json, subprocess, sys
from pathlib import Path
mount, out, commands = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
setup = commands.pop(0)  # shell lines that fill the tmpfs first
subprocess.run(setup, shell=True, check=True)
results = []
for command in commands:
    done = subprocess.run([sys.executable, "-m", "litgpt_ether", *command], capture_output=True, text=True)
    results.append({"code": done.returncode, "stderr": done.stderr})
files = {str(p.relative_to(mount)): p.stat().st_size for p in sorted(mount.rglob("*")) if p.is_file()}
out.write_text(json.dumps({"results": results, "files": files}))
"""


def in_tmpfs(tmp_path: Path, size: int, setup: str, *commands: list[str]) -> dict:
    """Run ``litgpt_ether`` commands with a tmpfs of ``size`` bytes at ``tmp_path/disk`` (after the shell ``setup``);
    their exit codes and stderr, and every file left on the tmpfs with its size. Skipped where no tmpfs can be
    mounted (no ``unshare``, or user namespaces disallowed)."""
    mount, out = tmp_path / "disk", tmp_path / "in-tmpfs.json"
    mount.mkdir()
    unshare = shutil.which("unshare")
    probe = unshare and subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mount}"],
                                       capture_output=True)  # fmt: skip
    if not probe or probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (unshare -rm and mount -t tmpfs)")
    script = tmp_path / "in_tmpfs.py"
    script.write_text(IN_TMPFS)
    shell = f'mount -t tmpfs -o size={size} tmpfs "$1" && exec "$2" "$3" "$1" "$4" "$5"'
    args = json.dumps([setup, *commands])
    subprocess.run([unshare, "-rm", "sh", "-c", shell, "sh", str(mount), sys.executable, str(script), str(out), args],
                   check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    return json.loads(out.read_text())


def test_a_full_disk_is_one_line_naming_the_file_and_bytes_and_leaves_nothing_half_written(finetune_out, tmp_path):
    """``merge --out_dir`` onto a disk too small for the weights, and in place beside an adapter on a full disk: one
    line each, and the disk holds what it held before."""
    step = finetune_out / "step-000020"
    adapter_files = {p.name: p.stat().st_size for p in step.iterdir()}
    size = (sum(adapter_files.values()) // 4096 + len(adapter_files) + 8) * 4096  # the step dir and 8 pages more
    got = in_tmpfs(tmp_path, size, f"cp -r {step} {tmp_path / 'disk'}/step",
                   ["merge", str(step), "--out_dir", str(tmp_path / "disk" / "merged")],
                   ["merge", str(tmp_path / "disk" / "step")])  # fmt: skip
    for result in got["results"]:
        assert result["code"] == 1 and "Traceback" not in result["stderr"], result["stderr"][-3000:]
        last = result["stderr"].strip().splitlines()[-1]
        assert last.startswith("litgpt_ether: error: no space left for ") and "lit_model.pth': it needs about" in last
        assert "bytes and" in last and "nothing was written" in last
    assert got["files"] == {f"step/{name}": size for name, size in adapter_files.items()}


def test_a_finetune_that_fills_the_disk_stops_in_one_line_keeping_its_checkpoints(checkpoint_dir, dataset_path,
                                                                                 previous_run, tmp_path):  # fmt: skip
    """Room for the step checkpoints but not for the final merged weights: the run stops in one line, every step
    checkpoint intact (equal to those of the same run on a large disk) and no partial directory left."""
    pages = lambda d: sum(-(-p.stat().st_size // 4096) * 4096 for p in d.rglob("*") if p.is_file())  # noqa: E731
    steps = sum(pages(d) for d in previous_run.glob("step-*")) + pages(previous_run / "logs")
    size = steps + pages(previous_run / "final") // 2 + 4 * 4096
    out_dir = tmp_path / "disk" / "run"
    got = in_tmpfs(tmp_path, size, "true", finetune_args(checkpoint_dir, dataset_path, out_dir, *SHORT))
    (result,) = got["results"]
    assert result["code"] == 1 and "Traceback" not in result["stderr"], result["stderr"][-3000:]
    last = result["stderr"].strip().splitlines()[-1]
    assert last.startswith("litgpt_ether: error: no space left for ") and "final" in last, last
    left = {Path(name).parts[1] for name in got["files"]}
    assert left == {"step-000001", "step-000002", "step-000003", "logs"}, left
    for step in ("step-000001", "step-000002", "step-000003"):
        names = {Path(n).name for n in got["files"] if Path(n).parts[1] == step}
        assert names == {p.name for p in (previous_run / step).iterdir()}

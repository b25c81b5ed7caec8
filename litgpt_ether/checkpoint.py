"""Adapter files and checkpoint directories: the one place that reads, writes and resolves them.

An adapter file (``lit_model.pth.ether``) holds the ETHER tensors and the ETHER options; the base
model's own ``model_config.yaml`` and ``lit_model.pth`` supply the rest. Every verb that reads a
finetune output goes through ``resolve`` and ``load_model``, so merged and unmerged outputs behave
the same everywhere.
"""

import errno
import glob
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import litgpt.config
import litgpt.model
import torch
import yaml
from litgpt.prompts import PromptStyle, has_prompt_style, load_prompt_style
from litgpt.tokenizer import Tokenizer
from litgpt.utils import check_valid_checkpoint_dir, copy_config_files

from litgpt_ether.ether import GPT, Config, ConfigError, ether_filter, load_base_checkpoint, merge_ether

try:  # POSIX: the lock that keeps a second writer out of an output directory
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

ADAPTER_FILE = "lit_model.pth.ether"
MODEL_FILE = "lit_model.pth"
TRAINING_STATE_FILE = "training_state.pth"  # what ``finetune --resume`` needs beyond the adapter


# Every file the toolkit writes goes to a temporary name first and is renamed into place (``os.replace`` is
# atomic): a run killed during a save leaves the previous file or the new one, never a truncated one. Temporary names
# carry the writer's process id, so two writers never share one, and a killed writer's leftovers are recognised
# (their process is gone) and removed the next time their directory is written.

LOCK_FILE = ".litgpt_ether.lock"


class DirectoryBusy(ConfigError):
    """Another process is writing the output directory."""


@contextmanager
def exclusive(directory: Path, check: Callable[[], Any] | None = None) -> Iterator[Any]:
    """Hold an exclusive lock on ``directory`` (created if needed) while the block runs; refuse if another process
    holds it, naming that process.

    ``check`` (what the directory must be like to be written: no earlier results, no run in the way) runs before
    anything is created, and again once the lock is held, since another writer may have finished meanwhile; the
    block gets what that second call returns.

    An OS file lock (``flock``) dies with its process, so a crash or SIGKILL leaves no stale lock behind: the lock
    file stays (removing it would let two processes lock two files of one name) and holds its last holder's id.
    """
    check = check or (lambda: None)
    check()
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield check()
        return
    lock = directory / LOCK_FILE
    new_lock = not lock.exists()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise DirectoryBusy(
                f"{str(directory)!r} is being written by {holder}: wait for it to finish, or choose another output"
                " directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield check()
    except BaseException as err:
        if new_lock and not isinstance(err, DirectoryBusy):  # failed: the directory as it was before
            lock.unlink(missing_ok=True)
            if created and not any(directory.iterdir()):
                directory.rmdir()
        raise
    finally:
        os.close(fd)  # releases the lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def remove_leftovers(directory: Path, name: str, kinds: tuple[str, ...]) -> None:
    """Remove ``.<name>.<pid>.<kind>`` files and directories in ``directory`` whose process is gone (killed while
    it wrote), saying so in one line each. Another live process's are left alone."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.({'|'.join(kinds)})")
    for path in Path(directory).glob(f".{glob.escape(name)}.*"):
        match = pattern.fullmatch(path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        print(f"Removed {str(path)!r}, left by process {match.group(1)} (stopped while writing)", file=sys.stderr)


def _temporary(path: Path, kind: str) -> Path:
    """This process's temporary name for ``path``, once a dead process's leftovers of it are gone."""
    remove_leftovers(path.parent, path.name, (kind,))
    return path.with_name(f".{path.name}.{os.getpid()}.{kind}")


class DiskFull(ConfigError):
    """Not enough space for a file: said in one line, with nothing half-written left behind."""


def nbytes(obj: Any) -> int:
    """The bytes of the tensors in ``obj`` (nested in mappings and sequences): about what ``torch.save`` writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def check_free_space(path: Path, needed: int) -> None:
    """Refuse, before writing, a file of ``needed`` bytes at ``path`` that its file system has no room for."""
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise DiskFull(_no_space(path, needed, free))


def _no_space(path: Path, needed: int, free: int) -> str:
    return (f"no space left for {str(path)!r}: it needs about {needed:,} bytes and {free:,} are free; nothing was"
            " written (earlier files are intact): free some space or choose another directory")  # fmt: skip


def _write_atomic(path: Path, write: Callable[[Path], None], needed: int) -> None:
    """``write`` a temporary name beside ``path``, then rename it into place. The name is this process's own, so two
    writers never write into one file; a failed write (a full disk, an interrupt) removes it. ``needed`` (bytes,
    an estimate) is checked against the free space first."""
    check_free_space(path, needed)
    tmp = _temporary(path, "tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(_no_space(path, needed, shutil.disk_usage(path.parent).free)) from None
        raise


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a reader never sees a half-written file."""
    _write_atomic(path, lambda tmp: torch.save(obj, tmp), nbytes(obj))


def write_text_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), len(text.encode()))


def copy_config_files_atomic(source_dir: Path, out_dir: Path) -> None:
    """litgpt's ``copy_config_files`` (its list of config and tokenizer files), each renamed into place."""
    tmp = _temporary(out_dir / "config-files", "tmp")
    try:
        tmp.mkdir()
        copy_config_files(Path(source_dir), tmp)
        for file in tmp.iterdir():
            os.replace(file, out_dir / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A directory written under a temporary name and renamed to ``target`` once complete.

    A kill while writing leaves only ``.<name>.<pid>.partial``, which nothing loads and the next save into that
    directory removes.
    """
    tmp = _temporary(target, "partial")
    remove_leftovers(target.parent, target.name, ("old",))
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:  # a failed save leaves nothing behind (a killed one leaves the ``.partial``)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():  # replacing an older save: move it aside first, as rename cannot replace a directory
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


def save_adapter(path: Path, state_dict: dict[str, torch.Tensor], config: Config) -> None:
    """The ETHER tensors plus the ETHER options that rebuild the model around a base config."""
    atomic_save({"model": state_dict, "ether": config.ether_args()}, path)


def load_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's tensors and ETHER options, checked: a mapping of finite tensors under ETHER names, and options
    ``Config`` knows. A diverged or hand-edited adapter is refused here, by every verb alike."""
    try:
        adapter = torch.load(path, map_location="cpu", weights_only=True)
        state, ether_args = adapter["model"], adapter["ether"]
    except FileNotFoundError:
        raise ConfigError(f"adapter file {str(path)!r} does not exist") from None
    except Exception as err:
        raise ConfigError(f"{str(path)!r} is not a readable ETHER adapter ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not isinstance(ether_args, dict):
        raise ConfigError(f"{str(path)!r} is not an ETHER adapter (its 'model' and 'ether' entries must be mappings)")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConfigError(f"{str(path)!r} is not an ETHER adapter: {not_tensors[0]!r} is not a tensor")
    unknown = set(ether_args) - set(Config.ether_field_names())
    if unknown or not all(ether_filter(k, v) for k, v in state.items()):
        raise ConfigError(f"{str(path)!r} is not an ETHER adapter (unknown options {sorted(unknown)})")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConfigError(
            f"{str(path)!r} holds non-finite values (NaN or inf) in {bad[0]!r}: the run that saved it diverged;"
            " use an earlier checkpoint"
        )
    return state, ether_args


# --------------------------------------------------------------------------------------------------
# The files around the weights: each read through one function that names the file and what is wrong with it.


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a config, hyperparameters, a prompt style)."""
    try:
        value = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        detail = " ".join(str(err).split())[:200]
        raise ConfigError(f"{str(path)!r} is not readable YAML ({type(err).__name__}: {detail})") from None
    if not isinstance(value, dict):
        what = "is empty" if value is None else f"holds a {type(value).__name__}"
        raise ConfigError(f"{str(path)!r} {what}: expected a YAML mapping of names to values")
    return value


def read_model_config(path: Path, ether_args: dict[str, Any] | None = None) -> litgpt.config.Config:
    """``model_config.yaml`` as litgpt's ``Config``, or with ``ether_args`` as this package's ETHER ``Config``
    (litgpt's ``from_file``, its errors as one line)."""
    values = read_yaml_mapping(path)
    try:
        if ether_args is None:
            return litgpt.config.Config(**values)
        return Config(**{**values, **ether_args})
    except ConfigError:
        raise
    except Exception as err:
        detail = " ".join(str(err).split())[:200]
        raise ConfigError(f"{str(path)!r} is not a litgpt model config ({type(err).__name__}: {detail})") from None


def read_prompt_style(directory: Path, config: litgpt.config.Config) -> PromptStyle:
    """The prompt style saved with a checkpoint (``prompt_style.yaml``), else the one litgpt infers from its config."""
    return saved_prompt_style(directory) if has_prompt_style(directory) else PromptStyle.from_config(config)


def saved_prompt_style(directory: Path) -> PromptStyle:
    """``directory``'s ``prompt_style.yaml``: a mapping naming a litgpt ``PromptStyle`` class that loads."""
    path = Path(directory) / "prompt_style.yaml"
    if not isinstance(read_yaml_mapping(path).get("class_path"), str):
        raise ConfigError(f"{str(path)!r} names no class_path (such as litgpt.prompts.Alpaca)")
    try:
        style = load_prompt_style(Path(directory))
    except Exception as err:
        raise ConfigError(f"{str(path)!r} names no usable prompt style ({type(err).__name__}: {err})") from None
    if not isinstance(style, PromptStyle):
        raise ConfigError(f"{str(path)!r} names {type(style).__name__}, which is not a litgpt PromptStyle")
    return style


def load_tokenizer(directory: Path) -> Tokenizer:
    """litgpt's ``Tokenizer`` for a checkpoint directory, a corrupt or missing tokenizer file as one line."""
    try:
        return Tokenizer(Path(directory))
    except Exception as err:
        detail = " ".join(str(err).split())[:200]
        raise ConfigError(
            f"the tokenizer in {str(directory)!r} is not readable ({type(err).__name__}: {detail})"
        ) from None


@dataclass
class Resolved:
    """What a verb needs from a user-given path: where the files are, and whether an adapter must be applied."""

    files_dir: Path  # tokenizer, configs and prompt style live here
    base_dir: Path  # the checkpoint whose lit_model.pth supplies the frozen weights
    adapter: Path | None  # None: files_dir holds merged (or plain) weights
    loaded: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = field(default=None, repr=False, compare=False)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The adapter's tensors and ETHER options (``load_adapter``), read once (``resolve`` reads them first)."""
        if self.loaded is None:
            self.loaded = load_adapter(self.adapter)
        return self.loaded


def resolve(path: Path, base_checkpoint_dir: Path | None = None, prefer_adapter: bool = False) -> Resolved:
    """Accept a litgpt checkpoint dir, a finetune ``out_dir``, its ``final/`` or ``step-*`` dir, or an adapter file.

    Merged weights are used when present, unless ``prefer_adapter`` or ``path`` is the adapter file itself;
    otherwise the adapter is applied on the fly to the base checkpoint named in ``hyperparameters.yaml`` (or
    ``base_checkpoint_dir``).
    """
    path = Path(path)
    prefer_adapter = prefer_adapter or path.is_file()
    if path.is_dir() and not (path / MODEL_FILE).is_file() and not (path / ADAPTER_FILE).is_file():
        if (path / "final").is_dir():
            path = path / "final"
    adapter = path if path.is_file() else path / ADAPTER_FILE
    files_dir = adapter.parent
    if not adapter.is_file() or (not prefer_adapter and (files_dir / MODEL_FILE).is_file()):
        check_checkpoint_dir(files_dir)
        return Resolved(files_dir, files_dir, None)
    loaded = load_adapter(adapter)  # refused now, before the verb does anything else, if it is unusable
    if has_prompt_style(files_dir):
        saved_prompt_style(files_dir)
    base = Path(base_checkpoint_dir) if base_checkpoint_dir is not None else base_checkpoint_of(files_dir)
    check_checkpoint_dir(base)
    return Resolved(files_dir, base, adapter, loaded)


def check_checkpoint_dir(path: Path) -> None:
    """litgpt's check that ``path`` holds weights, model config and tokenizer, as a one-line ``ConfigError``; then
    that the config, the tokenizer and the prompt style (if saved) are readable, so no verb meets them broken later.
    """
    try:
        check_valid_checkpoint_dir(Path(path), verbose=False, raise_error=True)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    read_prompt_style(path, read_model_config(Path(path) / "model_config.yaml"))
    load_tokenizer(path)


def base_checkpoint_of(adapter_dir: Path) -> Path:
    hparams = adapter_dir / "hyperparameters.yaml"
    if not hparams.is_file():
        raise ConfigError(
            f"{str(adapter_dir)!r} has no hyperparameters.yaml naming its base model: pass --base_checkpoint_dir"
        )
    base = read_yaml_mapping(hparams).get("checkpoint_dir")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{str(hparams)!r} names no checkpoint_dir (the base model): pass --base_checkpoint_dir")
    base = Path(base)
    if not base.is_dir():
        raise ConfigError(
            f"the base model {str(base)!r} named in {str(hparams)!r} is not a directory here:"
            " pass --base_checkpoint_dir"
        )
    return base


def build_config(resolved: Resolved) -> tuple[litgpt.config.Config, dict[str, torch.Tensor] | None]:
    """The model config (an ETHER ``Config`` when an adapter applies) and the adapter tensors."""
    if resolved.adapter is None:
        return read_model_config(resolved.files_dir / "model_config.yaml"), None
    state, ether_args = resolved.load()
    return read_model_config(resolved.base_dir / "model_config.yaml", ether_args), state


def instantiate(config: litgpt.config.Config) -> litgpt.model.GPT:
    return GPT(config) if isinstance(config, Config) else litgpt.model.GPT(config)


def check_adapter_fits(model: litgpt.model.GPT, adapter_state: dict[str, torch.Tensor], resolved: Resolved) -> None:
    """Every ETHER tensor the model has, with the model's shape, and nothing else."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if ether_filter(k, v)}
    got = {k: tuple(v.shape) for k, v in adapter_state.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:2]
        raise ConfigError(
            f"adapter {str(resolved.adapter)!r} does not fit base model {str(resolved.base_dir)!r}"
            f" (first differing tensors: {diff})"
        )


def model_from_checkpoint(
    config: litgpt.config.Config, base_checkpoint: Path, adapter_state: dict[str, torch.Tensor] | None = None
) -> litgpt.model.GPT:
    """A model for inference, built on the meta device and filled with the base checkpoint's own (memory-mapped)
    tensors, strictly but for ETHER keys, then the adapter's, so a 7B model costs no fp32 copy in RAM; the caller
    moves it to its device and precision. Whether the adapter fits is the caller's to check (``check_adapter_fits``),
    with the file to name."""
    with torch.device("meta"):
        model = instantiate(config)
    load_base_checkpoint(model, base_checkpoint, assign=True)
    if adapter_state is not None:
        model.load_state_dict(adapter_state, strict=False, assign=True)
    model.cos, model.sin = model.rope_cache(device=torch.device("cpu"))  # non-persistent: not in the checkpoint
    return model.eval()


def load_model(resolved: Resolved) -> litgpt.model.GPT:
    """A model ready for inference: plain litgpt when merged, ETHER layers when not (``model_from_checkpoint``)."""
    config, adapter_state = build_config(resolved)
    if adapter_state is not None:
        with torch.device("meta"):
            check_adapter_fits(instantiate(config), adapter_state, resolved)
    return model_from_checkpoint(config, resolved.base_dir / MODEL_FILE, adapter_state)


def merge_adapter(resolved: Resolved, out_dir: Path) -> Path:
    """Write a standard litgpt checkpoint dir: ``H_out W H_in`` (fp32 math, base dtype) and everything around it.

    Validates everything before writing, and writes the weights atomically: a failed merge leaves nothing.
    """
    assert resolved.adapter is not None
    merged = merge_ether(load_model(resolved)).state_dict()
    bad = [k for k, v in merged.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConfigError(f"merging {str(resolved.adapter)!r} gives non-finite weights in {bad[:3]}; nothing written")

    out_dir.mkdir(parents=True, exist_ok=True)
    check_free_space(out_dir / MODEL_FILE, nbytes(merged))  # before the small files: nothing written if it fails
    copy_config_files_atomic(resolved.base_dir, out_dir)
    for name in ("prompt_style.yaml", "hyperparameters.yaml"):
        if (resolved.files_dir / name).is_file() and resolved.files_dir != out_dir:
            write_text_atomic((resolved.files_dir / name).read_text(encoding="utf-8"), out_dir / name)
    atomic_save(merged, out_dir / MODEL_FILE)
    return out_dir / MODEL_FILE

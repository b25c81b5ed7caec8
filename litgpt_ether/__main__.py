"""The ``litgpt_ether`` command line: one subcommand per verb, parsed by jsonargparse as litgpt does."""

import errno
import inspect
import json
import os
import re
import sys
import typing
import warnings
from argparse import ArgumentError
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser
from litgpt.utils import CLI

from litgpt_ether.chat import main as chat_fn
from litgpt_ether.checks import ConfigError
from litgpt_ether.evaluate import evaluate as evaluate_fn
from litgpt_ether.export import export as export_fn
from litgpt_ether.finetune import Interrupted, NonFiniteLossError
from litgpt_ether.finetune import setup as finetune_fn
from litgpt_ether.generate import main as generate_fn
from litgpt_ether.inspect import inspect as inspect_fn
from litgpt_ether.merge import merge as merge_fn
from litgpt_ether.serve import main as serve_fn

COMMANDS = {
    "finetune": finetune_fn,
    "merge": merge_fn,
    "generate": generate_fn,
    "chat": chat_fn,
    "evaluate": evaluate_fn,
    "inspect": inspect_fn,
    "serve": serve_fn,
    "export": export_fn,
}


# Errors that are the user's to fix: one line on stderr, no traceback (unless LITGPT_ETHER_DEBUG is set)
USER_ERRORS = (ConfigError, ArgumentError, NonFiniteLossError)


class Parser(ArgumentParser):
    """jsonargparse's parser, with a class that refuses its arguments (``--data JSON --data.json_path missing``)
    reported as a user error instead of a traceback."""

    def instantiate_classes(self, cfg, **kwargs):
        try:
            return super().instantiate_classes(cfg, **kwargs)
        except ConfigError:
            raise
        except (ValueError, TypeError, OSError) as err:
            raise ConfigError(explain(str(err), [])) from err


def debug() -> bool:
    """``LITGPT_ETHER_DEBUG=1``: errors keep their traceback."""
    return os.environ.get("LITGPT_ETHER_DEBUG", "").lower() not in ("", "0", "false", "no")


def reset_before_whole_optimizer(args: list[str]) -> list[str]:
    """Put a plain optimizer name before each ``--optimizer '{"class_path": ...}'`` and ``--optimizer.class_path``.

    jsonargparse 4.41 crashes (``'dict' object has no attribute 'init_args'``) when either replaces a config's
    dict optimizer; after a plain name it has no dict to merge into. The last value still wins, and a new
    ``class_path`` starts from that class's defaults (jsonargparse drops the old ``init_args`` when the class
    changes).
    """
    out: list[str] = []
    for arg in args:
        after_flag = bool(out) and out[-1] == "--optimizer"
        whole = arg if after_flag else arg.partition("=")[2] if arg.startswith("--optimizer=") else None
        if (whole is not None and _is_class_spec(whole)) or arg.partition("=")[0] == "--optimizer.class_path":
            at = len(out) - 1 if after_flag else len(out)  # before the flag
            out[at:at] = ["--optimizer", "AdamW"]
        out.append(arg)
    return out


def adapters_as_list(args: list[str]) -> list[str]:
    """``serve --adapters a=x b=y`` (as the README writes it) to the one list value jsonargparse parses.

    Every word after ``--adapters`` up to the next option is an adapter; ``--adapters '[a=x, b=y]'`` and a list in a
    config file work as they are.
    """
    if not args or args[0] != "serve" or "--adapters" not in args:
        return args
    at = args.index("--adapters")
    end = next((i for i in range(at + 1, len(args)) if args[i].startswith("--")), len(args))
    words = args[at + 1 : end]
    if len(words) == 1 and words[0].lstrip().startswith("["):
        return args
    return [*args[: at + 1], json.dumps(words), *args[end:]]


def configs_first(args: list[str]) -> list[str]:
    """Move every ``--config FILE`` of a verb to just after the verb's name, so what is typed beside it wins.

    jsonargparse applies arguments in order: ``finetune /my/model --config preset.yaml`` would otherwise train the
    preset's ``checkpoint_dir`` instead of the model typed, without a word. Config files keep their order.
    """
    if not args or args[0].startswith("-"):
        return args
    verb, rest, configs, others = args[0], args[1:], [], []
    i = 0
    while i < len(rest):
        if rest[i] == "--config" and i + 1 < len(rest):
            configs += rest[i : i + 2]
            i += 2
            continue
        (configs if rest[i].startswith("--config=") else others).append(rest[i])
        i += 1
    return [verb, *configs, *others]


def check_config_files(args: list[str]) -> None:
    """Every ``--config FILE``: readable UTF-8 YAML holding a mapping, refused in one line naming it (jsonargparse
    stops with a ``UnicodeDecodeError`` traceback on a binary file). A ``--config`` that is not a file is
    jsonargparse's to read (it takes inline YAML too)."""
    given = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    given += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for name in given:
        path = Path(name)
        if not path.is_file():
            continue
        try:
            value = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            detail = " ".join(str(err).split())[:160]
            raise ConfigError(f"--config {name!r} is not a YAML text file ({type(err).__name__}: {detail})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"--config {name!r} must hold a YAML mapping of options, got {type(value).__name__}")


def explain(message: str, args: list[str]) -> str:
    """jsonargparse's message in one line a user can act on.

    A value outside a ``Literal`` is "Cannot take a Union of no types": the choices are spelled out instead. A
    value no member of a ``Union`` takes lists every member's complaint and dumps the value parsed: only the
    complaints that are not "Expected a <class 'NoneType'>" are kept.
    """
    key = re.match(r'Parser key "([\w.]+)":', message.strip())
    name = key.group(1) if key else None
    if name and "Cannot take a Union of no types" in message and args and args[0] in COMMANDS:
        parameter = inspect.signature(COMMANDS[args[0]]).parameters.get(name)
        members = typing.get_args(parameter.annotation) if parameter is not None else ()  # Literal, Literal | None
        choices = [c for m in members for c in (typing.get_args(m) or (m,)) if isinstance(c, str)]
        if choices:
            given = next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)
            given = given or next((args[i + 1] for i, a in enumerate(args[:-1]) if a == f"--{name}"), None)
            got = f", got {given!r}" if given is not None else ""
            return f"--{name} must be one of {', '.join(map(repr, choices))}{got}"
    if "Does not validate against any of the Union subtypes" in message:
        lines = [line.strip() for line in message.splitlines()]
        errors = [line[2:] for line in lines if line.startswith("- ") and "<class 'NoneType'>" not in line]
        given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), "")
        got = f", got {given!r}" if given and not given.startswith("Namespace(") else ""
        return f"{'--' + name + ': ' if name else ''}{'; '.join(errors)}{got}"
    return " ".join(message.split())


def _is_class_spec(value: str) -> bool:
    try:
        spec = yaml.safe_load(value)
    except yaml.YAMLError:
        return False
    return isinstance(spec, dict) and "class_path" in spec


def main() -> None:
    # PyTorch bug that raises a false-positive warning (as silenced by litgpt's own CLI)
    warnings.filterwarnings(
        "ignore", message=r"The epoch parameter in `scheduler.step\(\)` was not necessary", category=UserWarning
    )
    torch.set_float32_matmul_precision("high")
    # in place: finetune re-parses sys.argv to save its hyperparameters
    sys.argv[1:] = reset_before_whole_optimizer(configs_first(adapters_as_list(sys.argv[1:])))
    try:
        check_config_files(sys.argv[1:])
        # exit_on_error=False: jsonargparse raises instead of printing its usage block and exiting
        CLI(COMMANDS, exit_on_error=False, parser_class=Parser)
    except USER_ERRORS as err:
        if debug():
            raise
        print(f"litgpt_ether: error: {' '.join(explain(str(err), sys.argv[1:]).split())}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ArgumentError) else 1)
    except OSError as err:
        if debug() or err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {err.filename!r}" if err.filename else ""
        print(f"litgpt_ether: error: no space left on the device{where}: free some space and run it again (files"
              " written before are intact)", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    except (Interrupted, KeyboardInterrupt) as err:  # Ctrl-C: 128 + SIGINT, as a shell reports it
        if debug():
            raise
        print(f"litgpt_ether: {err or 'interrupted'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

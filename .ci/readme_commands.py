"""Print the shell commands of the README's code blocks marked for CI, so that CI runs what the README says.

A region ``<!-- ci:NAME -->`` ... ``<!-- /ci:NAME -->`` holds fenced code blocks; ``python .ci/readme_commands.py
NAME`` prints their commands in order, one per line (backslash continuations joined, comment and blank lines
dropped; several regions of the same name are concatenated). Standard library only: it runs before any virtual
environment exists. An unknown or empty region is an error, so a README edit that drops a marker turns CI red
instead of silently testing nothing.
"""

import re
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def blocks(name: str, text: str, prefix: str = "ci") -> list[tuple[str, str]]:
    """The fenced code blocks, as (language, body), inside the regions marked ``PREFIX:NAME``, in order."""
    marker = re.escape(f"{prefix}:{name}")
    regions = re.findall(rf"<!-- {marker} -->(.*?)<!-- /{marker} -->", text, flags=re.S)
    return [block for region in regions for block in re.findall(r"```([a-z]*)\n(.*?)```", region, flags=re.S)]


def command_lines(script: str) -> list[str]:
    """A shell block's commands, one per line: backslash continuations joined, comment and blank lines dropped."""
    joined = script.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def commands(name: str, text: str) -> list[str]:
    """The commands of every fenced block inside the regions marked ``ci:NAME``."""
    found = command_lines("\n".join(body for _, body in blocks(name, text)))
    if not found:
        raise SystemExit(f"README.md has no commands marked <!-- ci:{name} -->")
    return found


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python .ci/readme_commands.py NAME")
    print("\n".join(commands(sys.argv[1], README.read_text())))

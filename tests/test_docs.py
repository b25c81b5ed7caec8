"""The docs hold together: every link and every path they name resolves, every page is one click from the README, and
every block marked ``<!-- run:demo -->`` runs on the demo's output (as CI runs the README's ``ci:`` blocks)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / ".ci"))
from readme_commands import blocks, command_lines, commands  # noqa: E402

README = ROOT / "README.md"
PRESETS = ROOT / "config_hub" / "finetune"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SKIP = {".git", ".venv", "out", "build", "checkpoints", "__pycache__"}


def sources() -> list[Path]:
    """What the repository holds, not what a run, a venv or a build leaves in it: its text files."""
    found = []
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in SKIP and not d.endswith(".egg-info")]
        found += [Path(directory) / f for f in files if f.endswith((".py", ".md", ".yaml", ".sh", ".toml", "run"))]
    return found


PATH = r"(?:docs|config_hub|scripts|tests|litgpt_ether|demo|\.ci)/[\w./*{},-]*[\w*}]"


def prose(text: str) -> str:
    """A page without its fenced code blocks: what renders as headings and links."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def slugs(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: rendered text, lower case, punctuation dropped, spaces to hyphens,
    a repeated heading numbered."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(text), flags=re.M):
        rendered = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
        slug = re.sub(r"[^\w\- ]", "", rendered.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def expand(path: str) -> list[str]:
    """``a/{b,c}.yaml`` to ``a/b.yaml`` and ``a/c.yaml``."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [q for part in match[1].split(",") for q in expand(path[: match.start()] + part + path[match.end() :])]


def exists(path: str) -> bool:
    """From the repository's root, or from ``config_hub/finetune/``: presets go by short names (``demo/ether.yaml``)."""
    return any(any(base.glob(path)) if "*" in path else (base / path).exists() for base in (ROOT, PRESETS))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    text = page.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", prose(text))
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link}"
        if anchor:
            assert path.suffix == ".md" and anchor in slugs(path.read_text()), f"{page.name}: {link}"


def test_every_named_path_resolves():
    """Paths named in the docs (``config_hub/...``, ``tests/x.py::test_y`` ...), and ``docs/`` paths named anywhere."""
    named = {(page, p) for page in PAGES for p in re.findall(rf"(?<![\w./-]){PATH}", page.read_text())}
    # in code, braces are f-strings, not alternatives
    named |= {(s, p) for s in sources() for p in re.findall(r"(?<![\w./-])docs/[\w./*-]*[\w*]", s.read_text())}
    assert len(named) > 50
    missing = {(src.relative_to(ROOT).as_posix(), p) for src, p in named if not all(map(exists, expand(p)))}
    assert not missing, sorted(missing)
    for page in PAGES:  # a test named as tests/x.py::name, or ::name after it on the same line
        for line in page.read_text().splitlines():
            test_file = None
            for file, name in re.findall(r"(tests/\w+\.py)?::(\w+)", line):
                test_file = file or test_file
                assert test_file and f"def {name}(" in (ROOT / test_file).read_text(), f"{page.name}: {file}::{name}"


def test_every_docs_page_is_one_click_from_the_readme():
    text = README.read_text()
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in text, page.name


def runnable(page: Path) -> list[tuple[str, str]]:
    return blocks("demo", page.read_text(), prefix="run")


RUNNABLE = [page for page in PAGES[1:] if runnable(page)]


def test_what_the_docs_show_on_the_demo_is_run():
    """A command on the demo's output shown in a docs page runs here or in CI, unless it needs a running server."""
    assert {p.name for p in RUNNABLE} >= {"after-tuning.md", "evaluate.md", "python-api.md"}
    run = set(commands("after-demo", README.read_text())) | set(commands("demo", README.read_text()))
    for page in RUNNABLE:
        run |= {c for lang, body in runnable(page) if lang == "bash" for c in command_lines(body)}
    for page in PAGES[1:]:
        for body in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for command in command_lines(body):
                if "out/finetune/demo-" in command and not command.startswith(("litgpt_ether serve", "lm_eval")):
                    assert command in run, f"{page.name}: {command}"
    for page in RUNNABLE:
        assert all(lang in ("bash", "python") for lang, _ in runnable(page)), page.name
        assert not any("pip install" in body for _, body in runnable(page)), page.name  # the suite's venv is set


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.name)
def test_runnable_blocks_run_on_the_demo(page, demo_run):
    """Each page's blocks in order, from a directory holding the demo and a short run of its ETHER+ preset."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for lang, body in runnable(page):
        steps = [["bash", "-euo", "pipefail", "-c", c] for c in command_lines(body)] if lang == "bash" else [
            [sys.executable, "-c", body]]  # fmt: skip
        for step in steps:
            result = subprocess.run(step, cwd=demo_run, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{page.name}: {step[-1]}\n{result.stderr[-3000:]}"

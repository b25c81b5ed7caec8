"""The README's commands are what CI runs: the marked regions exist, and every demo command is among them."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / ".ci"))
from readme_commands import commands  # noqa: E402

README = (ROOT / "README.md").read_text()


def test_the_demo_needs_only_the_base_install_and_the_tests_every_extra():
    (demo,) = commands("demo", README)
    (test,) = commands("test", README)
    # the demo needs nothing beyond the base install; the tests install every extra
    assert "pip install torch==2.13.0 && pip install -e . &&" in demo and "litgpt_ether finetune --config" in demo
    assert 'pip install -e ".[all]"' in test and "pip check" in test and "pytest" in test
    assert "ruff format --check ." in test and "ruff check ." in test


def test_every_demo_command_the_readme_shows_is_run_by_ci():
    """A command on the demo's output shown anywhere in the README but outside a ci region would go untested.

    ``litgpt_ether serve`` runs until stopped, so CI cannot run it in line: tests/test_serve.py starts the same verb
    on adapters of every kind and talks to it over HTTP."""
    ci = set(commands("after-demo", README)) | set(commands("demo", README))
    shown = {line.strip() for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
             for line in block.replace("\\\n", " ").splitlines()
             if "out/finetune/demo-" in line and not line.lstrip().startswith(("#", "litgpt_ether serve"))}  # fmt: skip
    assert shown and shown <= ci, shown - ci
    verbs = {" ".join(c.split()[:2]) for c in ci}
    expected = {f"litgpt_ether {v}" for v in ["chat", "generate", "merge", "evaluate", "inspect", "export"]}
    assert expected | {"litgpt generate"} <= verbs, verbs


def test_a_command_that_needs_an_extra_installs_it_first():
    after = commands("after-demo", README)
    evaluate = next(i for i, c in enumerate(after) if c.startswith("litgpt_ether evaluate"))
    assert 'pip install -e ".[eval]"' in after[:evaluate]


@pytest.mark.parametrize("name", ["nothing-marked", "demo"])
def test_a_missing_or_empty_region_is_an_error(name):
    text = "<!-- ci:demo -->\n```bash\n# only a comment\n```\n<!-- /ci:demo -->\n"
    with pytest.raises(SystemExit, match=f"no commands marked <!-- ci:{name} -->"):
        commands(name, text)


def test_continuations_are_joined_and_comments_dropped():
    text = "<!-- ci:x -->\n```bash\n# a comment\nlitgpt_ether finetune a \\\n  --b c\n\necho hi\n```\n<!-- /ci:x -->\n"
    assert commands("x", text) == ["litgpt_ether finetune a    --b c", "echo hi"]

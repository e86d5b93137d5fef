"""The guides' commands are commands mmllm takes: every `mmllm …` line in a shell block of the README
and docs/ parses with the real CLI parser (options, subcommands, overrides), and every relative link
points at a file that exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mmllm.cli import _parse

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_commands(page: Path) -> list[str]:
    """`mmllm …` commands of the page's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("mmllm ") and "--help" not in part:
                    commands.append(part)
    return commands


CASES = [(page.name, command) for page in PAGES for command in shell_commands(page)]


def test_the_guides_have_commands():
    assert {name for name, _ in CASES} >= {"README.md", "training.md", "api.md", "deploy.md"}


@pytest.mark.parametrize(("page", "command"), CASES, ids=[f"{p}:{c[:60]}" for p, c in CASES])
def test_every_documented_command_parses(page, command):
    argv = shlex.split(command)[1:]
    _parse(argv)  # argparse exits (SystemExit 2) on an unknown option or command


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_point_at_files(page):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if not target.startswith(("http://", "https://", "mailto:")):
            assert (page.parent / target).exists(), f"{page.name}: {target}"

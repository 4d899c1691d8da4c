"""The README and docs/: links resolve, the manual stays short, its Quick start and key table stay true.

Plain text checks, no model and no network: every relative link in README.md and docs/*.md points at
an existing file (and heading, for `#anchor` links), the README is at most 400 lines, its Quick
start holds the two commands CI runs, its configuration table has one row per key of
`[tool.flwr.app.config]` with pyproject.toml's default, and no machine's absolute paths appear.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 400

_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_INLINE_CODE = re.compile(r"`[^`]*`")
# Folders only a particular machine has: a checkout, scratch space, home folders.
_MACHINE_PATH = re.compile(r"(?<![\w<>.~-])/(?:work|tmp|home|Users|root)/")


def _prose_lines(text: str) -> list[str]:
    """Return the lines outside fenced code blocks (code there is not markdown)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """Return GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = _INLINE_CODE.sub(lambda match: match.group(0).strip("`"), heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Return the anchors of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = _slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    """Return the page's link targets that are not web addresses (inline code left out)."""
    targets = []
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        for target in _LINK.findall(_INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                targets.append(target)
    return targets


def _section(text: str, title: str) -> str:
    """Return the text of the `## title` section, up to the next heading of level 2."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _table_cells(section: str) -> dict[str, str]:
    """Return key -> default cell of a `| `key` | default | meaning |` table."""
    rows = {}
    for line in section.splitlines():
        match = re.match(r"^\| `([^`]+)` \| `([^|]*)` \|", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_docs_exist_and_the_readme_links_every_one():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in relative_links(README)}
    assert DOCS, "docs/ has no pages"
    assert [page.name for page in DOCS if page.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_relative_links_point_at_existing_files_and_headings(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with anchor '#{anchor}' in {destination.name}")
    assert broken == []


def test_readme_is_a_short_manual():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move depth into docs/"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_no_absolute_paths_of_a_machine(page):
    hits = [f"{number}: {line.strip()}" for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
            if _MACHINE_PATH.search(line)]
    assert hits == [], "write <checkout>/, results/..., ~/.flwr instead"


def test_quick_start_holds_the_two_commands_ci_runs():
    section = _section(README.read_text(encoding="utf-8"), "Quick start")
    block = re.search(r"```\w*\n(.*?)```", section, flags=re.S)
    assert block, "Quick start has no code block"
    commands = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["scripts/quickstart.sh", ".venv/bin/python -m pytest"]
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "scripts/quickstart.sh install" in ci
    assert ".venv/bin/python -m pytest" in ci


def test_configuration_table_has_every_key_with_its_default():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    defaults = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    table = _table_cells(_section(README.read_text(encoding="utf-8"), "Configuration"))
    assert sorted(set(defaults) - set(table)) == [], "keys missing from the README's table"
    assert sorted(set(table) - set(defaults)) == [], "README rows for keys pyproject.toml does not have"
    def same(cell: str, default: object) -> bool:
        value = tomllib.loads(f"v = {cell}")["v"]
        return type(value) is type(default) and value == default

    wrong = {key: cell for key, cell in table.items() if not same(cell, defaults[key])}
    assert wrong == {}, f"defaults differ from pyproject.toml: {wrong}"

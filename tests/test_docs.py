"""The methods reference (docs/methods) stays complete and every reference to it resolves.

Every registered public method has a page with the required sections and its picture, the
README's method table links it, and every ``docs/methods/<page>.md#<section>`` written in the
package or the tests names an existing page and heading; method code and tests cite these pages,
never the internal specs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import vlprune

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "methods"
SECTIONS = ("Algorithm", "Differences from the official code", "Ties and precision",
            "What it keeps")
REFERENCE = re.compile(r"docs/methods/([\w.-]+\.md)(?:#([\w-]+))?")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in page.read_text().splitlines()
            if line.startswith("#")}


def _sources() -> list[Path]:
    return sorted([*(ROOT / "vlprune").rglob("*.py"), *(ROOT / "tests").rglob("*.py")])


@pytest.mark.parametrize("method", vlprune.list_methods())
def test_every_method_has_its_page(method):
    page = DOCS / f"{method}.md"
    assert page.is_file(), f"no methods page for {method!r}"
    headings = {line.lstrip("#").strip() for line in page.read_text().splitlines()
                if line.startswith("## ")}
    assert set(SECTIONS) <= headings
    assert f"img/toy_{method}.png" in page.read_text()
    assert (DOCS / "img" / f"toy_{method}.png").is_file()
    assert f"(docs/methods/{method}.md)" in (ROOT / "README.md").read_text()


def test_references_to_the_pages_resolve():
    found = 0
    for source in _sources():
        for page, anchor in REFERENCE.findall(source.read_text()):
            found += 1
            where = f"{source.relative_to(ROOT)}: docs/methods/{page}#{anchor}"
            assert (DOCS / page).is_file(), where
            assert not anchor or anchor in _anchors(DOCS / page), where
    assert found > 20


def test_relative_links_between_pages_resolve():
    for page in DOCS.glob("*.md"):
        for target, anchor in re.findall(r"\]\(([\w./-]+\.md)(?:#([\w-]+))?\)", page.read_text()):
            path = (page.parent / target).resolve()
            assert path.is_file(), f"{page.name} -> {target}"
            assert not anchor or anchor in _anchors(path), f"{page.name} -> {target}#{anchor}"


def test_method_code_and_tests_cite_the_pages_not_the_specs():
    for path in [*(ROOT / "vlprune" / "methods").glob("*.py"),
                 *(ROOT / "tests" / "methods").glob("*.py")]:
        text = path.read_text()
        assert "specs/" not in text and "spec §" not in text, path.name

"""README, CHANGELOG and docs/: every relative link and anchor leads somewhere, and the README stays short."""

import re
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", REPO_ROOT / "CHANGELOG.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _outside_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _outside_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are examples, not links)."""
    return re.sub(r"`[^`\n]*`", "", _outside_fences(text))


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", _outside_fences(page.read_text(encoding="utf-8")), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(_outside_code(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor} in {linked.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_link_check_catches_a_missing_page_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Run `a.py --flag`\n\n[ok](#title) [gone](missing.md) [bad](#nowhere) `[x](y.md)`\n"
                    "```\n# not a heading\n[in code](ignored.md)\n```\n")
    targets = LINK.findall(_outside_code(page.read_text()))
    assert targets == ["#title", "missing.md", "#nowhere"]
    assert _anchors(page) == {"title", "run-apy---flag"}


def test_the_readme_fits_on_a_few_screens_and_links_every_docs_page():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150, "README.md is the front page: reference material belongs in docs/"
    linked = {Path(target).name for target in LINK.findall(readme) if target.startswith("docs/")}
    pages = {page.name for page in (REPO_ROOT / "docs").glob("*.md")}
    # ablation.md and data_efficiency.md are written by examples/ablation.py and shown in research.md
    assert pages - linked == {"ablation.md", "data_efficiency.md"}, sorted(pages - linked)

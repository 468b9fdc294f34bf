"""The documentation stays short, its links resolve, and the results summary matches the committed JSON."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import summary

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), summary.OUT]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _prose(path: Path) -> str:
    """The markdown of ``path`` without its fenced code blocks."""
    return FENCE.sub("", path.read_text())


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path``."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.+)$", _prose(path), re.M)}


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 160


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    for target in LINK.findall(_prose(doc)):
        if re.match(r"[a-z]+:", target):  # https:, mailto: …
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        assert dest.exists(), f"{doc.relative_to(ROOT)}: {target} does not exist"
        if anchor:
            assert anchor in _anchors(dest), f"{doc.relative_to(ROOT)}: {target} names no heading"


def test_benchmarks_readme_is_what_summary_writes():
    assert summary.OUT.read_text() == summary.render(), "stale: run python -m benchmarks.summary"

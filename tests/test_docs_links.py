"""Every relative link in README.md, CONTRIBUTING.md, benchmarks/README.md and docs/*.md points
at a file that exists, and a link's #anchor at a heading of the page it names (GitHub's rule
for heading anchors). Web links are not fetched."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def pages() -> list[Path]:
    found = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md"]
    found += sorted((ROOT / "docs").glob("*.md"))
    return [p for p in found if p.exists()]


def links(text: str) -> list[str]:
    text = FENCE.sub("", text)                   # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)        # nor does inline code
    return LINK.findall(text)


def anchor(heading: str) -> str:
    """GitHub's slug: lower case, punctuation dropped (hyphens and underscores kept), spaces to -."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        a = anchor(m.group(1))
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return out


def broken(page: Path) -> list[str]:
    bad = []
    for target in links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):      # http:, https:, mailto:
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{page.relative_to(ROOT)}: {target} (no heading #{frag} in {dest.name})")
    return bad


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken(page) == []


def test_the_check_catches_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Memory budget, streamed checkpoints\n\ntext\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#memory-budget-streamed-checkpoints) ![img](docs/none.png)\n"
                    "[bad anchor](docs/a.md#memory) `[not a link](nowhere.md)`\n"
                    "```\n[in code](nowhere.md)\n```\n[web](https://example.com/x)\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert broken(page) == ["README.md: docs/none.png (no such file)",
                                "README.md: docs/a.md#memory (no heading #memory in a.md)"]
    finally:
        ROOT = old

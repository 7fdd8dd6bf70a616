"""The README and docs/: the README stays short, and every relative link and anchor leads somewhere."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens (outside code blocks)."""
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())
    out = set()
    for heading in re.findall(r"(?m)^#{1,6} (.+)$", text):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text()) <= 8_000


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(doc):
    text = re.sub(r"(?ms)^```.*?^```", "", doc.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{doc.name}: {broken}"


def test_the_docs_are_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert all(f"docs/{d.name}" in readme for d in DOCS[1:])

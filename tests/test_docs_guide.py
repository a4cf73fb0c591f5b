"""The user guide's snippets run: each page's ``python`` blocks after the set-up of its index."""

import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
PAGES = sorted(
    p.stem for p in GUIDE.glob("*.md") if p.stem != "index" and BLOCK.search(p.read_text())
)


def test_guide_has_pages_with_snippets():
    assert len(PAGES) >= 6


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("page", PAGES)
def test_guide_snippets_run(page, capsys):
    setup = BLOCK.findall((GUIDE / "index.md").read_text())[0]
    blocks = BLOCK.findall((GUIDE / f"{page}.md").read_text())
    exec(compile(setup + "\n".join(blocks), f"docs/guide/{page}.md", "exec"), {})


def test_landing_page_snippet_runs(capsys):
    (block,) = BLOCK.findall((GUIDE.parent / "index.md").read_text())
    exec(compile(block, "docs/index.md", "exec"), {})

"""Every public name of ``secondorder.__all__`` has an entry in the API reference (docs/api/)."""

import importlib
import re
from pathlib import Path

import pytest

import secondorder

API = Path(__file__).resolve().parent.parent / "docs" / "api"
PUBLIC = sorted(name for name in secondorder.__all__ if not name.startswith("__"))


def _documented() -> set[str]:
    """Names listed in an ``autosummary`` block or an ``auto*`` directive of the API pages."""
    names: set[str] = set()
    for page in sorted(API.glob("*.rst")) + sorted(API.glob("*.md")):
        in_summary = False
        for line in page.read_text().splitlines():
            directive = re.match(r"\s*\.\. (\w+)::\s*(\S*)", line)
            if directive:
                kind, arg = directive.groups()
                in_summary = kind == "autosummary"
                if kind.startswith("auto") and arg:
                    names.add(arg.removeprefix("secondorder."))
                continue
            if in_summary:
                entry = re.fullmatch(r"\s+([A-Za-z_][\w.]*)\s*", line)
                if entry:
                    names.add(entry.group(1).removeprefix("secondorder."))
                elif line.strip() and not line.lstrip().startswith(":"):
                    in_summary = False
    return names


def test_api_pages_exist():
    assert (API / "index.rst").is_file()
    assert len(list(API.glob("*.rst"))) >= 4


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_in_api_reference(name):
    assert name in _documented(), f"secondorder.{name} is missing from the pages in {API}"


def _exists(name: str) -> bool:
    """``name`` is a public name of secondorder or a dotted path below it."""
    module, _, attr = name.rpartition(".")
    if not module:
        return hasattr(secondorder, name)
    try:
        return hasattr(importlib.import_module(f"secondorder.{module}"), attr)
    except ImportError:
        return False


def test_api_reference_names_exist():
    missing = sorted(n for n in _documented() if not _exists(n))
    assert not missing, f"the API reference lists names that secondorder lacks: {missing}"

"""Cases of the conformance matrix that fail on the current code, by cause (issue 13 items).

A key is a pattern of test ids ``{op}-{model}-{loss}-{split}``: four fields separated
by ``-``, each ``*`` (any value) or alternatives separated by ``|``. Every matching test runs as
``pytest.mark.xfail(strict=True)``, so when a fix lands its tests XPASS and fail: then delete
the entry (or the fixed alternatives). A test gets the reason of the most specific matching
entry (fewest ``*``). Each reason names the issue item, the cause, and the
relative error measured against the dense reference (or what the library raises). A test that
fails for two causes is listed under the first one checked.
"""

from __future__ import annotations

KNOWN_FAILURES: dict[str, str] = {}


def matches(pattern: str, test_id: str) -> bool:
    """Whether ``test_id`` matches ``pattern`` (module docstring)."""
    fields, values = pattern.split("-"), test_id.split("-")
    assert len(fields) == len(values) == 4, (pattern, test_id)
    return all(f == "*" or v in f.split("|") for f, v in zip(fields, values))


def known_failure(test_id: str) -> str | None:
    """The reason of the most specific entry (fewest ``*``) matching ``test_id``, or None."""
    found = [(pat.count("*"), why) for pat, why in KNOWN_FAILURES.items() if matches(pat, test_id)]
    return min(found, key=lambda x: x[0])[1] if found else None

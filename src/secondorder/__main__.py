"""``python -m secondorder``: the same as the ``secondorder`` command."""

from __future__ import annotations

from secondorder.experiments.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

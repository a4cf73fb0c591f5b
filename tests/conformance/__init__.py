"""The conformance matrix (``test_matrix.py``) and the checks of its dense references.

``tests/reference.py`` is loaded here under a name of its own (``tests_reference``), so that it
cannot be confused with the module ``reference`` of ``tests/curvature`` on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _load_reference() -> ModuleType:
    name = "tests_reference"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "reference.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


reference = _load_reference()

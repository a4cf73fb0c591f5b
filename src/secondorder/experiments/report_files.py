"""Files of experiment runs: JSON that always parses, atomic writes, the environment.

* :func:`to_jsonable` / :func:`write_json` -- tensors and NumPy values become numbers and lists,
  non-finite floats (NaN, ±inf) become ``null``.
* :func:`write_atomically` -- every file is written into a temporary file in the same
  directory, then renamed over the destination with ``os.replace``, so a reader (or a run that
  fails half-way) never sees a half-written file; :func:`write_markdown` uses it for text.
* :func:`environment_info` -- library versions and hardware of a run.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import platform
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "environment_info",
    "to_jsonable",
    "write_atomically",
    "write_json",
    "write_markdown",
]


# ------------------------------------------------------------------------------------ JSON
def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` recursively into plain JSON types.

    Tensors and NumPy arrays become (nested) lists, or numbers when they have 0 dimensions;
    NumPy scalars become Python numbers; non-finite floats (NaN, ``inf``, ``-inf``) become
    ``None`` (JSON ``null``); tuples and sets become lists; mapping keys become strings;
    dataclasses become dicts; ``Path``, ``torch.dtype`` and ``torch.device`` become strings;
    enums become their value.

    Args:
        obj: The object to convert.

    Returns:
        An object made of ``dict``, ``list``, ``str``, ``int``, ``float`` (finite), ``bool``
        and ``None`` only.

    Raises:
        TypeError: If ``obj`` contains a value of another type; the message gives its
            location, e.g. ``results['curves'][3]``.
    """
    return _jsonable(obj, "obj")


def _jsonable(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return _jsonable(obj.value, where)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Tensor):
        return _jsonable(obj.detach().cpu().tolist(), where)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item(), where)
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, where)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    raise TypeError(
        f"{where}: cannot convert a value of type {type(obj).__name__} to JSON; expected "
        "numbers, strings, tensors, arrays, lists or dicts"
    )


def _file_mode() -> int:
    """The mode of a new file under the process's umask (``0o666 & ~umask``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Create or replace ``path`` atomically: ``write`` fills a temporary file, then a rename.

    The temporary file lies in ``path``'s directory (so ``os.replace`` is one atomic rename on
    the same file system) and is removed if ``write`` raises; ``path`` then keeps its old
    content, or does not exist.

    Args:
        path: Destination file; its parent directories are created.
        write: Called with the temporary file's path; writes the whole content there.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented, strictly valid JSON (see :func:`to_jsonable`).

    Args:
        path: Destination file, written atomically (:func:`write_atomically`); its parent
            directories are created.
        obj: The object to write.

    Returns:
        The path written.

    Raises:
        TypeError: If ``obj`` holds a value :func:`to_jsonable` cannot convert (then no file
            is written).
    """
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def environment_info() -> dict[str, Any]:
    """Describe the software and hardware a run used.

    Returns:
        Versions of Python, torch, numpy and secondorder, the platform, torch's thread count
        and CUDA availability (with the device name when available).
    """
    from secondorder import __version__

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "secondorder": __version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if info["cuda_available"]:
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def write_markdown(path: str | Path, text: str) -> Path:
    """Write markdown text to a file, creating its parent directories.

    Args:
        path: Destination file, written atomically (:func:`write_atomically`).
        text: Markdown; a final newline is added when missing.

    Returns:
        The path written.
    """
    text = text if text.endswith("\n") else text + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

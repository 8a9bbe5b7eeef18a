"""Lazy public faces for the stage subpackages (PEP 562 module ``__getattr__``).

A stage's ``__init__`` names what other stages and users may call, but importing the package must stay free of
torch, Ray and faiss (``tests/test_architecture.py``): each name is imported from its module on first use only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``name`` lives in ``package.<exports[name]>``."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__

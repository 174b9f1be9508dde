"""Optional dependencies: a command imports its extra's packages where it first needs them, and a missing one
is one line naming the extra that installs it (``pip install arcvit`` carries only what training needs)."""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from arcvit.errors import MissingExtra, MissingExtraWarning


def _needs(extra: str) -> str:
    return f"needs the {extra!r} extra: pip install 'arcvit[{extra}]'"


def require(module: str, extra: str, what: str) -> ModuleType:
    """``module``, or MissingExtra saying that ``what`` (a command, method or option) needs ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError:  # not installed, or hidden (sys.modules[module] = None)
        raise MissingExtra(f"{what} {_needs(extra)}") from None


def optional(module: str, extra: str, what: str) -> ModuleType | None:
    """``module``, or None after one warning that ``what`` (a by-product such as a plot) was skipped."""
    try:
        return importlib.import_module(module)
    except ImportError:
        warnings.warn(f"skipped {what}, which {_needs(extra)}", MissingExtraWarning, stacklevel=2)
        return None

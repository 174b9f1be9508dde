"""Each backend registers with the core as soon as the library it serves is imported.

``import arcvit`` imports neither torch nor timm (so ``arcvit --help`` answers at once); yet a timm model must
find arcvit's timm block specs, and ``timm.create_model`` the shipped ViT, whenever timm is loaded, as when
``import arcvit`` imported them. ``register_when_imported`` runs a registration right after its library's own
import finishes (or at once, if it was imported before arcvit)."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Callable


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it lets the usual finder find a watched library, then runs the registration after
    that library's module has executed."""

    def __init__(self) -> None:
        self.pending: dict[str, Callable[[], None]] = {}

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        register = self.pending.pop(fullname, None)
        if register is None:
            return None
        spec = importlib.util.find_spec(fullname)  # the real finder (this one has nothing pending for it now)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_then_register(module) -> None:
            execute(module)
            register()
        spec.loader.exec_module = exec_then_register  # this module's loader only
        return spec


_WATCHER = _AfterImport()


def register_when_imported(library: str, register: Callable[[], None]) -> None:
    """Run ``register`` once ``library`` (a top-level module) is imported: now, if it already is."""
    if library in sys.modules:
        register()
        return
    _WATCHER.pending[library] = register
    if _WATCHER not in sys.meta_path:
        sys.meta_path.insert(0, _WATCHER)


def _timm() -> None:
    importlib.import_module("arcvit.backends.timm")  # its block specs, hooks and the shipped ViT


def _transformers_on_first_model() -> None:
    from arcvit.core.specs import register_lazy_backend
    register_lazy_backend("transformers.", "arcvit.backends.transformers")


def register_backends() -> None:
    """timm's backend when timm is imported; transformers' when the core first meets one of its models (the core
    itself needs torch, so that is registered when torch is imported)."""
    register_when_imported("timm", _timm)
    register_when_imported("torch", _transformers_on_first_model)

"""Adapters, runs, merged files and ONNX files shared through the Hugging Face Hub.

``push`` uploads one of them with a generated model card and ``arcvit.json`` (the kind and every file's SHA-256);
``pull`` resolves ``hf-hub:ORG/NAME[@REVISION]`` to a commit, downloads that commit into huggingface_hub's cache
and checks every file against ``arcvit.json`` before a local loader reads it. huggingface_hub is imported only
when a reference is resolved or a push runs, so ``arcvit --help`` never loads it.
"""
from arcvit.hub.refs import PREFIX, HubRef, is_hub_ref, parse_ref

__all__ = ["PREFIX", "HubRef", "Pulled", "Pushed", "is_hub_ref", "parse_ref", "pull", "push"]


def __getattr__(name: str):
    """``pull``/``Pulled`` and ``push``/``Pushed`` on first use: their modules read files and call the client."""
    modules = {"pull": "arcvit.hub.pull", "Pulled": "arcvit.hub.pull", "push": "arcvit.hub.push",
               "Pushed": "arcvit.hub.push"}
    if name in modules:
        import importlib
        return getattr(importlib.import_module(modules[name]), name)
    raise AttributeError(f"module 'arcvit.hub' has no attribute {name!r}")

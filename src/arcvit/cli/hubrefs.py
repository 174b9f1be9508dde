"""``hf-hub:ORG/NAME[@REVISION]`` wherever a command reads an adapter, run, merged file or ONNX file: each such
option is pulled (resolved to a commit, downloaded, checked) and replaced by the local path before the command
runs, and an error the command raises names the pinned reference instead of the cache folder. arcvit.hub, and
with it huggingface_hub, is imported only when an option holds a reference."""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

# the options that name what a command reads, and what each is read as
SOURCES = {"adapter": "adapter", "run": "run", "merged": "merged", "onnx": "onnx"}


def hub_source(args: argparse.Namespace, option: str) -> str:
    """What ``--OPTION`` named: the pinned ``hf-hub:`` reference it was pulled from (recorded in outputs), else
    the local path as given."""
    pulled = getattr(args, "pulled", {}).get(option)
    return str(pulled.ref) if pulled else str(getattr(args, option))


@contextlib.contextmanager
def pulled_sources(args: argparse.Namespace) -> Iterator[None]:
    """Pull every option of ``args`` that holds a Hub reference; the command runs on the local copies."""
    from arcvit.hub.refs import is_hub_ref
    refs = {option: getattr(args, option) for option in SOURCES if is_hub_ref(getattr(args, option, None))}
    if not refs:
        yield
        return
    from arcvit.hub.pull import named_errors, pull
    args.pulled = {option: pull(ref, SOURCES[option]) for option, ref in refs.items()}
    for option, pulled in args.pulled.items():
        setattr(args, option, str(pulled.path))
    with named_errors(list(args.pulled.values())):
        yield


def pulled(args: argparse.Namespace) -> dict[str, str]:
    """``{"source": "hf-hub:ORG/NAME@COMMIT"}`` for a command's JSON output when it read a pulled repo, else {}:
    the exact commit an answer came from, so that it can be reproduced after later pushes."""
    refs = [str(p.ref) for p in getattr(args, "pulled", {}).values()]
    return {"source": refs[0] if len(refs) == 1 else refs} if refs else {}

"""Pretrained weights from the Hugging Face Hub, failing fast when the Hub cannot be reached.

Unreachable, huggingface_hub retries each file with exponential backoff (about a minute for a ViT, which
tries two file names) before timm gives up. Before a download, `hub_mode` therefore probes the Hub's host
with one short TCP connection; when that fails (or ``HF_HUB_OFFLINE`` is set) the download runs in
huggingface_hub's offline mode: cached weights still load, missing ones fail at once, with no retries.
"""
from __future__ import annotations

import contextlib
import socket
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlparse

from timm.models import get_pretrained_cfg

PROBE_TIMEOUT_S = 3.0


def from_hub(name: str) -> bool:
    """Whether timm fetches ``name``'s pretrained weights from the Hugging Face Hub (not a local file)."""
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag: timm's own error says so when the model is created
        return False
    return bool(cfg and cfg.hf_hub_id and not cfg.file)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the Hub's endpoint (``HF_ENDPOINT`` honoured), or to the proxy that the
    environment (``HTTPS_PROXY``, ...) routes it through; False when offline mode is set."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def hub_mode(name: str) -> Iterator[bool]:
    """Inside: huggingface_hub in offline mode (cache only) if ``name``'s weights come from an unreachable
    Hub. Yields whether it is."""
    if not from_hub(name) or hub_reachable():
        yield False
        return
    from huggingface_hub import constants
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = before

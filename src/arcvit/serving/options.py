"""One validator per kind of value the server takes from its command line or its requests (whole numbers,
decimal numbers, the token, host names), so that every option and field of a kind is parsed the same way.

Numbers are read by arcvit.numbers (shared with every command's options): ASCII decimal digits (with one ``.``
for a decimal number) within stated bounds, else one error naming the option and the bounds.
"""
from __future__ import annotations

import re

from arcvit.errors import ConfigError
from arcvit.numbers import decimal_number, whole_number

__all__ = ["LOOPBACK", "WILDCARD", "decimal_number", "default_hosts", "hosts", "token", "whole_number"]

_HOST = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]+")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")


def token(text: str | None) -> str | None:
    """A bearer token is printable ASCII without spaces (it travels in an HTTP header), and not empty."""
    if text is None:
        return None
    if not text or not text.isascii() or not text.isprintable() or " " in text:
        raise ConfigError("--token: expected printable ASCII characters without spaces (not empty)")
    return text


def hosts(text: str, name: str = "--allowed-hosts") -> tuple[str, ...]:
    """A comma-separated list of host names or addresses (no ports, no wildcards)."""
    names = tuple(part.strip().lower() for part in text.split(","))
    for host in names:
        if not host.isascii() or not _HOST.fullmatch(host):
            raise ConfigError(f"{name}: {host!r} is not a host name or address (list names, comma-separated, "
                              "without ports)")
    return names


def default_hosts(host: str, token: str | None) -> tuple[str, ...] | None:
    """The Host header names PUT/DELETE answer to without ``--allowed-hosts``: the bound address and loopback's
    names; on a wildcard address any name with a token (the token is the check), else loopback's names only."""
    if host in WILDCARD:
        return None if token is not None else LOOPBACK
    return tuple(dict.fromkeys((host.lower().strip("[]"), *LOOPBACK)))

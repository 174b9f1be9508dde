"""A study's storage URL (``arcvit tune --storage``): parsed once, checked, and never printed with a secret.

A URL can hold a password in two places: its user part (``postgresql://user:pw@host/db``) and its query
(``?password=pw``, which libpq also reads). ``shown_url`` hides both working on the text, not on a parse, so a
URL that does not parse (a port that is not a number, an unencoded ``@`` in the password) is shown safely too.
SQLAlchemy (Optuna's own dependency) is imported only when a URL is parsed.
"""
from __future__ import annotations

import argparse
import re
from typing import Any

from arcvit.errors import ConfigError

HIDDEN = "***"
CONNECT_TIMEOUT_S = 10  # a PostgreSQL study server that does not answer fails after this long
EXAMPLES = "e.g. sqlite:////path/study.db, postgresql://host/db"
# A query parameter whose name says it holds a secret: password, sslpassword, passfile's neighbours, pwd, token.
_SECRET_PARAMETER = re.compile(r"([?&][^=&#]*(?:pass|pwd|secret|token)[^=&#]*=)[^&#]*", re.IGNORECASE)


def shown_url(url: str) -> str:
    """``url`` as a message may print it: the password of its user part and every secret query value hidden.

    Everything between the first ``:`` of the user part and the last ``@`` counts as the password, so a
    password holding ``@`` or ``:`` never shows in part."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        credentials, _, after = rest.rpartition("@")
        if ":" in credentials:
            rest = f"{credentials.split(':', 1)[0]}:{HIDDEN}@{after}"
    rest = _SECRET_PARAMETER.sub(lambda m: m.group(1) + HIDDEN, rest)
    return f"{scheme}{sep}{rest}"


def parse_storage_url(url: str) -> Any:
    """SQLAlchemy's ``URL`` for ``url``; a URL that does not parse is one ConfigError (its password hidden)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        return make_url(url)
    except ArgumentError:
        raise ConfigError(f"--storage {shown_url(url)!r}: not a database URL ({EXAMPLES})") from None
    except ValueError:  # make_url reads the port with int(): "host:abc" raises ValueError
        raise ConfigError(f"--storage {shown_url(url)!r}: not a database URL: its port is not a number "
                          f"({EXAMPLES})") from None


def engine_options(url: str) -> dict[str, Any]:
    """A PostgreSQL server that does not answer (an unroutable host) fails after 10 s instead of the system's
    TCP time-out, unless the URL sets its own ``connect_timeout``."""
    parsed = parse_storage_url(url)
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return {}


def storage_flag(url: str) -> str:
    """``--storage`` as an argparse ``type=``: a URL that does not parse is argparse's one line (exit 2), its
    password hidden; Optuna opens it later."""
    try:
        parse_storage_url(url)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--storage ")) from None
    return url

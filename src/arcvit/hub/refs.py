"""``hf-hub:ORG/NAME[@REVISION]``: the one way a Hub repo is named wherever arcvit reads a file (timm's prefix)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from arcvit.errors import ConfigError

PREFIX = "hf-hub:"
# The Hub's own rules for a repo id (two names of letters, digits, '-', '_', '.'; no '--' or '..') and a git
# revision (a branch, tag or commit: no spaces, no '..', no leading '-' or '/').
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO = re.compile(rf"{_NAME}/{_NAME}")
_REVISION = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_./-]{0,199}")


@dataclass(frozen=True)
class HubRef:
    """A repo on the Hub and the revision asked for (None: its main branch)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{PREFIX}{self.repo}" + (f"@{self.revision}" if self.revision else "")

    def at(self, commit: str) -> "HubRef":
        """The same repo pinned to ``commit``: what outputs record, so that a later push changes nothing."""
        return HubRef(self.repo, commit)


def is_hub_ref(value: object) -> bool:
    """Whether a command-line value names a Hub repo rather than a local path."""
    return isinstance(value, str) and value.startswith(PREFIX)


def parse_ref(value: str) -> HubRef:
    """``hf-hub:ORG/NAME[@REVISION]`` checked by the Hub's rules, so a typo is named before any request."""
    body = value.removeprefix(PREFIX)
    repo, _, revision = body.partition("@")
    if not is_hub_ref(value) or not _REPO.fullmatch(repo) or "--" in repo or ".." in repo:
        raise ConfigError(f"{value}: not a Hub reference; write {PREFIX}ORG/NAME or {PREFIX}ORG/NAME@REVISION "
                          "(letters, digits, '-', '_', '.')")
    if "@" in body and (not _REVISION.fullmatch(revision) or ".." in revision or revision.endswith("/")):
        raise ConfigError(f"{value}: revision {revision!r} is not a branch, tag or commit name")
    return HubRef(repo, revision or None)

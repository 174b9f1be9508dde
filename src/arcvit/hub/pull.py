"""``hf-hub:ORG/NAME[@REVISION]`` to a checked local path: resolved to a commit, downloaded with huggingface_hub's
``snapshot_download`` into its cache (offline, with ``HF_HUB_OFFLINE=1`` or an unreachable Hub, the cached
commit is used), every file checked against ``arcvit.json`` before the caller's loader reads it."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from arcvit.errors import ArcvitError, ConfigError, ModelError, first_line
from arcvit.hub import manifest
from arcvit.hub.refs import HubRef, parse_ref
from arcvit.version import __version__


@dataclass(frozen=True)
class Pulled:
    """A pulled repo: the reference pinned to its commit, the path to hand a loader, and the snapshot folder."""

    ref: HubRef
    path: Path
    snapshot: Path
    kind: str

    def named(self, message: str) -> str:
        """``message`` with the cache folder replaced by the pinned reference, so an error names the repo."""
        return message.replace(str(self.snapshot), str(self.ref))


def hub_settings() -> dict[str, str | None]:
    """Endpoint and cache from the environment at call time (huggingface_hub reads them once, at import)."""
    return {"endpoint": os.environ.get("HF_ENDPOINT") or None, "cache_dir": os.environ.get("HF_HUB_CACHE") or None}


def _quiet_bars():
    """huggingface_hub's progress bar class, silenced: a pull adds no lines to a command's output."""
    from huggingface_hub.utils import tqdm

    class Quiet(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})
    return Quiet


def _download(ref: HubRef) -> Path:
    """The snapshot folder of ``ref``'s commit (arcvit's formats only), each failure as one line."""
    from huggingface_hub import errors, snapshot_download
    try:
        return Path(snapshot_download(ref.repo, revision=ref.revision, allow_patterns=manifest.PATTERNS,
                                      library_name="arcvit", library_version=__version__, tqdm_class=_quiet_bars(),
                                      **hub_settings()))
    except (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError):
        raise ModelError(f"{ref}: not in the local cache and the Hub cannot be reached (offline, or "
                         "HF_HUB_OFFLINE=1); pull it once online") from None
    except errors.RevisionNotFoundError:
        raise ConfigError(f"{ref}: the repo has no revision {ref.revision!r} (a branch, tag or commit)") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError):
        raise ConfigError(f"{ref}: no such repo on the Hub, or it is private and no token with access was given "
                          "(set HF_TOKEN, or `hf auth login`)") from None
    except errors.RemoteEntryNotFoundError as e:
        raise ModelError(f"{ref}: a file the repo lists cannot be downloaded ({first_line(e, 200)})") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise ModelError(f"{ref}: cannot download ({type(e).__name__}: {first_line(e, 200)})") from None


def pull(value: str | HubRef, use: str) -> Pulled:
    """Resolve, download and check the repo ``value`` names, as ``use`` (adapter, run, merged or onnx)."""
    ref = parse_ref(value) if isinstance(value, str) else value
    snapshot = _download(ref)
    pinned = ref.at(snapshot.name)  # the cache keeps each commit in snapshots/<commit>/
    body = manifest.read(snapshot, str(pinned))
    manifest.verify(snapshot, body, str(pinned))
    return Pulled(pinned, snapshot / manifest.entry(body, use, str(pinned)), snapshot, body["kind"])


@contextlib.contextmanager
def named_errors(pulled: list[Pulled]) -> Iterator[None]:
    """Re-raise an arcvit error from reading pulled files with their Hub references in place of cache paths."""
    try:
        yield
    except ArcvitError as e:
        message = str(e)
        for one in pulled:
            message = one.named(message)
        e.args = (message,)  # the same error, kind and HTTP status; only the paths read differently
        raise

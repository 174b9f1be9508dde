"""Fetch a suite's public archives from the Hugging Face Hub with ``huggingface_hub`` (imported on use).

``hf_hub_download`` streams each file to its cache (resumable: an interrupted download continues from its
``.incomplete`` file), reuses a cached copy, and honours ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``.
"""
from __future__ import annotations

import os
from pathlib import Path

from arcvit.errors import DataError, first_line

# Public copies (see docs/data.md): the repo and the files holding the task folders.
HUB_REPOS = {"vtab1k": ("XiN0919/VTAB-1k", ("vtab-1k.zip",)), "fgvc": ("XiN0919/FGVC", ())}


def _commit(path: Path) -> str:
    """The commit a cached file was downloaded at (its ``snapshots/<commit>/`` folder), or '?'."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else "?"


def download(repo: str, files: list[str], revision: str, cache_dir: str | None = None,
             quiet: bool = False) -> list[tuple[Path, str]]:
    """(local path, "hub REPO@COMMIT FILE") of each file of the dataset repo ``repo`` at ``revision``."""
    from huggingface_hub import errors, hf_hub_download
    from huggingface_hub.utils import disable_progress_bars
    if quiet:
        disable_progress_bars()
    where = f"hub dataset {repo}@{revision}"
    got = []
    for name in files:
        try:
            local = Path(hf_hub_download(repo, name, repo_type="dataset", revision=revision, cache_dir=cache_dir,
                                         endpoint=os.environ.get("HF_ENDPOINT") or None))
        except errors.LocalEntryNotFoundError:
            raise DataError(f"{where}: {name} is not in the local cache and the Hub cannot be reached (offline, "
                            "or HF_HUB_OFFLINE=1); download it once online, or use --source archive PATH") from None
        except errors.EntryNotFoundError:
            raise DataError(f"{where}: the repo has no file {name!r} (--files names the files to fetch)") from None
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
            raise DataError(f"{where}: {type(e).__name__} ({first_line(e)}); check --repo and "
                            "--revision") from None
        except (errors.HfHubHTTPError, OSError) as e:
            raise DataError(f"{where}: cannot download {name} ({type(e).__name__}: {first_line(e)})") from None
        got.append((local, f"hub {repo}@{_commit(local)} {name}"))
    return got

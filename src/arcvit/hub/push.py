"""``arcvit push``: one commit to a Hub repo through huggingface_hub's ``HfApi`` (created if missing, private on
request, on a branch when one is named) holding the staged files, ``arcvit.json`` and the generated model card."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from arcvit.errors import ConfigError, ModelError, first_line
from arcvit.hub import card, manifest
from arcvit.hub.pull import hub_settings
from arcvit.hub.refs import PREFIX, HubRef, parse_ref
from arcvit.hub.stage import Staged, stage
from arcvit.version import __version__


@dataclass(frozen=True)
class Pushed:
    """A finished push: the repo pinned to the new commit, its URL, the kind and the files it holds."""

    ref: HubRef
    url: str
    kind: str
    files: list[str]


def _operations(staged: Staged, ref: HubRef) -> list:
    """One addition per staged file, then arcvit.json and the model card."""
    from huggingface_hub import CommitOperationAdd
    readme = card.render(staged.facts, str(HubRef(ref.repo))).encode()
    return [*(CommitOperationAdd(name, str(path)) for name, path in sorted(staged.files.items())),
            CommitOperationAdd(manifest.NAME, manifest.document(staged.kind, staged.files)),
            CommitOperationAdd("README.md", readme)]


def _commit(staged: Staged, ref: HubRef, private: bool) -> tuple[str, str]:
    """Create the repo (and branch) if missing, then commit; (commit id, commit URL). Client errors as one line."""
    from huggingface_hub import HfApi, errors
    api = HfApi(endpoint=hub_settings()["endpoint"], library_name="arcvit", library_version=__version__)
    where = f"--repo {ref.repo}"
    try:
        api.create_repo(ref.repo, private=private, exist_ok=True)
        if ref.revision:
            api.create_branch(ref.repo, branch=ref.revision, exist_ok=True)
        info = api.create_commit(ref.repo, _operations(staged, ref), revision=ref.revision,
                                 commit_message=f"arcvit push: {staged.kind} ({', '.join(sorted(staged.files))})")
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403) or isinstance(e, errors.RepositoryNotFoundError):
            raise ConfigError(f"{where}: no write access to the repo (set HF_TOKEN to a token that may write to "
                              f"{ref.repo.split('/')[0]}, or `hf auth login`)") from None
        raise ModelError(f"{where}: the Hub refused the push (HTTP {status}: {first_line(e, 200)})") from None
    except (errors.HTTPError, OSError) as e:
        raise ModelError(f"{where}: cannot reach the Hub ({type(e).__name__}: {first_line(e, 200)})") from None
    return info.oid, info.commit_url


def push(source: str | Path, repo: str, private: bool = False, revision: str | None = None) -> Pushed:
    """Upload ``source`` (adapter folder, run folder, merged file or ONNX file) to ``repo`` (``ORG/NAME``), on
    ``revision`` (a branch; default main), with its model card. Everything is checked before a request is sent."""
    if "@" in repo:
        raise ConfigError(f"--repo {repo}: name the branch with --revision, not '@'")
    ref = parse_ref(f"{PREFIX}{repo}" + (f"@{revision}" if revision else ""))
    staged = stage(Path(source))
    commit, url = _commit(staged, ref, private)
    return Pushed(ref.at(commit), url, staged.kind, sorted([*staged.files, manifest.NAME, "README.md"]))

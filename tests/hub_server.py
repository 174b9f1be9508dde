"""A Hugging Face Hub on 127.0.0.1 for the tests: just the endpoints huggingface_hub's client calls to create a repo
and a branch, commit files (preupload, then an NDJSON commit of regular files), resolve a revision (model info),
list a commit's files and download them (HEAD and GET on resolve). Repos keep every commit, so an old commit stays
downloadable after a later push; private repos answer 401 without the token, as the Hub does.

Tests change what it serves behind the client's back with ``tamper`` and ``remove`` (edits of a commit's files)."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from urllib.parse import unquote, urlsplit

TOKEN = "hf_test_write_token"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [  # (method, path pattern, FakeHub method name)
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)", "create_branch"),
    ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "model_info"),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/.*)?", "tree"),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


class Answer(Exception):
    """An HTTP error answer: status, the Hub's X-Error-Code, and a message."""

    def __init__(self, status: int, code: str = "", message: str = "", **extra: str) -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)


def blob_id(data: bytes) -> str:
    """git's blob id, as the Hub reports a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The Hub's state and its answers; ``endpoint`` is the URL to set as HF_ENDPOINT."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self._serial = count()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- what tests do behind the client's back ----
    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        return self.repos[repo].commits[self._commit(self.repos[repo], revision)]

    def tamper(self, repo: str, path: str, data: bytes, branch: str = "main") -> str:
        """A new commit on ``branch`` whose ``path`` holds ``data`` (arcvit.json left as it was); its id."""
        return self._new_commit(self.repos[repo], branch, self.files(repo, branch) | {path: data})

    def remove(self, repo: str, path: str, branch: str = "main") -> str:
        """A new commit on ``branch`` without ``path``; its id."""
        files = dict(self.files(repo, branch))
        del files[path]
        return self._new_commit(self.repos[repo], branch, files)

    # ---- the endpoints ----
    def _repo(self, repo: str, authorized: bool) -> Repo:
        found = self.repos.get(repo)
        if found is None or (found.private and not authorized):
            raise Answer(401 if found else 404, "RepoNotFound", f"Repository {repo} not found")
        return found

    def _commit(self, repo: Repo, revision: str) -> str:
        revision = unquote(revision)
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise Answer(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def create_repo(self, body: dict, authorized: bool, **_) -> dict:
        if not authorized:
            raise Answer(401, "", "You must be authenticated to create a repo")
        repo = f"{body['organization']}/{body['name']}"
        if repo in self.repos:
            raise Answer(409, "", "You already created this model repo", url=f"{self.endpoint}/{repo}")
        self.repos[repo] = Repo(private=body.get("visibility") == "private" or bool(body.get("private")))
        self._new_commit(self.repos[repo], "main", {})
        return {"url": f"{self.endpoint}/{repo}"}

    def validate_yaml(self, **_) -> dict:
        return {"errors": [], "warnings": []}

    def preupload(self, body: dict, repo: str, rev: str, authorized: bool, **_) -> dict:
        if not authorized:
            raise Answer(401, "RepoNotFound", "write access needs a token")
        self._commit(self._repo(repo, authorized), rev)
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                          for f in body["files"]]}

    def commit(self, lines: list[dict], repo: str, rev: str, authorized: bool, **_) -> dict:
        if not authorized:
            raise Answer(401, "RepoNotFound", "write access needs a token")
        found = self._repo(repo, authorized)
        files = dict(found.commits[self._commit(found, rev)])
        for line in lines:
            if line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] == "deletedFile":
                files.pop(line["value"]["path"], None)
        sha = self._new_commit(found, unquote(rev), files)
        return {"commitUrl": f"{self.endpoint}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}

    def create_branch(self, repo: str, rev: str, authorized: bool, **_) -> dict:
        found = self._repo(repo, authorized)
        if not authorized:
            raise Answer(401, "RepoNotFound", "write access needs a token")
        if unquote(rev) in found.branches:
            raise Answer(409, "", "Reference already exists")
        found.branches[unquote(rev)] = found.branches["main"]
        return {}

    def model_info(self, repo: str, authorized: bool, rev: str | None = None, **_) -> dict:
        found = self._repo(repo, authorized)
        sha = self._commit(found, rev or "main")
        return {"id": repo, "sha": sha, "private": found.private,
                "siblings": [{"rfilename": p} for p in sorted(found.commits[sha])]}

    def tree(self, repo: str, rev: str, authorized: bool, **_) -> list[dict]:
        found = self._repo(repo, authorized)
        files = found.commits[self._commit(found, rev)]
        return [{"type": "file", "oid": blob_id(data), "size": len(data), "path": path}
                for path, data in sorted(files.items())]

    def resolve(self, repo: str, rev: str, path: str, authorized: bool, **_) -> tuple[bytes, dict[str, str]]:
        found = self._repo(repo, authorized)
        sha = self._commit(found, rev)
        data = found.commits[sha].get(unquote(path))
        if data is None:
            raise Answer(404, "EntryNotFound", f"{path} does not exist at {sha}")
        return data, {"X-Repo-Commit": sha, "ETag": f'"{blob_id(data)}"'}

    def _new_commit(self, repo: Repo, branch: str, files: dict[str, bytes]) -> str:
        sha = hashlib.sha1(f"commit {next(self._serial)} {sorted(files)}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.branches[branch] = sha
        return sha

    def answer(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers) for one request."""
        path = urlsplit(raw_path).path
        self.requests.append(f"{method} {path}")
        authorized = headers.get("authorization") == f"Bearer {TOKEN}"
        for verb, pattern, name in ROUTES:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                break
        else:
            return 404, b'{"error": "no such endpoint"}', {"Content-Type": "application/json"}
        args = {k: v for k, v in match.groupdict().items() if v is not None}
        if name == "commit":
            args["lines"] = [json.loads(line) for line in body.splitlines() if line.strip()]
        elif body:
            args["body"] = json.loads(body)
        try:
            with self._lock:
                result = getattr(self, name)(authorized=authorized, **args)
        except Answer as e:
            return e.status, json.dumps({"error": str(e), **e.extra}).encode(), {"X-Error-Code": e.code, "X-Error-Message": str(e),
                                                                     "Content-Type": "application/json"}
        if name == "resolve":
            return 200, result[0], result[1]
        return 200, json.dumps(result).encode(), {"Content-Type": "application/json"}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, send_body: bool) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, data, headers = hub.answer(self.command, self.path, self.headers, body)
            self.send_response(status)
            for key, value in headers.items():
                if value:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if send_body:
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve(True)

        def do_POST(self) -> None:
            self._serve(True)

        def do_HEAD(self) -> None:
            self._serve(False)

        def log_message(self, *args) -> None:
            pass
    return Handler

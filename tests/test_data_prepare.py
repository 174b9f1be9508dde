"""`arcvit data prepare` (archive, folder and hub sources) and `arcvit data verify`, on tiny tasks in the public
VTAB-1k layout: real PNG files, real zip/tar archives, the real huggingface_hub client against a server on
127.0.0.1. Every bad input ends in one line on stderr, exit 1, and leaves nothing that verify accepts."""
from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from arcvit.cli import main
from arcvit.data.manifest import MANIFEST, data_provenance, read_manifest
from arcvit.data.writers import write_fgvc_task, write_vtab_task

TASKS = {"cifar": 100, "dtd": 47, "kitti": 4}  # natural, natural, structured: folder -> classes
SIZES = {"train800": 6, "val200": 3, "test": 5}
ANY = ["--any-size", "--quiet"]


def _splits(seed: int, classes: int) -> dict:
    rng = np.random.default_rng(seed)
    return {s: (rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, classes, n))
            for s, n in SIZES.items()}


def build_tasks(top: Path, tasks: dict[str, int] = TASKS) -> Path:
    """Tiny task folders in the public layout under ``top`` (distinct random images: no leak)."""
    for n, (task, classes) in enumerate(tasks.items()):
        write_vtab_task(top / task, _splits(n, classes))
    return top


def zip_folder(folder: Path, archive: Path, prefix: str = "vtab-1k") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{prefix}/{path.relative_to(folder)}")
    return archive


@pytest.fixture
def source(tmp_path) -> Path:
    return build_tasks(tmp_path / "src")


@pytest.fixture
def archive(tmp_path, source) -> Path:
    return zip_folder(source, tmp_path / "vtab-1k.zip")


def run(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def prepare_argv(root: Path, path: Path, *extra: str) -> list[str]:
    return ["data", "prepare", "vtab1k", "--source", "archive", str(path), "--out", str(root),
            "--tasks", *TASKS, *ANY, *extra]


def verify_argv(root: Path, *extra: str) -> list[str]:
    return ["data", "verify", str(root), "--suite", "vtab1k", "--tasks", *TASKS, *ANY, *extra]


def test_archive_prepare_then_verify(tmp_path, archive, capsys):
    root = tmp_path / "root"
    code, out, err = run(prepare_argv(root, archive), capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert set(summary["tasks"]) == set(TASKS)
    assert summary["source"].startswith("archive vtab-1k.zip sha256:")
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST, *sorted(TASKS)]  # staging folder gone
    entry = read_manifest(root)["tasks"]["kitti"]
    assert entry["splits"]["test"]["images"] == SIZES["test"] and entry["formats"] == {"PNG": 14}
    assert entry["splits"]["train800val200"]["images"] == SIZES["train800"] + SIZES["val200"]
    code, out, err = run(verify_argv(root), capsys)
    assert code == 0, err
    assert json.loads(out)["tasks"] == summary["tasks"]
    assert data_provenance(root, "KITTI") == {"digest": summary["tasks"]["kitti"], "source": summary["source"]}
    assert data_provenance(tmp_path, "kitti")["digest"] == "unverified"


def test_same_bytes_from_another_source_get_the_same_digest(tmp_path, source, archive, capsys):
    """A folder, a tar.gz and a zip nested in a zip (unpacked at any depth) give the same task digests."""
    tar = tmp_path / "vtab.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(source, arcname="deep/er/vtab")
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(archive, "inner/vtab-1k.zip")
    digests = []
    for n, path in enumerate((source, tar, outer)):
        code, out, err = run(prepare_argv(tmp_path / f"root{n}", path), capsys)
        assert code == 0, err
        digests.append(json.loads(out)["tasks"])
    assert digests[0] == digests[1] == digests[2]


def test_existing_task_needs_force_and_out_may_not_be_the_source(tmp_path, archive, source, capsys):
    root = tmp_path / "root"
    assert run(prepare_argv(root, archive), capsys)[0] == 0
    code, _, err = run(prepare_argv(root, archive), capsys)
    assert code == 1 and len(err) == 1 and "exist already; pass --force" in err[0]
    assert run(prepare_argv(root, archive, "--force"), capsys)[0] == 0
    code, _, err = run(prepare_argv(source, source), capsys)
    assert code == 1 and "overlaps the folder prepare reads" in err[0]


def test_interrupted_prepare_leaves_no_task_that_looks_finished(tmp_path, archive, source, monkeypatch, capsys):
    """Interrupted while checking the second task: the first is in place and recorded, nothing else is; a
    staging folder left by a killed prepare (here: a complete copy of every task) is not taken for data."""
    import arcvit.data.prepare as prep
    root, checked = tmp_path / "root", []
    real = prep.verify_task

    def interrupted(*args, **kwargs):
        checked.append(args[2])
        if len(checked) == 2:
            raise KeyboardInterrupt(f"checking {args[2]}")
        return real(*args, **kwargs)
    monkeypatch.setattr(prep, "verify_task", interrupted)
    with pytest.raises(KeyboardInterrupt, match="^checking "):
        prep.prepare("vtab1k", root, "archive", path=str(archive), tasks=list(TASKS), check_sizes=False)
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST, "cifar"]
    assert list(read_manifest(root)["tasks"]) == ["cifar"]
    monkeypatch.setattr(prep, "verify_task", real)
    shutil.copytree(source, root / ".arcvit-prepare-killed")
    code, _, err = run(verify_argv(root), capsys)
    assert code == 1 and sorted(line.split(": ")[2] for line in err[:-1]) == ["dtd", "kitti"]
    code, _, err = run(["data", "prepare", "vtab1k", "--source", "archive", str(archive), "--out", str(root),
                        "--tasks", "dtd", "kitti", "--any-size"], capsys)
    assert code == 0 and any(".arcvit-prepare-killed is another prepare's staging folder" in line for line in err)
    assert (root / ".arcvit-prepare-killed").is_dir() and run(verify_argv(root), capsys)[0] == 0


def _edit_list(folder: Path, task: str, split: str, edit) -> None:
    path = folder / task / f"{split}.txt"
    lines = path.read_text().splitlines()
    lines[0] = edit(lines[0])
    path.write_text("\n".join(lines) + "\n")


def _zip_with(tmp_path: Path, source: Path, name: str, data: bytes = b"x", attr: int | None = None) -> Path:
    archive = zip_folder(source, tmp_path / "bad.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo(name)
        if attr is not None:
            info.external_attr = attr << 16
        zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return archive


def _truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _tar_with_link(tmp_path: Path, source: Path) -> Path:
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(source, arcname="vtab")
        link = tarfile.TarInfo("vtab/cifar/images/evil.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    return archive


def _tar_gz(tmp_path: Path, source: Path) -> Path:
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source, arcname="vtab")
    return archive


def _with_edit(tmp_path: Path, source: Path, task: str, split: str, edit) -> Path:
    _edit_list(source, task, split, edit)
    return zip_folder(source, tmp_path / "bad.zip")


BAD = {  # id: (make the archive, words the one error line must hold, tasks that must not be placed)
    "truncated_zip": (lambda t, s: _truncated(zip_folder(s, t / "bad.zip")), "truncated or not a zip", TASKS),
    "truncated_tar_gz": (lambda t, s: _truncated(_tar_gz(t, s)), "truncated or corrupt archive", TASKS),
    "task_missing": (lambda t, s: (shutil.rmtree(s / "kitti"), zip_folder(s, t / "bad.zip"))[1],
                     "not found at any depth: kitti", ["kitti"]),
    "list_files_missing": (lambda t, s: ([p.unlink() for p in (s / "kitti").glob("*.txt")],
                                         zip_folder(s, t / "bad.zip"))[1],
                           "kitti (folder vtab-1k/kitti holds none of train800.txt", ["kitti"]),
    "label_out_of_range": (lambda t, s: _with_edit(t, s, "kitti", "test", lambda ln: ln.rsplit(" ", 1)[0] + " 4"),
                           "kitti/test.txt:1: label 4 outside 0..3", ["kitti"]),
    "image_missing": (lambda t, s: _with_edit(t, s, "dtd", "val200", lambda ln: "images/nowhere.png 1"),
                      "dtd/val200.txt:1: listed image 'images/nowhere.png' not found", ["dtd"]),
    "zip_slip": (lambda t, s: _zip_with(t, s, "vtab-1k/../../evil.txt"), "would be written outside", TASKS),
    "absolute_path": (lambda t, s: _zip_with(t, s, "/tmp/arcvit-evil.txt"), "would be written outside", TASKS),
    "zip_symlink": (lambda t, s: _zip_with(t, s, "vtab-1k/cifar/link.png", b"/etc/passwd", 0o120777),
                    "is a symlink", TASKS),
    "tar_symlink": (lambda t, s: _tar_with_link(t, s), "is a symlink", TASKS),
    "huge_member": (lambda t, s: _zip_with(t, s, "vtab-1k/big.bin", bytes(2 << 20)), "larger than", TASKS),
    "leak": (lambda t, s: (shutil.copy(s / "cifar/images/train800/0.png", s / "cifar/images/test/0.png"),
                           zip_folder(s, t / "bad.zip"))[1], "1 image(s) in both training and test", ["cifar"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_archive_one_line_and_nothing_verify_accepts(case, tmp_path, source, capsys):
    make, words, refused = BAD[case]
    bad = make(tmp_path, source)
    root = tmp_path / "root"
    code, out, err = run(prepare_argv(root, bad, "--max-member-mb", "1"), capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("arcvit data: error: ") and words in err[0], err[0]
    assert not (tmp_path / "arcvit-evil.txt").exists() and not Path("/tmp/arcvit-evil.txt").exists()
    if root.exists():
        assert not list(root.glob(".arcvit-prepare-*"))
        assert not any((root / t).exists() for t in refused)
        assert set(read_manifest(root)["tasks"]) == set(TASKS) - set(refused)
    code, _, err = run(verify_argv(root), capsys)
    assert code == 1 and any(t in line for t in refused for line in err)


def _break_image(root: Path) -> None:
    (root / "dtd/images/test/2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


VERIFY = {  # id: (damage a verified root, words of the problem line)
    "missing_task": (lambda r: shutil.rmtree(r / "dtd"), "dtd: task folder"),
    "undecodable_image": (_break_image, "dtd/test.txt:3: image 'images/test/2.png' does not decode"),
    "union_broken": (lambda r: _edit_list(r, "cifar", "train800val200", lambda ln: ln.rsplit(" ", 1)[0] + " 99"),
                     "cifar/train800val200.txt: not the union"),
    "malformed_line": (lambda r: _edit_list(r, "kitti", "train800", lambda ln: "no label here"),
                       "kitti/train800.txt:1: label 'here' is not a decimal integer"),
    "image_changed": (lambda r: shutil.copy(r / "kitti/images/test/1.png", r / "kitti/images/test/0.png"),
                      "kitti/test: images or labels differ from MANIFEST.json"),
    "list_changed": (lambda r: _edit_list(r, "cifar", "test", lambda ln: ln + " "),
                     "cifar/test.txt: list file differs from MANIFEST.json"),
}


@pytest.mark.parametrize("case", VERIFY)
def test_verify_reports_each_defect_and_keeps_the_manifest(case, tmp_path, archive, capsys):
    root = tmp_path / "root"
    assert run(prepare_argv(root, archive), capsys)[0] == 0
    before = (root / MANIFEST).read_bytes()
    damage, words = VERIFY[case]
    damage(root)
    code, _, err = run(verify_argv(root), capsys)
    assert code == 1 and any(words in line for line in err), err
    assert err[-1].endswith(f"{MANIFEST} left as it was") and all(ln.startswith("arcvit data: error: ") for ln in err)
    assert (root / MANIFEST).read_bytes() == before


def test_verify_checks_the_public_sizes_and_force_records_anew(tmp_path, archive, capsys):
    root = tmp_path / "root"
    assert run(prepare_argv(root, archive), capsys)[0] == 0
    code, _, err = run(["data", "verify", str(root), "--tasks", "kitti", "--quiet"], capsys)  # suite from manifest
    assert code == 1 and "kitti/train800: 6 images, the public release's list file has 800" in err[0]
    assert "kitti/test: 5 images, the public release's list file has 711" in err[3]
    shutil.copy(root / "kitti/images/test/1.png", root / "kitti/images/test/0.png")
    assert run(verify_argv(root), capsys)[0] == 1
    assert run(verify_argv(root, "--force"), capsys)[0] == 0
    assert run(verify_argv(root), capsys)[0] == 0


def test_fgvc_archive(tmp_path, capsys):
    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.array([3, 7, 3, 9])) for s in
              ("train", "val", "test")}
    write_fgvc_task(tmp_path / "src/CUB_200_2011", splits)
    archive = zip_folder(tmp_path / "src", tmp_path / "fgvc.zip", prefix="FGVC")
    root = tmp_path / "root"
    code, out, err = run(["data", "prepare", "fgvc", "--source", "archive", str(archive), "--out", str(root),
                          "--tasks", "cub", *ANY], capsys)
    assert code == 0, err
    entry = read_manifest(root)["tasks"]["CUB_200_2011"]
    assert entry["splits"]["train"]["classes_seen"] == 3 and entry["suite"] == "fgvc"
    assert run(["data", "verify", str(root), "--tasks", "cub", *ANY], capsys)[0] == 0


# ---- the hub source: the real huggingface_hub client against a small Hub on 127.0.0.1 -------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def serve():
    """``serve(payload)``: a Hub on 127.0.0.1 serving ``payload`` as file ``vtab-1k.zip`` of the dataset repo
    ``test/VTAB-1k``, the way the Hub's resolve endpoint does (HEAD with commit, etag and size; GET, with
    Range for resumed downloads). Returns (endpoint, the requests seen)."""
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    servers = []

    def start(payload: bytes) -> tuple[str, list[str]]:
        etag = hashlib.sha256(payload).hexdigest()
        requests: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def _head(self) -> bytes | None:
                requests.append(f"{self.command} {self.path}")
                if self.path.split("?")[0] != "/datasets/test/VTAB-1k/resolve/main/vtab-1k.zip":
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                start = int(self.headers.get("Range", "bytes=0-").split("=")[1].split("-")[0])
                body = payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                return body

            def do_HEAD(self) -> None:
                self._head()

            def do_GET(self) -> None:
                body = self._head()
                if body:
                    self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def hub_argv(root: Path, cache: Path, *extra: str) -> list[str]:
    return ["data", "prepare", "vtab1k", "--repo", "test/VTAB-1k", "--out", str(root), "--cache-dir", str(cache),
            "--tasks", *TASKS, *ANY, *extra]


def test_hub_download_then_offline_from_the_cache(tmp_path, archive, serve, monkeypatch, capsys):
    import huggingface_hub.constants
    endpoint, requests = serve(archive.read_bytes())
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    cache = tmp_path / "cache"
    code, out, err = run(hub_argv(tmp_path / "root", cache), capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["source"].startswith(f"hub test/VTAB-1k@{COMMIT} vtab-1k.zip sha256:")
    assert set(summary["tasks"]) == set(TASKS) and any(r.startswith("GET ") for r in requests)
    assert run(verify_argv(tmp_path / "root"), capsys)[0] == 0

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    served = len(requests)
    code, out, err = run(hub_argv(tmp_path / "again", cache), capsys)
    assert code == 0, err
    assert json.loads(out)["tasks"] == summary["tasks"] and len(requests) == served  # the cache, no request

    code, _, err = run(hub_argv(tmp_path / "third", tmp_path / "empty_cache"), capsys)
    assert code == 1 and len(err) == 1 and "is not in the local cache" in err[0]
    assert not (tmp_path / "third").exists()


def test_hub_bad_inputs(tmp_path, archive, serve, monkeypatch, capsys):
    """A file the repo lacks, FGVC without --files, and a truncated archive on the Hub: one line each, nothing
    placed."""
    endpoint, _ = serve(_truncated(archive).read_bytes())
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    code, _, err = run(hub_argv(tmp_path / "root", tmp_path / "cache", "--files", "nope.zip"), capsys)
    assert code == 1 and len(err) == 1 and "the repo has no file 'nope.zip'" in err[0], err
    code, _, err = run(["data", "prepare", "fgvc", "--out", str(tmp_path / "f"), "--quiet"], capsys)
    assert code == 1 and len(err) == 1 and "name the repo's archive(s) with --files" in err[0]
    code, _, err = run(hub_argv(tmp_path / "root", tmp_path / "cache"), capsys)
    assert code == 1 and len(err) == 1 and "truncated or not a zip" in err[0], err
    assert not (tmp_path / "f").exists() and not any((tmp_path / "root" / t).exists() for t in TASKS)


@pytest.mark.parametrize("suite", [[], ["--suite", "vtab1k"]])
def test_verify_of_a_root_that_does_not_exist_says_so(suite, tmp_path, capsys):
    """With or without --suite: the missing folder is named, not the manifest it cannot hold."""
    assert main(["data", "verify", str(tmp_path / "nowhere"), *suite]) == 1
    err = capsys.readouterr().err
    assert err == f"arcvit data: error: {tmp_path / 'nowhere'}: data root not found\n"

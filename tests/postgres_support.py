"""A real PostgreSQL server for tests: Debian's binaries (/usr/lib/postgresql/*/bin), a fresh cluster in a
temporary folder, listening on 127.0.0.1 at a free port, stopped and deleted whatever happens.

PostgreSQL refuses to run as root, so under root ``initdb`` and ``pg_ctl`` run as the ``postgres`` user, in a
folder that user owns. Authentication is ``trust`` for the one local user the URL names: nothing outside this
machine can reach the server, and it lives only as long as the test.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

DB_USER = "arcvit"


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's binary folder, None when none is installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str], timeout: float = 120) -> None:
    done = subprocess.run(_as_server_user(command), capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a throw-away server; yields its URL (``postgresql://arcvit@127.0.0.1:PORT/postgres``)."""
    binaries = postgres_bin()
    if binaries is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (scripts/setup.sh does)")
    folder = Path(tempfile.mkdtemp(prefix="arcvit-pg-"))
    data, port = folder / "data", _free_port()
    if os.geteuid() == 0:
        server_user = pwd.getpwnam("postgres")
        os.chown(folder, server_user.pw_uid, server_user.pw_gid)
    started = False
    try:
        _run([str(binaries / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust", "-E", "UTF8"])
        options = f"-p {port} -c listen_addresses=127.0.0.1 -k {folder} -c fsync=off"
        started = True  # from here on, stop it even if start-up fails half-way
        _run([str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "server.log"),
              "-w", "-t", "60", "start"])
        yield f"postgresql://{DB_USER}@127.0.0.1:{port}/postgres"
    finally:
        if started:
            with contextlib.suppress(Exception):
                _run([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], timeout=60)
        shutil.rmtree(folder, ignore_errors=True)

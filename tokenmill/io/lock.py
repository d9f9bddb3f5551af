"""OUTPUT.lock: one run per output at a time (an flock locally; a lease on a store: StoreLock).

Two runs resuming the same output (a SLURM requeue racing a manual rerun) would both append the
same rows. The lock is an flock(2) on OUTPUT.lock, held from before the journal is read until the
report is written. The kernel drops it when the process dies, however it dies, so a killed run
never leaves a stale lock; a second run fails at once, naming the holder's pid and host.

The file is removed on release. A run that opened the file just before the holder removed it
would lock a deleted inode, so after locking we check that the path still names our inode, and
start over if not.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

LEASE_S = float(os.environ.get("TOKENMILL_LOCK_LEASE_S", 600))


class OutputLocked(Exception):
    """Another run holds the output's lock; the message names it."""


def lock_path(output: Path) -> Path:
    return Path(str(output) + ".lock")


class OutputLock:
    """`with OutputLock(output):` holds the lock or raises OutputLocked."""

    def __init__(self, output: Path, command_line: str = ""):
        self.output = output
        self.path = lock_path(output)
        self.command_line = command_line
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise OutputLocked (OSError if the file cannot be made)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise OutputLocked(
                    f"{self.output} is being written by another tokenmill run ({holder}); wait "
                    "for it to finish or stop it, then rerun (a killed run releases it at once)"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file while we opened it: try again
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": self.command_line,
        }
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # releases the lock
        self._fd = None


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "pid unknown: it is just starting"
    return f"pid {info['pid']} on {info.get('host', '?')}, since {info.get('since', '?')}"


class StoreLock:
    """OUTPUT.lock on a store: an object naming its holder, renewed at every commit.

    A store has no flock, and a PUT cannot say "only if absent" everywhere, so this is a lease,
    not a mutex: a second run refuses (exit 6) while the lock names a live holder (the same host
    and a running pid, or another host that renewed it within TOKENMILL_LOCK_LEASE_S, default
    600 s); a killed run's lock is taken over at once from the same host, after the lease from
    another. Two runs starting within the same instant can both pass; the loser finds out at its
    next commit (the lock names the other run) and stops before writing another part or manifest.
    """

    def __init__(self, fs, path: str, url: str, command_line: str = ""):
        self.fs, self.path, self.url = fs, path, url
        self.command_line = command_line
        self.token = uuid.uuid4().hex
        self._held = False
        self._renewed = 0.0

    def acquire(self) -> None:
        info = self._read()
        if info is not None and _alive(info):
            holder = _lease_holder(info)
            raise OutputLocked(
                f"{self.url} is being written by another tokenmill run ({holder}); wait "
                "for it to finish or stop it, then rerun (a killed run's lock is taken over at "
                f"once on the same host, after {LEASE_S:.0f} s from another)"
            )
        self._write()
        self._held = True

    def renew(self) -> None:
        """Raise OutputLocked if another run took the lock over; else renew the lease (a PUT at
        most every LEASE_S / 10 seconds: one GET per commit otherwise)."""
        info = self._read()
        if info is not None and info.get("token") != self.token:
            self._held = False
            holder = _lease_holder(info)
            raise OutputLocked(
                f"another tokenmill run took {self.url} over ({holder}); this run stops "
                "without committing more"
            )
        if info is None or time.time() - self._renewed > LEASE_S / 10:
            self._write()

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        info = self._read()
        if info is None or info.get("token") == self.token:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.path) or b"{}")
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def _write(self) -> None:
        self._renewed = time.time()
        info = {
            "token": self.token,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "renewed": time.time(),
            "command": self.command_line,
        }
        self.fs.pipe_file(self.path, (json.dumps(info) + "\n").encode())


def _alive(info: dict[str, Any]) -> bool:
    if info.get("host") == socket.gethostname() and info.get("pid"):
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - float(info.get("renewed", 0)) < LEASE_S


def _lease_holder(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('since', '?')}"

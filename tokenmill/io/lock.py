"""OUTPUT.lock: one run per output at a time.

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
from pathlib import Path


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

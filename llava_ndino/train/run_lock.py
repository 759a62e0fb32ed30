"""One writer per run directory: an exclusive lock that a second training on the same ``output_dir``
fails on at once, naming the process that holds it.

The lock is ``flock`` on ``RUN/.lock``: the kernel releases it when the holder exits, however it
exits (kill -9 included), so a stale lock cannot exist. On file systems without ``flock`` the lock
falls back to the recorded process id, which is taken over when that process is gone (same host).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from pathlib import Path

from llava_ndino.formats.run_dir import LOCK_FILE

try:
    import fcntl
except ImportError:  # not on POSIX: only the process-id fallback
    fcntl = None


class RunLockedError(RuntimeError):
    """Another process is training in the same run directory."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse(run_dir: Path, holder: dict) -> RunLockedError:
    who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
    return RunLockedError(
        f"{run_dir} is in use by {who}: two trainings in one output_dir would overwrite each other's "
        "checkpoints; wait for it to finish, stop it, or pick another output_dir"
    )


class RunLock:
    """Hold the run directory's lock from :meth:`acquire` until :meth:`release` or process exit."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError` naming its holder."""
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock(fd, me)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(me) + "\n").encode())
        self._fd = fd

    def _lock(self, fd: int, me: dict) -> None:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                raise _refuse(self.run_dir, _holder(self.path)) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        holder = _holder(self.path)  # no flock here: trust a live process id on this host
        if (
            holder
            and holder.get("host") == me["host"]
            and holder.get("pid") != me["pid"]
            and _alive(holder["pid"])
        ):
            raise _refuse(self.run_dir, holder)

    def release(self) -> None:
        """Give the lock back (the file stays; its content names the last holder)."""
        if self._fd is not None:
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

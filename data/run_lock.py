"""One writing job per output directory: the exclusive lock experiments.train_lm, experiments.train_video and
data.pipeline hold on their --out for the job's lifetime. Two jobs on one directory (a double launch, a scheduler's
requeue while the old job still runs) interleaved their checkpoints, logs and shards silently (the second set the
first's metrics.jsonl aside as a run with no checkpoint while the first went on writing it). Readers (load_model,
load_video_model, data.report) take no lock.

The lock is `fcntl.flock` on `<out>/.jaxscale-run.lock`: the kernel releases it when the holder exits, however it
dies (kill -9 too), so a lock is never stale and nothing cleans up; the file stays, naming the last holder."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import socket
import sys
import time

LOCK_NAME = ".jaxscale-run.lock"


class DirLocked(RuntimeError):
    """Another live job holds the directory's lock; the message names the directory, the holder and the fix."""


class RunLock:
    """The exclusive lock on `out` (made if missing) for `job` (its name in the holder line), taken at once or
    refused with DirLocked (`wait`: taken once the holder lets go, for a shared cache). release() (also on leaving
    a `with`) frees it; a directory this lock made and nothing else wrote in is removed again, with the parents it
    made (a refused run leaves no directory). A file system without flock (a Lustre mount without -o flock, some FUSE
    mounts) runs unlocked, with a warning: the lock is a guard, not a need."""

    def __init__(self, out, job: str, wait: bool = False):
        self.out = pathlib.Path(out)
        self.path = self.out / LOCK_NAME
        self.fd = None
        while True:  # a lock on a file its holder removed (with the directory it made) since our open: again
            self.made = not self.out.exists()
            self.top = _first_missing(self.out)  # mkdir(parents=True) makes `out`'s missing parents too
            fd = self._open()
            try:
                locked = self._flock(fd, wait)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                os.close(fd)
                return
            if _same_file(fd, self.path):  # else it guarded nothing: the next job made and locked a new file
                break
            os.close(fd)
        self.fd = fd
        line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job": job,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (line + "\n").encode(), 0)

    def _open(self) -> int:
        for _ in range(3):  # a released lock removing the directory it made, between our mkdir and open: again
            try:  # (mkdir's exist_ok raises too when the directory goes between its mkdir and its check)
                self.out.mkdir(parents=True, exist_ok=True)
                # no O_TRUNC: the holder's line stays readable until this process holds the lock
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except (FileNotFoundError, FileExistsError):
                if os.path.lexists(self.out) and not self.out.is_dir():
                    raise  # a file in the way, not a race
        raise FileNotFoundError(f"{self.out}: removed while taking its lock (another job's released lock); "
                                "start again")

    def _flock(self, fd: int, wait: bool) -> bool:
        """Lock `fd` (False: the file system has no flock, said once) or raise DirLocked."""
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise
                print(f"waiting for {self.out}: in use by {holder_line(_holder(fd))}", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            return True
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                print(f"warning: cannot lock {self.out} ({e.strerror}: its file system has no flock); nothing stops "
                      "a second job writing there at the same time", file=sys.stderr)
                return False
            raise DirLocked(f"{self.out} is in use by another job: {holder_line(_holder(fd))}; two jobs "
                            "writing one directory mix their outputs. Wait for it, stop it, or use another --out"
                            ) from None

    def release(self):
        if self.fd is None:
            return
        if self.made and os.listdir(self.out) == [LOCK_NAME]:  # still holding it: no job can take this file now
            os.unlink(self.path)
            # and the parents it made (`--out new/run` refused left `new/`), up to the first that was there
            for d in [self.out, *self.out.parents[:len(self.out.parts) - len(self.top.parts)]]:
                try:
                    os.rmdir(d)
                except OSError:  # another job made a file there meanwhile: the directory is its own
                    break
        os.close(self.fd)  # (frees the lock)
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _first_missing(out: pathlib.Path) -> pathlib.Path:
    """The outermost directory of `out`'s path that does not exist (`out` itself when only it is missing)."""
    top = out
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def _same_file(fd: int, path: pathlib.Path) -> bool:
    try:
        st, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _holder(fd: int) -> str:
    """The lock file's text. Refused in the instant between the winner's flock and its write, it still named the last
    holder, a dead pid, as the job to stop: re-read (up to a second) while it names a process gone from this host, or
    is empty (the winner truncates the file, then writes its line: a refusal in between said "not yet written")."""
    for _ in range(100):
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if text and not _gone_here(text):
            break
        time.sleep(0.01)
    return text


def _gone_here(text: str) -> bool:
    try:
        h = json.loads(text)
        if h["host"] != socket.gethostname():
            return False
        os.kill(int(h["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, TypeError, OSError, OverflowError):  # not ours, another host, or alive (EPERM)
        pass
    return False


def holder_line(text: str) -> str:
    """The lock file's holder as 'pid P on host H (job, started T)', or what the file holds if it is not ours."""
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']} ({h['job']}, started {h['started']})"
    except (ValueError, KeyError, TypeError):
        return f"holder unknown (its lock file holds {text[:200]!r})" if text else "holder not yet written (starting)"

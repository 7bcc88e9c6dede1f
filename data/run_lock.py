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
    a `with`) frees it; a directory this lock made and nothing else wrote in is removed again (a refused run leaves
    no directory). A file system without flock (a Lustre mount without -o flock, some FUSE mounts) runs unlocked,
    with a warning: the lock is a guard, not a need."""

    def __init__(self, out, job: str, wait: bool = False):
        self.out = pathlib.Path(out)
        self.path = self.out / LOCK_NAME
        self.made = not self.out.exists()
        self.fd = None
        for _ in range(3):  # a refused run removing the directory it made, between our mkdir and open: again
            self.out.mkdir(parents=True, exist_ok=True)
            try:  # no O_TRUNC: the holder's line stays readable until this process holds the lock
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                break
            except FileNotFoundError:
                continue
        else:
            raise FileNotFoundError(f"{self.out}: removed while taking its lock (another job's refused start); "
                                    "start again")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                print(f"waiting for {self.out}: in use by {holder_line(holder)}", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not self.path.exists() or os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                    os.close(fd)  # the holder removed the directory it had made (nothing written): lock anew
                    self.__init__(out, job, wait)
                    return
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                print(f"warning: cannot lock {self.out} ({e.strerror}: its file system has no flock); nothing stops "
                      "a second job writing there at the same time", file=sys.stderr)
                return
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise DirLocked(f"{self.out} is in use by another {job} job: {holder_line(holder)}; two jobs writing "
                            "one directory mix their outputs. Wait for it, stop it, or use another --out") from None
        self.fd = fd
        line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job": job,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (line + "\n").encode(), 0)

    def release(self):
        if self.fd is None:
            return
        if self.made and os.listdir(self.out) == [LOCK_NAME]:  # still holding it: no job can take this file now
            os.unlink(self.path)
            try:
                os.rmdir(self.out)
            except OSError:  # another job made a file there meanwhile: the directory is its own
                pass
        os.close(self.fd)  # (frees the lock)
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def holder_line(text: str) -> str:
    """The lock file's holder as 'pid P on host H (job, started T)', or what the file holds if it is not ours."""
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']} ({h['job']}, started {h['started']})"
    except (ValueError, KeyError, TypeError):
        return f"holder unknown (its lock file holds {text[:200]!r})" if text else "holder not yet written (starting)"

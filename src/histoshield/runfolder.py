"""The run-folder contract: one writer at a time, and one kind of run per folder.

`claim(out, kind, resume=..., overwrite=...)` is held by every command that writes a run folder
(train, study, attack, certify; later cv, audit) for as long as it writes:

- an exclusive `fcntl.flock` on `out/.histoshield.lock`, taken before anything else is written;
  a second writer fails at once with one line naming the holder (pid, start time, command). The
  kernel drops the lock when its process dies, so a lock left by `kill -9` is simply taken over.
- the folder's kind: `run.json` ({kind, created, histoshield}) written on first claim, or for
  folders made before run.json existed, the kind their files show (KIND_MARKERS). A folder of
  another kind is refused; a finished run of the same kind needs `resume` or `overwrite`.

A process that already holds a folder may claim it again (nested use); claims of different
folders never wait on each other, so a study's training runs in its subfolders just work.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from histoshield.errors import HistoshieldError

LOCK = ".histoshield.lock"
RUN = "run.json"
KINDS = ("train", "study", "attack", "certify", "cv", "audit", "explain")

# Files that show a folder's kind when it has no run.json (folders written before run.json).
# Order matters: a study folder also holds results.json and certify.json.
KIND_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("study", ("state.json",)),
    ("train", ("best.pt", "last.pt", "metrics.csv")),
    ("certify", ("certify.json",)),
    ("attack", ("robustness.png",)),
)
# Files whose presence means a run of that kind finished (at least partly) and would be replaced.
FINISHED = {
    "train": ("last.pt", "best.pt"),
    "study": ("state.json",),
    "attack": ("results.json",),
    "certify": ("certify.json",),
    "cv": ("state.json",),
    "audit": ("results.json",),
    "explain": ("explain.json",),
}

_HELD: dict[Path, int] = {}  # folders this process holds: path -> nesting depth


def _is_attack_results(path: Path) -> bool:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    rows = obj.get("results") if isinstance(obj, dict) else None
    return isinstance(rows, list) and all(isinstance(r, dict) and "attack" in r for r in rows)


def kind_of(folder: str | Path) -> str | None:
    """The kind of run `folder` holds (run.json, else its files), or None for no run."""
    folder = Path(folder)
    info = read_run_info(folder)
    if info is not None:
        return info.get("kind")
    for kind, files in KIND_MARKERS:
        if any((folder / f).exists() for f in files):
            return kind
    if (folder / "results.json").is_file() and _is_attack_results(folder / "results.json"):
        return "attack"
    return None


def read_run_info(folder: str | Path) -> dict[str, Any] | None:
    """run.json of `folder` as a dict, or None when absent or unreadable."""
    try:
        obj = json.loads((Path(folder) / RUN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("kind"), str) else None


def os_error(e: OSError, path: str | Path | None = None, verb: str = "write") -> HistoshieldError:
    """One line for a file-system failure: which path, what happened, what to do."""
    where = path if path is not None else (e.filename or "a file")
    code = e.errno
    if code in (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", -1)):
        verb = "write"  # only writing can fail this way
    if code == errno.ENOSPC or code == getattr(errno, "EDQUOT", -1):
        what, todo = "no space left on the device", "free some space or choose another location"
    elif code == errno.EROFS:
        what, todo = "read-only file system", "choose a writable location"
    elif code in (errno.EACCES, errno.EPERM):
        what = "permission denied"
        todo = "choose a location you can write to" if verb == "write" else "check its permissions"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        what, todo = "part of the path is an existing file", "choose a folder path"
    elif code == errno.EISDIR:
        what, todo = "it is a folder", "pass a file path"
    elif code == errno.ENOENT:
        what, todo = "no such file or folder", "check the path"
    else:
        what, todo = e.strerror or type(e).__name__, "check the location"
    return HistoshieldError(f"cannot {verb} {where}: {what}; {todo}")


def _holder(lock: Path) -> str:
    try:
        h = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "another process"
    if not isinstance(h, dict):
        return "another process"
    return (
        f"{h.get('kind', 'a histoshield')} run (pid {h.get('pid', '?')}, started "
        f"{h.get('started', '?')}: {h.get('command', '?')})"
    )


def _open_locked(out: Path) -> int:
    """Open and flock out/LOCK without waiting; the fd, or one line naming the holder."""
    import fcntl

    lock = out / LOCK
    for _ in range(5):  # the lock file may be replaced between open and flock: retry
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HistoshieldError(
                f"{out} is in use by another {_holder(lock)}; wait for it to finish or choose "
                "another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise HistoshieldError(f"cannot lock {lock}: it keeps being replaced; choose another --out")


def _write_holder(fd: int, kind: str) -> None:
    info = {
        "pid": os.getpid(),
        "kind": kind,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["histoshield", *sys.argv[1:]]) if sys.argv else kind,
    }
    data = (json.dumps(info) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def check_kind(out: Path, kind: str, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder of another kind, or a finished run of this kind without resume/overwrite."""
    found = kind_of(out)
    if found is not None and found != kind:
        raise HistoshieldError(
            f"{out} holds {_a(found)} run, not {_a(kind)} run; choose another --out (nothing was "
            "written)"
        )
    done = any((out / f).exists() for f in FINISHED.get(kind, ()))
    if found == kind and done and not (resume or overwrite):
        raise HistoshieldError(
            f"{out} already holds {_a(kind)} run: {_AGAIN.get(kind, _AGAIN['attack'])}, or choose "
            "another --out"
        )


_AGAIN = {
    "train": "pass --resume to continue it",
    "study": "pass --resume to continue it, --overwrite to start again",
    "cv": "pass --resume to continue it, --overwrite to start again",
    "attack": "pass --overwrite to replace it",
}


def _write_run_info(out: Path, kind: str) -> None:
    from histoshield import __version__
    from histoshield.runtime import write_json

    if read_run_info(out) is None:
        created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(out / RUN, {"kind": kind, "created": created, "histoshield": __version__})


def _only_ours(out: Path) -> bool:
    try:
        return {p.name for p in out.iterdir()} <= {LOCK, RUN}
    except OSError:
        return False


@contextmanager
def claim(
    out: str | Path, kind: str, *, resume: bool = False, overwrite: bool = False
) -> Iterator[Path]:
    """Hold `out` exclusively as a `kind` run folder while the block writes into it."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}")
    out = Path(out).expanduser()
    key = out.resolve()
    if key in _HELD:  # this process already holds it (nested call): nothing more to take
        _HELD[key] += 1
        try:
            yield out
        finally:
            _HELD[key] -= 1
        return
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 writes the run folder
        yield out
        return
    if out.exists() and not out.is_dir():
        raise HistoshieldError(f"--out {out} is an existing file; pass a folder for the run")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(out)
    except OSError as e:
        raise os_error(e, out) from None
    try:
        try:
            _write_holder(fd, kind)
        except OSError as e:
            raise os_error(e, out / LOCK) from None
        check_kind(out, kind, resume=resume, overwrite=overwrite)
        _write_run_info(out, kind)
        _HELD[key] = 1
        try:
            yield out
        finally:
            _HELD.pop(key, None)
    finally:
        if created and _only_ours(out):  # nothing of the run was written: leave no trace
            for name in (RUN, LOCK):
                (out / name).unlink(missing_ok=True)
            try:
                out.rmdir()
            except OSError:
                pass
        os.close(fd)

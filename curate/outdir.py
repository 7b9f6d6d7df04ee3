"""Complete-or-nothing output directories.

A step that writes a whole directory (``curate filter --out``, ``curate
export --out``) builds it in a hidden staging directory beside the target
(``.NAME.partial-PID-XXXX``) and renames it into place when every file is
written. A killed or failed step leaves the target as it was (absent, or the
previous complete output; an existing target is swapped with the new one in
one atomic step where Linux allows it); the next run removes stale staging
directories of dead processes. ``--force`` replaces an earlier output of the same step, and
refuses a directory holding anything that step does not write, so it never
deletes a user's files.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from curate.errors import CurateError
from curate.fsutil import remove_inside

_STAGING = ".{name}.partial-"
_RETIRED = ".{name}.old-"


def _mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(target: Path) -> None:
    """Delete staging / retired directories beside ``target`` left by processes that are gone."""
    if not target.parent.is_dir():
        return
    for prefix in (_STAGING, _RETIRED):
        for path in target.parent.glob(prefix.format(name=target.name) + "*"):
            pid = path.name[len(prefix.format(name=target.name)):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                remove_inside(path, target.parent)


def check_target(target: Path, *, force: bool, owned: Iterable[str], step: str) -> None:
    """Refuse a target that is a file, non-empty without ``force``, or holding files ``step`` does not write."""
    if target.exists() and not target.is_dir():
        raise CurateError(f"--out {target} is a file: give a directory")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not force:
        raise CurateError(f"{target} already exists and is not empty: choose another --out or pass --force to overwrite")
    patterns = list(owned)
    foreign = sorted(p.name for p in target.iterdir() if not any(fnmatch.fnmatch(p.name, pat) for pat in patterns))
    if foreign:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise CurateError(
            f"--force would replace {target}, but it holds {listed}, which {step} did not write: "
            "move those out or choose another --out"
        )


@contextmanager
def staged_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``target`` (call :func:`check_target` first)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=_STAGING.format(name=target.name) + f"{os.getpid()}-"))
    try:
        os.chmod(stage, _mode())
        yield stage
        _publish(stage, target)
    except BaseException as exc:
        remove_inside(stage, target.parent)
        if _disk_full(exc):
            raise CurateError(
                f"the disk holding {target.parent} is full; nothing was written to {target}: free space and rerun"
            ) from None
        raise


def _disk_full(exc: BaseException) -> bool:
    """True for an out-of-space error, raised by Python (OSError) or by polars' writers (os error 28)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, Exception) and "No space left on device" in str(exc)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(stage: Path, target: Path) -> None:
    if not target.exists():
        os.rename(stage, target)
        return
    if _exchange(stage, target):  # target is now the new output; stage holds the old one
        remove_inside(stage, target.parent)
        return
    # no atomic swap: two renames; a kill between them leaves no target (the next run writes it anew)
    retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=_RETIRED.format(name=target.name) + f"{os.getpid()}-"))
    os.rmdir(retired)  # only the unique name is wanted
    os.rename(target, retired)
    os.rename(stage, target)
    remove_inside(retired, target.parent)

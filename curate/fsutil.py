"""Safe names and safe deletes: nothing curate removes can lie outside the directory it belongs to.

Every delete in the package goes through :func:`remove_inside`, which
resolves the path (following ``..`` and symlinks) and refuses it unless it
is strictly inside ``root``, the run / output directory that owns it. Names
that become path components (training runs of a recipe, ...) are checked
with :func:`check_slug` first, so a recipe key such as ``../../victim`` is
refused before anything is written.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from curate.errors import CurateError

SLUG = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def check_slug(name: object, key: str) -> str:
    """``name`` if it is a slug (lower-case letters, digits, ``_ . -``; no ``..``), else a CurateError naming ``key``."""
    if not isinstance(name, str) or not SLUG.match(name) or ".." in name:
        raise CurateError(f"{key}: {name!r} is not a valid name; use lower-case letters, digits, '_', '.' and '-' "
                          "(starting with a letter or digit, no '..' and no '/'), e.g. dpo or sparsepo-l1")
    return name


def remove_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Delete the file or directory ``path`` if it exists; refuse unless it lies strictly inside ``root``.

    A symlink inside ``root`` is removed itself, never what it points to.
    Returns whether something was removed.
    """
    path, base = Path(path), Path(root).resolve()
    target = path.parent.resolve() / path.name if path.is_symlink() else path.resolve()
    if target == base or not target.is_relative_to(base):
        raise CurateError(f"refusing to delete {path}: it is not inside {root}, the directory it belongs to; "
                          "this is a bug or a crafted name, so nothing was deleted")
    if path.is_symlink() or path.is_file():
        path.unlink()
        return True
    if path.is_dir():
        shutil.rmtree(path)
        return True
    return False

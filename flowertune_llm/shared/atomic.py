"""Atomic writes: a file or folder is made under a temporary name beside its target, then renamed.

A reader (a resuming run, a client loading the built-in model, a second client of the same node)
sees the old content or the new, never a half-written file, and a write that fails or is killed
leaves the old content as it was. The temporary name is a dot, the target's name and a random
tail, in the target's folder: the rename then stays on one file system, where it is atomic.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """Return the process's umask (reading it means setting it: it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_normal_mode(path: str | Path, folder: bool = False) -> None:
    """Give a temporary file (mkstemp: 0600) or folder (mkdtemp: 0700) the mode the user's umask gives."""
    # mkstemp/mkdtemp are private on purpose; once renamed into place, results are ordinary files
    # that the user's other accounts, group or backup tools may read, as `open` would have made them.
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def give_normal_modes(folder: Path) -> None:
    """Give a staged folder and everything in it the modes the user's umask gives."""
    give_normal_mode(folder, folder=True)
    for path in folder.rglob("*"):
        give_normal_mode(path, folder=path.is_dir())


@contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write; on success it replaces `target`, on failure it goes."""
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        # After the writer: safetensors, for one, creates its files 0600 whatever was there.
        give_normal_mode(temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(target: Path, text: str) -> None:
    """Write text (UTF-8) to `target` atomically, on disk before the rename."""
    with staged_file(target) as temporary, open(temporary, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        # Without it, a crash soon after the rename can leave an empty file under the real name.
        os.fsync(stream.fileno())


@contextmanager
def staged_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside `target` to fill; on success it is renamed to `target`.

    On failure the staged folder is removed and `target` is left as it was. An existing `target`
    is removed first if `replace`, else the rename fails (an empty one is replaced). The staged
    folder is private (mkdtemp's 0700); `give_normal_modes` opens it up where that is wanted.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        # os.replace renames a folder only onto an empty one (or none).
        if replace and target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

"""Writes that never lose the last good file: new output is written beside its target under a
clearly named partial name and renamed into place only when complete.

    .NAME.partial-<pid>   output being written by process <pid> (a killed writer leaves it; the
                          next writer of NAME sweeps it once <pid> is gone)
    .NAME.old-<pid>       the previous directory NAME, moved aside for the instant between two
                          renames (a crash there leaves it; `recover_dir` puts it back)

A rename within one folder is atomic on POSIX file systems (and NFS), so a reader sees the old
file or the new one, never a mix. A directory cannot be replaced by one rename when the target
exists, hence the move-aside step.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

PARTIAL, OLD = ".partial-", ".old-"


def partial_path(target: str | Path) -> Path:
    """Where this process writes `target`'s next version: a hidden sibling naming the writer."""
    target = Path(target)
    return target.with_name(f".{target.name}{PARTIAL}{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _leftovers(target: Path, marker: str) -> list[tuple[Path, int]]:
    found = []
    for path in target.parent.glob(f".{target.name}{marker}*"):
        suffix = path.name.rsplit(marker, 1)[-1]
        if suffix.isdigit():
            found.append((path, int(suffix)))
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_partials(target: str | Path) -> list[Path]:
    """Delete the partial versions of `target` whose writer is gone (a killed or failed run);
    a live writer's (another run writing the same target right now) is kept. Returns what went.

    Liveness is a pid check on this host: on storage shared between hosts, run one writer per
    target at a time."""
    target = Path(target)
    swept = []
    for path, pid in _leftovers(target, PARTIAL):
        if _pid_alive(pid):
            continue
        log.warning("deleting %s, left by a writer (pid %d) that did not finish", path, pid)
        _remove(path)
        swept.append(path)
    return swept


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file of a folder, to disk: a rename must never publish a file whose
    bytes are still only in the page cache (a power loss would leave it empty)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename still stands
        pass
    finally:
        os.close(fd)


def commit_file(partial: str | Path, target: str | Path) -> None:
    """Publish a complete file: flush it, then rename it over `target` in one step."""
    partial, target = Path(partial), Path(target)
    fsync_tree(partial)
    os.replace(partial, target)
    _fsync_dir(target.parent)


def recover_dir(target: str | Path) -> Path | None:
    """After a crash between `swap_dir`'s two renames `target` is missing and its previous
    version sits aside as `.NAME.old-<pid>`: put it back. With `target` present, old versions
    left aside by dead writers are deleted. Returns the directory restored, if any."""
    target = Path(target)
    olds = sorted(
        ((path, pid) for path, pid in _leftovers(target, OLD) if not _pid_alive(pid)),
        key=lambda item: item[0].stat().st_mtime,
    )
    restored = None
    if not target.exists() and olds:
        path, _ = olds.pop()
        log.warning("restoring %s from %s, left by a writer that died mid-swap", target, path)
        os.replace(path, target)
        restored = target
    for path, _ in olds:
        _remove(path)
    return restored


def swap_dir(new: str | Path, target: str | Path) -> None:
    """Publish a complete directory at `target`: the old one is moved aside, the new one renamed
    in, and only then the old one deleted. At every instant `target` is a complete directory,
    or missing with the old one aside (restored by `recover_dir`)."""
    new, target = Path(new), Path(target)
    fsync_tree(new)
    aside = target.with_name(f".{target.name}{OLD}{os.getpid()}")
    _remove(aside)  # only this pid writes that name: a leftover of an earlier process with it
    if target.exists():
        os.replace(target, aside)
    os.replace(new, target)
    _fsync_dir(target.parent)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)


def prepare_dir(target: str | Path) -> Path:
    """Ready a directory write of `target`: recover a crashed swap, sweep dead writers' partials,
    and return this process's (empty) partial directory beside it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    sweep_partials(target)
    partial = partial_path(target)
    _remove(partial)
    return partial

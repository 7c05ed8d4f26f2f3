"""Directories that survive crashes and concurrent writers (single files: ``provenance.atomic_write``).

* ``replace_dir(target, fill)``: a directory (a stored prompt, a checkpoint) is written as a new
  version ``.{name}@v-{pid}-{hex}`` beside ``target``; ``target`` itself is a relative symlink to
  the current version, swapped by one ``rename(2)``. So the name is never missing, never half
  written, and still an ordinary directory to every reader (PEFT's ``from_pretrained`` included).
* ``locked(target)``: writers of one name are serialised across threads and processes by
  ``flock`` on ``.{name}@lock`` (a lock is held by an open file description, so two threads of one
  process exclude each other too); a writer that cannot get it in time gets ``Busy``.
* ``new_dir(target)``: a folder made once (an export, a converted model) appears whole or not at all.
* ``sweep(root)``: what a killed writer leaves (versions nothing points to, temporary links and
  files, and the ``.tmp-*``/``.old-*`` asides of earlier versions of this module) is removed by
  the next process, under the name's lock, so nothing in flight is ever touched.

Invariant: every hidden entry this module creates is ``.{name}@{kind}``; names never contain
``@``, so a leftover always says whose it is.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from softprompt.config import UserError

STARTED = time.time()  # leftovers from before this process started may be swept
LOCK_WAIT_S = 10.0  # how long a writer waits for another writer of the same name
LEFTOVER = re.compile(r"^\.(?P<name>[^@/]+)@(?P<kind>v|link|tmp)-(?P<pid>\d+)-[0-9a-f]+$")
LEGACY = re.compile(r"^\.(?P<name>[^@/]+?)\.(?:tmp-[a-z0-9_]{8}|old-\d+|rm-\d+)$")  # pre-versioned asides


class Busy(UserError):
    """Another writer holds the name for longer than ``LOCK_WAIT_S``: try again (HTTP 409)."""


def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (directories: the renames in them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def locked(target: Path, wait_s: float | None = -1) -> Iterator[None]:
    """Hold the writer lock of ``target``; wait ``wait_s`` seconds for it (negative: ``LOCK_WAIT_S``,
    ``None``: as long as it takes), then raise ``Busy``."""
    target = Path(target)
    wait_s = LOCK_WAIT_S if wait_s is not None and wait_s < 0 else wait_s
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent / f".{target.name}@lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if wait_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise Busy(f"{target.name!r} is being written by another request; try again") from None
                    time.sleep(0.005)
        yield
    finally:
        os.close(fd)  # closing the description releases the lock


def current_version(target: Path) -> Path | None:
    """The version directory ``target`` points to (``target`` itself for a plain directory);
    None if it is gone, also when a remover unlinks it while this runs."""
    try:
        return target.parent / os.readlink(target)
    except OSError as e:  # EINVAL: not a symlink; ENOENT: no such name (any more)
        if e.errno != errno.EINVAL:
            return None
    return target if target.is_dir() else None


def _fill_fresh(path: Path, fill: Callable[[Path], None]) -> None:
    path.mkdir()
    fill(path)
    for f in path.iterdir():
        fsync_path(f)
    fsync_path(path)


def replace_dir(target: Path, fill: Callable[[Path], None], wait_s: float | None = -1,
                exist_ok: bool = True) -> Path:
    """Make ``target`` a directory whose files ``fill(dir)`` writes: a new version, then one
    symlink swap. Raises ``Busy`` if another writer holds the name longer than ``wait_s``, and
    ``FileExistsError`` if ``target`` exists and not ``exist_ok``."""
    target = Path(target)
    with locked(target, wait_s):
        if not exist_ok and os.path.lexists(target):
            raise FileExistsError(target)
        sweep_name(target)
        ver = target.with_name(f".{target.name}@v-{_token()}")
        link = target.with_name(f".{target.name}@link-{_token()}")
        moved = None
        try:
            _fill_fresh(ver, fill)
            os.symlink(ver.name, link)
            old = current_version(target)
            if old == target:  # a plain directory from before versioning: move it aside first
                old = moved = target.with_name(f".{target.name}@v-{_token()}")
                os.replace(target, moved)
            os.replace(link, target)
            fsync_path(target.parent)
        except BaseException:
            if moved is not None and not os.path.lexists(target):
                os.replace(moved, target)  # put the old prompt back
            link.unlink(missing_ok=True)
            shutil.rmtree(ver, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def new_dir(target: Path) -> Iterator[Path]:
    """Yield an empty directory that becomes ``target`` (absent, or an empty directory) once the
    block succeeds; on failure nothing appears. For folders made once (exports, converted
    models); a caller that races other writers holds ``locked(target)`` around it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}@tmp-{_token()}")
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        try:
            os.replace(tmp, target)  # rename(2) replaces an empty directory, refuses a full one
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise UserError(f"{target} exists and is not an empty directory") from None
            raise
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_dir(target: Path, wait_s: float | None = -1) -> bool:
    """Remove ``target`` (the name vanishes at once, then its files); False if it was absent."""
    target = Path(target)
    with locked(target, wait_s):
        if not os.path.lexists(target):
            return False
        ver = current_version(target)
        if target.is_symlink():
            target.unlink()
        else:
            ver = target.with_name(f".{target.name}@v-{_token()}")
            os.replace(target, ver)
        fsync_path(target.parent)
        if ver is not None:
            shutil.rmtree(ver, ignore_errors=True)
    return True


def _owner_alive(entry: str) -> bool:
    m = LEFTOVER.match(entry) or re.search(r"-(?P<pid>\d+)-", entry)
    if not m:
        return False
    pid = int(m.group("pid"))
    if pid == os.getpid():
        return False  # our own leftovers: the caller holds the lock or the write failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_name(target: Path) -> list[Path]:
    """Remove the leftovers of ``target``'s dead writers; the caller holds ``locked(target)``."""
    target = Path(target)
    current = current_version(target)
    gone = []
    for entry in os.listdir(target.parent):
        m = LEFTOVER.match(entry)
        path = target.parent / entry
        if m and m.group("name") == target.name and path != current:
            if m.group("kind") == "tmp" and _owner_alive(entry):
                continue  # new_dir folders are not always made under the name's lock
            _remove(path)
            gone.append(path)
        elif (lm := LEGACY.match(entry)) and lm.group("name") == target.name and path.lstat().st_mtime < STARTED:
            _remove(path)
            gone.append(path)
    return gone


def sweep(root: Path) -> list[Path]:
    """Remove what killed writers left in ``root``; names being written right now are skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = {m.group("name") for e in os.listdir(root) if (m := LEFTOVER.match(e) or LEGACY.match(e))}
    gone: list[Path] = []
    for name in sorted(names):
        try:
            with locked(root / name, wait_s=0):
                gone += sweep_name(root / name)
        except Busy:
            continue
    return gone


def sweep_temp(prefix: str) -> list[Path]:
    """Remove ``{prefix}{pid}-*`` folders in the system temp directory whose process is gone."""
    tmp = Path(tempfile.gettempdir())
    gone = []
    for entry in os.listdir(tmp):
        path = tmp / entry
        if entry.startswith(prefix) and not _owner_alive(entry):
            try:
                if path.lstat().st_mtime < STARTED:
                    _remove(path)
                    gone.append(path)
            except OSError:
                continue
    return gone

"""Files that are whole or absent: written to a temporary file in the destination's folder, flushed,
fsynced and renamed over the destination (a rename within one file system is atomic on POSIX), so a
kill or a full disk during the write leaves the previous file, or none, never a torn one.

One writer for everything that must not tear: checkpoints, ``last_checkpoint``, the results
contract, trimmed ``metrics.json`` and cached ground truth.
"""
import contextlib
import errno
import os
import tempfile

from . import kill_points

TEMP_MARK = ".partial-"  # temporary names: .<final name>.partial-<random>


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; the final file gets what open() would give it
_NEW_FILE_MODE = 0o666 & ~_umask()


def temporary_name_of(path):
    """Whether ``path``'s name is one of atomic_write's temporary files."""
    name = os.path.basename(path)
    return name.startswith(".") and TEMP_MARK in name


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """``with atomic_write(path, "wb") as f: ...``: ``path`` holds the new content after the block,
    its old content (or nothing) if the block or the write fails. A full disk raises an OSError that
    names the folder."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    folder, name = os.path.split(os.path.abspath(path))
    kill_points.reached("before-write", name)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}{TEMP_MARK}", dir=folder)
        os.fchmod(fd, _NEW_FILE_MODE)
        with os.fdopen(fd, mode, **open_kwargs) as f:
            cut = kill_points.armed("mid-write", name)
            yield f if cut is None else _StopsAtByte(f, int(cut))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            _remove(tmp)
        full = _disk_full(e)
        if full is not None:
            raise OSError(full.errno, f"no space left to write {name} in {folder}; the previous file, if any, is "
                          f"intact ({full.strerror})") from e
        raise
    _fsync_folder(folder)
    kill_points.reached("after-rename", name)


def remove_stale_temporaries(folder):
    """Delete the temporary files a killed writer left in ``folder``; returns their paths."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    stale = [os.path.join(folder, n) for n in names if temporary_name_of(n)]
    for p in stale:
        _remove(p)
    return stale


class _StopsAtByte:
    """The fault suite's torn write (kill point ``mid-write``): writes through to ``f`` until
    ``limit`` bytes, flushes them to disk and stops the process there."""

    def __init__(self, f, limit):
        self._f, self._left = f, limit

    def write(self, data):
        if len(data) >= self._left:
            self._f.write(data[: self._left])
            self._f.flush()
            os.fsync(self._f.fileno())
            kill_points.kill()
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _disk_full(e):
    """The ENOSPC / EDQUOT error behind ``e``, if any (torch.save raises a RuntimeError from it)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


def _remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _fsync_folder(folder):
    # the rename itself is durable once the folder's entry is on disk
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

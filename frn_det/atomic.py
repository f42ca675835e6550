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

TEMP_MARK = ".partial-"  # temporary names: .<final name>.partial-<random>


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
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{TEMP_MARK}", dir=folder)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"no space left to write {os.path.basename(path)} in {folder}; the previous "
                          f"file, if any, is intact ({e.strerror})") from e
        raise
    except BaseException:
        _remove(tmp)
        raise
    _fsync_folder(folder)


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

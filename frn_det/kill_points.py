"""Named kill points for the fault suite (tests/test_faults.py): a run started with
``FRN_DET_KILL_AT=<point>:<target>[:<byte>]`` sends itself a signal (SIGKILL unless
``FRN_DET_KILL_WITH`` names another, e.g. ``TERM``) when it reaches that point, the way a crash,
the OOM killer or a scheduler would stop it there.

Points (where they are reached):

- ``before-write:<file name glob>``: atomic_write, before anything of the file is written;
- ``mid-write:<glob>:<byte>``: atomic_write, once ``byte`` bytes of the temporary file are written
  (they are flushed first, so the torn temporary file is on disk);
- ``after-rename:<glob>``: atomic_write, the new file in place, before the caller goes on (for a
  checkpoint: before ``last_checkpoint`` names it);
- ``evaluation:<n>``: the start of this process's n-th evaluation;
- ``iteration:<i>``: the end of training iteration i (the signal path: ``FRN_DET_KILL_WITH TERM``).

``FRN_DET_KILL_RANK`` (default 0) restricts a point to one process of a multi-process run, and
``FRN_DET_KILL_WHO=parent`` sends the signal to the process's parent (the launcher of a
multi-process run) instead. Unset, every point is a dictionary lookup that does nothing.
"""
import fnmatch
import os
import signal

ENV = "FRN_DET_KILL_AT"
POINTS = ("before-write", "mid-write", "after-rename", "evaluation", "iteration")
_counts = {}


def armed(point, target, rank=0):
    """The kill point's byte argument ("" if it has none) when ``FRN_DET_KILL_AT`` arms ``point``
    for ``target`` in the process of this ``rank``; None otherwise."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, rest = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown kill point {name!r}; known: {', '.join(POINTS)}")
    pattern, _, byte = rest.partition(":")
    if name != point or rank != int(os.environ.get("FRN_DET_KILL_RANK", "0")):
        return None
    return byte if fnmatch.fnmatchcase(str(target), pattern) else None


def reached(point, target, rank=0):
    """Stop here if ``FRN_DET_KILL_AT`` arms ``point`` for ``target``."""
    if armed(point, target, rank) is not None:
        kill()


def reached_nth(point, rank=0):
    """Counts the calls for ``point``; stops at the n-th when ``FRN_DET_KILL_AT`` is ``point:n``."""
    _counts[point] = _counts.get(point, 0) + 1
    reached(point, _counts[point], rank)


def kill():
    signum = getattr(signal, "SIG" + os.environ.get("FRN_DET_KILL_WITH", "KILL").upper())
    who = os.getppid() if os.environ.get("FRN_DET_KILL_WHO") == "parent" else os.getpid()
    os.kill(who, signum)

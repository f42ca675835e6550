"""Preemption: SIGTERM (a cluster scheduler, ``kill``, ``docker stop``) and SIGINT (Ctrl-C) stop a
training run at the end of the current iteration with a checkpoint, which ``--resume`` continues
as it does a periodic one (bitwise, frn_det.engine.resumable). The one place that handles signals,
for both tools (the yacs Trainer and the LazyConfig loop register :class:`StopOnSignal`;
:func:`frn_det.engine.launch.launch` runs :func:`run_stoppable`).

- The first signal is a request: the iteration under way finishes (with its periodic checkpoint,
  if one is due), a checkpoint ``model_<iteration>.pth`` is written (frn_det.atomic: whole or
  absent), and the process exits with ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT:
  what a shell reports for a process the signal ended, and non-zero so that no scheduler takes the
  run for a finished one), after a message saying how to resume. An evaluation due at that
  iteration is left to ``--resume``, which runs it first.
- A second signal ends the process at once (the signal's default action).
- Every process of a multi-process run stops after the same iteration: they agree on the request at
  the end of each iteration (one all_gather of an integer). The launching process forwards its
  signals to the training processes through shared memory, so it does not matter whether a signal
  reaches all processes (Ctrl-C, Slurm) or only the launcher (``kill <pid>``, Kubernetes, docker).
- Data-loader worker processes, forked from a training process, inherit the handler and ignore the
  signal: the training process decides, and they stop with it.
- Outside the training loop (data checks, model building, the final evaluation) signals act as
  they do without frn-det; a request during the last iteration lets the run finish.
"""
import logging
import multiprocessing
import os
import signal
import sys
import threading

import detectron2.utils.comm as comm
import torch.multiprocessing as mp
from detectron2.engine import HookBase

from .. import kill_points

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum):
    return 128 + int(signum)


STOP_EXIT_CODES = {exit_code(s) for s in STOP_SIGNALS}


class TrainingStopped(SystemExit):
    """Raised out of ``trainer.train()`` after the stop checkpoint: exits with ``128 + signum``."""

    def __init__(self, signum, iteration):
        super().__init__(exit_code(signum))
        self.signum, self.iteration = signum, iteration


class _Requests:
    """This process's stop request: the first signal's number (0: none), and in a training process
    of a multi-process run the launcher's (shared memory)."""

    signum = 0
    from_launcher = None  # a RawValue('i') set by run_stoppable's forwarding

    @classmethod
    def current(cls):
        return cls.signum or (cls.from_launcher.value if cls.from_launcher is not None else 0)


class _Handlers:
    """Installs a handler for STOP_SIGNALS in this process; restores the previous ones on exit."""

    def __init__(self, on_signal):
        self._on_signal, self._previous, self._pid = on_signal, {}, os.getpid()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # where Python runs signal handlers
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            return  # a forked data-loader worker: the process that forked it decides
        self._on_signal(signum)


def _second_signal_ends_at_once(signum):
    # logging may hold its lock in the interrupted code: write to the file descriptor
    os.write(2, f"\n{signal.Signals(signum).name} again: stopping at once\n".encode())
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _request_stop(signum):
    if _Requests.signum:
        _second_signal_ends_at_once(signum)
    _Requests.signum = signum
    os.write(2, (f"\n{signal.Signals(signum).name}: finishing the current iteration, then writing a checkpoint "
                 "(send it again to stop at once)\n").encode())


class StopOnSignal(HookBase):
    """Stops training at the end of an iteration after SIGTERM or SIGINT, with a checkpoint written
    by ``checkpointer`` under PeriodicCheckpointer's name. Register it after PeriodicCheckpointer and
    before EvalHook, on every process."""

    def __init__(self, checkpointer, resume_hint="the same command with --resume"):
        self.checkpointer, self._hint = checkpointer, resume_hint
        self._handlers, self._ignored = _Handlers(_request_stop), False

    def before_train(self):
        _Requests.signum = 0
        self._handlers.__enter__()

    def after_train(self):
        self._handlers.__exit__()

    def after_step(self):
        iteration = self.trainer.iter
        kill_points.reached("iteration", iteration, comm.get_rank())
        signum = _Requests.current()
        if comm.get_world_size() > 1:  # stop together: the request of any process counts for all
            signum = max(comm.all_gather(signum))
        if not signum:
            return
        if iteration >= self.trainer.max_iter - 1:
            if not self._ignored:
                self._ignored = True
                logger.warning(f"{signal.Signals(signum).name} during the last iteration: finishing the run "
                               "(final checkpoint, final evaluation, results)")
            return
        name = f"model_{iteration:07d}"
        if os.path.basename(self.checkpointer.get_checkpoint_file()) != f"{name}.pth":  # not written periodically
            self.checkpointer.save(name, iteration=iteration)
        comm.synchronize()
        path = os.path.join(self.checkpointer.save_dir, f"{name}.pth")
        logger.warning(f"Stopped by {signal.Signals(signum).name} after iteration {iteration} (process {comm.get_rank()} "
                       f"of {comm.get_world_size()}); checkpoint {path}. To continue, run {self._hint}. "
                       f"Exit code {exit_code(signum)}.")
        raise TrainingStopped(signum, iteration)


class _WithLauncherRequests:
    """A training process's main function, which also sees the stop requests of its launcher."""

    def __init__(self, main, shared):
        self._main, self._shared = main, shared

    def __call__(self, *args):
        _Requests.from_launcher = self._shared
        return self._main(*args)


def _forward_to_training_processes(shared):
    def on_signal(signum):
        if shared.value:  # the second: the training processes end now, and so does this one
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)
            _second_signal_ends_at_once(signum)
        shared.value = signum
        os.write(2, (f"\n{signal.Signals(signum).name}: the training processes finish their iteration and write a "
                     "checkpoint (send it again to stop at once)\n").encode())

    return on_signal


def run_stoppable(launch, main, world_size, *args, **kwargs):
    """``launch(main, *args, **kwargs)`` (detectron2's launcher) with the stop requests of this
    module: with several processes, this (launching) process forwards its signals to them, and a
    stop of theirs ends this process with their exit code (a TrainingStopped without the traceback
    of torch.multiprocessing)."""
    if world_size <= 1:
        return launch(main, *args, **kwargs)
    shared = multiprocessing.get_context("spawn").RawValue("i", 0)
    try:
        with _Handlers(_forward_to_training_processes(shared)):
            return launch(_WithLauncherRequests(main, shared), *args, **kwargs)
    except mp.ProcessExitedException as e:
        if e.exit_code in STOP_EXIT_CODES:
            print(f"Training stopped by {signal.Signals(e.exit_code - 128).name}: resume with the same command and "
                  "--resume", file=sys.stderr)
            raise SystemExit(e.exit_code) from None
        raise

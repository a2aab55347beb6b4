"""Stop requests from signals, and what to do about them.

The handler only records the signal. The trainer polls `requested` at step boundaries (and between
evaluation batches), all ranks agree over a collective, rank 0 writes one consistent checkpoint,
and only then does anything leave: never a save from inside a handler at an arbitrary point of a
step (submitit's default does that; our handlers replace its USR2/TERM handlers in the job).

  USR2 (configurable) : Slurm's warning before preemption or the time limit -> checkpoint, requeue
                        (USR1 and USR2 are both warnings whichever checkpoint.signal names)
  SIGTERM             : scancel, or a cluster without preempt_send_user_signal -> checkpoint, exit
  SIGINT              : Ctrl-C -> checkpoint, exit
  SIGHUP              : the terminal closed (ssh dropped) -> checkpoint, exit; left alone under nohup
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from contextlib import contextmanager
from typing import Iterator, Optional

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 3     # stopped on a signal with a checkpoint saved; not requeued (resumable)
EXIT_REQUEUED = 5        # checkpoint saved and the job put back in the queue; the CLI exits 0 for it
EXIT_GAVE_UP = 4         # time limit hit more than checkpoint.max_requeues times
# the ends every rank agrees on (the ranks leave together); any other is a failure or a Ctrl-C of one rank
AGREED_EXITS = frozenset({0, EXIT_INTERRUPTED, EXIT_REQUEUED, EXIT_GAVE_UP})

# seconds before the time limit that Slurm's --signal warns: submit sets it for its jobs, slurm/train.sbatch exports it
SIGNAL_LEAD_ENV = "ALLCONV_SIGNAL_LEAD_S"
DEFAULT_SIGNAL_LEAD_S = 120.0


def signal_lead_s() -> float:
    """The signal lead this job was given; ValueError naming the variable and the fix for one that is no number
    of seconds (read at start-up too, so a typo fails there, not at the time limit)."""
    raw = os.environ.get(SIGNAL_LEAD_ENV, "").strip()
    if not raw:
        return DEFAULT_SIGNAL_LEAD_S
    try:
        lead = float(raw)
    except ValueError:
        lead = -1.0
    if not 0 <= lead < float("inf"):
        raise ValueError(f"{SIGNAL_LEAD_ENV}={raw!r} is not a number of seconds >= 0: set it to the seconds of the job's "
                         f"--signal=...@SECONDS (e.g. {SIGNAL_LEAD_ENV}=120 with --signal=USR2@120), or unset it for "
                         f"{DEFAULT_SIGNAL_LEAD_S:g}")
    return lead


def signum(name: str) -> int:
    return getattr(signal, "SIG" + name.upper().removeprefix("SIG"))


# A stop signal that arrived before training installed its StopRequest (see `catch_early`).
_early: Optional[int] = None
# A SIGTERM or SIGHUP after a recorded warning (a preemption's GraceTime over): it ends the start too.
_early_end: Optional[int] = None
# The job's warning signal (checkpoint.signal) once the config has named it.
_warn: int = signal.SIGUSR2
# Warnings whatever checkpoint.signal names (that is the one Slurm is asked to send): another tool's or an
# admin's requeue signal (Lightning's is USR1) would otherwise kill the job with nothing saved since its last
# checkpoint, where its default action ends the process.
USR_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
# A SIGINT this soon after the signal that began a stop is the same Ctrl-C come twice (a process group signalled
# and a controller passing it on, ms apart), not a second one asking to stop at once; a person takes longer
SAME_SIGNAL_S = 0.5


def warning_signals(warn: int) -> tuple[int, ...]:
    return tuple(dict.fromkeys((warn, *USR_SIGNALS)))


def _hangup() -> tuple:
    """(SIGHUP,) unless the process ignores it (started under nohup, which asks to outlive the terminal)."""
    return () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)


def _record_early(sig: int, frame) -> None:
    global _early, _early_end
    if _early is None:
        _early = sig
    elif _early_end is None and sig not in warning_signals(_warn):  # the grace time after a warning ran out
        _early_end = sig


def catch_early(warn_signal: Optional[str] = None) -> None:
    """Record the warning signal, SIGTERM and SIGHUP from now on (a job's start: imports, data, model, W&B).

    The CLI calls it first with no signal, before the heavy imports and before the config names
    one: then USR1 and USR2 are caught (as always). `train.run` calls it again with checkpoint.signal, which
    may add HUP or XCPU. Under submitit its own handlers would otherwise
    be in place then and after training: its USR2 handler checkpoints from inside the handler and
    requeues even a job that has just completed. The next StopRequest picks the recorded signal up,
    so training stops at its second step boundary (the stop poll is read one step late: poll.StepPoll).
    """
    global _warn
    if warn_signal is not None:
        _warn = signum(warn_signal)
    for s in dict.fromkeys((*warning_signals(_warn), signal.SIGTERM, *_hangup())):
        signal.signal(s, _record_early)


class StartupStop(Exception):
    """A SIGTERM or SIGHUP came during start-up (scancel, a kill): every rank ends this start at the same safe point,
    before training (or at once, before its rendezvous). Nothing was trained since the checkpoint on disk, and
    Slurm kills a rank that is still busy starting (a resume's data, model, W&B) when KillWait runs out: waiting for
    the first steps to stop lost the run's last word (seen: CANCELLED read as a failure)."""


def take_early_stop() -> Optional[str]:
    """The name of a SIGTERM or SIGHUP that `catch_early` recorded (cleared), also one after a warning, else None.
    A warning signal alone stays recorded: the first training steps requeue the job on it, with a checkpoint
    (after it a SIGTERM came: KillWait's SIGKILL would come before those steps)."""
    global _early, _early_end
    if _early is not None and _early not in warning_signals(_warn):
        said, _early = signal.Signals(_early).name, None
        return said
    if _early_end is not None:
        said, _early_end = signal.Signals(_early_end).name, None
        return said
    return None


@contextmanager
def sigint_deferred(take: bool = True) -> Iterator[list[int]]:
    """A Ctrl-C during the block is taken when it ends. For code that swallows Python's KeyboardInterrupt: the
    first `import torch._dynamo` loads Triton's C++ library, whose start-up runs Python and drops an exception
    raised in it, so a Ctrl-C then was lost and start-up went on into training (seen: 1 in 2 at that moment).
    SIGINT left ignored (`nohup`, a script's `cmd &`) stays ignored; not in a thread (no handlers there).
    Yields the list of SIGINTs received; `take=False` leaves them to the caller (nothing is raised)."""
    import threading
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        yield got
        return
    before = signal.signal(signal.SIGINT, lambda s, frame: got.append(s))
    if before is None:  # a handler set outside Python: put back the default, the nearest Python can
        before = signal.SIG_DFL
    try:
        yield got
    finally:
        signal.signal(signal.SIGINT, before)
    if not take:
        return
    if got and callable(before):
        before(signal.SIGINT, None)  # Python's default raises KeyboardInterrupt, here, past the code that ate it
    elif got and before == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)


def ignore_late_signals(warn_signal: Optional[str] = None) -> None:
    """Training is over (done, stopped or failed): ignore warnings (USR1, USR2, `warn_signal`),
    SIGTERM, SIGHUP and SIGINT from now on: the run's exit code is said, and only the exit is left.

    Python resets its handlers to the default (terminate) while the interpreter shuts down, so a
    time-limit warning landing in those last moments would kill a finished process by the signal,
    and Slurm would record the job FAILED (seen: COMPLETED training, FAILED job). SIG_IGN survives
    that reset. Only for process entry points: a test process calling `train.run` keeps its handlers.
    """
    for s in {signal.SIGUSR1, signal.SIGUSR2, signum(warn_signal) if warn_signal else _warn, signal.SIGTERM,
              signal.SIGHUP, signal.SIGINT}:
        signal.signal(s, signal.SIG_IGN)


_exit_said = False  # exit_said ran: StopRequest leaves its SIG_IGN in place


def exit_said(warn_signal: Optional[str] = None) -> None:
    """The process's own run has said its exit (its stop or completion logged, W&B closed): ignore the signals from
    now on (ignore_late_signals), so the exit code stays the run's. A Ctrl-C in the moments left (a completed run's
    gc, the process group's teardown) ended it 130, "interrupted". For process entry points only (the CLI's train,
    a submitit job: Trainer.entry_point); a test that runs train in its process keeps its handlers."""
    global _exit_said
    _exit_said = True
    ignore_late_signals(warn_signal)


class StopRequest:
    """Installs handlers that only set a flag; `requested` is the first signal seen (or None)."""

    def __init__(self, warn_signal: str = "USR2", say: bool = False):
        self.say = say  # the process that speaks for the run (rank 0) answers a first Ctrl-C on stderr
        self.warn = signum(warn_signal)
        self.warnings = warning_signals(self.warn)
        self.received: Optional[int] = None
        self.in_start_up = False  # `received` came before training (catch_early recorded it)
        self._at = 0.0  # when the first signal came (time.monotonic)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        global _early, _early_end
        # once each: checkpoint.signal=HUP is SIGHUP too, and a second install would record this handler as the one
        # to restore. The configured warning signal is caught even under nohup: the config asked for it
        for s in dict.fromkeys((*self.warnings, signal.SIGTERM, signal.SIGINT, *_hangup())):
            self._previous[s] = signal.signal(s, self._handle)
        if _early is not None:  # came before training started: honour it now
            self.received, self._at, _early, self.in_start_up = _early, time.monotonic(), None, True
        _early_end = None  # a SIGTERM after that warning: a preemption all the same, as _handle keeps the first
        return self

    def __exit__(self, *exc) -> None:
        if _exit_said:  # the run said its exit inside the block (a stop): nothing to put back
            return
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handle(self, sig: int, frame) -> None:
        # A warning followed by TERM (the grace period ending) is still a preemption: keep the first.
        now = time.monotonic()
        if self.received is None:
            self.received, self._at = sig, now
            if sig == signal.SIGINT and self.say:  # a step may take seconds: without a word, Ctrl-C is pressed again
                # os.write, not print: a print the handler interrupted would make print raise (reentrant call); and
                # never an error in the step it interrupts (a `| tee` the same Ctrl-C ended: a broken pipe)
                with contextlib.suppress(OSError):
                    os.write(2, b"allconv-hpc: Ctrl-C: stopping after the next step, with a checkpoint (Ctrl-C "
                                b"again stops at once, without one)\n")
        elif sig == signal.SIGINT and now - self._at >= SAME_SIGNAL_S:
            raise KeyboardInterrupt  # Ctrl-C while a stop is under way: the user wants out now (checkpoints are atomic)

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def is_warning(self) -> bool:
        return self.received in self.warnings

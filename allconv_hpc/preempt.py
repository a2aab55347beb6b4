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
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from datetime import datetime
from typing import Iterator, Mapping, Optional

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


def slurm_conf_missing() -> Optional[str]:
    """Why no Slurm command can answer here, when SLURM_CONF names a file that is not there: each would retry
    for 60 s before failing (s_p_parse_file), so callers ask this first. None when it is set right or unset."""
    path = os.environ.get("SLURM_CONF")
    if path and not os.path.isfile(path):
        return (f"SLURM_CONF={path} names no file ({'no such file' if not os.path.exists(path) else 'not a file'}); "
                f"point it at the cluster's slurm.conf, or unset it")
    return None


def slurm_out(cmd: list[str], warn: bool = False, env: Optional[dict] = None) -> Optional[str]:
    """stdout of a Slurm command, or None when it is missing, hangs or fails (logged when `warn`). `env`: set on
    top of this process's environment."""
    missing = slurm_conf_missing()
    if missing:
        if warn:
            log.warning("%s not run: %s", cmd[0], missing)
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                           env={**os.environ, **env} if env else None)
    except (OSError, subprocess.TimeoutExpired) as e:
        if warn:
            log.warning("%s failed: %s", cmd[0], e)
        return None
    if r.returncode != 0:
        if warn:
            said = (r.stderr or r.stdout).strip()[:300] or f"exit status {r.returncode}, no message"
            log.warning("%s: %s", " ".join(cmd), said)  # (scontrol requeue racing a requeue: nothing said)
        return None
    return r.stdout


def signum(name: str) -> int:
    return getattr(signal, "SIG" + name.upper().removeprefix("SIG"))


# A stop signal that arrived before training installed its StopRequest (see `catch_early`).
_early: Optional[int] = None
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
    global _early
    if _early is None:
        _early = sig


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
    """The name of a SIGTERM or SIGHUP that `catch_early` recorded (cleared), else None. A warning signal stays
    recorded: the first training steps requeue the job on it, with a checkpoint."""
    global _early
    if _early is None or _early in warning_signals(_warn):
        return None
    said, _early = signal.Signals(_early).name, None
    return said


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


class StopRequest:
    """Installs handlers that only set a flag; `requested` is the first signal seen (or None)."""

    def __init__(self, warn_signal: str = "USR2", say: bool = False):
        self.say = say  # the process that speaks for the run (rank 0) answers a first Ctrl-C on stderr
        self.warn = signum(warn_signal)
        self.warnings = warning_signals(self.warn)
        self.received: Optional[int] = None
        self._at = 0.0  # when the first signal came (time.monotonic)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        global _early
        # once each: checkpoint.signal=HUP is SIGHUP too, and a second install would record this handler as the one
        # to restore. The configured warning signal is caught even under nohup: the config asked for it
        for s in dict.fromkeys((*self.warnings, signal.SIGTERM, signal.SIGINT, *_hangup())):
            self._previous[s] = signal.signal(s, self._handle)
        if _early is not None:  # came before training started: honour it now
            self.received, self._at, _early = _early, time.monotonic(), None
        return self

    def __exit__(self, *exc) -> None:
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


class SlurmJob:
    """The Slurm side of a stop: timeout vs preemption, and requeue. Side effects in tiny methods."""

    def __init__(self, environ: Optional[Mapping[str, str]] = None):
        self.env = dict(os.environ if environ is None else environ)
        self.cancelled = False  # set by requeue(): a user's scancel came while the job stopped
        self.unanswered = False  # set by requeue(): the requeue failed and Slurm did not say the job's state

    @classmethod
    def of_rank(cls, source: str) -> "SlurmJob":
        """The job a rank started by `source` (DistEnv.source) runs in: none for a cluster=local rank, whose
        inherited SLURM_JOB_ID is the user's allocation (never to requeue, nor the job that wrote its records)."""
        return cls({} if source == "local" else None)

    @property
    def in_slurm(self) -> bool:
        return "SLURM_JOB_ID" in self.env

    @property
    def job_id(self) -> str:
        """The id scontrol accepts for this job or array task."""
        arr, task = self.env.get("SLURM_ARRAY_JOB_ID"), self.env.get("SLURM_ARRAY_TASK_ID")
        return f"{arr}_{task}" if arr and task else self.env["SLURM_JOB_ID"]

    @property
    def restarts(self) -> int:
        return int(self.env.get("SLURM_RESTART_COUNT", 0) or 0)

    def is_timeout(self, lead_s: float) -> bool:
        """A warning that comes within the signal lead (+ Slurm's coarse timer slack) of the limit, unless Slurm
        says it preempted the job (PreemptTime, since this start: Slurm clears it as it requeues): a preemption
        near the limit must not use up one of checkpoint.max_requeues. When squeue cannot tell, count it as a
        time limit: max_requeues then bounds the requeues, where counting it as a preemption would requeue a job
        at its time limit forever."""
        job = self._show()
        try:  # ISO times (SLURM_TIME_FORMAT=standard, whatever the user's is); anything else: not trusted
            preempted = datetime.fromisoformat(job["PreemptTime"]) >= datetime.fromisoformat(job["StartTime"])
        except (KeyError, ValueError):
            preempted = False
        if preempted:
            log.info("warning signal: Slurm preempted the job at %s: preemption", job["PreemptTime"])
            return False
        # this task's own id: an array task's raw SLURM_JOB_ID can equal the array's id, for which squeue
        # lists every task still queued (one line each)
        out = self._run(["squeue", "-h", "-j", self.job_id, "-o", "%L"])
        lines = (out or "").split()
        try:
            if len(lines) != 1:
                raise ValueError(f"{len(lines)} lines")
            left = parse_slurm_time(lines[0])  # None: no time limit, so the warning is a preemption
        except ValueError as e:
            log.warning("squeue could not tell the time left (%s): counting this warning signal as a time limit "
                        "(requeues bounded by checkpoint.max_requeues)", "no answer" if out is None else e)
            return True
        timeout = left is not None and left <= lead_s + 90
        log.info("warning signal with %s s left before the time limit (signal lead %g s): %s",
                 "no limit" if left is None else f"{left:g}", lead_s, "time limit" if timeout else "preemption")
        return timeout

    def requeue(self) -> bool:
        """Requeue this job (array task); True if it is, or Slurm had already requeued it.

        Not a job Slurm is already ending with no reason of its own (a user's scancel after the warning,
        while the checkpoint was written: `cancelled`): Slurm would accept the requeue and undo the cancel.
        A time limit (Reason=TimeLimit) or a preemption (PreemptTime set; PreemptMode=CANCEL ends the job
        when its grace time is over) is still requeued."""
        job = self._show()
        if job.get("Restarts", -1) > self.restarts:
            return True  # Slurm's own preemption requeued it
        if (job.get("JobState") in ("COMPLETING", "CANCELLED") and job.get("Reason") == "None"
                and job.get("PreemptTime", "None") in ("None", "Unknown")):
            self.cancelled = True
            return False
        if self._run(["scontrol", "requeue", self.job_id]) is not None:
            return True
        out = self._run(["squeue", "-h", "-j", self.job_id, "-o", "%T"])
        self.unanswered = out is None  # a busy controller may still carry the requeue out (seen: minutes later)
        state = (out or "").strip()
        if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
            return True  # Slurm's own preemption requeued it ("Job is pending execution")
        if state == "COMPLETING":  # requeued while its processes end, or cancelled: Restarts tells
            return self._show().get("Restarts", -1) > self.restarts
        return False

    def _show(self) -> dict:
        """JobState, Reason, PreemptTime, StartTime (str) and Restarts (int) from `scontrol show job`; {} when it
        cannot tell."""
        info = self._run(["scontrol", "show", "job", self.job_id], env={"SLURM_TIME_FORMAT": "standard"}) or ""
        job = dict(re.findall(r"\b(JobState|Reason|PreemptTime|StartTime)=(\S+)", info))
        m = re.search(r"\bRestarts=(\d+)", info)
        return {**job, **({"Restarts": int(m.group(1))} if m else {})}

    def _run(self, cmd: list[str], env: Optional[dict] = None) -> Optional[str]:
        return slurm_out(cmd, warn=True, env=env)


def parse_slurm_time(s: str) -> Optional[float]:
    """'[D-]HH:MM:SS' / 'MM:SS' -> seconds; 'UNLIMITED' -> None; ValueError for anything else, such as
    squeue's 'INVALID' (time left below 0, e.g. past the limit while the checkpoint was written) or
    'NOT_SET': the caller cannot tell how close the limit is."""
    if s == "UNLIMITED":
        return None
    if not s or not s[0].isdigit():
        raise ValueError(f"time left {s!r}")
    days = 0
    if "-" in s:
        d, s = s.split("-", 1)
        days = int(d)
    parts = [int(x) for x in s.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, sec = parts
    return days * 86400 + h * 3600 + m * 60 + sec

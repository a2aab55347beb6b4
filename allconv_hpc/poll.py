"""What every rank agrees on at a step boundary: a signal on some rank, a timed checkpoint due. One host-side
collective per step, lagged by one step so that no step waits for it."""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from typing import Optional

from .preempt import StopRequest
from .slurm import SlurmJob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Poll:
    """What all ranks agreed on at a step boundary."""
    warning: bool = False       # some rank got the warning signal (USR2: preemption or time limit ahead)
    terminate: bool = False     # some rank got SIGTERM/SIGINT/SIGHUP first: checkpoint, exit, no requeue
    due: bool = False           # rank 0's clock says a timed checkpoint is due
    write_failed: bool = False  # rank 0's checkpoint writer failed (a full disk): every rank stops now, not at the
    #                             next save, every_steps or every_minutes of training later
    signum: int = 0             # a signal a rank got (a terminating one before a warning), and that rank:
    rank: int = -1              # rank 0's log names another's

    def said(self) -> str:
        """The stop's signal and rank, for the log: "SIGTERM on rank 1"."""
        name = signal.Signals(self.signum).name if self.signum else "a signal"
        return f"{name} on rank {self.rank}" if self.rank >= 0 else name

    @property
    def stop(self) -> bool:
        return self.warning or self.terminate


def classify_stop(agreed: Poll, slurm: SlurmJob, lead_s: float) -> str:
    """interrupted (not in Slurm, SIGTERM/SIGINT/SIGHUP on any rank, or an interactive allocation) | timeout |
    preempted. A SIGTERM with which Slurm ends a batch job at its time limit is a timeout: the warning never came
    (Slurm may send it up to a minute early, to steps only: while cluster.setup ran there was none; or in a task's
    first moments, ignored), and the job ended TIMEOUT, not requeued, with its checkpoint."""
    if not slurm.in_slurm:
        return "interrupted"
    if agreed.terminate:
        if agreed.signum != signal.SIGTERM or not slurm.at_time_limit():
            return "interrupted"
        log.warning("SIGTERM as Slurm ends job %s at its time limit: its warning signal never reached the run (sent "
                    "during cluster.setup, or as a task started); requeued as the warning would have been",
                    slurm.job_id)
        return "timeout"
    job = slurm.show()  # one scontrol for both questions, inside the signal lead
    if not slurm.is_batch(job):
        return "interrupted"
    return "timeout" if slurm.is_timeout(lead_s=lead_s, job=job) else "preempted"


class StepPoll:
    """The poll of one training run. `dist`: the run's distributed.Dist; `every_minutes`: checkpoint.every_minutes
    (None: no timed checkpoints)."""

    def __init__(self, dist, rank: int, every_minutes: Optional[float]):
        self.dist, self.rank, self.is_main, self.every_minutes = dist, rank, rank == 0, every_minutes
        self.agreed = Poll()  # the answer last returned
        self._pending = None
        self.restart_clock()

    def restart_clock(self) -> None:
        """A checkpoint was just written (or training starts): the next timed one is every_minutes from now."""
        self._since, self._due_sent = time.monotonic(), False

    def poll(self, stop: StopRequest, write_failed: bool = False) -> Poll:
        """Did any rank get a signal, and which kind; is a timed checkpoint due (rank 0's clock); did rank 0's
        checkpoint writer fail (`write_failed`, rank 0's word).
        Each flag is reduced on its own: one rank's due checkpoint must not hide another's signal.

        Lagged by one poll: this call sends this step's flags in the background and returns what
        the previous call sent, which arrived while the step ran. Every rank acts on the same
        answer at the same step, and no step waits for a network round trip (across nodes gloo's
        ring takes 2(N-1) hops). A signal is acted on one step later: milliseconds."""
        due = (self.is_main and self.every_minutes is not None and not self._due_sent
               and time.monotonic() - self._since >= self.every_minutes * 60)
        self._due_sent |= due  # sent once; restart_clock() clears it (else the next step would ask again)
        warning, terminate = stop.requested and stop.is_warning, stop.requested and not stop.is_warning
        previous = self.finish()
        # the signal and its rank in one number, so that the max keeps them paired (a terminating one first)
        mine = (int(terminate) << 40 | (stop.received or 0) << 20 | self.rank + 1) if stop.requested else 0
        self._pending = self.dist.max_ints_start([int(warning), int(terminate), int(due), mine, int(write_failed)])
        theirs = previous[3]
        self.agreed = Poll(*map(bool, previous[:3]), signum=theirs >> 20 & 0xFFFFF, rank=(theirs & 0xFFFFF) - 1,
                           write_failed=bool(previous[4]))
        return self.agreed

    def finish(self) -> list[int]:
        """The answer to the poll in flight (zeros if none); every rank calls it at the same point."""
        pending, self._pending = self._pending, None
        return self.dist.max_ints_finish(pending) if pending is not None else [0] * 5

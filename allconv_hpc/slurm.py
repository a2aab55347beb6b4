"""Slurm's commands, asked from inside a job (SlurmJob: a warning's cause, timeout or preemption; the requeue) and
from the login node (slurm_out). A command that is missing, hangs or fails answers None, and its caller decides
what that means (preempt.py has the signals themselves)."""
from __future__ import annotations

import logging
import os
import re
import subprocess
from datetime import datetime
from typing import Mapping, Optional

log = logging.getLogger(__name__)


def slurm_conf_missing() -> Optional[str]:
    """Why no Slurm command can answer here, when SLURM_CONF names a file that is not there: each would retry
    for 60 s before failing (s_p_parse_file), so callers ask this first. None when it is set right or unset."""
    path = os.environ.get("SLURM_CONF")
    if path and not os.path.isfile(path):
        return (f"SLURM_CONF={path} names no file ({'no such file' if not os.path.exists(path) else 'not a file'}); "
                f"point it at the cluster's slurm.conf, or unset it")
    return None


def slurm_out(cmd: list[str], warn: bool = False, env: Optional[dict] = None, timeout: float = 30) -> Optional[str]:
    """stdout of a Slurm command, or None when it is missing, hangs or fails (logged when `warn`). `env`: set on
    top of this process's environment."""
    missing = slurm_conf_missing()
    if missing:
        if warn:
            log.warning("%s not run: %s", cmd[0], missing)
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
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

    def is_timeout(self, lead_s: float, job: Optional[dict] = None) -> bool:
        """A warning that comes within the signal lead (+ Slurm's coarse timer slack) of the limit, unless Slurm
        says it preempted the job (PreemptTime, since this start: Slurm clears it as it requeues): a preemption
        near the limit must not use up one of checkpoint.max_requeues. When squeue cannot tell, count it as a
        time limit: max_requeues then bounds the requeues, where counting it as a preemption would requeue a job
        at its time limit forever. `job`: show()'s answer, where the caller has it."""
        job = self.show() if job is None else job
        if _preempted(job):
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

    def requeue(self, timeout: float = 30) -> bool:
        """Requeue this job (array task); True if it is, or Slurm had already requeued it. `timeout`: each Slurm
        command's (short within KillWait, after the time limit's SIGTERM).

        Not a job Slurm is already ending with no reason of its own (a user's scancel after the warning,
        while the checkpoint was written: `cancelled`): Slurm would accept the requeue and undo the cancel.
        A time limit (Reason=TimeLimit) or a preemption (PreemptTime since this start, not an earlier start's,
        as is_timeout reads it; PreemptMode=CANCEL ends the job when its grace time is over) is still requeued."""
        job = self.show(timeout=timeout)
        if job.get("Restarts", -1) > self.restarts:
            return True  # Slurm's own preemption requeued it
        if job.get("JobState") in ("COMPLETING", "CANCELLED") and job.get("Reason") == "None" and not _preempted(job):
            self.cancelled = True
            return False
        if self._run(["scontrol", "requeue", self.job_id], timeout=timeout) is not None:
            return True
        out = self._run(["squeue", "-h", "-j", self.job_id, "-o", "%T"], timeout=timeout)
        self.unanswered = out is None  # a busy controller may still carry the requeue out (seen: minutes later)
        state = (out or "").strip()
        if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
            return True  # Slurm's own preemption requeued it ("Job is pending execution")
        if state == "COMPLETING":  # requeued while its processes end, or cancelled: Restarts tells
            return self.show(timeout=timeout).get("Restarts", -1) > self.restarts
        return False

    def is_batch(self, job: Optional[dict] = None) -> bool:
        """An sbatch job, which a requeue runs again; not an interactive allocation (salloc; srun alone), which
        Slurm does not requeue: a `train` started by hand in one stops instead. True when scontrol cannot tell."""
        if (self.show() if job is None else job).get("BatchFlag") != "0":
            return True
        log.warning("job %s is an interactive allocation (salloc, or srun without sbatch): Slurm requeues batch jobs "
                    "only, so this warning signal stops the run (the same command resumes it)", self.job_id)
        return False

    def at_time_limit(self) -> bool:
        """Slurm is ending this batch job at its time limit (Reason=TimeLimit, seen with JobState=COMPLETING while its
        processes get SIGTERM; `scontrol requeue` then still requeues it), not preempting it (a grace time's end may
        read so too). Asked within KillWait (30 s by default) of a SIGTERM: a controller that does not answer in 5 s
        is no time limit."""
        job = self.show(timeout=5)
        return job.get("Reason") == "TimeLimit" and job.get("BatchFlag") != "0" and not _preempted(job)

    def show(self, timeout: float = 30) -> dict:
        """JobState, Reason, PreemptTime, StartTime, BatchFlag (str) and Restarts (int) from `scontrol show job`; {}
        when it cannot tell."""
        info = self._run(["scontrol", "show", "job", self.job_id], env={"SLURM_TIME_FORMAT": "standard"},
                         timeout=timeout) or ""
        job = dict(re.findall(r"\b(JobState|Reason|PreemptTime|StartTime|BatchFlag)=(\S+)", info))
        m = re.search(r"\bRestarts=(\d+)", info)
        return {**job, **({"Restarts": int(m.group(1))} if m else {})}

    def _run(self, cmd: list[str], env: Optional[dict] = None, timeout: float = 30) -> Optional[str]:
        return slurm_out(cmd, warn=True, env=env, timeout=timeout)


def _preempted(job: dict) -> bool:
    """Slurm preempted the job since this start (PreemptTime, which a requeue clears, at or after StartTime)."""
    try:  # ISO times (SLURM_TIME_FORMAT=standard, whatever the user's is); anything else: not trusted
        return datetime.fromisoformat(job["PreemptTime"]) >= datetime.fromisoformat(job["StartTime"])
    except (KeyError, ValueError):
        return False


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

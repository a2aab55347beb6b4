"""cluster=local's stand-in for `srun --kill-on-bad-exit`: its rendezvous ports, and the reaper a failed rank
leaves behind to end its job's other ranks (its controller: localcontrol).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional


# set in each task of a cluster=local job by launcher.TrainJob; here, not in distributed.py, so that setting it does
# not import torch outside train.run's Ctrl-C guard
LOCAL_PORT_ENV = "ALLCONV_LOCAL_PORT"


def free_ports(n: int) -> list[int]:
    """n distinct ports free on this machine now (held open together while the OS picks them): each
    cluster=local DDP job's rendezvous, instead of one derived from its pid, which another job or
    program may hold."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


# cluster=local has no `srun --kill-on-bad-exit`: submitit's local controller waits for every task. A rank that
# fails leaves this behind to end its job's other ranks (the controller's other children) still running
# LOCAL_KILL_WAIT_S later: SIGTERM (a rank waiting at the rendezvous ends at once), then SIGKILL as many seconds
# after (a rank hung in its own code), as Slurm does with KillWait. They usually end long before: their next
# collective fails on the closed connection, or they failed alike (a diverged run) and rank 0 is finishing its
# W&B upload, which the wait leaves time for. Checkpoints are written by rename, never half, whatever is killed.
LOCAL_KILL_WAIT_S = 30


_REAPER = ("import sys; from allconv_hpc.localjob import _reap; "
           "_reap(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], [int(p) for p in sys.argv[4:]])")


def start_reaper(controller: int, pids: list, stderr=None, who: str = "this rank failed") -> None:
    """A process of its own that ends those of `pids` still the controller's children (_reap); its note, which
    begins with `who`, goes to `stderr` (a file; None: this process's)."""
    subprocess.Popen([sys.executable, "-c", _REAPER, str(controller), str(LOCAL_KILL_WAIT_S), who, *map(str, pids)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def is_reaper(pid: int) -> bool:
    """pid runs _reap: a child of the controller (one it started) that is none of the job's ranks."""
    from .jobs import process_cmdline
    cmd = process_cmdline(pid)
    return cmd is not None and "allconv_hpc.localjob import _reap" in cmd


def _reap(controller: int, wait_s: float, who: str, pids: list[int]) -> None:
    """Run by the reaper process: SIGTERM then SIGKILL, wait_s apart, to those of pids still the controller's
    running children (a pid reused since is not its child); a note on stderr (the failed rank's .err) says so."""
    from .jobs import children
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the ranks' and the user's, meant for the ranks
        signal.signal(s, signal.SIG_IGN)
    said = []
    for n, sig in enumerate((signal.SIGTERM, signal.SIGKILL), 1):
        end = time.monotonic() + wait_s
        while set(pids) & set(children(controller)) and time.monotonic() < end:
            time.sleep(0.5)
        sent = []
        for pid in set(pids) & set(children(controller)):
            try:
                os.kill(pid, sig)
                sent.append(str(pid))
            except OSError:  # ended meanwhile (or no longer ours)
                pass
        if sent:
            said.append(f"{signal.Signals(sig).name} to {', '.join(sorted(sent))} at {n * wait_s:g} s")
    if said:
        print(f"note: {who}, and its job's other ranks still ran: sent {'; '.join(said)} (cluster=local has no srun "
              f"--kill-on-bad-exit)", file=sys.stderr, flush=True)


# The signals a user sends a cluster=local job id: its controller passes them on. Held (blocked: pending, not lost)
# from the controller's first line until its ranks are started, and in a rank from its exec until train.run's
# handlers and Ctrl-C guard are in place (unhold): a signal in those first moments killed the controller with a
# traceback (the job LOST) or a rank inside submitit's start (FAILED), where it now stops the run as in start-up.
HELD_AT_START = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


def unhold() -> None:
    """Deliver what came while HELD_AT_START were held (nothing held, as in a job srun started: a no-op)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_AT_START)


DEATH_SIGNAL = signal.SIGTERM  # a rank whose controller died stops as on scancel: a checkpoint, then exit


def local_job_id(source: str) -> Optional[str]:
    """The cluster=local job a rank started by `source` (DistEnv.source) runs in, as its records name it (status
    tells a record of the job from one of a `train` by hand that resumed the run after it); None for others."""
    return os.environ.get("SUBMITIT_LOCAL_JOB_ID") if source == "local" else None


def controller_gone() -> bool:
    """In a rank of a cluster=local job: its controller (whose pid is the job id) is no longer its parent. Its
    parent-death signal (localcontrol) may have come while submitit's own handler, which only logs a SIGTERM, was in
    place."""
    job = os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    return os.environ.get("SUBMITIT_EXECUTOR") == "local" and job is not None and str(os.getppid()) != job


def end_local_peers(controller: int, interrupt: bool = False) -> None:
    """After this rank failed in a cluster=local job: end the job's other ranks that do not end by themselves
    (see LOCAL_KILL_WAIT_S), from a process of its own, so that this one exits now and its peers see it go.
    `interrupt`: this rank was Ctrl-C'd before its Trainer could tell its peers (train.peers_untold): they get the
    Ctrl-C now, as they would from the controller; they may be waiting for this one at the rendezvous.
    `controller`: this rank's parent when it started; if that is no longer its parent (the controller died, and
    this process now belongs to init or a subreaper), its children are not this job's ranks: nothing is done."""
    ppid = os.getppid()
    if ppid != controller or ppid <= 1:
        return
    from .jobs import children
    try:
        peers = [str(pid) for pid in children(ppid) if pid != os.getpid() and not is_reaper(pid)]
        for pid in peers if interrupt else ():
            with contextlib.suppress(OSError):  # ended meanwhile
                os.kill(int(pid), signal.SIGINT)
        if peers:
            start_reaper(ppid, peers)
    except (OSError, subprocess.SubprocessError) as e:  # never hide the rank's own failure
        print(f"note: could not look for this job's other ranks to end them ({e}); a hung one holds the job "
              f"until cluster.timeout_min", file=sys.stderr)

"""cluster=local's job controller: submitit's, started by `python -m allconv_hpc.localcontrol`, with what a job
id that users signal needs. The job id `submit` prints is the controller's pid, and a user signals it as they
would `scancel --signal` a Slurm job: the controller passes USR1, USR2, HUP, TERM and INT on to its ranks and
goes on supervising them (submitit's own died of all but TERM, and its ranks trained on unsupervised, with no
cluster.timeout_min). The ranks get a parent-death signal (Linux), so a SIGKILLed controller leaves none training.
They run in a process group of their own (as torchrun's workers do): a signal to the job's group (a terminal's
Ctrl-C, `kill -- -PGID`) reaches them once, through the controller; straight as well, a second SIGINT a few ms after
the first would stop a rank at once, with no checkpoint.
"""
from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from .jobs import START_UP_INTERRUPT, START_UP_STOP
from .localjob import DEATH_SIGNAL, HELD_AT_START, start_reaper, unhold

if __name__ == "__main__":  # the controller: held until its ranks are started (start_tasks), from before the slow imports
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_AT_START)

import submitit  # noqa: E402
from submitit.core import utils  # noqa: E402
from submitit.local import local  # noqa: E402

FORWARDED = HELD_AT_START
# ignored from the rank's exec, as in a Slurm job (executor.make_executor), where a warning in a rank's first
# moments is lost, not fatal; here they are held too (HELD_AT_START), so one stays pending (Linux keeps a blocked
# signal even when ignored) and reaches train's handlers at unhold()
IGNORED_AT_START = (signal.SIGUSR1, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class LocalExecutor(submitit.LocalExecutor):
    """submitit's LocalExecutor, its jobs run by this module's Controller."""

    attach = False  # see start_controller

    def _submit_command(self, command: str) -> local.LocalJob:
        p = self.parameters
        ntasks, n_gpus, visible = p.get("tasks_per_node", 1), p.get("gpus_per_node", 0), p.get("visible_gpus", ())
        gpus = range(n_gpus) if visible == () else visible[:n_gpus]
        process = start_controller(self.folder, command, ntasks, ",".join(str(k) for k in gpus),
                                   p.get("timeout_min", 2.0), p.get("signal_delay_s", 30), p.get("setup", ()),
                                   attach=self.attach)
        return local.LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))


def start_controller(folder: Path, command: str, ntasks: int, cuda_devices: str, timeout_min: float,
                     signal_delay_s: int, setup, attach: bool = False) -> subprocess.Popen:
    """submitit's local.start_controller, starting this module's Controller. cluster.setup's shell `exec`s it, so
    the job id (the pid of what is started here) is the controller's pid either way, the process users signal.

    Unless `attach` (submit --wait, whose terminal's Ctrl-C is to reach the job), the controller starts a session
    of its own, its output in .submitit/controller-<job id>.log: in submit's, it held submit's stdout open (so
    `$(allconv-hpc submit ...)` or a pipe waited for the job to end), and a terminal closed without job control
    (`ssh -t host allconv-hpc submit ...`) sent the job SIGHUP, which stopped it."""
    env = {**os.environ, "SUBMITIT_LOCAL_NTASKS": str(ntasks), "SUBMITIT_LOCAL_COMMAND": command,
           "SUBMITIT_LOCAL_TIMEOUT_S": str(int(60 * timeout_min)),
           "SUBMITIT_LOCAL_SIGNAL_DELAY_S": str(int(signal_delay_s)), "SUBMITIT_LOCAL_NODEID": "0",
           "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_STDERR_TO_STDOUT": "", "SUBMITIT_EXECUTOR": "local",
           "CUDA_VISIBLE_DEVICES": cuda_devices, "SUBMITIT_LOCAL_WITH_SHELL": ""}
    cmd = [sys.executable, "-m", "allconv_hpc.localcontrol", str(folder)]
    logs = Path(folder).parent
    log, io = None, {}
    if not attach:
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f".controller-{os.getpid()}-{time.monotonic_ns()}.log"  # named by the job id once it has one
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o666)
        io = dict(stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True)
    try:
        if setup:  # a Ctrl-C must still stop a setup line that hangs: the controller holds them from its first line
            process = subprocess.Popen(" && ".join([*setup, "exec " + shlex.join(cmd)]), shell=True, env=env, **io)
        else:
            held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_AT_START)  # from its exec on (Python's own start-up)
            try:
                process = subprocess.Popen(cmd, env=env, **io)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
    except BaseException:
        if log is not None:
            log.unlink(missing_ok=True)  # no job: no log of one
        raise
    finally:
        if log is not None:
            os.close(fd)  # the controller has its own copy
    if log is not None:
        try:  # the job runs: a log left under its temporary name must not fail the submission
            os.replace(log, logs / f"controller-{process.pid}.log")
        except OSError:
            pass
    return process


def _prctl() -> Optional[Callable]:
    """libc's prctl, looked up before any fork (the rank's preexec_fn only calls it); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def rank_preexec(parent: int, prctl: Optional[Callable]) -> Callable[[], None]:
    """What a rank runs between fork and exec: a process group of its own (see the module's note), the warnings
    ignored (see IGNORED_AT_START), and DEATH_SIGNAL once the controller (`parent`, single-threaded: the kernel sends
    it when the thread that forked ends) is gone. A controller that died before prctl took effect is caught by the
    getppid check right after it."""
    def preexec() -> None:
        os.setpgid(0, 0)
        for s in IGNORED_AT_START:
            signal.signal(s, signal.SIG_IGN)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(DEATH_SIGNAL))
        if os.getppid() != parent:
            os._exit(128 + int(DEATH_SIGNAL))
    return preexec


class Controller(local.Controller):
    """submitit's controller, passing the signals a user sends the job id on to the ranks (it waits for them as
    ever: requeue on submitit's requeue code, else the end). SIGHUP stays ignored under nohup, in the ranks too.
    A controller of a session of its own (submit without --wait) passes on the others even where it was started
    ignoring them (a script's `submit &` ignores SIGINT): no terminal's Ctrl-C reaches it, so one that comes is a
    `kill -INT` of the job id, which README promises stops the job as `scancel --signal=INT` would (it trained
    on). Attached to submit --wait, in its caller's group, an ignored signal stays ignored: that Ctrl-C is meant
    for another job of the script."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.pid = str(os.getpid())  # the job id (under cluster.setup, the shell's pid too: it execs this process)
        own_session = os.getsid(0) == os.getpid()
        for s in FORWARDED:
            if signal.getsignal(s) != signal.SIG_IGN or (own_session and s != signal.SIGHUP):
                signal.signal(s, self._forward_signal)

    def start_tasks(self) -> None:  # submitit's, with rank_preexec; the ranks start holding HELD_AT_START
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_AT_START)
        try:
            self._start_tasks()
        finally:
            unhold()  # what came meanwhile is passed on now, to ranks that hold it until train.run takes it

    def wait(self, freq: int = 24) -> list[Optional[int]]:
        """submitit's wait, and srun's --kill-on-bad-exit for a rank ended by a signal (kill -9, the OOM killer, a
        SIGINT or SIGTERM at its rendezvous, which ends that wait at once): such a rank left no reaper behind
        (localjob.end_local_peers), and its peers would wait for it up to dist.timeout_s at a rendezvous (300 s on
        CPU), or on an NCCL collective (1800 s)."""
        timeout = freq * self.timeout_s
        almost_timeout = freq * (self.timeout_s - self.signal_delay_s)
        seen: set[int] = set()
        for step in range(timeout):
            exit_codes = [t.poll() for t in self.tasks]
            for k, e in enumerate(exit_codes):  # first: the last rank to end may be one of them
                if e is not None and e < 0 and k not in seen:
                    seen.add(k)
                    self._signalled(k, -e, [t.pid for t, c in zip(self.tasks, exit_codes) if c is None])
            if all(e is not None for e in exit_codes):
                return exit_codes
            if step == almost_timeout:
                self._forward_signal(local.LocalJobEnvironment._usr_sig())
            time.sleep(1.0 / freq)
        return [t.poll() for t in self.tasks]

    def _signalled(self, k: int, sig: int, running: list[int]) -> None:
        """Rank k ended by signal `sig` while `running` run: a word in its .err file, which `status` reads (it said
        none), and its peers ended: by the same signal if it is one that stops a start (they may wait for it at
        their rendezvous; elsewhere they stop at their next safe point, maybe a minute away: no reaper), else as
        a failed rank's reaper ends them."""
        try:
            name = signal.Signals(sig).name
        except ValueError:  # a real-time signal
            name = f"signal {sig}"
        # the ones that end a rank by the signal only at its rendezvous (distributed._stops_at_once); the lines
        # are train's own for a stop in start-up, which status reads as one
        stop = sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        if sig == signal.SIGINT:
            said = f"allconv-hpc: {START_UP_INTERRUPT}, at its rendezvous; nothing was written to the run's checkpoints"
        elif stop:
            said = (f"allconv-hpc: stopped by {name} {START_UP_STOP} (at its rendezvous); nothing was trained or "
                    f"written to its checkpoints")
        else:  # status.CONTROLLER_SAID: named only where no rank said why (a peer's error comes first)
            said = (f"allconv-hpc (controller): ended by {name}, without a word of its own (a kill -9, the OOM "
                    f"killer, a crash, a failed peer's reaper)")
        try:
            print(said, file=self.stderrs[k], flush=True)
            for pid in running if stop else ():
                try:
                    os.kill(pid, sig)
                except OSError:  # ended meanwhile
                    pass
            if running and not stop:
                start_reaper(int(self.pid), running, stderr=self.stderrs[k], who=f"this rank ended by {name}")
        except OSError as e:  # a full disk, no process left to start: the controller goes on waiting for its ranks
            print(f"note: rank {k} ended by {name}; could not say so or end its peers ({e})", file=sys.stderr)

    def _start_tasks(self) -> None:
        self.folder.mkdir(exist_ok=True)
        paths = [utils.JobPaths(self.folder, self.pid, k) for k in range(self.ntasks)]
        self.stdouts = [p.stdout.open("a") for p in paths]
        self.stderrs = self.stdouts if self.stderr_to_stdout else [p.stderr.open("a") for p in paths]
        preexec = rank_preexec(os.getpid(), _prctl())
        for k in range(self.ntasks):
            env = {**os.environ, "SUBMITIT_LOCAL_LOCALID": str(k), "SUBMITIT_LOCAL_GLOBALID": str(k),
                   "SUBMITIT_LOCAL_JOB_ID": self.pid}
            # no terminal input: in a group of their own, a read of it (a breakpoint()) would stop them (SIGTTIN)
            self.tasks.append(subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL, stdout=self.stdouts[k],
                                               stderr=self.stderrs[k], encoding="utf-8", preexec_fn=preexec))


if __name__ == "__main__":
    Controller(Path(sys.argv[1])).run()

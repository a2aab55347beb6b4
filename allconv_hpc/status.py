"""`allconv-hpc status FOLDER`: one line per job, from Slurm (squeue, then sacct when accounting
exists, then scontrol) and from the run folder's own status.json (written by the trainer), so it
stays right across requeues and array tasks and tolerates clusters without accounting. A job that Slurm
(or this machine, for cluster=local) no longer knows, with no final state anywhere, shows as LOST; one
Slurm did not answer for, with no final state of its own run, as UNKNOWN, RUNNING?, REQUEUED? or INTERRUPTED? (a stop
Slurm may have requeued since): not done.
A run no scheduler answers for (started by hand with `train`) that says it is running is RUNNING while its
process holds the folder's lock (runlock), and LOST once that process is gone (as seen from its own host). A run
whose lock a new start holds (a resume in its rendezvous) is RUNNING (starting) whatever the start before recorded."""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from . import runlock
from .fsio import half_set_aside, read_json
from .jobs import (ACTIVE_STATES, FIXES, JOB_KEYS, LOCAL_SETUP_STOP, SETUP_STOP, START_UP_INTERRUPT, START_UP_STOP,
                   STATUS_KEYS, DamagedFile, SlurmState, check_keys, held_advice, is_held, local_ended_at, local_state,
                   never_starts, read_record, slurm_states, squeue_silence, started_job, started_unrecorded,
                   stopped_elsewhere, trains_elsewhere)

# LOST: Slurm answered, no longer knows the job, accounting has nothing, and the run never wrote a final
# state (killed hard, e.g. a node died): it is not running, and it did not finish
FAILED_STATES = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "CANCELLED", "LOST"}
EXIT_NO_ANSWER = 3  # `status`: no job failed, but Slurm did not answer for one whose run has not ended
EXIT_STOPPED = 3  # `submit --wait` (which waits while Slurm does not answer): none failed, one stopped unfinished


def job_records(folder: Path) -> list[dict]:
    """The submissions folder holds: a sweep's jobs, a run's job, or a run started without submit."""
    path = folder / "sweep.json"
    sweep = read_record(path)
    if sweep is not None:
        jobs = sweep.get("jobs")
        if not isinstance(jobs, list) or not jobs:
            raise DamagedFile(f"{path}: no 'jobs' list, or an empty one; {FIXES[path.name]}")
        recs = {}  # by point folder: one a sweep.json written before 2026-12-06 tracked twice (moved, linked) once
        for i, rec in enumerate(jobs):
            rec = _here(check_keys(rec, JOB_KEYS, path, f"job {i + 1}: "), folder, sweep=True)
            name = Path(rec["run_dir"]).name
            if name not in recs or (rec.get("submitted") or 0) >= (recs[name].get("submitted") or 0):
                recs[name] = rec
        return [_point_job({**rec, "started_by": "sweep"}) for rec in recs.values()]
    path = folder / "submission.json"
    rec = read_record(path)
    if rec is not None:  # a job started since without submit (sbatch slurm/train.sbatch) is the run's now
        rec = _here(check_keys(rec, JOB_KEYS, path), folder, sweep=False)
        return [started_unrecorded(folder, rec) or rec]
    # what a train leaves (not holds_run: a sweep folder has .submit.lock, and one without its sweep.json is no run)
    if any((folder / n).exists() for n in ("status.json", "checkpoints", "train.log", runlock.LOCK_FILE)):
        # started without submit: Slurm is asked about the job its status.json names, if any
        st = read_record(folder / "status.json") or {}  # (a damaged one is named by run_status)
        # a job that ended (gave up, failed, completed): its record names it, and the same sbatch goes on with it
        by = {"started_by": "sbatch"} if st.get("slurm_job_id") else {}
        return [started_job(folder) or {"job_id": None, "run_dir": str(folder), "backend": "none", **by}]
    parent = folder.absolute().parent  # runs/x/checkpoints given for runs/x
    up = (f"; it is inside the run or sweep folder {parent}: allconv-hpc status {shlex.quote(str(parent))}"
          if any((parent / n).exists() for n in ("status.json", "checkpoints", "sweep.json", "submission.json"))
          else "")
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist; give a run folder (hydra.run.dir) or a sweep folder{up}")
    try:  # a folder of runs (runs/): name a few
        inside = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and any(
            (d / n).exists() for n in ("sweep.json", "submission.json", "status.json", "checkpoints")))
    except OSError:  # unreadable: said as before
        inside = []
    shown = ", ".join(shlex.quote(str(d)) for d in inside[:3]) + (f" ... ({len(inside)} in all)" if len(inside) > 3 else "")
    holds = (f"; it holds runs or sweeps: give one of them, e.g. {shown}, or all: allconv-hpc status "
             f"{shlex.quote(str(folder))}/*" if inside else "")
    raise FileNotFoundError(f"{folder} is neither a run folder (status.json, checkpoints/) nor a sweep "
                            f"folder (sweep.json){holds or up}")


def _point_job(rec: dict) -> dict:
    """A sweep point's job: the sweep's record, unless the point was submitted since on its own (its submission.json
    names a later job) or resumed by a job started without submit; as `status POINT` shows it."""
    run_dir = Path(rec["run_dir"])
    try:
        own = read_record(run_dir / "submission.json")
    except DamagedFile:  # `status POINT` names it; the sweep's record stands here
        own = None
    if own is not None and str(own.get("job_id")) != str(rec.get("job_id")) and \
            isinstance(own.get("submitted"), (int, float)) and own["submitted"] > rec.get("submitted", 0):
        try:
            rec = _here(check_keys(own, JOB_KEYS, run_dir / "submission.json"), run_dir, sweep=False)
        except DamagedFile:
            pass
    return started_unrecorded(run_dir, rec) or rec


def _here(rec: dict, folder: Path, sweep: bool) -> dict:
    """The record with run_dir in the folder asked about: a run or sweep folder moved or copied since it was
    submitted (off scratch, say) is read where it is now, not at the path recorded at submit time."""
    recorded = Path(rec["run_dir"])
    mine = folder / recorded.name if sweep else folder
    # a point removed from a copy is the copy's (gone), not the original's, which may have trained on since
    if os.path.realpath(mine) == os.path.realpath(recorded):
        return rec
    out = {**rec, "run_dir": str(mine.absolute())}
    if trains_elsewhere(rec, folder, sweep):  # a copy: while the job is active, it trains the original
        out["copy_of"] = str(recorded)
    logs = rec.get("submitit_folder")  # the job's logs, in the run's or its sweep's folder: moved with it
    for old, new in ((recorded, mine), (recorded.parent, mine.parent)):
        if isinstance(logs, str) and Path(logs).parent == old and (new / Path(logs).name).is_dir():
            out["submitit_folder"] = str((new / Path(logs).name).absolute())
            break
    return out


def run_status(run_dir: Path) -> dict:
    """The run's own status.json ({} before its job wrote one)."""
    path = run_dir / "status.json"
    st = read_record(path)
    return {} if st is None else check_keys(st, STATUS_KEYS, path)


def _tail_lines(path: Path) -> Optional[list[str]]:
    """The lines of a log's last 64 KiB (a long run's log is not read whole); None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return None


def _last_start(run_dir: Path) -> tuple[Optional[float], Optional[str]]:
    """When the run's last start began (to the second; None if its tail does not say) and the last ERROR line it
    logged, without the timestamp (from train.log's tail)."""
    started = error = None
    for line in _tail_lines(run_dir / "train.log") or []:
        if " INFO] run folder " in line:  # train.run's first line: an earlier start's error is not this one's
            started, error = _log_time(line), None
        elif " ERROR] " in line:
            error = line.split(" ERROR] ", 1)[1]
    return started, error


def _log_time(line: str) -> Optional[float]:
    """The time of a train.log line ("[%Y-%m-%d %H:%M:%S LEVEL] ...", local time), None for another format."""
    try:
        return time.mktime(time.strptime(line[1:20], "%Y-%m-%d %H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def _last_error(run_dir: Path) -> Optional[str]:
    """The last ERROR line of the run's train.log since its last start (in its tail), without the timestamp."""
    return _last_start(run_dir)[1]


def _failed_since(run_dir: Path, st: dict) -> Optional[str]:
    """The error of a start after the run's last record that failed before writing one (a resume of a completed
    run whose rendezvous timed out): the record stands, but that start must not pass unseen."""
    started, error = _last_start(run_dir)
    return error if started is not None and started > st.get("updated", 0) else None


_LOGGED_ERROR = re.compile(r"^\[[^\]]* ERROR(?: rank \d+)?\] (.+)$")  # train.setup_logging's format
_C10_ERROR = re.compile(r"^\[rank\d+\]:\[E\d{4} [^\]]*\] (.+)$")  # torch's C++ log: NCCL's watchdog, which ends the process
# srun's word on a task a signal ended (SIGKILL: "Killed", e.g. the kernel's OOM killer; a signal not handled),
# not its "Exited with exit code N", which follows every failure the lines above name better
_SRUN_SIGNAL = re.compile(r"^srun: error: [^:\s]+: task(s?) ([\d,-]+): (?!Exited with exit code).+$")
_NAMES_RANK = re.compile(r"^ranks? [\d,-]+:")
# a cluster=local controller's word on a rank a signal ended without one (localcontrol.Controller._signalled)
CONTROLLER_SAID = "allconv-hpc (controller): "
_LOGGED_WARNING = re.compile(r"^\[[^\]]* WARNING(?: rank \d+)?\] (.+)$")


def _task_errors(path: Path) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """A job task's .err file (its tail): the last line this tool printed before exiting (a preflight error, a
    cluster.setup line that failed; a stop in start-up, also as logged), the last error logged or raised (a
    rendezvous timeout, a traceback), else the signal srun says ended a task; and the cluster=local controller's
    word on a rank a signal ended."""
    said = other = killed = ended = None
    traceback = stop = False  # stop: `said` is a logged stop in start-up, which a later error makes no last word
    for line in _tail_lines(path) or []:
        if (m := _SRUN_SIGNAL.match(line)) is not None:
            # srun writes it into the batch step's file (task 0's), naming the task it means
            killed = f"rank{m.group(1)} {m.group(2)}: ended by a signal ({line})"
        elif line.startswith(CONTROLLER_SAID):
            ended = line.removeprefix(CONTROLLER_SAID)
        elif line.startswith("allconv-hpc: "):
            said, stop = line.removeprefix("allconv-hpc: ").removeprefix("error: "), False
        elif (m := _LOGGED_WARNING.match(line)) is not None and _is_stop(m.group(1)):
            said, stop, other = m.group(1), True, None  # train's StartupStop or Ctrl-C line, logged: the last word
        elif (m := _LOGGED_ERROR.match(line) or _C10_ERROR.match(line)) is not None:
            other = m.group(1)
        elif line.startswith("Traceback ("):
            traceback = True
        elif traceback and line and not line[0].isspace():  # the exception's own line ends the traceback
            other, traceback = line, False
        if stop and other is not None:
            said = stop = None
    return said, other or killed, ended


CTRL_C = "interrupted (Ctrl-C)"  # how every line of a Ctrl-C's stop begins (cli, train): no task's error


def _stopped_in_start_up(rec: dict) -> bool:
    """Every task of the job said last that a Ctrl-C or a signal stopped it in start-up, before its trainer wrote a
    record (a cluster=local job's ranks, which got the terminal's Ctrl-C as they imported torch; its controller
    says it for a rank the signal ended at its rendezvous)."""
    folder = _job_folder(rec)
    said = [_task_errors(p)[0] for p in folder.glob(f"{folder.name}_*_log.err")] if folder is not None else []
    return bool(said) and all(s is not None and _is_stop(s) for s in said)


def _is_stop(said: str) -> bool:
    """A task's last word is that a Ctrl-C or a signal stopped it in start-up (train's lines; a cluster=local
    controller's for a rank the signal ended at its rendezvous)."""
    return (said.startswith((START_UP_INTERRUPT, SETUP_STOP))  # SETUP_STOP: the batch shell's, before any rank
            or said.startswith("stopped by ") and START_UP_STOP in said)


def _job_error(rec: dict, kinds: tuple = (0, 1)) -> Optional[str]:
    """Why a job failed when its run wrote no error (it stopped before its trainer started: a node without the
    data, a rank's rendezvous): from its tasks' .err files, a rank's own refusal first, since the others' errors
    (a rendezvous that timed out waiting for it) follow from it. kinds=(0,): a refusal only."""
    folder = _job_folder(rec)
    if folder is None:  # started with sbatch by hand: its logs are where its script says
        return None
    job = folder.name
    found = {}
    for path in folder.glob(f"{job}_*_log.err"):
        task = path.name[len(job) + 1:].split("_")[0]
        if task.isdigit():
            found[int(task)] = _task_errors(path)
    for kind in kinds:
        for task in sorted(found):
            said = found[task][kind]  # a stop (Ctrl-C, a SIGTERM in start-up) is no rank's failure
            if said and not said.startswith(CTRL_C) and not _is_stop(said):
                # the batch script's own line (cluster.setup) is no rank's
                return said if _NAMES_RANK.match(said) or said.startswith("cluster.setup") else f"rank {task}: {said}"
    ended = [task for task in sorted(found) if found[task][2]] if 1 in kinds else []
    return f"rank {ended[0]}: {found[ended[0]][2]}" if ended else None  # no rank's own word: the controller's


def _why_lost(rec: dict, error: str) -> Optional[str]:
    """Where to read why the peers a PeerLost `error` names as silent ended: their own task files (.err), which
    hold the cluster=local controller's or srun's word on a signal that ended one. Named, not quoted: the same
    words come from a failed peer's clean-up (a reaper, srun's --kill-on-bad-exit) that ended a hung rank, and a
    requeued job's files hold its earlier starts too. None for a job started without submit."""
    m = re.search(r"peer rank\(s\) ([\d, ]+) did not answer", error)
    folder = _job_folder(rec)
    if m is None or folder is None:
        return None
    files = [folder / f"{folder.name}_{r}_log.err" for r in sorted({int(r) for r in m.group(1).split(",") if
                                                                   r.strip()})]
    files = [str(p) for p in files if p.is_file()]
    whose = "ranks'" if len(files) > 1 else "rank's"
    return (f"the lost {whose} own log (srun's or the controller's word on a signal that ended one): "
            f"{', '.join(files)}") if files else None


def _killed_only(rec: dict) -> bool:
    """The job's tasks say nothing but that a signal ended them (or nothing at all): no rank's own error."""
    error = _job_error(rec)
    return error is None or "ended by a signal (" in error


def _job_folder(rec: dict) -> Optional[Path]:
    """The job's own folder of submitit files (.submitit/<job id>/), None for a job submit did not start."""
    return Path(rec["submitit_folder"]) / str(rec["job_id"]) if rec.get("submitit_folder") else None


def _never_started(rec: dict) -> bool:
    """The job's submitit folder holds what submit wrote (its script, its pickle) and no log of a task: Slurm (or
    the local controller) never started it. False when that cannot be told (no folder, sbatch by hand)."""
    folder = _job_folder(rec)
    return folder is not None and folder.is_dir() and not any(folder.glob(f"{folder.name}_*_log.*"))


def slurm_ids(recs: list[dict]) -> list[str]:
    """The Slurm jobs of `recs`, whose states one squeue call asks (slurm_states)."""
    return [str(rec["job_id"]) for rec in recs if rec.get("job_id") and rec.get("backend") == "slurm"]


def run_rows(folder: Path) -> list[dict]:
    runs = read_runs(job_records(Path(folder)))
    return rows_of(runs, slurm_states(slurm_ids([rec for rec, _ in runs])))


def read_runs(recs: list[dict]) -> list[tuple[dict, dict]]:
    """Each job record with its run's status.json, read before Slurm is asked (as each was before the calls were
    batched): a run that ends meanwhile shows its older word beside Slurm's newer one, not the other way round."""
    return [(rec, run_status(Path(rec["run_dir"]))) for rec in recs]


def rows_of(runs: list[tuple[dict, dict]], answers: dict[str, SlurmState]) -> list[dict]:
    """A row for each (record, status.json) of `runs`; `answers`: slurm_states of their Slurm jobs (and maybe more)."""
    _sweep_commands.cache_clear()  # a submit --wait's next poll reads sweep.json anew
    rows = []
    silent = False  # Slurm did not answer for an earlier job: its answer for the others is not used, as before
    for rec, st in runs:
        run_dir = Path(rec["run_dir"])
        state = restarts = None
        known = ended = False  # the scheduler answered for this job (a job it does not know is gone)
        reason = ""
        slurm = bool(rec.get("job_id")) and rec.get("backend") == "slurm"
        if slurm and not silent:
            state, restarts, known, ended, reason = answers[str(rec["job_id"])]
            silent = not known
            if stopped_elsewhere(rec, state):  # the run's own word, and its lock, tell
                state = None
        elif rec.get("job_id") and rec.get("backend") == "local":
            state, known = local_state(rec), True
        # a status.json older than this submission is an earlier job's: its progress, not this job's state
        current = st.get("updated", 0) >= rec.get("submitted", 0)
        # written since by a process outside the job, which has ended: a `train` by hand resumed the run (its
        # record names no job, or its salloc's). The run's own word and its lock tell, as for any run by hand, and
        # the command that goes on with it is that train
        by_hand = current and not (state in ACTIVE_STATES and not ended) and (
            slurm and "slurm_job_id" in st and str(st["slurm_job_id"]) != str(rec["job_id"])
            or rec.get("backend") == "local" and (state is not None or "local_job_id" in st)
            and _local_by_hand(st, rec))
        copy_of = rec.get("copy_of") if state in ACTIVE_STATES and not ended else None
        if by_hand or copy_of:  # (a copy of an ended job's folder is its run, where it is now)
            state, restarts, ended = None, None, False
        run_state = st.get("state") if current else None
        active = state in ACTIVE_STATES and not ended
        unfinished = run_state in (None, "running", "requeued")
        # a stop Slurm may have requeued since (a SIGTERM preemption under PreemptMode=REQUEUE, `scontrol requeue`):
        # not final while Slurm does not answer
        maybe_requeued = slurm and run_state == "interrupted"
        no_answer = bool(rec.get("job_id")) and state is None and not known and (unfinished or maybe_requeued)
        # the lock is asked only where the scheduler does not say the job runs; a cluster=local job whose
        # controller is gone (SIGKILLed) may have ranks still stopping, or starting before their first record
        gone = rec.get("backend") == "local" and state is None and unfinished
        # (also for a job Slurm says runs: a requeued job's start shows as one; `acquire` retries past this look)
        held, holder = runlock.holder(run_dir) if state not in ACTIVE_STATES or state == "RUNNING" else (None, "")
        new_start = bool(held) and _new_start(run_dir, st)
        starting = new_start and run_state != "running"
        # Slurm says the job is over, yet the lock its run took is held: its node died holding it (a network file
        # system keeps a dead node's lock a while, NFSv3 until the node is back), not a new start by hand
        dead_lock = (bool(held) and not new_start and slurm and known and (ended or state not in ACTIVE_STATES | {None})
                     and current and run_state == "running" and str(st.get("slurm_job_id")) == str(rec["job_id"]))
        # a start with checkpoint.resume=never stopped while it set the old run aside: the next one finishes that
        half_aside = half_set_aside(run_dir / "checkpoints")
        checkpoint_step, cut_short = _resume_point(run_dir) if not half_aside else (None, [])
        if not st and not rec.get("job_id"):  # started by hand, ended or still starting before its first record
            state = {True: "RUNNING (starting)", False: "FAILED"}.get(held, "UNKNOWN")  # fit writes the first
            active = bool(held)
            ck = checkpoint_step if not held else None
            if ck is not None:  # status.json deleted (or lost)
                state, st = NO_RECORD, _progress_from_files(run_dir, ck)
            elif held is False:  # its error is in train.log (a failed download, a damaged data file)
                st = {"error": _last_error(run_dir) or "ended before its first status record; see train.log, and for "
                                                         "another rank's error its own output (torchrun's console)"}
                current = True
        elif held and not dead_lock and (run_state == "running" or gone or starting):
            # a train by hand resumed the run after its job ended, a local job's ranks outlive their controller, or
            # a resume is starting (rendezvous, data, model) over the last start's final record
            state, active, no_answer, ended = "RUNNING (starting)" if starting else "RUNNING", True, False, False
        elif state is None and not known and run_state == "running" and not rec.get("job_id") and held is False:
            state = "LOST"  # started by hand, no scheduler to ask: its lock, free and last taken here, says gone
        if state is None and known and unfinished:
            state = "LOST"  # gone without a final word: killed hard (SIGKILL, node failure)
            setup_log = Path(rec.get("submitit_folder", "")) / f"setup-{rec.get('job_id')}.log"  # executor._local_setup
            control_log = Path(rec.get("submitit_folder", "")) / f"controller-{rec.get('job_id')}.log"  # localcontrol
            mine = st and current  # (an earlier job's record: this one never wrote its own)
            setup_stop = _setup_stop(setup_log) if rec.get("backend") == "local" and not mine else None
            if rec.get("backend") == "local" and not mine and _ends_in_traceback(control_log):
                # (a module of the submit's folder shadowing one it imports, say): a failure, not a stop to resume
                state = f"LOST (never started: its controller failed, see {control_log})"
            elif setup_stop:  # a Ctrl-C (submit --wait's terminal) or a kill in a long setup: no failure
                state = f"{SETUP_STOPPED} {setup_stop} in cluster.setup)"
            # a setup that printed nothing (`exit 3` ends its shell before the failure line) and started no task
            elif rec.get("backend") == "local" and not mine and setup_log.is_file() and (
                    setup_log.stat().st_size or _never_started(rec)):
                state = f"LOST (never started: cluster.setup failed? see {setup_log})"
            elif _never_started(rec):  # e.g. an array task scancelled while pending
                state = "LOST (never started)"
        elif state is None:  # Slurm forgot the job (MinJobAge) and no accounting: the run folder decides
            # the run's own word, marked apart from Slurm's states of the same name where it is a guess
            state = {"completed": "COMPLETED", "failed": "FAILED", "gave_up": "GAVE UP",
                     "interrupted": "INTERRUPTED?" if no_answer else "INTERRUPTED",
                     "requeued": "REQUEUED?", "running": "RUNNING?"}.get(run_state, "UNKNOWN")
        if restarts is None:
            restarts = st.get("restarts", 0) if current else 0
        if state == "LOST" and not current and _stopped_in_start_up(rec):
            state = "INTERRUPTED"
        # the run stopped on a signal with a checkpoint (exit 3, which Slurm records as FAILED; scancel's SIGTERM:
        # CANCELLED; the time limit's where the requeue was refused: TIMEOUT, unless it came in start-up, where the
        # next start would spend its time alike), or gave up after checkpoint.max_requeues time limits (exit 4,
        # FAILED): resumable by the same submit, as a cluster=local job's INTERRUPTED, not a failure
        own = current and (not slurm or str(st.get("slurm_job_id")) == str(rec["job_id"]))  # that job's own word
        in_start_up = run_state == "interrupted" and START_UP_STOP in str(st.get("error"))  # stopped before training
        # a rank refused in start-up (its node lacks the data): srun's --kill-on-bad-exit SIGTERMs the others, and a
        # rank 0 already past its signal set-up records that as a stop in start-up; the refusal is why the job failed
        refusal = (_job_error(rec, kinds=(0,)) if slurm and state == "FAILED" and current and not active
                   and in_start_up else None)
        refused = refusal is not None
        stopped = not refused and not active and not dead_lock and (
            run_state in STOPPED_RUN and state in ("FAILED", "CANCELLED", "TIMEOUT") and own
            and not (state == "TIMEOUT" and in_start_up)
            # scancel's, where the run had no time to say so (KillWait's SIGKILL came first, in a long start-up or
            # stop; no word of this job at all): its checkpoints stand, unless a rank said why it failed
            or state == "CANCELLED" and (run_state in ("running", "requeued") and own
                                         or run_state is None and not _never_started(rec) and _killed_only(rec)))
        if stopped and state == "FAILED":
            state = STOPPED_RUN[run_state]
        # scancelled before it started: nothing ran, nothing failed (the same submit starts it). Slurm says CANCELLED
        # while it remembers the job, nothing once it forgot it (no accounting): the same either way
        cancelled = ((slurm or rec.get("backend") == "local") and not (st and current) and not active
                     and state in ("CANCELLED", "LOST (never started)") and _never_started(rec))
        if cancelled and state == "CANCELLED":
            state = "CANCELLED (never started)"
        # a run whose last start failed, queued again as the same job (Slurm's requeue after a node failure,
        # `scontrol requeue`: its restart count is past the failed start's): the job's state decides until the new
        # start writes its own word. The failed start itself, still ending (COMPLETING, other nodes' ranks), failed
        queued_again = active and isinstance(restarts, int) and restarts > (st.get("restarts") or 0)
        failed = not starting and not stopped and not cancelled and (
            state.split(" ")[0] in FAILED_STATES or ended or run_state == "failed" and not queued_again)
        if not run_dir.exists() and not active:  # removed since (a point deleted from a copy of a sweep, say)
            state, failed = "GONE (no run folder)", False
        if run_state == "completed" and failed and not active:
            # training finished, then Slurm ended the job otherwise (scancel or the time limit just after the
            # last epoch): the run is done, not failed, and a new submit would find nothing to do
            state, failed = f"{state} (run completed)", False
        # until this job writes status.json, progress is the earlier job's, towards this job's trainer.epochs (also
        # where its record names none: a stop in start-up before the config was read)
        target = st.get("epochs") if (current and st.get("epochs") is not None) or not rec.get("epochs") \
            else rec["epochs"]
        error = st.get("error") if current else None  # what the run said when it failed
        if failed and error is None and rec.get("job_id") and not active:
            error = _job_error(rec)  # it failed before its trainer could say why: its tasks' .err files do
            if error is not None and state.startswith("LOST"):  # cluster=local: a job whose tasks exited non-zero
                state = "FAILED"
        if failed and error is None and "its controller failed" in state:  # what it raised
            error = _task_errors(Path(rec.get("submitit_folder", "")) / f"controller-{rec.get('job_id')}.log")[1]
        if refused:
            error = refusal
        if failed and current and st.get("peer_lost") and not active and error:  # what ended the lost peers
            error = "; ".join(filter(None, (error, _why_lost(rec, error))))
        if dead_lock:
            error = (f"{error}; " if error else "") + (
                f"the job ended ({state}) with its run lock still held by {holder}: if that node is down, delete "
                f"{run_dir / runlock.LOCK_FILE} before resuming")
        if copy_of and not active and run_dir.exists():  # a snapshot of a run its job trains elsewhere: no job, and no failure, of its own
            state, failed, error = "COPY (its job trains the original)", False, None
        never = never_starts(reason, rec["job_id"]) if state == "PENDING" else None  # --wait would wait forever
        held = is_held(state, reason)  # and so would this
        if never:
            state = f"PENDING ({never})"
        elif state == "PENDING" and reason in ("PartitionDown", "PartitionInactive"):  # waits for an admin, maybe long
            state = f"PENDING ({reason}: starts once an admin brings the partition up)"
        elif held:  # scontrol hold / requeuehold, or an admin's hold
            state = f"PENDING ({held_advice(rec, reason)})"
            never = True
        # a run resumed by hand since: the job its record names (its salloc's), if any, not the submitted one
        job = st.get("slurm_job_id") or st.get("local_job_id") if by_hand else rec.get("job_id") or st.get("slurm_job_id")
        rows.append({"job": (None if copy_of else job) or "-",
                     "copy_of": copy_of, "copy_job": rec.get("job_id") if copy_of else None,  # a copy of the
                     # folder its job trains now
                     "state": state, "run": run_state or "-",
                     "slurm_answered": known if slurm else None,
                     # no_answer: Slurm did not answer and the run has not ended, so it may still be queued
                     "active": (active and not never) or no_answer, "failed": failed or bool(never),
                     "no_answer": no_answer,
                     "restarts": restarts, "epoch": st.get("epoch", 0), "epochs": target,
                     "step": st.get("global_step", 0), "last_val_acc": st.get("last_val_acc"),
                     "best_val_acc": st.get("best_val_acc"), "test_acc": st.get("test_acc"), "wandb_id": st.get("wandb_id") or "-",
                     "error": error, "checkpoint_step": checkpoint_step, "cut_short": cut_short,
                     "half_aside": half_aside,
                     "starts_over": run_state in (*MAY_RESUME, None) and _starts_over(run_dir, rec),
                     "peer_lost": bool(st.get("peer_lost")) and current,  # failed only as a peer was killed
                     "refused": refused,  # a rank's refusal in start-up failed the job: no resume advice
                     # a failed row says its own error; another's record may hide a start that failed since
                     "start_error": _failed_since(run_dir, st) if st and not (active or failed) else None,
                     "folder": Path(os.path.abspath(run_dir)).name, "run_dir": str(run_dir.resolve()),  # `.` too
                     "started_by": "train" if by_hand else rec.get("started_by") or (
                         "sbatch" if rec.get("started_by_hand") else "submit" if rec.get("job_id") else "train"),
                     "resume_command": None if by_hand else _resume_command(rec, run_dir)})
        if rows[-1]["started_by"] == "train":  # started or resumed by hand: its overrides, for the notes
            rows[-1]["train_command"], rows[-1]["ranks"] = _train_command(run_dir, st), _ranks(st)
    return rows


def _train_command(run_dir: Path, st: dict) -> Optional[str]:
    """A run started by hand: `allconv-hpc train` with the overrides its .hydra/overrides.yaml records (those of its
    last start), aimed at the folder where it is now; None where that file is missing or unreadable. Under torchrun
    on one node (status.json's `ranks`, `nodes`), torchrun's own line of as many ranks: one process would resume it
    on a fraction of its ranks (its random streams reseeded: no exact resume)."""
    from omegaconf import OmegaConf
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
    except Exception:  # (OSError, a YAML error: the notes then name no command)
        return None
    if not isinstance(overrides, list) or not all(isinstance(w, str) for w in overrides):
        return None
    from .compose import recorded_data_root
    from .config import ConfigError
    from .plan import hydra_value
    root = recorded_data_root(run_dir)  # absolute: a data.root given relative names another folder elsewhere
    if root is not None and any(re.match(r"[+~]*data\.root=", w) for w in overrides):
        try:
            plain = re.fullmatch(r"[A-Za-z0-9_./-]+", root)
            overrides = [w for w in overrides if not re.match(r"[+~]*data\.root=", w)] + [
                f"data.root={root if plain else hydra_value(root, 'data.root')}"]
        except ConfigError:  # a path Hydra cannot be given quoted: none to name
            return None
    launch = ["allconv-hpc"]
    if _ranks(st) > 1:
        if st.get("launch") != "torchrun" or st.get("nodes") != 1:  # a torchrun per node (each its rendezvous
            return None  # options), ranks started by hand: not one line to give (_same_command says their count)
        launch = ["torchrun", "--standalone", f"--nproc_per_node={st['ranks']}", "-m", "allconv_hpc"]
    return _resume_command({"command": [*launch, "train", *overrides]}, run_dir, sweep=False)


def _ends_in_traceback(log: Path) -> bool:
    """Whether the end of `log` (its last 64 KiB) holds a Python traceback, but for a Ctrl-C's (a stop)."""
    lines = [line for line in _tail_lines(log) or [] if line.strip()]
    return any(line.startswith("Traceback (most recent call last)") for line in lines) and \
        not lines[-1].startswith("KeyboardInterrupt")


def _ranks(st: dict) -> int:
    """The ranks the run's last start had (status.json's `ranks`; 1 in records from before it was kept)."""
    return st["ranks"] if isinstance(st.get("ranks"), int) else 1


def _resume_command(rec: dict, run_dir: Path, sweep: Optional[bool] = None) -> Optional[str]:
    """The submit command that queued the row's job, aimed at the folder where the run is now (moved or copied
    since: its own folder, not the recorded one), or None for a record from before they kept it. Run from another
    folder than submit's, it goes there first: its other relative values (data.root=data) are taken from there."""
    from .plan import hydra_value
    command = rec.get("command")
    if not command or not all(isinstance(w, str) for w in command):
        return None
    if sweep is None:  # a point's own record (status sw/seed=0) too
        sweep = "-m" in command or "--multirun" in command
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    words = [w for w in command if not re.match(r"[+~]*hydra\.(sweep|run)\.dir=", w)]
    if sweep and _submitted_otherwise(rec, run_dir.parent):
        words = _narrowed(words, rec.get("overrides") or [])
    here = os.path.abspath(run_dir.parent if sweep else run_dir)
    if not re.fullmatch(r"[A-Za-z0-9_./-]+", here):  # for Hydra in "..." (kept by the shell's '...'), if it can
        try:
            here = f'"{here}"' if '"' not in here else hydra_value(here, key)
        except Exception:  # a path submit would refuse: none to give
            return None
    said = shlex.join([*words, f"{key}={here}"])
    cwd = rec.get("cwd")
    elsewhere = isinstance(cwd, str) and cwd != os.getcwd() and os.path.isdir(cwd)  # gone (moved): as typed
    return f"cd {shlex.quote(cwd)} && {said}" if elsewhere else said


def _submitted_otherwise(rec: dict, sweep_dir: Path) -> bool:
    """The command that queued `rec` also covers a point of the sweep that another command (re)submitted since
    (other values: trainer.epochs=4 after 20): given as it is, it would give that point its values again (grow it,
    say). Where its points cannot be told, said so too (narrowed: safe either way)."""
    from .sweep import spelling_free
    command = rec.get("command")
    others = {spelling_free(name) for name, c in _sweep_commands(str(sweep_dir / "sweep.json")) if c != command}
    if not others:
        return False
    covered = _covered(tuple(command))
    return covered is None or bool(others & covered)


@functools.lru_cache(maxsize=8)  # for one pass (rows_of clears it): one read of sweep.json for all its points' rows
def _sweep_commands(path: str) -> tuple:
    """(point folder name, the command that queued its job) for each point sweep.json records."""
    jobs = read_json(path).get("jobs")
    return tuple((Path(j["run_dir"]).name, j.get("command")) for j in jobs if isinstance(j, dict)
                 and isinstance(j.get("run_dir"), str) and j.get("command") is not None) if isinstance(jobs, list) \
        else ()


@functools.lru_cache(maxsize=8)
def _covered(command: tuple) -> Optional[frozenset]:
    """The point folder names a sweep's submit `command` covers; None where they cannot be told."""
    from .sweep import expand_sweep, point_dirname
    words = [w for w in command[command.index("submit") + 1:] if not w.startswith("-")] if "submit" in command else []
    try:
        _, points = expand_sweep(words, multirun=True)
    except Exception:  # (ConfigError, Hydra's own)
        return None
    return frozenset(point_dirname(p) for p in points)


def _narrowed(words: list[str], overrides: list[str]) -> list[str]:
    """A sweep's submit command narrowed to one point (its `overrides`): each swept value list becomes that point's
    value as choice(...), still swept, so it names the same point folder."""
    from .compose import override_key
    mine = {override_key(o): o.split("=", 1)[1] for o in overrides if "=" in o}
    out = []
    for w in words:
        k = override_key(w) if "=" in w and not w.startswith("-") else None
        if k in mine and w not in overrides and w.split("=", 1)[1] != mine[k]:
            w = f"{w.split('=', 1)[0]}=choice({mine[k]})"
        out.append(w)
    return out


# a cluster=local job's records before they named it: one written this long after its result is a later start's
# (file times kept to the second, a file server's clock apart from this one's)
LOCAL_RESULT_SLACK_S = 5.0


def _local_by_hand(st: dict, rec: dict) -> bool:
    """The run's record is not its ended cluster=local job's: it names another job (none: a train by hand), or, from
    before records named theirs, it came well after the job's result."""
    if "local_job_id" in st:
        return str(st["local_job_id"]) != str(rec["job_id"])
    ended = local_ended_at(rec)
    return ended is not None and st.get("updated", 0) > ended + LOCAL_RESULT_SLACK_S


def _new_start(run_dir: Path, st: dict) -> bool:
    """The lock's holder took it after the run's last record: a new start, not the writer of that record on its
    way out (W&B finishing) before it lets the lock go."""
    taken = runlock.taken_at(run_dir)
    return taken is not None and taken > st.get("updated", 0)


def _starts_over(run_dir: Path, rec: dict) -> bool:
    """The same command run again sets the run's checkpoints aside and starts over, rather than resume: the
    submission's checkpoint.resume=never (its job may have stopped before it recorded its config), else the one
    the run last started with."""
    from .compose import override_key, recorded
    given = [o.partition("=")[2].strip("'\"") for o in rec.get("overrides") or []
             if override_key(o) == "checkpoint.resume"]
    return (given[-1] if given else recorded(run_dir, "checkpoint", "resume")) == "never"


def _resume_point(run_dir: Path) -> tuple[Optional[int], list[int]]:
    """(the step of the checkpoint a resume would load, by its file name: the newest whose completeness trailer is
    there; -1 for a last.pt alone, None for none; the newer steps it passes over, `_cut_short`)."""
    steps = _step_files(run_dir)
    if not steps:
        return (-1 if (run_dir / "checkpoints" / "last.pt").exists() else None), []
    cut = _cut_short(run_dir, steps)
    return steps[len(cut)], cut


def _step_files(run_dir: Path) -> list[int]:
    """The steps of checkpoints/step_*.pt, newest first."""
    try:
        names = os.listdir(run_dir / "checkpoints")
    except OSError:
        return []
    return sorted((int(m.group(1)) for m in map(re.compile(r"step_(\d+)\.pt").fullmatch, names) if m), reverse=True)


def _cut_short(run_dir: Path, steps: list[int]) -> list[int]:
    """The newest steps whose file has no completeness trailer (a copy cut short), up to the first that has one: a
    resume passes over them (with a warning), and so does status. As CheckpointDir.load_latest tries last.pt after
    the newest step file, a whole last.pt of its own (a copy, not the cut file's hard link) passes over none. Only
    the files' last bytes are read; a file that cannot be read stops the look (the resume stops there too, with
    its error), and one whose bytes changed inside (a bit flipped) is not seen."""
    from .fsio import has_trailer
    folder, out = run_dir / "checkpoints", []
    for step in steps:
        if has_trailer(folder / f"step_{step:08d}.pt") is not False:
            break
        if step == steps[0] and has_trailer(folder / "last.pt"):  # (a hard link to the cut file has none either)
            return []
        out.append(step)
    return out if len(out) < len(steps) else []  # none whole: the trainer's error names them, not this


def _progress_from_files(run_dir: Path, checkpoint_step: int) -> dict:
    """Without status.json: the epochs history.csv holds (those whose checkpoint landed) and their accuracies,
    towards the trainer.epochs its .hydra/config.yaml records, the newest checkpoint's step (-1: last.pt alone, step
    unknown) and the W&B id its id file holds."""
    import csv
    from .compose import recorded
    from .history import read_history
    from .tracking import read_id
    try:
        rows = read_history(run_dir / "history.csv")
    except (OSError, csv.Error, ValueError):  # ValueError: not UTF-8 (a damaged file)
        rows = []
    accs = [a if isinstance(a := r.get("val_acc"), (int, float)) else None for r in rows]  # a hand-edited cell: none
    try:
        wandb_id = read_id(run_dir)
    except OSError:
        wandb_id = None
    epochs = recorded(run_dir, "trainer", "epochs")
    return {"epoch": len(rows), "epochs": epochs if isinstance(epochs, int) else None,
            "global_step": max(0, checkpoint_step), "last_val_acc": accs[-1] if accs else None,
            "best_val_acc": max((a for a in accs if isinstance(a, float)), default=None), "wandb_id": wandb_id}


# run states of a run that may have stopped part-way (a signal; a kill, a time limit while it said running; the
# time limits used up)
MAY_RESUME = ("interrupted", "running", "requeued", "gave_up")
# a run folder with checkpoints and no status.json (deleted: status.json's damage is named with that fix)
NO_RECORD = "UNKNOWN (no status.json)"
# the run's own word for a stop that left a checkpoint for the same submit to resume, and the state it is shown as
# where Slurm says FAILED (exit 3 and 4)
STOPPED_RUN = {"interrupted": "INTERRUPTED", "gave_up": "GAVE UP"}
# rows neither failed nor done: `submit --wait` exits EXIT_STOPPED for them, not 0 ("every run completed")
# (a CANCELLED row that is not failed: a scancel the run had no time to answer)
UNFINISHED = {*STOPPED_RUN.values(), "CANCELLED", "CANCELLED (never started)", "LOST (never started)",
              "GONE (no run folder)", NO_RECORD}
# a cluster=local job whose cluster.setup a signal ended ("... SIGINT in cluster.setup)"): unfinished too
SETUP_STOPPED = "INTERRUPTED (never started:"


def _setup_stop(log: Path) -> Optional[str]:
    """The signal that ended a cluster=local job's cluster.setup (its log's last line, executor._local_setup's trap),
    or None."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 200))
            last = f.read().decode(errors="replace").strip().splitlines()[-1:]
    except OSError:
        return None
    return last[0].removeprefix(LOCAL_SETUP_STOP).strip() if last and last[0].startswith(LOCAL_SETUP_STOP) else None


def is_failed(row: dict) -> bool:
    return row["failed"]


def exit_code(rows: list[dict]) -> int:
    """1 if a job failed, EXIT_NO_ANSWER if Slurm did not answer for one (it may have), else 0."""
    if any(is_failed(r) for r in rows):
        return 1
    return EXIT_NO_ANSWER if any(r["no_answer"] for r in rows) else 0


def format_table(rows: list[dict]) -> str:
    test = ["test_acc"] if any(r.get("test_acc") is not None for r in rows) else []  # data.val_size runs only
    cols = ["job", "state", "run", "restarts", "epoch", "step", "last_val_acc", "best_val_acc", *test, "wandb_id",
            "folder"]
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    cells = [[_epochs(r) if c == "epoch" else fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _epochs(row: dict) -> str:
    """Epochs done of the run's trainer.epochs ("?" where no record says it)."""
    return f"{row['epoch']}/{'?' if row['epochs'] is None else row['epochs']}"


# a sweep point's note names its recorded submit command so; _errors gives each such command once, below the notes
SWEEP_COMMAND_BELOW = "its sweep's submit command (below)"


def _errors(rows: list[dict]) -> str:
    """Below the table, a line per note: `folder: note`; then each sweep submit command the notes refer to
    (points added by another submit have theirs)."""
    said = [(r, note) for r in rows for note in notes(r)]
    commands = dict.fromkeys(r["resume_command"] for r, note in said if SWEEP_COMMAND_BELOW in note)
    return ("".join(f"\n{r['folder']}: {note}" for r, note in said)
            + "".join(f"\nsweep submit command: {c}" for c in commands))


def notes(r: dict) -> list[str]:
    """What is said of a row below the table: why it failed, where it said; how to go on with a run stopped
    part-way."""
    out = []
    if r["failed"] and r["error"]:
        out.append(r["error"])
    ck = r.get("checkpoint_step")
    if ck is not None:
        then = _resumes(ck)
        if r.get("cut_short"):  # a copy cut short (a full disk, an rsync stopped): passed over
            then += (f" ({', '.join(f'step_{s:08d}.pt' for s in r['cut_short'])}, newer, "
                     f"{'is' if len(r['cut_short']) == 1 else 'are'} cut short: no completeness trailer)")
    elif r["epoch"]:  # deleted since: train sets the epochs it recorded aside
        then = ("starts it over: its checkpoints are gone (deleted?), and the epochs it recorded are set aside in "
                "checkpoints.oldN/")
    elif r["step"]:
        then = "starts it over: its checkpoints are gone (deleted?)"
    else:
        then = "starts it over: it stopped before its first checkpoint"
    if r.get("half_aside"):
        then = ("finishes setting its old run aside (a start with checkpoint.resume=never was stopped doing it) and "
                "starts it over")
    if ck is not None and r.get("starts_over"):  # what resume=never does again, at each start
        then = (f"starts it over again (checkpoint.resume=never sets its checkpoints aside); with "
                f"checkpoint.resume=auto instead it {then.replace('resumes it', 'resumes')}")
    if r.get("copy_of") and r["state"].startswith("COPY"):  # its progress is a snapshot of the original's
        return [f"a copy of {r['copy_of']}, which its job {r['copy_job']} trains now, not this folder; "
                f"{_same_command(r)} {then} here"]
    # a failure (a rank's refusal too) says what to change, itself
    if (not r["active"] and (r["run"] != "failed" or r["peer_lost"]) and not r.get("refused")
            and (r["run"] in MAY_RESUME or r["peer_lost"] or r["state"] in (NO_RECORD, "CANCELLED"))  # scancel, kill
            and r["state"].split(" ")[0] not in ACTIVE_STATES and not r["state"].endswith("?")):
        done = (f"stopped with epoch {_epochs(r)} done (step {r['step']})" if r["state"] != NO_RECORD else
                f"no status.json (deleted?): history.csv has epoch {_epochs(r)}")
        if r["state"] == NO_RECORD and r["epochs"] is not None and r["epoch"] >= r["epochs"]:
            then = "finds it completed (nothing to train) and writes its status.json again"
        more = ""
        if r["run"] == "gave_up":  # the same limits would give up alike: the knob that trains more per start
            done += ", giving up: its time limit came more than checkpoint.max_requeues times"
            longer = {"sbatch": "a longer sbatch --time", "train": "a longer allocation (--time)"}.get(
                r["started_by"], "a larger cluster.timeout_min")
            more = f" (with {longer}, each start trains longer)"
        out.append(f"{done}; {_same_command(r)} {then}{more}")
    if r["state"] in ("CANCELLED (never started)", "LOST (never started)") or r["state"].startswith(SETUP_STOPPED):
        again = _same_command(r) if r["started_by"] == "sweep" or r.get("resume_command") else \
            "the same submit command"  # it was submitted
        how = "(stopped in its cluster.setup)" if r["state"].startswith(SETUP_STOPPED) else "(scancel?)"
        # a checkpoint is an earlier job's: a point that had trained part-way resumes
        out.append(f"job {r['job']} ended before it started {how}; nothing ran: {again} "
                   f"{'starts it' if ck is None else then}")
    if r["state"] == "GONE (no run folder)":
        out.append(f"its run folder is gone (moved or removed?): {_same_command(r)} starts it anew")
    if r.get("start_error"):
        out.append(f"a later start failed before it wrote status.json (the state shown is the start before): "
                   f"{r['start_error']}")
    return out


def _resumes(ck: int) -> str:
    return f"resumes it from its newest checkpoint, step {ck}" if ck >= 0 else "resumes it from its newest checkpoint"


def _same_command(r: dict) -> str:
    """The command that goes on with the row's run: a sweep's point is resubmitted with its sweep (a lone
    `train` would need the point's overrides), a run started by hand is trained again. A recorded submit command
    is named: a sweep's below the notes (one for its points), a run's here."""
    if r.get("resume_command"):
        return SWEEP_COMMAND_BELOW if r["started_by"] == "sweep" else f"`{r['resume_command']}`"
    if r["started_by"] == "train" and r.get("train_command"):
        return f"the same train command (`{r['train_command']}`)"
    if r["started_by"] == "train" and r.get("ranks", 1) > 1:  # one process would resume it on one rank, reseeded
        return f"the same launch of its {r['ranks']} ranks, with the same overrides,"
    return {"sweep": "the same `submit -m` command (the whole sweep)", "train": "the same train command",
            "sbatch": "the same sbatch or srun (or train) command"}.get(r["started_by"], "the same submit (or train) command")


_DASHED = ("job", "run", "wandb_id")  # a row's "-" where nothing says it (no job, no run state, no W&B run)


def status_main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="allconv-hpc status", description="State of a run or a sweep.",
                                 epilog="exit status: 0 no job failed, 1 a job failed or can never start as asked, 3 Slurm did "
                                        "not answer for a job whose run has not ended, 2 not a run or sweep folder, "
                                        "or a file of it is damaged (the error names it)")
    ap.add_argument("folder", type=Path, nargs="+", help="run or sweep folders (runs/* for every run in runs/)")
    ap.add_argument("--json", action="store_true", help="machine-readable rows")
    args = ap.parse_args(argv)
    rows, seen, refused = [], set(), False
    folders = args.folder
    if len(folders) > 1:  # runs/*: a plain file beside the runs (notes.md) is no folder given
        folders = [f for f in folders if not f.is_file()] or folders
    found: dict = {}  # folder: its job records and their status.json, or why it has none
    for folder in folders:
        try:
            found[folder] = read_runs(job_records(folder))
        except (FileNotFoundError, DamagedFile) as e:
            found[folder] = e
    # one squeue call for every folder's jobs (runs/*: a call a folder hammered slurmctld)
    answers = slurm_states(slurm_ids([rec for runs in found.values() if isinstance(runs, list) for rec, _ in runs]))
    for folder in folders:  # each said on its own: one that is no run folder leaves the others' rows
        try:
            if isinstance(found[folder], Exception):
                raise found[folder]
            for r in rows_of(found[folder], answers):
                if (r["run_dir"], r["job"]) not in seen:  # a folder given twice (runs/a and runs/*) shows once
                    seen.add((r["run_dir"], r["job"]))
                    rows.append(r)
        except (FileNotFoundError, DamagedFile) as e:
            print(f"allconv-hpc status: error: {e}", file=sys.stderr)
            refused = True
    if len(args.folder) > 1:  # two sweeps' points share names (seed=0): each row by its path from here
        for r in rows:
            rel = os.path.relpath(r["run_dir"])
            r["folder"] = rel if not rel.startswith("..") else r["run_dir"]
    if not rows:
        if args.json:  # a consumer of --json reads a list, empty here (the errors are on stderr, the exit code 2)
            print("[]")
        return 2
    print(json.dumps([{**r, **{k: None for k in _DASHED if r[k] == "-"},  # the table's dash: null, as other keys
                       "notes": [n.replace(SWEEP_COMMAND_BELOW, f"`{r['resume_command']}`") for n in notes(r)]}
                      for r in rows], indent=1) if args.json
          else format_table(rows) + _errors(rows))
    silent = [str(r["job"]) for r in rows if r["slurm_answered"] is False]
    if silent:
        # each reason once; the jobs after the first silent one are not asked (each would wait up to 30 s)
        why = "; ".join(dict.fromkeys(filter(None, (squeue_silence(j, "") for j in silent)))) or "squeue did not answer"
        print(f"allconv-hpc status: warning: Slurm did not answer for job(s) {', '.join(silent)} ({why}): their "
              f"state is the run's own status.json", file=sys.stderr)
    return 2 if refused else exit_code(rows)


WIDE = 8  # jobs: beyond, a progress line counts the states and names only the jobs that changed


def _job_state(job: str, state: str, epoch: Optional[str]) -> str:
    return f"{job}:{state}({'-' if epoch is None else epoch})"


def _progress(snap: list[tuple], last: Optional[list[tuple]]) -> str:
    """`--wait`'s line at each change: every job's state(epoch), or for a big sweep the count in each state
    and the jobs whose state or epoch changed (at most WIDE of them named)."""
    if len(snap) <= WIDE:
        return "  ".join(_job_state(*x) for x in snap)
    counts: dict[str, int] = {}
    for _, state, _ in snap:
        counts[state] = counts.get(state, 0) + 1
    before = {j: (s, e) for j, s, e in last or []}
    changed = [_job_state(j, s, e) for j, s, e in snap if last is not None and before.get(j) != (s, e)]
    more = f" +{len(changed) - WIDE} more" if len(changed) > WIDE else ""
    line = f"{len(snap)} jobs: " + ", ".join(f"{counts[state]} {state}" for state in sorted(counts))  # a fixed order
    return line + (f"; changed: {'  '.join(changed[:WIDE])}{more}" if changed else "")


def wait_for(folder: Path, poll_s: float = 5.0, jobs: Optional[set] = None) -> int:
    """Print state changes until no job is queued or running; 1 if any failed, 3 if none failed but a run stopped
    unfinished (interrupted: a signal, with a checkpoint), 2 (as `status`) when a record is damaged (it stays so:
    waiting on would never end) or the folder is gone (moved or removed), else 0. `jobs`: the ids of the jobs to
    watch (a sweep's points submitted again by this submit), not the sweep's others, which may have failed long
    before."""
    last = None
    while True:
        try:
            every = run_rows(folder)
            rows = [r for r in every if str(r["job"]) in jobs] if jobs else every
            rows = rows or every  # none of them found (records rewritten meanwhile): the folder's
        except (DamagedFile, FileNotFoundError) as e:  # FileNotFoundError: the folder moved or removed meanwhile
            print(f"allconv-hpc submit: error: {e}; stopped watching (the jobs go on)", file=sys.stderr)
            return 2
        snap = [(r["job"], r["state"], _epochs(r)) for r in rows]
        if snap != last:
            print(time.strftime("%H:%M:%S"), _progress(snap, last), flush=True)
            last = snap
        if not any(r["active"] for r in rows):  # Slurm not answering keeps it waiting
            print(format_table(rows) + _errors(rows))
            code = exit_code(rows)
            if code == 0 and any(r["run"] in MAY_RESUME or r["state"] in UNFINISHED or
                                 r["state"].startswith(SETUP_STOPPED) for r in rows):
                return EXIT_STOPPED  # a script must tell "done" from "stopped with a checkpoint"
            return code
        time.sleep(poll_s)

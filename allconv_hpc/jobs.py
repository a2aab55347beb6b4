"""The jobs that may train into a run folder, and the records they leave: what `submit`, `train` and
`status` all ask. A job's state comes from Slurm (squeue, then sacct and scontrol) or, for cluster=local,
from its controller's process and submitit's result file; submission.json, sweep.json and status.json are
read strictly (DamagedFile names the file and its fix)."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional

from .slurm import SlurmJob, slurm_conf_missing, slurm_out

DIVERGED = "non-finite"  # how a diverged run's error in status.json begins: submit warns of it, an early stop keeps it
START_UP_STOP = "during start-up, before training"  # in the error of a start a signal stopped (train: StartupStop)
# how the line of a start a Ctrl-C stopped begins (train, and a cluster=local controller for a rank the Ctrl-C ended
# at its rendezvous): a stop asked for before training, no failure
START_UP_INTERRUPT = "interrupted (Ctrl-C) during start-up"
# how the batch shell's line begins when Slurm's SIGTERM (scancel, a preemption, the time limit) ended its
# cluster.setup (executor._slurm_setup): a stop before any rank existed, no failure
SETUP_STOP = "SIGTERM during cluster.setup"
# the last line of a cluster=local job's setup log (executor._local_setup) where a signal ended its cluster.setup
LOCAL_SETUP_STOP = "cluster.setup stopped by"


# The run's own word in status.json (read leniently: {} for none), for the checks before a start and at its end.
def is_completed(st: dict, epochs_done, epochs: int) -> bool:
    """Finished: it said so, and `epochs_done` (its checkpoint's, or its own record's) reaches trainer.epochs (a
    larger trainer.epochs trains it on)."""
    return st.get("state") == "completed" and isinstance(epochs_done, int) and epochs_done >= epochs


def is_diverged(st: dict) -> bool:
    """It stopped on a non-finite loss: a resume repeats the divergence."""
    return st.get("state") == "failed" and str(st.get("error", "")).startswith(DIVERGED)

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING", "PREEMPTED", "SPECIAL_EXIT", "STOPPED"}


_silence: dict[str, str] = {}  # job id -> why squeue_job got no answer for it: submit's and status's words for it


def squeue_silence(job_id: str, unknown: str = "squeue did not answer") -> str:
    """Why `squeue_job(job_id)` got no answer, in squeue's own words where it said any (e.g. "Could not establish
    a configuration source": no slurm.conf here, SLURM_CONF unset); `unknown` for a job not asked."""
    return _silence.get(str(job_id)) or unknown


def squeue_job(job_id: str) -> tuple[bool, Optional[str], str]:
    """(Slurm answered, the job's state while it is queued or running, None when it is not; squeue's reason,
    e.g. why it is pending). Inside `asked_ahead`, from its one call where it asks for this job."""
    global _ahead
    if _ahead_ids is not None and job_id in _ahead_ids:
        if _ahead is None:
            _ahead = squeue_jobs(_ahead_ids)
        return _ahead[job_id][:3]
    return squeue_jobs([job_id])[job_id][:3]


_ahead_ids: Optional[list] = None  # the jobs asked_ahead asks for, while it lasts
_ahead: Optional[dict] = None  # squeue_jobs' answers for them, once one was needed


@contextmanager
def asked_ahead(job_ids: list[str]) -> Iterator[None]:
    """squeue asked once for all of `job_ids` (a sweep's points, each checked by submit), at the first that is
    needed (a config error of the first point is said before Slurm is asked): squeue_job answers from that call
    within, where it asked one call a job (200 for a sweep of 200 points, and again under the lock)."""
    global _ahead_ids, _ahead
    _ahead_ids, _ahead = (list(job_ids) if len(job_ids) > 1 else None), None
    try:
        yield
    finally:
        _ahead_ids, _ahead = None, None


def recorded_jobs(folders: list[Path]) -> list[str]:
    """The Slurm job ids that the submission.json of each of `folders` names (damaged or missing: none)."""
    from .fsio import read_json
    recs = [read_json(Path(f) / "submission.json") for f in folders]
    return [str(r["job_id"]) for r in recs if r.get("job_id") and r.get("backend") == "slurm"]


Queued = tuple[bool, Optional[str], str, Optional[int]]  # squeue_jobs': squeue_job's, and the job's restart count
# squeue -O's fields: "|" after each, and no width (a width cuts a value: DependencyNeverSatisfied is 24 characters)
SQUEUE_FIELDS = "JobID:0|,ArrayJobID:0|,ArrayTaskID:0|,RestartCnt:0|,State:0|,Reason:0"
_LISTABLE = re.compile(r"[1-9]\d{0,9}(_(0|[1-9]\d{0,9}))?")


def listable(job_id: str) -> bool:
    """An id squeue reads as itself within a list of ids: "123", or an array task's "123_4". It refuses a whole list
    for one id it cannot read ("abc", "0", 4294967295: "Invalid job id", which alone means a job it forgot) and reads
    others as another job ("007" as 7, "12.0" or "12x" as 12): such an id is asked on its own, as before."""
    return bool(_LISTABLE.fullmatch(job_id)) and all(int(n) < 0xFFFFFFFE for n in job_id.split("_"))


LIST_MAX = 1000  # ids in one -j list: 15,000 of them passed the kernel's 128 KiB limit on one argument


def id_groups(job_ids: list[str], most: int = LIST_MAX) -> list[list[str]]:
    """The ids each call asks for: the listable ones in lists of at most `most`, any other alone (none, from submit
    or a job)."""
    ids = list(dict.fromkeys(job_ids))
    batch = [j for j in ids if listable(j)]
    return [batch[i:i + most] for i in range(0, len(batch), most)] + [[j] for j in ids if not listable(j)]


def by_id(ids: list[str], lines: list[dict], names: Callable[[dict], Iterable[str]]) -> dict[str, list[dict]]:
    """Each id's lines of a command's answer for `ids`, in its order: for one id, all of them (as asked alone); for
    several, those whose `names` (its raw id, its array task's, its array's) hold it, looked up, not searched: a
    whole scontrol table is tens of thousands of lines."""
    if len(ids) == 1:
        return {ids[0]: lines}
    index: dict[str, list[dict]] = {}
    for ln in lines:
        for name in dict.fromkeys(names(ln)):
            index.setdefault(name, []).append(ln)
    return {j: index.get(j, []) for j in ids}


def squeue_jobs(job_ids: list[str]) -> dict[str, Queued]:
    """squeue_job's answer and the restart count (None where squeue lists no job) of each of `job_ids`, from one
    squeue call for them all. squeue leaves out of a list the ids it does not know, forgotten or never there, as it
    lists nothing for an ended job; when it does not answer, no job of the list has an answer, for the same reason."""
    out: dict[str, Queued] = {}
    for ids in id_groups([str(j) for j in job_ids]):
        rows, silence = _squeue(ids)
        mine = by_id(ids, rows or [], _squeue_names)
        for j in ids:
            if rows is None:
                _silence[j] = silence
                out[j] = (False, None, "", None)
                continue
            _silence.pop(j, None)
            row = (mine[j] or [None])[0]  # squeue's first line: an array's id lists its tasks
            out[j] = ((True, None, "", None) if row is None else
                      (True, row["state"], row["reason"].strip(), int(row["restarts"]) if row["restarts"].isdigit()
                       else None))
    return out


def _squeue_names(row: dict) -> tuple[str, ...]:
    """squeue lists the row (one task a line: -r) for its raw id, its array's and its task's "array_task"."""
    return row["job"], row["array"], f"{row['array']}_{row['task']}"


def _squeue(ids: list[str]) -> tuple[Optional[list[dict]], str]:
    """squeue's rows for `ids`, in one call ([] for a job Slurm has forgotten), or None and why it did not answer."""
    missing = slurm_conf_missing()
    if missing:  # squeue would retry for 60 s, then fail
        return None, missing
    cmd = ["squeue", "-h", "-j", ",".join(ids), "-r", "-O", SQUEUE_FIELDS]  # -r: a line a task, not 77_[1-5]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None, "squeue gave no answer in 30 s (slurmctld busy or down?)"
    except OSError as e:
        return None, "no squeue on PATH" if isinstance(e, FileNotFoundError) else f"squeue could not run: {e}"
    if r.returncode == 0:
        names = ("job", "array", "task", "restarts", "state", "reason")
        return [dict(zip(names, ln.split("|", 5))) for ln in r.stdout.splitlines() if ln.count("|") >= 5], ""
    if "Invalid job id" in r.stderr:  # a job Slurm has forgotten (said for one id alone), vs. no answer at all
        return [], ""
    lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
    said = lines[-1].removeprefix("squeue: ")[:200] if lines else f"exit status {r.returncode}, no message"  # the fatal one
    if "configuration source" in said:  # no slurm.conf here, nor a configless slurmd to ask
        said += ": point SLURM_CONF at the cluster's slurm.conf"
    return None, f"squeue: {said}"


# Why a job is pending that Slurm will never start as asked (EnforcePartLimits=NO, Slurm's default, queues it
# anyway): it asks for more nodes, CPUs, memory, time or features than its partition has. `submit` refuses
# such a job first (sbatch --test-only); one queued otherwise (sbatch by hand) shows, and ends `--wait`.
NEVER_STARTS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints"}


def never_starts(reason: str, job: str) -> Optional[str]:
    """What a pending job waits for that will not come (NEVER_STARTS; a per-job limit of its QOS or account, which
    `submit` cannot check; a dependency on a job that ended otherwise, which Slurm keeps queued unless the site set
    kill_invalid_depend), and what to do; None for a reason that clears by itself."""
    if reason == "DependencyNeverSatisfied":
        return (f"{reason}: a job it depends on ended otherwise than its dependency asks, so it never starts; "
                f"scontrol update JobId={job} Dependency= starts it without, scancel {job} ends it")
    if reason in NEVER_STARTS or re.fullmatch(r"(QOS|Assoc)Max\w*PerJob\w*", reason):
        return f"{reason}: never starts as asked; scancel {job}"
    return None


def is_held(state: Optional[str], reason: str) -> bool:
    """A pending job that waits for a release (scontrol hold / requeuehold, an admin's hold), not for nodes."""
    return state == "PENDING" and (reason.startswith("JobHeld") or "held state" in reason)


def held_advice(rec: dict, reason: str) -> str:
    job = rec["job_id"]
    return (f"held by an admin: {reason}; ask them, or scancel {job}" if reason == "JobHeldAdmin" else
            f"held: scontrol release {job}")


SlurmState = tuple[Optional[str], Optional[int], bool, bool, str]  # slurm_state's


def slurm_state(job_id: str) -> SlurmState:
    """(state, restarts, Slurm answered, ended, squeue's reason) from squeue / sacct / scontrol; state None when
    Slurm knows nothing. squeue lists every job that is not over: one it does not list has ended, even where
    sacct or scontrol name an active state (PREEMPTED with PreemptMode=CANCEL; sacct keeps REQUEUED for a job
    cancelled while it waited to restart). Such an end is not a success."""
    return slurm_states([job_id])[job_id]


def slurm_states(job_ids: list[str]) -> dict[str, SlurmState]:
    """slurm_state of each of `job_ids`, from one squeue call for them all (its restart count too), then, for those
    it does not list, one sacct and one scontrol call: a sweep's poll asked 3 calls a job (15 s for 200 points)."""
    ids = list(dict.fromkeys(map(str, job_ids)))
    queue = squeue_jobs(ids)
    gone = [j for j in ids if queue[j][1] is None]
    acct, ctl = _sacct_states(gone), _scontrol_fields(gone)
    out: dict[str, SlurmState] = {}
    for j in ids:
        answered, state, reason, restarts = queue[j]
        listed = state is not None
        if not listed:
            state = acct.get(j)
            fields = ctl.get(j, {})
            if fields.get("JobState"):  # the controller's word, while it has one, beats accounting's
                state = fields["JobState"]
            restarts = int(fields["Restarts"]) if fields.get("Restarts", "").isdigit() else None
        out[j] = (state, restarts, answered, answered and not listed and state in ACTIVE_STATES, reason if listed else "")
    return out


def _sacct_states(ids: list[str]) -> dict[str, str]:
    """Accounting's state of each job it has a line for (its last line: an array's id names its tasks)."""
    out = {}
    for group in id_groups(ids):
        said = slurm_out(["sacct", "-n", "-X", "-P", "-j", ",".join(group), "-o", "JobID,JobIDRaw,State"]) or ""
        lines = [dict(zip(("job", "raw", "state"), ln.split("|", 2))) for ln in said.splitlines() if ln.count("|") == 2]
        for j, mine in by_id(group, lines, _sacct_names).items():
            if mine and mine[-1]["state"].split():
                out[j] = mine[-1]["state"].split()[0]  # "CANCELLED by 0" -> CANCELLED
    return out


def _sacct_names(line: dict) -> tuple[str, ...]:
    """sacct gives the line for its raw id, its "77_3" and its array's "77" (all its tasks)."""
    return line["job"], line["raw"], line["job"].split("_")[0]


def _scontrol_fields(ids: list[str]) -> dict[str, dict[str, str]]:
    """`scontrol show job`'s fields (JobState, Restarts...) of each job the controller still holds. One id is asked
    alone; several in one call for every job (scontrol takes one id; squeue's list was that one table already)."""
    ids = list(dict.fromkeys(ids))
    listed = [j for j in ids if listable(j)]
    table = len(listed) > 1  # the whole table for the listable ids; any other id (or one alone) asked alone
    out = {}
    for group in ([listed] if table else []) + [[j] for j in ids if not (table and j in listed)]:
        said = slurm_out(["scontrol", "-o", "show", "job", group[0]] if len(group) == 1 else
                         ["scontrol", "-a", "-o", "show", "job"]) or ""
        lines = [dict(kv.split("=", 1) for kv in ln.split() if "=" in kv) for ln in said.splitlines()]
        # an array task's id ("77_3") is looked up by its array's ("77"), then found in the task ranges of its lines
        found = by_id([*group, *{j.partition("_")[0] for j in group}] if len(group) > 1 else group, lines,
                      lambda f: (f.get("JobId", ""), f.get("ArrayJobId", "")))
        for j in group:
            mine = found[j] if len(group) == 1 or "_" not in j else [
                f for f in found.get(j.partition("_")[0], []) if _scontrol_names(f, j)]
            if mine:
                out[j] = {k: v for fields in mine for k, v in fields.items()}  # a later line's value wins
    return out


def _scontrol_names(fields: dict, job_id: str) -> bool:
    """`scontrol show job` gives the line for its raw id, its array's "77" and its tasks' "77_3" (those still pending
    share one line: ArrayTaskId=3-5,8%2)."""
    array = fields.get("ArrayJobId")
    if job_id in (fields.get("JobId"), array):
        return True
    array_, _, task = job_id.partition("_")
    return bool(array) and array_ == array and task.isdigit() and any(_in_range(int(task), part) for part in
                                  fields.get("ArrayTaskId", "").split("%")[0].split(","))


def _in_range(n: int, part: str) -> bool:
    first, _, last = part.partition("-")
    return first.isdigit() and (last or first).isdigit() and int(first) <= n <= int(last or first)


def ended_states(job: str) -> list[str]:
    """How job `job` (each task of an array's id) ended, from the controller while it holds it (MinJobAge), else
    from accounting (which may lag it by seconds); [] while any of it is queued or running, or Slurm does not know
    it."""
    answered, state, _ = squeue_job(job)
    if not answered or state is not None:
        return []
    said = slurm_out(["scontrol", "-o", "show", "job", job]) or ""
    ends = [m.group(1) for m in re.finditer(r"\bJobState=(\S+)", said)]
    if not ends:
        said = slurm_out(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"]) or ""
        ends = [ln.split()[0] for ln in said.splitlines() if ln.split()]  # "CANCELLED by 0" -> CANCELLED
    # (PREEMPTED here, not listed by squeue, is an end: PreemptMode=CANCEL; a requeued job is listed, PENDING)
    return [] if any(e in ACTIVE_STATES - {"PREEMPTED"} for e in ends) else ends


def _local_result(rec: dict) -> Path:
    return Path(rec.get("submitit_folder", "")) / str(rec["job_id"]) / f"{rec['job_id']}_0_result.pkl"


def local_ended_at(rec: dict) -> Optional[float]:
    """When a cluster=local job's result was written (its rank 0 had written its last status.json before), or
    None (no result: running, killed)."""
    try:
        return _local_result(rec).stat().st_mtime
    except OSError:
        return None


def local_state(rec: dict) -> Optional[str]:
    """Jobs of cluster=local: their submitit folder says whether a result was written."""
    res = _local_result(rec)
    if res.exists():
        try:
            kind = _load_plain(res.read_bytes())[0]
        except Exception:
            return None
        return "COMPLETED" if kind == "success" else "FAILED"
    try:  # the job id of a local job is its controller's pid
        pid = int(rec["job_id"])
    except ValueError:
        return None
    return "RUNNING" if _pid_runs(pid) and _runs_controller(pid) else None


def _load_plain(data: bytes):
    """A pickle of plain values (a job's result: ("success", its exit code) or ("error", a traceback's text)),
    loaded without importing anything it names: `status` may read a shared folder another user could write, where
    a planted pickle would run its code (the data's pickles are read alike: data.py)."""
    import io
    import pickle

    class Plain(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            raise pickle.UnpicklingError(f"{module}.{name}: a job's result names nothing to import")
    return Plain(io.BytesIO(data)).load()


# what a local job's controller runs (localcontrol.start_controller; submitit's own, in older records)
CONTROLLERS = ("allconv_hpc.localcontrol", "submitit.local._local")


def _runs_controller(pid: int) -> bool:
    """Whether process pid is a local job's controller, not another process given its pid since (after a reboot, or
    pids wrapped round after the controller was killed): that read RUNNING for good, and `submit` and `train` told
    to `kill` it. A setup line's shell names the controller too (`sh -c '... && exec ... localcontrol'`). True where
    the command line cannot be read: as before."""
    cmd = process_cmdline(pid)
    return cmd is None or any(c in cmd for c in CONTROLLERS)


def process_cmdline(pid: int) -> Optional[str]:
    """Process pid's command line (from /proc, else /bin/ps: a job's PATH may lack /usr/bin); None when it is gone
    or cannot be read (another user's, hidden)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except FileNotFoundError:
        if Path("/proc/self").exists():  # Linux: it ended
            return None
    except OSError:
        return None
    try:  # -ww: the whole line, not cut at a terminal's width
        out = subprocess.run(["/bin/ps", "-ww", "-o", "command=", "-p", str(pid)], capture_output=True,
                             text=True).stdout
    except OSError:
        return None
    return out.strip() or None


def _pid_runs(pid: int) -> bool:
    """Whether process pid runs. One that ended but was not reaped (a zombie) does not: `submit --wait` started
    submitit's local controller itself, so once the job ends the controller stays its zombie child. Not reaped
    here: submitit's Popen of it would then read exit status 0 for a controller that failed."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: the pid is another user's now
        return False
    st = process_stat(pid)
    return st is not None and st[0] != "Z"


def process_stat(pid: int) -> Optional[tuple[str, int]]:
    """(the kernel's one-letter state, Z for a zombie; the parent's pid) of process pid, None when it is gone;
    from /proc, or from ps where there is no /proc (macOS; /bin/ps: a job's PATH may lack /usr/bin)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # "pid (comm) S ppid ...": comm
        return fields[0], int(fields[1])                                           # may hold spaces and ")"
    except FileNotFoundError:
        if Path("/proc/self").exists():  # Linux: it ended
            return None
    except (OSError, IndexError, ValueError):
        return None
    out = subprocess.run(["/bin/ps", "-o", "stat=,ppid=", "-p", str(pid)], capture_output=True, text=True).stdout
    said = out.split()
    return (said[0][:1], int(said[1])) if len(said) == 2 and said[1].isdigit() else None


def children(ppid: int) -> list[int]:
    """The pids of process ppid's children that run (not zombies): from /proc on Linux, else one /bin/ps."""
    if Path("/proc/self").exists():
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
        return [pid for pid in pids if (st := process_stat(pid)) is not None and st[1] == ppid and st[0] != "Z"]
    out = subprocess.run(["/bin/ps", "-A", "-o", "pid=,ppid=,stat="], capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()]
    return [int(r[0]) for r in rows if len(r) == 3 and r[1] == str(ppid) and not r[2].startswith("Z")]


NO_ANSWER = "NO ANSWER"  # queued_state: squeue did not answer (timeout, controller down)


def queued_state(rec: dict) -> Optional[str]:
    """The scheduler's state of a submission while it is queued or running (one squeue call); None when
    it is not; NO_ANSWER when squeue could not say."""
    return queued(rec)[0]


def queued(rec: dict) -> tuple[Optional[str], str]:
    """(queued_state, squeue's reason for a Slurm job: "" for others), from the one squeue call."""
    if rec.get("job_id") and rec.get("backend") == "slurm":
        answered, state, reason = squeue_job(str(rec["job_id"]))
        if not answered:
            return NO_ANSWER, ""
        return (None, "") if stopped_elsewhere(rec, state) else (state, reason or "")
    if rec.get("job_id") and rec.get("backend") == "local":
        return local_state(rec), ""
    return None, ""


def stop_command(rec: dict) -> str:
    return f"scancel {rec['job_id']}" if rec.get("backend") == "slurm" else f"kill {rec['job_id']}"


def _same_folder(a: Path, b: Path) -> bool:
    """One folder, however reached: a symlink, a bind mount or a second mount of it (realpath sees only links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them missing
        return os.path.realpath(a) == os.path.realpath(b)


def trains_elsewhere(rec: dict, folder: Path, sweep: bool = False) -> bool:
    """`folder` (a sweep's for a point's `rec`, with `sweep`) is a copy of the one the job of `rec` trains: that one
    is still where submit recorded it, with the job in its own record. A copy of a running job's folder was shown
    as that job's, RUNNING, and training into it refused as the job's folder. A folder moved since is the job's."""
    recorded = Path(str(rec.get("run_dir") or ""))
    if not rec.get("job_id") or not recorded.name:
        return False
    mine = folder / recorded.name if sweep else folder
    if not recorded.is_dir() or _same_folder(mine, recorded):
        return False
    try:
        own = read_record(recorded.parent / "sweep.json" if sweep else recorded / "submission.json")
    except DamagedFile:
        return False
    jobs = [j.get("job_id") for j in own.get("jobs") or [] if isinstance(j, dict)] if sweep and own else \
        [own.get("job_id")] if own else []
    return str(rec["job_id"]) in map(str, jobs)


def other_jobs_state(run_dir: Path, environ: Optional[dict] = None) -> Optional[tuple[dict, str]]:
    """(record, state) of the job submitted into run_dir when it is queued or running and this process
    is not one of its ranks; None otherwise. Its own ranks (its Slurm id or array task, or its local
    controller's pid) never ask squeue; a damaged record or no answer is left to `submit` and `status`."""
    e = os.environ if environ is None else environ
    mine = {e.get("SUBMITIT_LOCAL_JOB_ID")}
    if "SLURM_JOB_ID" in e:  # the raw id, and the array task's A_T that submit records
        mine |= {e["SLURM_JOB_ID"], SlurmJob(e).job_id}
    try:
        rec = read_record(run_dir / "submission.json")
    except DamagedFile:
        rec = None
    records = [rec] if rec and rec.get("job_id") and not trains_elsewhere(rec, run_dir) else []
    started = started_unrecorded(run_dir, rec)
    if started is not None and not started.get("copy_of"):
        records.append(started)
    for rec in records:
        if str(rec["job_id"]) in mine:
            continue
        state = queued_state(rec)
        if state in ACTIVE_STATES:
            return rec, state
    return None


TRAINING = ("running", "requeued")  # a run's own states while its job is queued or running
# Slurm may requeue a job whose run stopped `interrupted` (preempted by SIGTERM alone; train.sbatch has --requeue):
# a queued state says so. RUNNING does not: an allocation the run was started in by hand (salloc) outlives it, and
# a requeued start records itself (lock, status.json) within seconds
QUEUED_AGAIN = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "PREEMPTED", "SPECIAL_EXIT"}


def stopped_elsewhere(rec: dict, state: Optional[str]) -> bool:
    """The job of a run that stopped `interrupted` (started_job) is active in Slurm but not queued again."""
    return bool(rec.get("stopped")) and state in ACTIVE_STATES and state not in QUEUED_AGAIN


def started_job(run_dir: Path) -> Optional[dict]:
    """A submission-like record of the Slurm job the run's status.json says trains it (its state running or
    requeued, or interrupted: the job may be queued again): what a job started without `submit` (sbatch
    slurm/train.sbatch) leaves. None otherwise, also
    for a damaged status.json (named by `status`). The id is the raw job id or an array task's "A_T"."""
    try:
        st = read_record(run_dir / "status.json") or {}
    except DamagedFile:
        return None
    job, state = st.get("slurm_job_id"), st.get("state")
    if state not in (*TRAINING, "interrupted") or isinstance(job, bool) or not isinstance(job, (str, int)) or not str(job):
        return None
    rec = {"job_id": str(job), "backend": "slurm", "run_dir": str(run_dir), "started_by_hand": True,
           "updated": st.get("updated", 0)}
    copied = _copied_from(run_dir, st, str(job))
    if copied:  # status shows it as a copy (COPY), and it may be trained: the job trains the original
        rec["copy_of"] = copied
    return {**rec, "stopped": True} if state == "interrupted" else rec  # Slurm may have requeued it: QUEUED_AGAIN


def _copied_from(run_dir: Path, st: dict, job: str) -> Optional[str]:
    """The folder the run of `st` (run_dir's status.json) was written in, where run_dir is a copy of it: that folder
    is still there and its own status.json names the same job, which trains it, not this copy. None otherwise (a
    folder moved since, the same folder by another path, a record written before status.json named its folder)."""
    was = st.get("run_dir")
    if not isinstance(was, str) or not was or not Path(was).is_dir() or _same_folder(run_dir, Path(was)):
        return None
    try:
        there = read_record(Path(was) / "status.json") or {}
    except DamagedFile:
        return None
    return was if str(there.get("slurm_job_id")) == job else None


def started_unrecorded(run_dir: Path, rec: Optional[dict]) -> Optional[dict]:
    """The job status.json says trains the run (`started_job`) when it is not `rec`, the one submission.json
    records, and status.json was written since that submission: one started without submit (sbatch
    slurm/train.sbatch) into a folder submitted to before. A status.json older than `rec` is the job's `rec` was
    submitted after (stopped, and the run submitted again): `rec` is the run's job, pending or running."""
    started = started_job(run_dir)
    if started is None or rec is None:
        return started
    if str(rec.get("job_id")) == started["job_id"] or started["updated"] < rec.get("submitted", 0):
        return None
    return started


class DamagedFile(Exception):
    """A record `status` reads (sweep.json, submission.json, a run's status.json) that it cannot use; the
    message names the file and its fix. A damaged status.json of one run of a sweep stops `status` too (exit
    2), not shown as an unknown run state: it is written atomically, so the damage stays, and the row would
    be a guess (LOST, or UNKNOWN, which `submit --wait` would wait on forever)."""


# how to get a good one back: status.json is rewritten whole by the run's next job
FIXES = {"sweep.json": "submit the sweep again (allconv-hpc submit -m ...), which writes a new one",
         "submission.json": "delete it and submit the run again",
         "status.json": "delete it: the run's next start (its job, or train) writes a new one"}


def _json_type(doc) -> str:
    """JSON's own name of a parsed value's type (null, array, string...), not Python's (NoneType, list, str)."""
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
            list: "array"}.get(type(doc), type(doc).__name__)


def read_record(path: Path) -> Optional[dict]:
    """The JSON object in path, None when there is no such file; DamagedFile when it cannot be read or
    is not a JSON object."""
    fix = FIXES[path.name]
    try:
        text = path.read_text(encoding="utf-8")  # JSON is UTF-8, whatever the locale
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        raise DamagedFile(f"{path}: permission denied; make it readable to you (ask its owner)") from None
    except IsADirectoryError:
        raise DamagedFile(f"{path}: is a folder, not a file; {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path}: cannot be read ({e}); {fix}") from None
    if not text.strip():
        raise DamagedFile(f"{path}: is empty; {fix}")
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise DamagedFile(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(doc, dict):
        raise DamagedFile(f"{path}: holds a JSON {_json_type(doc)}, not an object; {fix}")
    return doc


NUMBER = (int, float)
# the keys status computes with, and their types; a key may be missing unless REQUIRED
JOB_KEYS = {"run_dir": str, "job_id": (str, int, type(None)), "backend": str, "submitted": NUMBER,
            "submitit_folder": str, "command": list, "cwd": str}
STATUS_KEYS = {"state": (str, type(None)), "updated": NUMBER, "restarts": (int, type(None))}
REQUIRED = {"run_dir"}


def check_keys(doc, keys: dict, path: Path, entry: str = "") -> dict:
    """doc (the record in path, or its entry named so), when it is an object whose keys have the types given;
    DamagedFile otherwise."""
    where, fix = f"{path}: {entry}", FIXES[path.name]
    if not isinstance(doc, dict):
        raise DamagedFile(f"{where}holds a JSON {_json_type(doc)}, not an object; {fix}")
    for key, types in keys.items():
        if key in REQUIRED and key not in doc:
            raise DamagedFile(f"{where}has no {key!r}; {fix}")
        if key in doc and (not isinstance(doc[key], types) or isinstance(doc[key], bool)):
            raise DamagedFile(f"{where}{key!r} is {doc[key]!r}, of the wrong type; {fix}")
    return doc

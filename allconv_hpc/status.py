"""`allconv-hpc status FOLDER`: one line per job, from Slurm (squeue, then sacct when accounting
exists, then scontrol) and from the run folder's own status.json (written by the trainer), so it
stays right across requeues and array tasks and tolerates clusters without accounting. A job that Slurm
(or this machine, for cluster=local) no longer knows, with no final state anywhere, shows as LOST."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .preempt import slurm_out

# LOST: Slurm answered, no longer knows the job, accounting has nothing, and the run never wrote a final
# state (killed hard, e.g. a node died): it is not running, and it did not finish
FAILED_STATES = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "CANCELLED", "LOST"}
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING", "PREEMPTED"}


def squeue_state(job_id: str) -> tuple[bool, Optional[str]]:
    """(Slurm answered, the job's state while it is queued or running; None when it is not)."""
    try:
        r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False, None
    if r.returncode == 0:
        out = r.stdout.split()
        return True, out[0] if out else None
    return "Invalid job id" in r.stderr, None  # a job Slurm has forgotten, vs. no answer at all


def slurm_state(job_id: str) -> tuple[Optional[str], Optional[int], bool]:
    """(state, restarts, Slurm answered) from squeue / sacct / scontrol; state None when Slurm knows nothing."""
    answered, state = squeue_state(job_id)
    restarts = None
    if state is None:
        out = slurm_out(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
        if out and out.strip():
            state = out.strip().splitlines()[-1].split()[0]  # "CANCELLED by 0" -> CANCELLED
    out = slurm_out(["scontrol", "-o", "show", "job", job_id])
    if out:
        fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
        state = state or fields.get("JobState")
        if fields.get("Restarts", "").isdigit():
            restarts = int(fields["Restarts"])
    return state, restarts, answered


def _local_state(rec: dict) -> Optional[str]:
    """Jobs of cluster=local: their submitit folder says whether a result was written."""
    folder = Path(rec.get("submitit_folder", "")) / str(rec["job_id"])
    res = folder / f"{rec['job_id']}_0_result.pkl"
    if res.exists():
        import pickle
        try:
            kind = pickle.loads(res.read_bytes())[0]
        except Exception:
            return None
        return "COMPLETED" if kind == "success" else "FAILED"
    try:  # the job id of a local job is its controller's pid
        os.kill(int(rec["job_id"]), 0)
        return "RUNNING"
    except (ValueError, ProcessLookupError):
        return None
    except PermissionError:  # alive, someone else's
        return "RUNNING"


def queued_state(rec: dict) -> Optional[str]:
    """The scheduler's state of a submission while it is queued or running (one squeue call); else None."""
    if rec.get("job_id") and rec.get("backend") == "slurm":
        return squeue_state(str(rec["job_id"]))[1]
    if rec.get("job_id") and rec.get("backend") == "local":
        return _local_state(rec)
    return None


def run_rows(folder: Path) -> list[dict]:
    folder = Path(folder)
    sweep = folder / "sweep.json"
    if sweep.exists():
        recs = json.loads(sweep.read_text())["jobs"]
    elif (folder / "submission.json").exists():
        recs = [json.loads((folder / "submission.json").read_text())]
    elif (folder / "status.json").exists() or (folder / "checkpoints").exists():
        recs = [{"job_id": None, "run_dir": str(folder), "backend": "none"}]
    else:
        raise FileNotFoundError(f"{folder} is neither a run folder (status.json, checkpoints/) nor a sweep "
                                f"folder (sweep.json)")
    rows = []
    for rec in recs:
        run_dir = Path(rec["run_dir"])
        st = {}
        if (run_dir / "status.json").exists():
            st = json.loads((run_dir / "status.json").read_text())
        state = restarts = None
        known = False  # the scheduler answered for this job (a job it does not know is gone)
        if rec.get("job_id") and rec.get("backend") == "slurm":
            state, restarts, known = slurm_state(rec["job_id"])
        elif rec.get("job_id") and rec.get("backend") == "local":
            state, known = _local_state(rec), True
        run_state = st.get("state")
        if state is None and known and run_state in (None, "running", "requeued"):
            state = "LOST"  # gone without a final word: killed hard (SIGKILL, node failure)
        elif state is None:  # Slurm forgot the job (MinJobAge) and no accounting: the run folder decides
            state = {"completed": "COMPLETED", "failed": "FAILED", "gave_up": "FAILED", "interrupted": "STOPPED",
                     "requeued": "REQUEUED", "running": "RUNNING?"}.get(run_state, "UNKNOWN")
        if restarts is None:
            restarts = st.get("restarts", 0)
        rows.append({"job": rec.get("job_id") or "-", "state": state, "run": run_state or "-",
                     "restarts": restarts, "epoch": f"{st.get('epoch', 0)}/{st.get('epochs', '?')}",
                     "step": st.get("global_step", 0), "last_val_acc": st.get("last_val_acc"),
                     "best_val_acc": st.get("best_val_acc"), "wandb_id": st.get("wandb_id") or "-",
                     "folder": run_dir.name})
    return rows


def is_failed(row: dict) -> bool:
    return row["state"] in FAILED_STATES or row["run"] in ("failed", "gave_up")


def format_table(rows: list[dict]) -> str:
    cols = ["job", "state", "run", "restarts", "epoch", "step", "last_val_acc", "best_val_acc", "wandb_id", "folder"]
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def status_main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="allconv-hpc status", description="State of a run or a sweep.")
    ap.add_argument("folder", type=Path)
    ap.add_argument("--json", action="store_true", help="machine-readable rows")
    args = ap.parse_args(argv)
    try:
        rows = run_rows(args.folder)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"allconv-hpc status: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 1 if any(is_failed(r) for r in rows) else 0


def wait_for(folder: Path, poll_s: float = 5.0) -> int:
    """Print state changes until no job is queued or running; non-zero if any failed."""
    last = None
    while True:
        rows = run_rows(folder)
        snap = [(r["job"], r["state"], r["epoch"]) for r in rows]
        if snap != last:
            print(time.strftime("%H:%M:%S"), "  ".join(f"{j}:{s}({e})" for j, s, e in snap), flush=True)
            last = snap
        if not any(r["state"] in ACTIVE_STATES or r["state"] == "RUNNING?" for r in rows):
            print(format_table(rows))
            return 1 if any(is_failed(r) for r in rows) else 0
        time.sleep(poll_s)

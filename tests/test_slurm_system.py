"""`allconv-hpc submit` / `status` end to end on the real two-node Slurm dev cluster (slurm/dev-cluster.sh):
a sweep as one job array, a 2-node DDP job, a rank killed hard, preemption (also of the plain
slurm/train.sbatch), the time limit, scancel, refusals before anything reaches Slurm (and sbatch's
own), and cluster=local.

Every job runs the project's python (submitit uses sys.executable) with tiny settings. Each test has
its own folder (HOME, TMPDIR and run folders under tmp_path) and cancels what it submitted. Waits
are bounded polls of squeue / sacct / files; no assertion on Slurm's (coarse) timings.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from allconv_hpc.status import EXIT_NO_ANSWER, status_main
from allconv_hpc.distributed import slurm_port
from allconv_hpc.slurm import SlurmJob
from allconv_hpc.wandb_offline import merged_history, read_run, segments
from proc import (PY, assert_same_history, assert_same_weights, clean_env, final_weights, history, train_cmd,
                  wait_for_line)

pytestmark = pytest.mark.slurm

# tiny and quick; every job gets one CPU and one torch thread
JOB = ["data=synthetic", "data.train_size=300", "data.test_size=100", "model.width=0.125", "trainer.threads=1",
       "trainer.progress=log", "trainer.log_every_steps=1", "wandb.mode=offline", "trainer.batch_size=60",
       "dist.timeout_s=60"]
SLURM = ["cluster=slurm", "cluster.partition=low", "cluster.cpus_per_task=1"]
CLUSTER_KEYS = ("cluster", "hydra.sweep.dir")

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED"}
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


# ------------------------------------------------------------------------------ helpers

def poll(predicate, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def job_env(cluster, tmp: Path, **extra) -> dict:
    """The submitting environment; the jobs inherit it (sbatch --export=ALL)."""
    return clean_env(tmp, SLURM_CONF=cluster.conf, WANDB_SILENT="true", **extra)


def merged(*groups: list[str]) -> list[str]:
    """Override groups, a later group's key replacing an earlier one's (submit warns of a key given twice)."""
    out: list[str] = []
    for group in groups:
        keys = {o.split("=", 1)[0].lstrip("+~") for o in group if "=" in o}
        out = [o for o in out if o.split("=", 1)[0].lstrip("+~") not in keys] + list(group)
    return out


def cli(cluster, tmp: Path, *args: str, env: dict | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "allconv_hpc", *args], env=env or job_env(cluster, tmp), cwd=tmp,
                          capture_output=True, text=True, timeout=timeout)


def submit(cluster, tmp: Path, jobs: list, *overrides: str, **kw) -> tuple[list[tuple[str, Path]], subprocess.CompletedProcess]:
    r = cli(cluster, tmp, "submit", *overrides, **kw)
    assert r.returncode == 0, f"submit exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    ids = [(m.group(1), Path(m.group(2))) for m in re.finditer(r"^job (\S+)\s+(.+)$", r.stdout, re.M)]
    assert ids, r.stdout
    jobs.extend(j for j, _ in ids)
    return ids, r


def status(cluster, tmp: Path, folder: Path) -> tuple[int, list[dict], str]:
    table = cli(cluster, tmp, "status", str(folder))
    js = cli(cluster, tmp, "status", "--json", str(folder))
    return js.returncode, json.loads(js.stdout), table.stdout + table.stderr


def squeue_state(cluster, job_id: str) -> str | None:
    out = cluster.run(["squeue", "-h", "-j", job_id, "-o", "%T"]).stdout.split()
    return out[0] if out else None


def sacct_state(cluster, job_id: str) -> str:
    lines = cluster.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"]).stdout.split("\n")
    lines = [ln.split()[0] for ln in lines if ln.strip()]
    return lines[-1] if lines else ""


def wait_final(cluster, job_id: str, timeout: float) -> str:
    """Wait until the job left the queue for good; its final state from accounting."""
    def final():
        if squeue_state(cluster, job_id) in ACTIVE:
            return None
        s = sacct_state(cluster, job_id)
        return s if s in FINAL else None
    state = poll(final, timeout, interval=1.0)
    assert state, (f"job {job_id} not finished after {timeout} s: squeue {squeue_state(cluster, job_id)}, "
                   f"sacct {sacct_state(cluster, job_id)!r}")
    return state


def read_status(run: Path) -> dict:
    p = run / "status.json"
    return json.loads(p.read_text()) if p.exists() else {}


def wait_status(run: Path, state: str, timeout: float) -> dict:
    assert poll(lambda: read_status(run).get("state") == state, timeout), (read_status(run), tail(run))
    return read_status(run)


def tail(run: Path, n: int = 4000) -> str:
    parts = []
    if (run / "train.log").exists():
        parts.append((run / "train.log").read_text()[-n:])
    for f in sorted((run / ".submitit").glob("*/*_log.err")):
        parts.append(f"--- {f.name}\n" + f.read_text()[-n:])
    return "\n".join(parts)


def local_overrides(overrides: list[str]) -> list[str]:
    """The same training config without the launch-only keys (for a reference run here)."""
    return [o for o in overrides if not o.startswith(CLUSTER_KEYS)]


def start_reference(tmp: Path, run: Path, overrides: list[str]) -> subprocess.Popen:
    """An uninterrupted single-process run here, in the background, while Slurm runs the job."""
    log = open(tmp / "reference.out", "w")
    return subprocess.Popen(train_cmd(run, local_overrides(overrides) + ["wandb.mode=disabled"]),
                            env=clean_env(tmp), stdout=log, stderr=subprocess.STDOUT, text=True)


def finish_reference(tmp: Path, p: subprocess.Popen, timeout: float = 180) -> None:
    try:
        rc = p.wait(timeout)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 0, (tmp / "reference.out").read_text()[-3000:]


def submission_script(folder: Path) -> str:
    scripts = sorted((folder / ".submitit").glob("*/*_submission.sh"))
    assert scripts, list((folder / ".submitit").rglob("*"))
    return scripts[0].read_text()


def preempt_low(cluster, tmp: Path, jobs: list) -> str:
    """A job of the high partition that needs every CPU of both nodes: it preempts what runs in low."""
    high = cluster.run(["sbatch", "--parsable", "-p", "high", "-N2", "--exclusive", "-J", "preemptor",
                        "-o", str(tmp / "high-%j.out"), "--wrap", "sleep 5"])
    assert high.returncode == 0, high.stderr
    jobs.append(high.stdout.strip())
    return high.stdout.strip()


@pytest.fixture
def jobs(slurm_cluster):
    """Job ids a test submitted; whatever is still queued is cancelled at the end."""
    ids: list[str] = []
    yield ids
    alive = [j for j in ids if squeue_state(slurm_cluster, j) in ACTIVE]
    if alive:
        slurm_cluster.run(["scancel", *alive])
        poll(lambda: not any(squeue_state(slurm_cluster, j) in ACTIVE for j in alive), 60)


# -------------------------------------------------------------------------------- tests

@pytest.mark.slow
def test_sweep_is_one_job_array_with_one_wandb_group(slurm_cluster, jobs, tmp_path):
    sweep = tmp_path / "sweep"
    t0 = time.monotonic()
    ids, r = submit(slurm_cluster, tmp_path, jobs, "-m", *SLURM, "optim.lr=0.05,0.1", "seed=0,1", *JOB,
                    "trainer.epochs=2", "cluster.array_parallelism=4", "cluster.signal_lead_s=45",
                    f"hydra.sweep.dir={sweep}")
    returned_after = time.monotonic() - t0
    # non-blocking: it returned while the array is still in the queue
    assert any(squeue_state(slurm_cluster, j) in ACTIVE for j, _ in ids), r.stdout
    assert returned_after < 60
    assert f"sweep folder: {sweep}" in r.stdout
    assert len(ids) == 4
    (array,) = {j.split("_")[0] for j, _ in ids}  # one job array
    assert sorted(j for j, _ in ids) == [f"{array}_{i}" for i in range(4)], ids
    names = {"optim.lr=0.05,seed=0", "optim.lr=0.05,seed=1", "optim.lr=0.1,seed=0", "optim.lr=0.1,seed=1"}
    assert {d.name for _, d in ids} == names and all(d.parent == sweep for _, d in ids)

    doc = json.loads((sweep / "sweep.json").read_text())
    assert [(j["job_id"], j["run_dir"]) for j in doc["jobs"]] == [(j, str(d)) for j, d in ids]
    for j in doc["jobs"]:
        name = Path(j["run_dir"]).name
        for o in name.split(","):
            assert o in j["overrides"], (o, j["overrides"])

    script = submission_script(sweep)
    assert re.search(r"^#SBATCH --array=0-3%4$", script, re.M), script
    assert re.search(r"^#SBATCH --requeue$", script, re.M), script
    assert re.search(r"^#SBATCH --signal=USR2@45$", script, re.M), script  # to the srun tasks: no "B:"
    assert "--signal=B:" not in script

    for j, run in ids:
        assert wait_final(slurm_cluster, j, 150) == "COMPLETED", tail(run)
    groups, run_ids = set(), set()
    for _, run in ids:
        assert read_status(run)["state"] == "completed"
        assert len(history(run)) == 2
        assert (run / "checkpoints" / "last.pt").is_file()
        segs = segments(run / "wandb")
        assert len(segs) == 1, segs
        cfg = read_run(segs[0])["config"]
        groups.add(cfg["wandb"]["group"])
        run_ids.add(read_run(segs[0])["id"])
    assert groups == {sweep.name} and len(run_ids) == 4
    rc, rows, table = status(slurm_cluster, tmp_path, sweep)
    assert rc == 0, table
    assert sorted((r["job"], r["state"], r["run"]) for r in rows) == sorted((j, "COMPLETED", "completed") for j, _ in ids)


@pytest.mark.slow
def test_resubmitted_sweep_submits_only_the_unfinished_points(slurm_cluster, jobs, tmp_path):
    """A sweep cut short (scancel of its array after the first point completed), then the same command
    again: only the unfinished points get jobs, the completed one is left as it is; once more while those
    are queued, nothing."""
    sweep = tmp_path / "sweep"
    cmd = ["-m", *SLURM, "seed=0,1,2", *JOB, "trainer.epochs=2", "cluster.array_parallelism=1",
           f"hydra.sweep.dir={sweep}"]
    ids, _ = submit(slurm_cluster, tmp_path, jobs, *cmd)
    runs = {d.name: d for _, d in ids}
    first = dict((d.name, j) for j, d in ids)
    assert wait_final(slurm_cluster, first["seed=0"], 150) == "COMPLETED", tail(runs["seed=0"])
    slurm_cluster.run(["scancel", first["seed=0"].split("_")[0]], check=True)  # the whole array
    # a task that never started has no accounting record of its own: wait until squeue lists none
    assert poll(lambda: not any(squeue_state(slurm_cluster, j) in ACTIVE for j, _ in ids), 60), slurm_cluster.queue()
    done = {n for n, d in runs.items() if read_status(d).get("state") == "completed"}
    assert "seed=0" in done and "seed=2" not in done, {n: read_status(d) for n, d in runs.items()}
    kept = {p: p.stat().st_mtime_ns for n in done for p in runs[n].rglob("*") if p.is_file()}

    wider = [*cmd, "cluster.array_parallelism=2"]  # cluster.* is not part of the sweep's identity: same folder
    ids2, r = submit(slurm_cluster, tmp_path, jobs, *wider)
    for n in done:
        assert f"not submitted again (completed): {runs[n]}" in r.stdout, r.stdout
    assert sorted(d.name for _, d in ids2) == sorted(set(runs) - done), r.stdout
    # and again while those are queued or running (or just done): nothing more is submitted
    again = cli(slurm_cluster, tmp_path, "submit", *wider)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr
    assert not re.search(r"^job ", again.stdout, re.M), again.stdout
    for _, run in ids2:
        assert re.search(rf"^not submitted again \((job \S+ \(\w+\)|completed)\): {re.escape(str(run))}$",
                         again.stdout, re.M), again.stdout
    for j, run in ids2:
        assert wait_final(slurm_cluster, j, 150) == "COMPLETED", tail(run)
        assert read_status(run)["state"] == "completed" and len(history(run)) == 2
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the completed point was not touched
    doc = json.loads((sweep / "sweep.json").read_text())
    now = {**{n: first[n] for n in done}, **{d.name: j for j, d in ids2}}
    assert [(Path(j["run_dir"]).name, j["job_id"]) for j in doc["jobs"]] == sorted(now.items())
    rc, rows, table = status(slurm_cluster, tmp_path, sweep)
    assert rc == 0 and sorted(r["job"] for r in rows) == sorted(now.values()), table
    assert all(r["run"] == "completed" for r in rows), table


@pytest.mark.slow
def test_two_node_ddp_job_matches_one_process(slurm_cluster, jobs, tmp_path):
    run = tmp_path / "ddp"
    overrides = [*SLURM, *JOB, "cluster.nodes=2", "cluster.tasks_per_node=1", "model.dropout=false",
                 "trainer.epochs=3"]
    ids, _ = submit(slurm_cluster, tmp_path, jobs, *overrides, f"hydra.run.dir={run}")
    ref = start_reference(tmp_path, tmp_path / "ref", overrides)
    (job, _), = ids
    assert wait_final(slurm_cluster, job, 150) == "COMPLETED", tail(run)
    finish_reference(tmp_path, ref)
    log = (run / "train.log").read_text()
    # detect_env took the Slurm path: 2 ranks, master = first node, port from the job id and restart count
    assert f"rank 0/2 joined (gloo, slurm, master n1:{slurm_port(job, 0)})" in log, log[-2000:]
    nodes = slurm_cluster.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "NodeList"]).stdout.split()
    assert nodes[-1:] == ["n[1-2]"], nodes
    assert "2 rank(s), global batch 60" in log
    assert "read by allconv-hpc submit only" not in log  # submit applied its cluster.* overrides
    assert read_status(run)["state"] == "completed"
    assert_same_weights(final_weights(run), final_weights(tmp_path / "ref"), exact=False)
    assert_same_history(history(run), history(tmp_path / "ref"), exact=False)


def test_a_rendezvous_port_held_on_the_node_requeues_the_job_for_another(slurm_cluster, jobs, tmp_path):
    """Rank 0's port (from the job id and restart count) is held by another program on its node: the job
    requeues itself, its restart gets another port and completes, instead of failing while nobody watches."""
    run = tmp_path / "port"
    ids, _ = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "trainer.epochs=1", "cluster.tasks_per_node=2",
                    "+cluster.additional_parameters.hold=true", f"hydra.run.dir={run}")  # held: the port is known first
    (job, _), = ids
    held, again = slurm_port(job, 0), slurm_port(job, 1)
    with socket.socket() as squatter:  # every address: n1 and n2 are both this machine
        squatter.bind(("0.0.0.0", held))
        squatter.listen()
        slurm_cluster.run(["scontrol", "release", job], check=True)
        assert wait_final(slurm_cluster, job, 180) == "COMPLETED", tail(run)
    log = (run / "train.log").read_text()
    assert f":{held} is already in use on this node" in log and f"requeued job {job}" in log, log[-3000:]
    assert re.search(rf"rank 0/2 joined \(gloo, slurm, master n\d:{again}\)", log), log[-3000:]
    assert read_status(run)["state"] == "completed"
    restarts = slurm_cluster.run(["scontrol", "show", "job", job]).stdout
    assert "Restarts=1" in restarts or "Invalid job id" in restarts, restarts  # (forgotten once MinJobAge passed)


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_ends_bitwise_identical(slurm_cluster, jobs, tmp_path):
    run = tmp_path / "pre"
    epochs = 30
    overrides = [*SLURM, *JOB, f"trainer.epochs={epochs}", "trainer.deterministic=true"]  # dropout on
    ids, _ = submit(slurm_cluster, tmp_path, jobs, *overrides, f"hydra.run.dir={run}")
    (job, _), = ids
    ref = start_reference(tmp_path, tmp_path / "ref", overrides)
    wait_for_line(run / "train.log", "(global 10)", timeout=120)
    high = preempt_low(slurm_cluster, tmp_path, jobs)
    assert wait_final(slurm_cluster, job, 180) == "COMPLETED", tail(run)
    assert wait_final(slurm_cluster, high, 60) == "COMPLETED"
    finish_reference(tmp_path, ref)

    log = (run / "train.log").read_text()
    assert "stop requested (SIGUSR2) during" in log, log[-3000:]
    assert ": preemption" in log and "requeued at global step" in log, log[-3000:]
    assert "resumed from" in log and "done: best val_acc" in log
    st = read_status(run)
    assert st["state"] == "completed" and st["restarts"] == 1 and st["timeouts"] == 0, st
    assert_same_weights(final_weights(run), final_weights(tmp_path / "ref"), exact=True)
    assert_same_history(history(run), history(tmp_path / "ref"), exact=True)
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 0 and rows[0]["state"] == "COMPLETED" and rows[0]["restarts"] == 1, table
    # the requeued run left without a submitit result (job.done() stayed False); only the last one wrote it
    out = "".join(f.read_text() for f in (run / ".submitit").glob("*/*_0_log.out"))
    assert len(re.findall(r"^submitit INFO .* - Exiting after successful completion$", out, re.M)) == 1, out[-3000:]
    # W&B: one run id, two offline segments, every step once (the last eval is logged at steps + 1)
    wid = (run / "wandb_id.txt").read_text().strip()
    assert len(segments(run / "wandb", wid)) == 2
    steps = [r["_step"] for r in merged_history(run / "wandb", wid)]
    assert steps == list(range(1, epochs * 5 + 2)), steps
    # W&B's own state reads the requeued segment "finished"; its summary's status says what it was
    first, last = (read_run(seg) for seg in segments(run / "wandb", wid))
    assert (first["summary"]["status"], last["summary"]["status"]) == ("requeued", "completed")


@pytest.mark.slow
def test_a_preemption_near_the_time_limit_is_a_preemption_not_a_time_limit(slurm_cluster, jobs, tmp_path):
    """Preempted 35+ s into a 4 min limit with a 120 s lead: within lead + 90 s of the limit, where the time left
    alone reads as the time-limit warning. Slurm's PreemptTime says otherwise: requeued, with max_requeues=0 (a
    time limit would have ended it, GAVE UP)."""
    run = tmp_path / "near"
    [(job, _)], _ = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "cluster.timeout_min=4",
                           "cluster.signal_lead_s=120", "checkpoint.max_requeues=0", "trainer.epochs=100000",
                           "wandb.mode=disabled", f"hydra.run.dir={run}")
    wait_for_line(run / "train.log", "(global 10)", timeout=120)
    started = re.search(r"\bStartTime=(\S+)", slurm_cluster.run(["scontrol", "show", "job", job]).stdout).group(1)
    ran = time.time() - time.mktime(time.strptime(started, "%Y-%m-%dT%H:%M:%S"))
    time.sleep(max(0.0, 35 - ran))  # Slurm's warning for the limit comes 90+ s in (lead + its 30 s timer)
    preempt_low(slurm_cluster, tmp_path, jobs)
    wait_for_line(run / "train.log", "resumed from", timeout=180)
    log = (run / "train.log").read_text()
    assert re.search(r"warning signal: Slurm preempted the job at \S+: preemption", log), log[-3000:]
    assert "requeued at global step" in log and "time limit reached" not in log, log[-3000:]
    slurm_cluster.run(["scancel", job])
    assert wait_final(slurm_cluster, job, 120) in ("CANCELLED", "FAILED", "COMPLETED"), tail(run)
    st = read_status(run)  # the resumed start's (its record comes with its first checkpoint or stop)
    assert st["timeouts"] == 0 and st["restarts"] == 1, st


@pytest.mark.slow
def test_every_task_of_a_preempted_sweep_requeues_and_completes(slurm_cluster, jobs, tmp_path):
    """One array task's raw job id is the array's own id, for which squeue lists every queued task: its
    time-left query must be its own (it crashed on two lines of %L and the task FAILED)."""
    sweep = tmp_path / "sweep"
    # lr 0.01: 30 epochs of the tiny net at 0.05 diverged (non-finite loss, FAILED) on one CPU, not on another
    ids, _ = submit(slurm_cluster, tmp_path, jobs, "-m", *SLURM, *JOB, "seed=0,1", "trainer.epochs=30",
                    "optim.lr=0.01", "cluster.array_parallelism=2", f"hydra.sweep.dir={sweep}")
    for _, run in ids:
        wait_for_line(run / "train.log", "(global 10)", timeout=120)
    high = preempt_low(slurm_cluster, tmp_path, jobs)
    for j, run in ids:
        assert wait_final(slurm_cluster, j, 240) == "COMPLETED", tail(run)
        log = (run / "train.log").read_text()
        assert ": preemption" in log and "requeued at global step" in log, tail(run)
        st = read_status(run)
        assert st["state"] == "completed" and st["restarts"] == 1, st
    assert wait_final(slurm_cluster, high, 60) == "COMPLETED"


@pytest.mark.slow
def test_time_limit_requeues_until_done_or_gives_up(slurm_cluster, jobs, tmp_path):
    # Slurm checks its timers every 30 s and sends the warning when less than lead + 30 s are left:
    # with a 2 min limit and a 60 s lead, USR2 comes 30-60 s into a run. Seen with 1 min / 30 s: USR2 at
    # every check, 10-20 s into each run (5+ requeues). Machines differ in speed, so the first job (which can
    # never finish) measures an epoch, and the second is sized from it to need 2-3 runs.
    limit = ["cluster.timeout_min=2", "cluster.signal_lead_s=60", "wandb.mode=disabled"]
    run, run0 = tmp_path / "limit", tmp_path / "limit0"
    [(job0, _)], _ = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, *limit, "trainer.epochs=100000",
                            "checkpoint.max_requeues=0", f"hydra.run.dir={run0}")
    script = submission_script(run0)
    assert re.search(r"^#SBATCH --time=2$", script, re.M) and re.search(r"^#SBATCH --signal=USR2@60$", script, re.M)

    # max_requeues=0: the first warning ends it, with a checkpoint and a clear final state
    assert wait_final(slurm_cluster, job0, 180) == "FAILED", tail(run0)
    st0 = read_status(run0)
    assert st0["state"] == "gave_up" and st0["signal"] == "SIGUSR2", st0
    log0 = (run0 / "train.log").read_text()
    assert "(signal lead 60 s): time limit" in log0, log0[-2000:]  # ALLCONV_SIGNAL_LEAD_S reached the job
    assert "time limit reached 1 times (checkpoint.max_requeues=0)" in log0
    rc, rows, table = status(slurm_cluster, tmp_path, run0)
    assert rc == 0 and rows[0]["state"] == "GAVE UP" and rows[0]["run"] == "gave_up", table  # resumable: no failure
    assert "gave_up" in table
    assert final_weights(run0)  # the checkpoint taken on the warning loads

    # the default: checkpoint, requeue itself (scontrol), resume, until it is done. 80 s of work: more than
    # a run gives before its warning (<= 60 s, less start-up), about what two or three runs give.
    seconds = sorted(float(r["epoch_seconds"]) for r in history(run0))
    assert len(seconds) >= 5, seconds
    epochs = max(20, round(80 / seconds[len(seconds) // 2]))
    [(job, _)], _ = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, *limit, f"trainer.epochs={epochs}",
                           f"hydra.run.dir={run}")
    assert wait_final(slurm_cluster, job, 480) == "COMPLETED", tail(run)
    st = read_status(run)
    assert st["state"] == "completed" and st["epoch"] == epochs, st
    assert st["timeouts"] >= 1 and st["restarts"] >= 1, st
    log = (run / "train.log").read_text()
    assert "(signal lead 60 s): time limit" in log and "requeued at global step" in log
    assert log.count("resumed from") == st["restarts"]
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 0 and rows[0]["state"] == "COMPLETED" and rows[0]["restarts"] >= 1, table


@pytest.mark.slow
def test_scancel_checkpoints_then_resubmission_resumes(slurm_cluster, jobs, tmp_path):
    run = tmp_path / "cancel"
    # 60 epochs of 5 steps: the refused submit below takes seconds, and 15 epochs (4 s of training past global 10
    # on an idle machine) were over before its scancel came (seen in CI: the job COMPLETED)
    overrides = [*SLURM, *JOB, "trainer.epochs=60", f"hydra.run.dir={run}"]
    [(job, _)], _ = submit(slurm_cluster, tmp_path, jobs, *overrides)
    wait_for_line(run / "train.log", "(global 10)", timeout=120)
    # while it runs, the same command is refused: a second job would train into the same folder
    again = cli(slurm_cluster, tmp_path, "submit", *overrides)
    assert again.returncode == 2 and f"already has job {job} (RUNNING)" in again.stderr, again.stderr
    assert f"scancel {job}" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    slurm_cluster.run(["scancel", job], check=True)
    assert wait_final(slurm_cluster, job, 60) == "CANCELLED"
    st = wait_status(run, "interrupted", 30)
    assert st["signal"] == "SIGTERM" and 10 <= st["global_step"] < 300, st
    assert "stop requested (SIGTERM)" in (run / "train.log").read_text()
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    # stopped with a checkpoint, resumable: not a failure (status exits 0; submit --wait would exit 3)
    assert rc == 0 and rows[0]["state"] == "CANCELLED" and rows[0]["run"] == "interrupted", table
    assert not rows[0]["failed"], table

    # the same command again: same run folder, resumes from the checkpoint, same W&B run
    [(job2, _)], _ = submit(slurm_cluster, tmp_path, jobs, *overrides)
    assert job2 != job
    assert wait_final(slurm_cluster, job2, 150) == "COMPLETED", tail(run)
    log = (run / "train.log").read_text()
    assert f"global step {st['global_step']})" in log.split("resumed from", 1)[1].splitlines()[0], log[-3000:]
    st2 = read_status(run)
    assert st2["state"] == "completed" and st2["wandb_id"] == st["wandb_id"] and st2["slurm_job_id"] == job2
    assert [r["epoch"] for r in history(run)] == list(range(1, 61))
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 0 and rows[0]["job"] == job2 and rows[0]["state"] == "COMPLETED", table


@pytest.mark.slow
def test_scancel_while_a_resume_starts_is_a_stop_not_a_failure(slurm_cluster, jobs, tmp_path):
    """scancel while a resubmitted (or requeued) job starts (its data, the whitening fit, the model): the job is
    CANCELLED, its run resumable from the checkpoint it had, not FAILED. The ranks end the start at the next safe
    point (exit 3, run interrupted), or, where a long call (the fit) outlasts Slurm's KillWait (5 s here), are
    SIGKILLed before they can say a word: status read that as a failure."""
    run = tmp_path / "run"
    overrides = [*SLURM, *JOB, "data.preprocess=gcn_zca", f"hydra.run.dir={run}"]  # a fit of seconds
    [(job, _)], _ = submit(slurm_cluster, tmp_path, jobs, *overrides, "trainer.epochs=1")
    assert wait_final(slurm_cluster, job, 150) == "COMPLETED", tail(run)
    files = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    [(job2, _)], _ = submit(slurm_cluster, tmp_path, jobs, *overrides, "trainer.epochs=2")
    assert poll(lambda: (run / "train.log").read_text().count("run folder") == 2, 120), tail(run)
    time.sleep(0.5)  # in the whitening fit
    slurm_cluster.run(["scancel", job2], check=True)
    assert wait_final(slurm_cluster, job2, 60) == "CANCELLED"
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == files  # nothing trained
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 0 and (rows[0]["state"], rows[0]["failed"]) == ("CANCELLED", False), table
    assert rows[0]["run"] in ("interrupted", None), table  # its own word (the safe point), or none (KillWait)
    assert table.rstrip().endswith(f"hydra.run.dir={run}` resumes it from its newest checkpoint, step 5"), table
    assert "; `allconv-hpc submit cluster=slurm " in table, table  # the command that queued it, recorded
    assert "training synthetic" not in (run / "train.log").read_text().split("run folder")[-1], tail(run)


def rank_pid(job_id: str, rank: int) -> int | None:
    """The pid of a job's python rank on this machine, from /proc/*/environ (the nodes run here)."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = set(environ.read_bytes().split(b"\0"))
            argv = (environ.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if want <= env and b"python" in Path(argv[0].decode()).name.encode() and b"submitit.core._submit" in argv:
            return int(environ.parent.name)
    return None


@pytest.mark.slow
def test_a_rank_killed_hard_fails_the_job_and_is_named(slurm_cluster, jobs, tmp_path):
    """Issue 3: a rank SIGKILLed mid-training (no signal, nothing saved) ends the job FAILED, not COMPLETED,
    and what the job left says which rank died."""
    run = tmp_path / "killed"
    [(job, _)], _ = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "cluster.nodes=2", "cluster.tasks_per_node=1",
                           "trainer.epochs=1000", "wandb.mode=disabled", f"hydra.run.dir={run}")
    wait_for_line(run / "train.log", "(global 3)", timeout=90)
    pid = poll(lambda: rank_pid(job, 1), 20)
    assert pid, f"no python process with SLURM_JOB_ID={job} SLURM_PROCID=1"
    os.kill(pid, signal.SIGKILL)
    assert wait_final(slurm_cluster, job, 60) == "FAILED", tail(run)
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc != 0 and rows[0]["state"] == "FAILED", table
    assert re.search(r"\b(rank|rank\(s\)|task) 1\b", tail(run)), tail(run)  # the trainer: "peer rank(s) 1"; srun: "task 1"
    assert re.search(r"^rank(\(s\))? 1\b|\bpeer rank\(s\) 1\b", rows[0]["error"] or ""), table  # status names it too


def test_a_node_without_the_data_fails_the_job_and_status_names_it(slurm_cluster, jobs, tmp_path):
    """Rank 1's node lacks the dataset (here: its data.root, per SLURM_PROCID, is missing): that rank refuses
    before the rendezvous, srun --kill-on-bad-exit ends rank 0, and `status` gives rank 1's error from its .err
    file, with no resume advice. srun's SIGTERM finds rank 0 before its signal set-up (submitit passes it by, and
    the SIGKILL after KillWait ends it: no status.json) or after it (it records a stop in start-up): a race, the
    same status either way (test_status_files holds the second case for certain)."""
    import torch
    from allconv_hpc.data import write_cifar
    x, y = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (40,))
    write_cifar(tmp_path / "d0", "cifar10", x, y, x[:20], y[:20], [f"c{i}" for i in range(10)])
    run = tmp_path / "run"
    [(job, _)], _ = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "cluster.nodes=2", "cluster.tasks_per_node=1",
                           "data=cifar10", "data.train_size=null", "data.test_size=null", "trainer.batch_size=20",
                           f"data.root={tmp_path}/d${{oc.env:SLURM_PROCID,0}}", f"hydra.run.dir={run}")
    assert wait_final(slurm_cluster, job, 120) == "FAILED", tail(run)
    recorded = read_status(run) if (run / "status.json").exists() else None
    assert recorded is None or (recorded["state"] == "interrupted" and "during start-up" in recorded["error"]), tail(run)
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 1 and rows[0]["state"] == "FAILED", table
    assert rows[0]["error"].startswith(f"rank 1: CIFAR-10 not found: expected {tmp_path}/d1/cifar-10-batches-py "), table
    assert f"{run.name}: rank 1: CIFAR-10 not found" in table and "starts it over" not in table, table
    assert not (run / ".submitit" / "%j").exists()  # no empty template folder left


PLAIN_SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"


def sbatch_plain(slurm_cluster, jobs, tmp_path, epochs: int, script: Path = PLAIN_SCRIPT, sbatch: tuple = (),
                 **env) -> tuple[Path, str]:
    """slurm/train.sbatch (or a user's copy of it) submitted by hand (no submitit) into tmp_path/plain, with
    `sbatch` options and `env` variables of one's own: (run folder, job id)."""
    run = tmp_path / "plain"
    r = slurm_cluster.run(["sbatch", "--parsable", "-p", "low", "--cpus-per-task=1", "-o", str(tmp_path / "plain-%j.out"),
                           *sbatch, str(script), *JOB, f"trainer.epochs={epochs}", f"hydra.run.dir={run}"],
                          env=job_env(slurm_cluster, tmp_path, ALLCONV_PYTHON=PY, **env), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    jobs.append(r.stdout.strip())
    return run, jobs[-1]


@pytest.mark.slow
def test_plain_sbatch_script_trains_and_survives_preemption(slurm_cluster, jobs, tmp_path):
    """slurm/train.sbatch without submitit: preempted, it checkpoints, requeues, resumes and completes. A warning
    sent to its batch shell alone (--signal=B:USR2, scancel -b) reaches the ranks through srun the same way."""
    run, job = sbatch_plain(slurm_cluster, jobs, tmp_path, 30)
    wait_for_line(run / "train.log", "(global 10)", timeout=120)
    slurm_cluster.run(["scancel", "-b", "--signal=USR2", job], check=True)
    wait_for_line(run / "train.log", "resumed from", timeout=120)
    preempt_low(slurm_cluster, tmp_path, jobs)
    out = lambda: (tmp_path / f"plain-{job}.out").read_text()  # noqa: E731
    assert wait_final(slurm_cluster, job, 180) == "COMPLETED", out()[-3000:]
    log = (run / "train.log").read_text()
    assert "(signal lead 120 s): preemption" in log and "requeued at global step" in log, log[-3000:]
    assert "resumed from" in log and "done: best val_acc" in log, log[-3000:]
    st = read_status(run)
    assert st["state"] == "completed" and st["restarts"] == 2, st
    assert [r["epoch"] for r in history(run)] == list(range(1, 31))
    assert (run / "checkpoints" / "last.pt").is_file()
    assert f"job {job} restart 2 on" in out()


@pytest.mark.slow
def test_plain_sbatch_script_preempted_in_its_setup_requeues_itself(slurm_cluster, jobs, tmp_path):
    """A user's copy of slurm/train.sbatch with set-up lines where it says (modules, a venv), preempted while they
    run, before srun: the preemption's signal reached no rank. The script asks Slurm, requeues the job before
    training, and the job completes."""
    script = tmp_path / "mine.sbatch"
    text = PLAIN_SCRIPT.read_text()
    marker = "# Your environment's set-up goes here"
    assert text.count(marker) == 1
    script.write_text(text.replace(marker, "sleep 10  # inside the low partition's 20 s grace\n" + marker))
    run, job = sbatch_plain(slurm_cluster, jobs, tmp_path, 1, script)
    assert poll(lambda: squeue_state(slurm_cluster, job) == "RUNNING", 60)
    preempt_low(slurm_cluster, tmp_path, jobs)
    out = lambda: (tmp_path / f"plain-{job}.out").read_text()  # noqa: E731
    assert wait_final(slurm_cluster, job, 240) == "COMPLETED", out()[-3000:]
    assert f"allconv-hpc: a warning signal or preemption came before training (in the set-up): requeueing job " \
           f"{job}" in out() and "Unable to create step" not in out(), out()[-3000:]
    st = read_status(run)
    assert st["state"] == "completed" and st["restarts"] == 1, st
    assert "resumed from" not in (run / "train.log").read_text()  # the first start trained nothing


@pytest.mark.slow
def test_plain_sbatch_script_warned_of_its_time_limit_in_its_setup_stops_and_says_so(slurm_cluster, jobs, tmp_path):
    """A user's copy of slurm/train.sbatch with --signal=B:USR2 (the warning to its shell) and a set-up that runs
    into the time limit's warning: a requeue would spend the next start's time the same way, so the job stops,
    saying why and what to change, instead of requeueing itself forever without training."""
    script = tmp_path / "mine.sbatch"
    marker = "# Your environment's set-up goes here"
    # Slurm checks its timers every 30 s: with 2 min and a 60 s lead the warning comes 30-60 s in, during the sleep
    script.write_text(PLAIN_SCRIPT.read_text().replace(marker, "sleep 80\n" + marker))
    run, job = sbatch_plain(slurm_cluster, jobs, tmp_path, 1, script, ("--time=2", "--signal=B:USR2@60"),
                            ALLCONV_SIGNAL_LEAD_S="60")
    out = lambda: (tmp_path / f"plain-{job}.out").read_text()  # noqa: E731
    assert wait_final(slurm_cluster, job, 200) == "FAILED", out()[-3000:]
    assert re.search(r"allconv-hpc: the time limit's warning came during the set-up \(\d+ s left\): nothing was "
                     rf"trained, and a requeue would spend its time the same way, so job {job} is not requeued; give "
                     r"it a longer --time", out()), out()[-3000:]
    assert "requeueing job" not in out() and f"job {job} restart 1" not in out(), out()[-3000:]
    assert re.search(r"\bRestarts=0\b", slurm_cluster.run(["scontrol", "show", "job", job]).stdout)
    assert not run.exists()  # nothing started


def test_plain_sbatch_script_with_a_time_limit_within_its_signal_lead_stops_and_says_so(slurm_cluster, jobs, tmp_path):
    """slurm/train.sbatch as it is (--signal=USR2@120) given --time=1: every start would be warned as it began and
    requeue, training little or nothing; the job stops before training, saying what to change (submit refuses it)."""
    run, job = sbatch_plain(slurm_cluster, jobs, tmp_path, 1, PLAIN_SCRIPT, ("--time=1",))
    out = lambda: (tmp_path / f"plain-{job}.out").read_text()  # noqa: E731
    assert wait_final(slurm_cluster, job, 120) == "FAILED", out()[-3000:]
    assert re.search(rf"allconv-hpc: job {job}'s time limit \(\d+ s\) is not longer than its signal lead "
                     r"\(ALLCONV_SIGNAL_LEAD_S=120 s\): every start would be warned as it begins and requeue, training "
                     r"little or nothing; give a longer --time, or a shorter --signal=USR2@N", out()), out()[-3000:]
    assert re.search(r"\bRestarts=0\b", slurm_cluster.run(["scontrol", "show", "job", job]).stdout)
    assert not run.exists()  # nothing started


def test_a_failed_run_queued_again_in_its_job_shows_the_jobs_state_not_the_old_failure(slurm_cluster, jobs, tmp_path):
    """A job whose run failed (diverged here; a rank's peers on a lost node alike), queued again as the same job
    (Slurm's requeue after a node failure, `scontrol requeue`): `status` shows the job's state, exit 0, not the
    previous start's failure (exit 1, its error) until the new start writes its own word."""
    run = tmp_path / "div"
    [(job, _)], _ = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "optim.lr=1e30", f"hydra.run.dir={run}")
    assert wait_final(slurm_cluster, job, 120) == "FAILED", tail(run)
    assert read_status(run)["state"] == "failed"
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 1 and rows[0]["failed"] and "non-finite" in table, table  # its own failure, said
    slurm_cluster.run(["scontrol", "requeue", job], check=True)
    slurm_cluster.run(["scontrol", "update", f"jobid={job}", "StartTime=now+3600"], check=True)  # kept queued
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 0 and rows[0]["state"] == "PENDING" and rows[0]["run"] == "failed", table
    assert not rows[0]["failed"] and "non-finite" not in table, table


@pytest.mark.slow
def test_requeue_false_is_no_requeue_and_a_warning_then_stops_the_run(slurm_cluster, jobs, tmp_path):
    """cluster.requeue=false renders --no-requeue (else the site's JobRequeue=1 would allow it): Slurm
    refuses the trainer's `scontrol requeue`, so on the warning the run checkpoints and stops as
    interrupted (exit 3, the job FAILED) instead of going back to the queue."""
    run = tmp_path / "noreq"
    [(job, _)], _ = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "trainer.epochs=1000", "wandb.mode=disabled",
                           "cluster.requeue=false", f"hydra.run.dir={run}")
    script = submission_script(run)
    assert re.search(r"^#SBATCH --no-requeue$", script, re.M) and not re.search(r"^#SBATCH --requeue$", script, re.M)
    wait_for_line(run / "train.log", "(global 3)", timeout=120)
    assert re.search(r"\bRequeue=0\b", slurm_cluster.run(["scontrol", "show", "job", job]).stdout)
    refused = slurm_cluster.run(["scontrol", "requeue", job])
    assert refused.returncode != 0 and "disabled" in refused.stderr, refused.stderr
    slurm_cluster.run(["scancel", "--signal=USR2", job], check=True)  # the warning, to the tasks
    assert wait_final(slurm_cluster, job, 90) == "FAILED", tail(run)
    st = read_status(run)
    assert st["state"] == "interrupted" and st["signal"] == "SIGUSR2" and st["restarts"] == 0, st
    log = (run / "train.log").read_text()
    assert "interrupted at global step" in log and f"Slurm did not requeue job {job} (cluster.requeue=false" in log
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    # Slurm's FAILED is train's exit 3 (stopped with a checkpoint): shown INTERRUPTED, not a failure
    assert rc == 0 and rows[0]["state"] == "INTERRUPTED" and rows[0]["run"] == "interrupted", table
    assert not rows[0]["failed"], table


@pytest.mark.slow
def test_another_signal_is_exported_to_the_job_and_requeues(slurm_cluster, jobs, tmp_path):
    """cluster.signal=USR1: the job's python gets SUBMITIT_PREEMPT_SIGNAL=USR1 from the script (so
    submitit's handler, in place while the job starts, takes USR1: test_launcher checks what submitit
    makes of it); the signal, sent once training runs, requeues the job. So does USR2, not configured (an
    admin's, another tool's), where its default action would kill the job with nothing saved. USR2 sent to the
    batch shell alone (scancel -b) no longer ends the job."""
    run = tmp_path / "usr1"
    [(job, _)], _ = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "trainer.epochs=1000", "wandb.mode=disabled",
                           "cluster.signal=USR1", "checkpoint.signal=USR1", f"hydra.run.dir={run}")
    wait_for_line(run / "train.log", "(global 3)", timeout=120)
    pid = poll(lambda: rank_pid(job, 0), 20)
    assert pid and b"SUBMITIT_PREEMPT_SIGNAL=USR1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    slurm_cluster.run(["scancel", "--signal=USR1", job], check=True)
    st = wait_status(run, "requeued", 60)
    assert st["signal"] == "SIGUSR1", st
    assert "stop requested (SIGUSR1)" in (run / "train.log").read_text()
    wait_for_line(run / "train.log", "resumed from", timeout=120)
    slurm_cluster.run(["scancel", "--signal=USR2", job], check=True)
    st = poll(lambda: (s := read_status(run)).get("restarts") == 1 and s.get("state") == "requeued" and s, 90)
    assert st and st["signal"] == "SIGUSR2", (read_status(run), tail(run))
    # a warning to the batch shell alone (scancel -b): its default action ended the job, and with it the run (not
    # requeued). The shell now keeps it (it cannot pass it on while srun runs: scancel without -b does)
    wait_for_line(run / "train.log", "resumed from", timeout=120, offset=(run / "train.log").stat().st_size)
    slurm_cluster.run(["scancel", "-b", "--signal=USR2", job], check=True)
    epoch = poll(lambda: read_status(run).get("epoch"), 30)
    assert poll(lambda: (read_status(run).get("epoch") or 0) >= epoch + 2, 60), (read_status(run), tail(run))
    assert squeue_state(slurm_cluster, job) == "RUNNING" and read_status(run)["state"] == "running", tail(run)


def test_cluster_setup_lines_run_as_written_and_a_failing_one_stops_the_job(slurm_cluster, jobs, tmp_path):
    """As for a local job: exports reach the job, a comment stays one, and a line that fails (a module that
    does not load) ends the job before training, named in its .err file, instead of a run on other software."""
    run = tmp_path / "ok"
    [(job, _)], r = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "trainer.epochs=1", "--wait",
                           "cluster.setup=['export GREETING=hi  # the site module','','echo \"$GREETING from setup\"']",
                           f"hydra.run.dir={run}", timeout=300)
    assert wait_final(slurm_cluster, job, 60) == "COMPLETED"
    assert "hi from setup" in (run / ".submitit" / job / f"{job}_0_log.out").read_text()
    dry = cli(slurm_cluster, tmp_path, "submit", "--dry-run", *SLURM, *JOB, "cluster.setup=['module load x']",
              f"hydra.run.dir={tmp_path / 'dry'}")
    assert dry.returncode == 0 and "setup:\n  module load x" in dry.stdout, dry.stdout
    run = tmp_path / "bad"
    [(job, _)], r = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "trainer.epochs=1",
                           "cluster.setup=['no_such_module_x cuda/12.4','echo AFTER']", f"hydra.run.dir={run}")
    assert wait_final(slurm_cluster, job, 120) == "FAILED"
    err = (run / ".submitit" / job / f"{job}_0_log.err").read_text()
    assert "allconv-hpc: cluster.setup line failed (exit 127): no_such_module_x cuda/12.4\n" in err, err
    assert "AFTER" not in (run / ".submitit" / job / f"{job}_0_log.out").read_text()
    assert not (run / "status.json").exists()  # nothing trained
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 1 and rows[0]["state"] == "FAILED", table
    assert rows[0]["error"] == "cluster.setup line failed (exit 127): no_such_module_x cuda/12.4", table
    # a line that ends the batch shell itself (`exit`, even 0) is named too: it was FAILED (or COMPLETED) unexplained
    for code in (7, 0):
        run = tmp_path / f"exit{code}"
        [(job, _)], r = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "trainer.epochs=1",
                               f"cluster.setup=['export A=1','exit {code}','echo AFTER']", f"hydra.run.dir={run}")
        assert wait_final(slurm_cluster, job, 120) == "FAILED"
        rc, rows, table = status(slurm_cluster, tmp_path, run)
        assert rc == 1 and rows[0]["error"] == (f"cluster.setup line ended the job before training (exit {code}): "
                                                f"exit {code}"), table
        assert "AFTER" not in (run / ".submitit" / job / f"{job}_0_log.out").read_text()
    # Slurm's SIGTERM while a line runs (scancel here; a preemption past its grace time, the time limit): said as
    # such, not as the line's doing (it read "ended the job before training (exit 0)")
    run = tmp_path / "term"
    [(job, _)], r = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "trainer.epochs=1",
                           "cluster.setup=['sleep 60']", f"hydra.run.dir={run}")
    assert poll(lambda: squeue_state(slurm_cluster, job) == "RUNNING", 60)
    err_file = run / ".submitit" / job / f"{job}_0_log.err"
    assert poll(lambda: err_file.is_file(), 30)  # the batch shell runs its setup
    time.sleep(1)
    slurm_cluster.run(["scancel", job], check=True)
    assert wait_final(slurm_cluster, job, 60) == "CANCELLED"
    err = err_file.read_text()
    assert ("allconv-hpc: SIGTERM during cluster.setup (a preemption, scancel or the time limit), in: sleep 60; "
            "nothing was trained") in err and "ended the job before training" not in err, err
    rc, rows, table = status(slurm_cluster, tmp_path, run)  # a stop, no rank's failure (it read "rank 0: ...", exit 1)
    assert rc == 0 and not rows[0]["failed"] and "rank 0:" not in table, table


@pytest.mark.slow
def test_a_job_requeued_after_its_run_completed_records_its_restarts(slurm_cluster, jobs, tmp_path):
    """Requeued once its run had completed (preempted in its last moments), a job's next start finds nothing to do:
    its record, and `status`, say the job's requeue count, not the count of the start that completed."""
    run = tmp_path / "done"
    [(job, _)], _ = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "trainer.epochs=1", "wandb.mode=disabled",
                           f"hydra.run.dir={run}")
    assert wait_final(slurm_cluster, job, 120) == "COMPLETED"
    assert read_status(run)["restarts"] == 0
    slurm_cluster.run(["scontrol", "requeue", job], check=True)
    assert poll(lambda: read_status(run).get("restarts") == 1, 120), (read_status(run), tail(run))
    assert wait_final(slurm_cluster, job, 60) == "COMPLETED"
    assert read_status(run)["state"] == "completed" and "nothing to do" in tail(run)
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 0 and rows[0]["restarts"] == 1 and rows[0]["state"] == "COMPLETED", table


@pytest.mark.slow
def test_a_preemption_during_cluster_setup_requeues_the_job(slurm_cluster, jobs, tmp_path):
    """Preempted while its batch shell ran cluster.setup (modules, a venv), before any task existed: the preemption's
    signal went nowhere, the setup outlasted the grace time and srun failed ("Job/step already completing"): FAILED,
    not requeued. The job now asks scontrol whether its start was preempted, and requeues itself; it completes."""
    run = tmp_path / "setup"  # a setup that ends inside the low partition's 20 s grace (past it, and before Slurm's
    # kill, srun failed; that window is a few seconds, too narrow to hit on a loaded machine): asked at its end
    [(job, _)], _ = submit(slurm_cluster, tmp_path, jobs, *merged(SLURM, JOB, ["trainer.epochs=1",
                           "wandb.mode=disabled", "cluster.setup=['sleep 10']"]), f"hydra.run.dir={run}")
    assert poll(lambda: squeue_state(slurm_cluster, job) == "RUNNING", 60)
    preempt_low(slurm_cluster, tmp_path, jobs)
    assert wait_final(slurm_cluster, job, 240) == "COMPLETED", tail(run)
    err = (run / ".submitit" / job / f"{job}_0_log.err").read_text()
    assert f"allconv-hpc: a warning signal or preemption came before training (in cluster.setup): requeueing job {job}" \
        in err and "Unable to create step" not in err, err
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 0 and rows[0]["state"] == "COMPLETED" and rows[0]["restarts"] == 1, table


def test_sbatch_refusing_the_partition_is_one_line(slurm_cluster, tmp_path):
    r = cli(slurm_cluster, tmp_path, "submit", *merged(SLURM, JOB, ["cluster.partition=nope"]),
            f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("allconv-hpc submit: error: sbatch refused the job: invalid "
                                                   "partition specified: nope"), r.stderr
    assert lines[0].endswith("(give cluster.partition one of: low (the default), high)"), r.stderr
    assert not (tmp_path / "run").exists()
    # with GPUs asked for (README's first job, on a cluster of other partition names), sbatch speaks of the GPUs
    # first: the partition that is not there is named all the same
    r = cli(slurm_cluster, tmp_path, "submit", *merged(SLURM, JOB, ["cluster.partition=gpu", "cluster.gpus_per_node=1"]),
            f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and r.stderr.strip().endswith(
        "(cluster.partition=gpu is no partition here: give cluster.partition one of: low (the default), high)"), r.stderr
    assert not (tmp_path / "run").exists()


# what the dev cluster's nodes (2 of 2 CPUs, 8 GB, no features) can never give, and the fix the error names
NEVER = {
    "cpus": (["cluster.cpus_per_task=64"], "cluster.tasks_per_node x cluster.cpus_per_task = 64 CPUs per node but the "
             "nodes of partition low have 2: use cluster.cpus_per_task<=2"),
    # more tasks than CPUs: fewer tasks is the fix (it said cpus_per_task<=1, which it was)
    "tasks": (["cluster.tasks_per_node=4", "cluster.cpus_per_task=1"], "= 4 CPUs per node but the nodes of partition "
              "low have 2: use cluster.tasks_per_node<=2 (more cluster.nodes for more ranks)"),
    "nodes": (["cluster.nodes=4"], "cluster.nodes=4 but partition low has 2 node(s): use cluster.nodes<=2"),
    "mem": (["cluster.mem_gb=100"], "cluster.mem_gb=100 but the nodes of partition low have 8 GB: use cluster.mem_gb<=8"),
    "feature": (["cluster.constraint=nosuchfeature"], "cluster.constraint=nosuchfeature names features the nodes of "
                "partition low lack (they have: none): use cluster.constraint=null"),
    "sweep": (["-m", "seed=0,1", "cluster.cpus_per_task=64"], "use cluster.cpus_per_task<=2"),
    # every node of the partition excluded, or too many for the nodes asked for: the message says so
    "exclude": (['cluster.exclude="n1,n2"'], "not on n1,n2 (sbatch --test-only: allocation failure: Requested node "
                "configuration is not available); cluster.exclude=n1,n2 leaves none of the 2 node(s) of partition "
                "low for cluster.nodes=1: exclude fewer"),
    "exclude_range": (['cluster.exclude="n[2]"', "cluster.nodes=2"], "cluster.exclude=n[2] leaves 1 (n1) of the 2 "
                      "node(s) of partition low for cluster.nodes=2: exclude fewer"),
}


def submit_error(tmp_path, monkeypatch, capsys, extra: list[str]) -> str:
    """`allconv-hpc submit` in-process (the CLI's own entry point, no new interpreter per case) into
    tmp_path/run (tmp_path/sweep with -m): it must exit 2 with one line on stderr, returned."""
    from allconv_hpc.cli import main
    monkeypatch.chdir(tmp_path)
    folder = f"hydra.sweep.dir={tmp_path / 'sweep'}" if "-m" in extra else f"hydra.run.dir={tmp_path / 'run'}"
    code = main(["submit", *merged(SLURM, JOB, extra), folder])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("allconv-hpc submit: error: "), err
    return lines[0]


@pytest.mark.parametrize("case", sorted(NEVER))
def test_a_job_the_partition_can_never_start_is_refused_before_the_queue(slurm_cluster, tmp_path, monkeypatch, capsys,
                                                                         case):
    """sbatch queues it (EnforcePartLimits=NO) to pend forever; submit asks sbatch --test-only first."""
    extra, fix = NEVER[case]
    line = submit_error(tmp_path, monkeypatch, capsys, extra)
    assert line.startswith("allconv-hpc submit: error: Slurm can never start this job on partition low: it asks for "), line
    assert "(sbatch --test-only: " in line and fix in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()
    assert str(tmp_path) not in slurm_cluster.run(["squeue", "-h", "-o", "%o %Z"]).stdout


def test_a_job_over_the_partitions_time_limit_is_refused_before_the_queue(slurm_cluster, tmp_path, monkeypatch, capsys):
    """sbatch --test-only passes it (the job would pend with PartitionTimeLimit): the partition's limit decides."""
    from allconv_hpc.cli import main
    monkeypatch.chdir(tmp_path)
    slurm_cluster.run(["scontrol", "update", "PartitionName=high", "MaxTime=5"], check=True)
    try:
        code = main(["submit", "cluster=slurm", "cluster.partition=high", "cluster.cpus_per_task=1", *JOB,
                     "cluster.timeout_min=10", f"hydra.run.dir={tmp_path / 'run'}"])
    finally:
        slurm_cluster.run(["scontrol", "update", "PartitionName=high", "MaxTime=INFINITE"], check=True)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("allconv-hpc submit: error: Slurm can never start this job on partition high: it asks for "
                          "1 node(s) of 1 task(s) x 1 CPU(s), 10 min (sinfo: the partition's time limit); "
                          "cluster.timeout_min=10 but partition high allows 5 min: use cluster.timeout_min<=5"), err
    assert not (tmp_path / "run").exists()
    assert str(tmp_path) not in slurm_cluster.run(["squeue", "-h", "-o", "%o %Z"]).stdout


def test_a_job_pending_for_what_its_partition_never_has_ends_wait(slurm_cluster, jobs, tmp_path):
    """Queued without submit's check (sbatch by hand): status names the reason, --wait ends, exit 1."""
    from allconv_hpc import status as st
    r = slurm_cluster.run(["sbatch", "--parsable", "-p", "low", "--cpus-per-task=64", "-o", "/dev/null", "--wrap", "true"],
                          check=True)
    job = r.stdout.strip()
    jobs.append(job)
    assert poll(lambda: slurm_cluster.run(["squeue", "-h", "-j", job, "-o", "%r"]).stdout.strip() == "PartitionConfig",
                30)
    run = tmp_path / "run"
    run.mkdir()
    (run / "submission.json").write_text(json.dumps({"job_id": job, "backend": "slurm", "run_dir": str(run),
                                                     "submitted": time.time()}))
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 1, table
    assert rows[0]["state"] == f"PENDING (PartitionConfig: never starts as asked; scancel {job})", rows
    assert not rows[0]["active"] and squeue_state(slurm_cluster, job) == "PENDING"
    w = cli(slurm_cluster, tmp_path, "status", str(run))  # what --wait ends with (status.wait_for: no row active)
    assert w.returncode == 1 and "PartitionConfig" in w.stdout
    assert st.exit_code(rows) == 1


def test_a_job_whose_dependency_failed_ends_wait_and_status_says_how_to_free_it(slurm_cluster, jobs, tmp_path):
    """`dependency=afterok:N` (cluster.additional_parameters) on a job N that failed: Slurm keeps it PENDING for good
    (DependencyNeverSatisfied, unless kill_invalid_depend). status showed a plain PENDING, exit 0, and --wait waited
    forever. N fails after the submit (one that had failed before is refused by submit, below)."""
    r = slurm_cluster.run(["sbatch", "--parsable", "-p", "low", "-o", "/dev/null", "--wrap", "sleep 8; exit 1"],
                          check=True)
    first = r.stdout.strip()
    jobs.append(first)
    run = tmp_path / "run"
    w = cli(slurm_cluster, tmp_path, "submit", "--wait", *SLURM, *JOB,
            f"+cluster.additional_parameters.dependency=afterok:{first}", f"hydra.run.dir={run}")
    job = re.search(r"^job (\S+)", w.stdout, re.M)
    jobs.extend([job.group(1)] if job else [])
    assert w.returncode == 1 and "DependencyNeverSatisfied" in w.stdout, (w.stdout, w.stderr)
    job = job.group(1)
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 1, table
    assert rows[0]["state"] == (f"PENDING (DependencyNeverSatisfied: a job it depends on ended otherwise than its "
                                f"dependency asks, so it never starts; scontrol update JobId={job} Dependency= starts "
                                f"it without, scancel {job} ends it)"), rows
    assert rows[0]["failed"] is True and not rows[0]["active"] and squeue_state(slurm_cluster, job) == "PENDING"


def test_a_dependency_on_a_job_that_ended_otherwise_is_refused_before_the_queue(slurm_cluster, jobs, tmp_path,
                                                                              monkeypatch, capsys):
    """afterok:N on a job N that has failed would wait in the queue for good: refused, naming N's end; afterany:N,
    and a `?` list (any one may hold), are not."""
    r = slurm_cluster.run(["sbatch", "--parsable", "-p", "low", "-o", "/dev/null", "--wrap", "exit 1"], check=True)
    first = r.stdout.strip()
    jobs.append(first)
    assert poll(lambda: squeue_state(slurm_cluster, first) is None, 60)
    line = submit_error(tmp_path, monkeypatch, capsys, [f"+cluster.additional_parameters.dependency=afterok:{first}"])
    assert (f"cluster.additional_parameters.dependency=afterok:{first}: job {first} ended FAILED, so afterok:{first} "
            f"never holds and the job would wait in the queue for good (DependencyNeverSatisfied); drop it, or name "
            f"a job that completes (afterany:{first} starts after it, whatever its end)") in line, line
    assert not (tmp_path / "run").exists()
    # an array of a task that completed and one that failed: afterok asks for every task to complete, afternotok
    # for any one not to (a task's own id, for it alone)
    r = slurm_cluster.run(["sbatch", "--parsable", "-p", "low", "-o", "/dev/null", "--array=0-1", "--wrap",
                           "exit $SLURM_ARRAY_TASK_ID"], check=True)
    array = r.stdout.strip()
    jobs.append(array)
    assert poll(lambda: squeue_state(slurm_cluster, array) is None, 60)
    line = submit_error(tmp_path, monkeypatch, capsys, [f"+cluster.additional_parameters.dependency=afterok:{array}"])
    assert f": job {array} ended FAILED (a task of it), so afterok:{array} never holds" in line, line
    line = submit_error(tmp_path, monkeypatch, capsys,
                        [f"+cluster.additional_parameters.dependency=afternotok:{array}_0"])
    assert f": job {array}_0 ended COMPLETED, so afternotok:{array}_0 never holds" in line, line
    for ok in (f"afterany:{first}", f"afterok:{first}?afterany:{first}", f"afternotok:{first}",
               f"afternotok:{array}", f"afterok:{array}_0"):
        w = cli(slurm_cluster, tmp_path, "submit", "--dry-run", *SLURM, *JOB,
                f"+cluster.additional_parameters.dependency={ok}", f"hydra.run.dir={tmp_path / 'ok'}")
        assert w.returncode == 0, (ok, w.stderr)


def test_a_job_queued_into_a_down_partition_is_warned_of_and_status_says_what_it_waits_for(slurm_cluster, jobs,
                                                                                           tmp_path):
    """A partition an admin set DOWN takes jobs and starts none: submit warns (no refusal: it may come up soon), and
    status says the job waits for it, still active (--wait goes on). Before: PENDING, and nothing said why."""
    slurm_cluster.run(["scontrol", "update", "PartitionName=high", "State=DOWN"], check=True)
    try:
        run = tmp_path / "run"
        [(job, _)], r = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "cluster.partition=high",
                               f"hydra.run.dir={run}")
        assert ("warning: partition high is down (sinfo): the job waits in the queue until an admin brings it up; "
                "scancel it and submit with another cluster.partition to start sooner") in r.stderr, r.stderr
        reason = lambda: slurm_cluster.run(["squeue", "-h", "-j", job, "-o", "%r"]).stdout.strip()  # noqa: E731
        assert poll(lambda: reason() == "PartitionDown", 30), reason()
        rc, rows, table = status(slurm_cluster, tmp_path, run)
        assert rows[0]["state"] == "PENDING (PartitionDown: starts once an admin brings the partition up)", table
        assert rows[0]["active"] and not rows[0]["failed"], rows
        slurm_cluster.run(["scancel", job], check=True)
    finally:
        slurm_cluster.run(["scontrol", "update", "PartitionName=high", "State=UP"], check=True)
    ok = cli(slurm_cluster, tmp_path, "submit", "--dry-run", *SLURM, *JOB, "cluster.partition=high",
             f"hydra.run.dir={tmp_path / 'other'}")
    assert ok.returncode == 0 and "is down" not in ok.stderr, ok.stderr  # up again: no warning


@pytest.mark.parametrize("how", ["--hold", "requeuehold"])
def test_a_held_job_says_how_to_release_it_and_ends_wait(slurm_cluster, jobs, tmp_path, how):
    """A job held by its user (sbatch --hold, or scontrol requeuehold of a running one) never starts until released:
    status says `scontrol release`, and --wait (no row active) ends instead of waiting forever."""
    held = ["--hold"] if how == "--hold" else []
    r = slurm_cluster.run(["sbatch", "--parsable", "-p", "low", *held, "-o", "/dev/null", "--wrap", "sleep 60"], check=True)
    job = r.stdout.strip()
    jobs.append(job)
    if how == "requeuehold":
        assert poll(lambda: squeue_state(slurm_cluster, job) == "RUNNING", 30)
        slurm_cluster.run(["scontrol", "requeuehold", job], check=True)
    reason = lambda: slurm_cluster.run(["squeue", "-h", "-j", job, "-o", "%T %r"]).stdout.strip()  # noqa: E731
    assert poll(lambda: reason().startswith("PENDING") and "held" in reason().lower(), 60), reason()
    run = tmp_path / "run"
    run.mkdir()
    (run / "submission.json").write_text(json.dumps({"job_id": job, "backend": "slurm", "run_dir": str(run),
                                                     "submitted": time.time()}))
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rows[0]["state"] == f"PENDING (held: scontrol release {job})" and not rows[0]["active"], table
    assert rc == 1, table


def test_a_job_scancelled_while_it_waits_to_begin_ends_wait_unfinished_not_failed(slurm_cluster, jobs, tmp_path):
    """`submit --wait` of a job that waits in the queue (--begin an hour on) and is scancelled there: --wait ends
    with exit 3 (unfinished) and says the same submit starts it; `status` shows it CANCELLED (never started), not
    failed (exit 0). Before, it showed CANCELLED and both exited 1."""
    run = tmp_path / "run"
    args = [PY, "-m", "allconv_hpc", "submit", "--wait", *SLURM, *JOB, "+cluster.additional_parameters.begin=now+3600",
            f"hydra.run.dir={run}"]
    waiting = subprocess.Popen(args, env=job_env(slurm_cluster, tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert poll(lambda: (run / "submission.json").exists(), 60), waiting.poll()
        job = json.loads((run / "submission.json").read_text())["job_id"]
        jobs.append(job)
        reason = lambda: slurm_cluster.run(["squeue", "-h", "-j", job, "-o", "%T %r"]).stdout.strip()  # noqa: E731
        assert poll(lambda: reason() == "PENDING BeginTime", 30), reason()
        assert waiting.poll() is None  # a job that waits to begin is queued: --wait goes on
        slurm_cluster.run(["scancel", job], check=True)
        out, _ = waiting.communicate(timeout=90)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 3, out
    assert f"{job}:CANCELLED (never started)" in out, out
    assert out.rstrip().endswith(f"hydra.run.dir={run}` starts it"), out  # the submit command that queued it
    assert f"run: job {job} ended before it started (scancel?); nothing ran: `allconv-hpc submit cluster=slurm " in out
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 0 and (rows[0]["state"], rows[0]["failed"]) == ("CANCELLED (never started)", False), table
    assert not (run / "status.json").exists()  # nothing ran


def test_a_run_started_with_plain_sbatch_is_not_trained_into_twice(slurm_cluster, jobs, tmp_path):
    """status.json names the job that trains the run: submit and train refuse the folder while it is queued or
    running, and status asks Slurm about it (no guess)."""
    run, job = sbatch_plain(slurm_cluster, jobs, tmp_path, 500)
    st = wait_status(run, "running", 120)
    assert st["slurm_job_id"] == job, st
    sub = cli(slurm_cluster, tmp_path, "submit", *SLURM, *JOB, "trainer.epochs=500", f"hydra.run.dir={run}")
    assert sub.returncode == 2, (sub.stdout, sub.stderr)
    assert sub.stderr.strip().splitlines() == [
        f"allconv-hpc submit: error: run folder {run} already has job {job} (RUNNING) training into it (started "
        f"without submit, e.g. sbatch slurm/train.sbatch); a second job would train into the same folder: wait for it "
        f"(allconv-hpc status {run}) or stop it (scancel {job}), then submit again"], sub.stderr
    assert not (run / "submission.json").exists()
    by_hand = cli(slurm_cluster, tmp_path, "train", *JOB, "trainer.epochs=500", f"hydra.run.dir={run}")
    assert by_hand.returncode == 2 and f"has job {job} (RUNNING) training into it" in by_hand.stderr, by_hand.stderr
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 0 and (rows[0]["job"], rows[0]["state"]) == (job, "RUNNING"), table
    slurm_cluster.run(["scancel", job], check=True)
    wait_final(slurm_cluster, job, 120)
    dry = cli(slurm_cluster, tmp_path, "submit", "--dry-run", *SLURM, *JOB, "trainer.epochs=500", f"hydra.run.dir={run}")
    assert dry.returncode == 0 and f"{run}  " in dry.stdout, (dry.stdout, dry.stderr)  # ended: it may resume
    assert "hydra.run.dir" not in dry.stdout  # the folder is printed once, before the overrides
    options = dry.stdout.split("sbatch options:\n", 1)[1].split()  # the script's #SBATCH lines, as Slurm gets them
    assert {"--nodes=1", "--ntasks-per-node=1", "--partition=low", "--requeue"} <= set(options), dry.stdout
    assert any(o.startswith("--signal=USR2@") for o in options), dry.stdout


def test_submit_into_a_folder_a_hand_started_train_uses_is_refused_before_slurm(slurm_cluster, jobs, tmp_path):
    """No job record names a `train` started by hand: its run lock does. submit (a sweep too) refuses the
    folder naming the process, queues nothing, and once that train is gone the same submit goes ahead."""
    run = tmp_path / "run"
    first = subprocess.Popen(train_cmd(run, JOB + ["trainer.epochs=500", "checkpoint.every_steps=2"]),
                             env=job_env(slurm_cluster, tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for_line(run / "train.log", "(global 2)", timeout=120, proc=first)
        sub = cli(slurm_cluster, tmp_path, "submit", *SLURM, *JOB, "trainer.epochs=500", f"hydra.run.dir={run}")
        assert sub.returncode == 2, (sub.stdout, sub.stderr)
        assert f"is being trained into by pid {first.pid} on " in sub.stderr and "Traceback" not in sub.stderr, sub.stderr
        assert not (run / "submission.json").exists()
        queued = slurm_cluster.run(["squeue", "-h", "-o", "%i %Z"], check=True).stdout
        assert str(tmp_path) not in queued, queued  # nothing submitted from here reached the queue
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    sub = cli(slurm_cluster, tmp_path, "submit", *SLURM, *JOB, "trainer.epochs=500", f"hydra.run.dir={run}")
    assert sub.returncode == 0, (sub.stdout, sub.stderr)
    job = json.loads((run / "submission.json").read_text())["job_id"]
    jobs.append(job)
    wait_for_line(run / "train.log", "resumed from", timeout=180)  # the job trains on from its checkpoint


def test_a_job_cancelled_after_its_run_completed_is_not_failed(slurm_cluster, jobs, tmp_path):
    """Training done (status.json completed), then Slurm ends the job otherwise (scancel a moment later)."""
    run = tmp_path / "run"
    train = " ".join([PY, "-m", "allconv_hpc", "train", *JOB, "trainer.epochs=1", f"hydra.run.dir={run}"])
    submitted = time.time()
    r = slurm_cluster.run(["sbatch", "--parsable", "-p", "low", "--cpus-per-task=1", "-o", str(tmp_path / "job.out"),
                           "--wrap", f"{train} && sleep 300"], env=job_env(slurm_cluster, tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    jobs.append(job)
    (run / "submission.json").parent.mkdir(parents=True)
    (run / "submission.json").write_text(json.dumps({"job_id": job, "backend": "slurm", "run_dir": str(run),
                                                     "submitted": submitted}))
    wait_status(run, "completed", 180)
    slurm_cluster.run(["scancel", job], check=True)
    assert wait_final(slurm_cluster, job, 60) == "CANCELLED"
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 0 and rows[0]["state"] == "CANCELLED (run completed)" and not rows[0]["failed"], table
    again = cli(slurm_cluster, tmp_path, "submit", "--dry-run", *SLURM, *JOB, "trainer.epochs=1", f"hydra.run.dir={run}")
    assert again.returncode == 0 and f"not submitted again (completed): {run}" in again.stdout, again


def test_a_slurm_conf_naming_no_file_is_said_at_once_not_after_minutes(slurm_cluster, jobs, tmp_path):
    """The real commands retry a missing SLURM_CONF for 60 s each (submit took 90 s to say so): named first."""
    missing = tmp_path / "etc" / "slurm.conf"
    env = {**job_env(slurm_cluster, tmp_path), "SLURM_CONF": str(missing)}
    began = time.monotonic()
    r = cli(slurm_cluster, tmp_path, "submit", *SLURM, *JOB, f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert time.monotonic() - began < 30, r.stderr
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"allconv-hpc submit: error: SLURM_CONF={missing} names no file (no such file); point it at the cluster's "
        f"slurm.conf, or unset it"), (r.stdout, r.stderr)
    assert not (tmp_path / "run").exists()
    # status of a run of a real job, asked from a shell with the wrong SLURM_CONF: the run's record, and why
    subs = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}")
    job, run = subs[0][0]
    wait_status(run, "completed", 180)
    began = time.monotonic()
    st = cli(slurm_cluster, tmp_path, "status", str(run), env=env)
    assert time.monotonic() - began < 20, st.stderr  # not squeue's, sacct's and scontrol's 60 s retries
    assert st.returncode == 0 and f"Slurm did not answer for job(s) {job} (SLURM_CONF={missing} names no " in st.stderr
    assert "completed" in st.stdout, st.stdout


def test_two_submits_at_once_into_one_folder_queue_one_job(slurm_cluster, jobs, tmp_path):
    """Both pass their checks while the folder is free; the lock makes the later one check again and refuse."""
    import fcntl
    run = tmp_path / "run"
    run.mkdir()
    held = open(run / ".submit.lock", "w")
    fcntl.flock(held, fcntl.LOCK_EX)  # both submits plan, then wait here together
    outs = [tmp_path / f"submit{i}.err" for i in (0, 1)]
    procs = [subprocess.Popen([PY, "-m", "allconv_hpc", "submit", *SLURM, *JOB, "trainer.epochs=50",
                               f"hydra.run.dir={run}"], env=job_env(slurm_cluster, tmp_path), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=open(o, "w"), text=True) for o in outs]
    try:
        waiting = poll(lambda: all("waiting for another submit" in o.read_text() for o in outs), 120)
        held.close()  # releases the lock
        assert waiting, [o.read_text() for o in outs]
        results = [(p.wait(120), p.stdout.read(), o.read_text()) for p, o in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    queued = [re.search(r"^job (\S+)\s", out, re.M) for _, out, _ in results]
    jobs.extend(m.group(1) for m in queued if m)
    assert sorted(rc for rc, _, _ in results) == [0, 2], results
    (ok,) = [r for r in results if r[0] == 0]
    (no,) = [r for r in results if r[0] == 2]
    job = json.loads((run / "submission.json").read_text())["job_id"]
    assert ok[1].startswith(f"job {job}  {run}"), ok
    assert f"run folder {run} already has job {job} (" in no[2], no


BAD = {
    "missing_data": (["data=cifar10", "data.root=/nonexistent"], "CIFAR-10 not found"),
    "negative_lr": (["optim.lr=-1"], "optim.lr=-1"),
    "batch_vs_ranks": (["trainer.batch_size=61", "cluster.nodes=2"], "not divisible by the job's 2 ranks"),
    "partition_shell": (["cluster.partition='low;touch {pwned}'"], "cluster.partition="),
    "partition_newline": (["cluster.partition='low\ntouch {pwned}'"], "cluster.partition="),
    "partition_trailing_newline": (["cluster.partition='low\n'"], "cluster.partition="),
    "qos_substitution": (["cluster.qos='$(touch {pwned})'"], "cluster.qos="),
    "sweep_one_bad_point": (["-m", "optim.lr=0.1,-1"], "optim.lr=-1"),
}


def fake_sbatch(tmp: Path) -> tuple[Path, Path]:
    """A bin folder with an sbatch that only records that it was called."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    called = tmp / "sbatch-called"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {called}\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    return bin_dir, called


def assert_nothing_reached_slurm(cluster, tmp: Path, called: Path) -> None:
    assert not called.exists(), called.read_text()
    assert not (tmp / "pwned").exists()
    assert not (tmp / "run").exists() and not (tmp / "sweep").exists()
    assert str(tmp) not in cluster.run(["squeue", "-h", "-o", "%o"]).stdout


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_refused_before_slurm(slurm_cluster, tmp_path, monkeypatch, capsys, case):
    """In-process (the CLI's own entry point, without paying for a new interpreter per case)."""
    extra, message = BAD[case]
    extra = [e.format(pwned=tmp_path / "pwned") for e in extra]
    bin_dir, called = fake_sbatch(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    line = submit_error(tmp_path, monkeypatch, capsys, extra)
    assert message in line, line
    assert_nothing_reached_slurm(slurm_cluster, tmp_path, called)


def test_bad_config_is_refused_by_the_console_script(slurm_cluster, tmp_path):
    bin_dir, called = fake_sbatch(tmp_path)
    env = job_env(slurm_cluster, tmp_path)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    r = subprocess.run([str(Path(PY).with_name("allconv-hpc")), "submit",
                        *merged(SLURM, JOB, ["cluster.nodes=2", "trainer.batch_size=61"]),
                        f"hydra.run.dir={tmp_path / 'run'}"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("allconv-hpc submit: error: trainer.batch_size=61")
    assert_nothing_reached_slurm(slurm_cluster, tmp_path, called)


@pytest.mark.slow
def test_a_time_limit_whose_warning_came_during_cluster_setup_still_requeues(slurm_cluster, jobs, tmp_path):
    """The warning (30-60 s into a 2 min job with a 60 s lead, as above) goes to the job's steps only: sent while the
    first start's setup still ran, it reached nothing, and the limit's SIGTERM ended the job TIMEOUT with a checkpoint,
    not requeued, and `status` called that a failure (found by a Slurm journey audit). That SIGTERM now requeues
    (counted as a time limit); where the requeue is refused, TIMEOUT with run interrupted is a stop."""
    setup = "cluster.setup=['test \"$SLURM_RESTART_COUNT\" -gt 0 2>/dev/null || sleep 70']"  # the first start only
    limit = ["cluster.timeout_min=2", "cluster.signal_lead_s=60", "trainer.epochs=100000",
             "checkpoint.every_steps=20", setup]
    runs = {"true": tmp_path / "requeue", "false": tmp_path / "no_requeue"}
    ids = {}
    for requeue, run in runs.items():  # at once: a job per node
        mode = "offline" if requeue == "true" else "disabled"  # the real W&B, finished after the requeue now
        [(ids[requeue], _)], _ = submit(slurm_cluster, tmp_path, jobs, *SLURM, *JOB, *limit, f"wandb.mode={mode}",
                                        f"cluster.requeue={requeue}", f"hydra.run.dir={run}")
    log = lambda run: (run / "train.log").read_text() if (run / "train.log").exists() else ""  # noqa: E731
    job = ids["true"]
    assert poll(lambda: "requeued at global step" in log(runs["true"]), 300), tail(runs["true"])
    assert f"SIGTERM as Slurm ends job {job} at its time limit" in log(runs["true"]), tail(runs["true"])
    st = read_status(runs["true"])
    assert st["state"] == "requeued" and st["timeouts"] == 1 and st["signal"] == "SIGTERM", st
    assert poll(lambda: re.search(r"\bRestarts=1\b", slurm_cluster.run(["scontrol", "show", "job", job]).stdout), 60)
    slurm_cluster.run(["scancel", job])
    # --no-requeue: the requeue is refused, the job ends TIMEOUT with its checkpoint: resumable, not failed
    run = runs["false"]
    assert wait_final(slurm_cluster, ids["false"], 300) == "TIMEOUT", tail(run)
    assert "SIGTERM as Slurm ends job" in log(run) and read_status(run)["state"] == "interrupted", tail(run)
    rc, rows, table = status(slurm_cluster, tmp_path, run)
    assert rc == 0 and rows[0]["state"] == "TIMEOUT" and rows[0]["run"] == "interrupted", table
    assert f"hydra.run.dir={run}` resumes it from its newest checkpoint" in table, table


def test_requeue_tolerates_a_job_slurm_already_requeued(slurm_cluster, tmp_path):
    """`scontrol requeue` of a pending job fails ("Job is pending execution"): that counts as requeued."""
    r = slurm_cluster.run(["sbatch", "--parsable", "--hold", "-o", "/dev/null", "--wrap", "true"], check=True)
    job = r.stdout.strip()
    try:
        assert SlurmJob({"SLURM_JOB_ID": job, "SLURM_CONF": str(slurm_cluster.conf)}).requeue() is True
    finally:
        slurm_cluster.run(["scancel", job])


def test_requeue_does_not_undo_a_scancel_that_came_while_the_job_stopped(slurm_cluster, tmp_path):
    """A user's scancel landing after the warning, while the trainer writes its checkpoint: the job is
    COMPLETING (its processes end) and Slurm would accept `scontrol requeue`, running the cancelled job
    again (seen: USR2, scancel 0.05 s later, the job requeued and trained to the end)."""
    script = tmp_path / "slow_to_end.sh"
    script.write_text("#!/bin/bash\ntrap '' TERM\nsleep 60\n")  # ends at KillWait's SIGKILL: COMPLETING until
    script.chmod(0o755)
    job = slurm_cluster.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", f"srun {script}"],
                            check=True).stdout.strip()
    try:
        assert poll(lambda: slurm_cluster.run(["squeue", "-h", "-j", job, "-o", "%T"]).stdout.strip() == "RUNNING", 60)
        time.sleep(1)  # the step's script started
        slurm_cluster.run(["scancel", job], check=True)
        slurm = SlurmJob({"SLURM_JOB_ID": job})
        assert slurm.requeue() is False and slurm.cancelled
        assert wait_final(slurm_cluster, job, 60) == "CANCELLED"  # requeued, it would run its 60 s again
    finally:
        slurm_cluster.run(["scancel", job])


@pytest.mark.slow
def test_submit_cluster_local_runs_here_and_wait_streams_until_done(slurm_cluster, tmp_path):
    """cluster=local with two tasks: one DDP run of two ranks here (not two runs in one folder)."""
    run = tmp_path / "local"
    overrides = ["cluster=local", "cluster.cpus_per_task=1", "cluster.tasks_per_node=2", *JOB, "model.dropout=false",
                 "trainer.epochs=2"]
    p = subprocess.Popen([PY, "-m", "allconv_hpc", "submit", "--wait", *overrides, f"hydra.run.dir={run}"],
                         env=job_env(slurm_cluster, tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out
    pid = int(re.search(r"^job (\d+)\s", out, re.M).group(1))  # the local controller's pid
    try:
        assert re.search(rf"^\S+ {pid}:COMPLETED\(2/2\)$", out, re.M), out  # --wait's last state line
        rc, rows, table = status(slurm_cluster, tmp_path, run)
        assert rc == 0 and rows[0]["state"] == "COMPLETED" and rows[0]["run"] == "completed", table
        assert all((run / ".submitit" / str(pid) / f"{pid}_{t}_result.pkl").exists() for t in (0, 1))
        assert len(history(run)) == 2 and (run / "checkpoints" / "last.pt").is_file()
        log = (run / "train.log").read_text()
        # the rendezvous port is the one submit found free and gave the job (not derived from the pid)
        port = pickle.loads((run / ".submitit" / str(pid) / f"{pid}_submitted.pkl").read_bytes()).function.local_port
        assert f"rank 0/2 joined (gloo, local, master 127.0.0.1:{port})" in log, log[-2000:]
        assert log.count("training synthetic on cpu") == 1 and "2 rank(s), global batch 60" in log, log[-2000:]
        ref = start_reference(tmp_path, tmp_path / "ref", overrides)
        finish_reference(tmp_path, ref)
        assert_same_weights(final_weights(run), final_weights(tmp_path / "ref"), exact=False)
        assert_same_history(history(run), history(tmp_path / "ref"), exact=False)
    finally:
        cmdline = Path(f"/proc/{pid}/cmdline")
        try:  # only our own controller, should it still be there
            if b"submitit.local._local" in cmdline.read_bytes() and str(run).encode() in cmdline.read_bytes():
                os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


# ------------------------------------------------------------------ batched Slurm calls of status (jobs.slurm_states)

def counting_slurm(tmp: Path, log: Path) -> Path:
    """A folder of squeue, sacct and scontrol that log each call and exec the real ones: real answers, calls counted."""
    d = tmp / "counting"
    d.mkdir()
    for name in ("squeue", "sacct", "scontrol"):
        (d / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexec {shutil.which(name)} "$@"\n')
        (d / name).chmod(0o755)
    return d


def sweep_of(folder: Path, ids: list[str]) -> Path:
    """A sweep folder whose points are the jobs `ids` (no run has written status.json: Slurm's word alone)."""
    recs = []
    for i, job in enumerate(ids):
        (folder / f"p{i}").mkdir(parents=True)
        recs.append({"job_id": job, "backend": "slurm", "run_dir": str(folder / f"p{i}"), "submitted": time.time()})
    (folder / "sweep.json").write_text(json.dumps({"sweep_dir": str(folder), "jobs": recs}))
    return folder


def test_status_of_many_jobs_asks_squeue_once_and_shows_each_jobs_state(slurm_cluster, jobs, tmp_path, monkeypatch,
                                                                       capsys):
    """20 jobs (running, held, array tasks of both, ended, failed, one Slurm never had) in two folders: one squeue call
    for them all, one sacct and one scontrol for the ended ones; each row is the job's own state."""
    def sbatch(*args: str) -> str:
        job = slurm_cluster.run(["sbatch", "--parsable", "-o", "/dev/null", *args], check=True).stdout.strip()
        jobs.append(job)
        return job
    running, array, ended, failed = sbatch("--wrap", "sleep 300"), sbatch("-a", "0-1", "--wrap", "sleep 300"), \
        sbatch("--wrap", "true"), sbatch("--wrap", "false")
    held = [sbatch("-H", "--wrap", "true") for _ in range(10)]
    held_array = sbatch("-H", "-a", "0-4", "--wrap", "true")
    forgotten = str(int(held_array) + 100000)
    assert poll(lambda: squeue_state(slurm_cluster, f"{array}_1") == "RUNNING" and
                squeue_state(slurm_cluster, running) == "RUNNING" and
                not {squeue_state(slurm_cluster, j) for j in (ended, failed)} - {None}, 60)
    want = {running: "RUNNING", f"{array}_0": "RUNNING", f"{array}_1": "RUNNING", ended: "COMPLETED", failed: "FAILED",
            forgotten: "LOST", **{j: "PENDING" for j in held}, **{f"{held_array}_{t}": "PENDING" for t in range(5)}}
    assert len(want) == 21
    ids = list(want)
    one, two = sweep_of(tmp_path / "one", ids[:10]), sweep_of(tmp_path / "two", ids[10:])
    log = tmp_path / "calls"
    monkeypatch.setenv("PATH", f"{counting_slurm(tmp_path, log)}:{os.environ['PATH']}")
    capsys.readouterr()
    status_main([str(one), str(two), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert {r["job"]: r["state"].split(" ")[0] for r in rows} == want
    calls = [line.split(" ", 1)[0] for line in log.read_text().splitlines()]
    assert (calls.count("squeue"), calls.count("sacct"), calls.count("scontrol")) == (1, 1, 1), log.read_text()


def test_squeue_not_answering_is_said_once_for_every_folders_jobs_after_one_call(slurm_cluster, jobs, tmp_path,
                                                                                monkeypatch, capsys):
    """A controller that does not answer (a slurm.conf naming a port it does not listen on): one squeue call for all
    the folders' jobs, and the same warning as when each folder asked for its first job."""
    job = slurm_cluster.run(["sbatch", "--parsable", "-H", "-o", "/dev/null", "--wrap", "true"], check=True).stdout.strip()
    jobs.append(job)
    folders = [sweep_of(tmp_path / f"s{i}", [job, f"{job}_{i}"]) for i in range(3)]
    conf = tmp_path / "slurm.conf"
    conf.write_text(re.sub(r"(?m)^SlurmctldPort=\d+", "SlurmctldPort=1", slurm_cluster.conf.read_text()))
    monkeypatch.setenv("SLURM_CONF", str(conf))
    log = tmp_path / "calls"
    monkeypatch.setenv("PATH", f"{counting_slurm(tmp_path, log)}:{os.environ['PATH']}")
    capsys.readouterr()
    assert status_main([str(f) for f in folders]) == EXIT_NO_ANSWER
    err = capsys.readouterr().err
    assert re.fullmatch(rf"allconv-hpc status: warning: Slurm did not answer for job\(s\) {job}, {job}_0, {job}, "
                        rf"{job}_1, {job}, {job}_2 \(squeue: [^;]*\): their state is the run's own status.json\n",
                        err), err
    calls = [line.split(" ", 1)[0] for line in log.read_text().splitlines()]
    assert calls.count("squeue") == 1, log.read_text()

"""The real Slurm dev cluster from slurm/dev-cluster.sh: nodes, jobs, accounting,
node-name resolution for DDP, preemption with a user signal and requeue, and submitit.

Waits are bounded polls; no test asserts tight timings (Slurm's timers are coarse).
"""
import re
import time

import pytest

pytestmark = pytest.mark.slurm

NODES = ("n1", "n2")


# ------------------------------------------------------------------------------ helpers


def poll(predicate, timeout: float, interval: float = 0.5):
    """Call predicate until it returns something truthy (returned) or timeout (None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def sbatch(cluster, *args: str) -> str:
    proc = cluster.run(["sbatch", "--parsable", *args])
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def in_queue(cluster, job_id: str) -> bool:
    return bool(cluster.run(["squeue", "-h", "-j", job_id, "-o", "%A"]).stdout.strip())


def sacct_state(cluster, job_id: str) -> str:
    out = cluster.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"]).stdout.split()
    return out[-1] if out else ""


def wait_sacct_state(cluster, job_id: str, timeout: float = 30) -> str:
    """The final state from accounting (sacct lags the controller by a few seconds)."""
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
    poll(lambda: sacct_state(cluster, job_id).startswith(final), timeout)
    return sacct_state(cluster, job_id)


def scontrol_job(cluster, job_id: str) -> dict:
    out = cluster.run(["scontrol", "-o", "show", "job", job_id]).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_done(cluster, job_id: str, timeout: float = 60) -> None:
    assert poll(lambda: not in_queue(cluster, job_id), timeout), (
        f"job {job_id} still queued after {timeout}s: {scontrol_job(cluster, job_id)}"
    )


# -------------------------------------------------------------------------------- tests


def test_nodes_idle_in_both_partitions(slurm_cluster):
    assert slurm_cluster.wait_queue_empty(60)

    def states():
        out = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%N %P %t"], check=True).stdout
        return {tuple(line.split()) for line in out.splitlines()}

    want = {(n, p, "idle") for n in NODES for p in ("low*", "high")}
    assert poll(lambda: states() == want, 30), states()


def test_sbatch_wrap_completes_and_sacct_reports_it(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = sbatch(slurm_cluster, "-p", "low", "-o", str(out), "--wrap", "echo hello from $SLURMD_NODENAME")
    wait_done(slurm_cluster, job, 60)
    assert re.fullmatch(r"hello from n[12]\n", out.read_text())
    assert wait_sacct_state(slurm_cluster, job) == "COMPLETED"


def test_two_node_job_resolves_node_names(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = sbatch(
        slurm_cluster, "-N2", "--ntasks-per-node=1", "-o", str(out), "--wrap",
        "srun -l bash -c 'echo node=$SLURMD_NODENAME n1=$(getent hosts n1 | cut -d\" \" -f1)"
        " n2=$(getent hosts n2 | cut -d\" \" -f1)'",
    )
    wait_done(slurm_cluster, job, 60)
    lines = sorted(out.read_text().split("\n"))
    lines = [line for line in lines if line]
    assert lines == [
        "0: node=n1 n1=127.0.0.1 n2=127.0.0.1",
        "1: node=n2 n1=127.0.0.1 n2=127.0.0.1",
    ], out.read_text()
    assert wait_sacct_state(slurm_cluster, job) == "COMPLETED"


LOW_JOB = """#!/bin/bash
echo "start restart=${SLURM_RESTART_COUNT:-0}" >> "$EVENTS"
if [[ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]]; then exit 0; fi
# The step (not the batch shell) receives --signal's USR2 when the job is preempted.
srun bash -c '
  trap "echo usr2 >> \\"\\$EVENTS\\"" USR2
  trap "echo term >> \\"\\$EVENTS\\"; exit 143" TERM
  echo step-running >> "$EVENTS"
  for i in $(seq 1500); do sleep 0.2; done
'
"""


def test_preemption_signals_then_requeues_low_job(slurm_cluster, tmp_path):
    assert slurm_cluster.wait_queue_empty(60), "needs the whole cluster"
    events = tmp_path / "events"
    script = tmp_path / "low.sh"
    script.write_text(LOW_JOB)

    def seen(word):
        return lambda: events.exists() and word in events.read_text().split("\n")

    low = sbatch(
        slurm_cluster, "-p", "low", "-n1", "--time=10", "--signal=USR2@10",
        f"--export=ALL,EVENTS={events}", "-o", str(tmp_path / "low-%j.out"), str(script),
    )
    assert poll(seen("step-running"), 60), scontrol_job(slurm_cluster, low)

    cpus = int(slurm_cluster.run(["sinfo", "-h", "-N", "-n", "n1", "-o", "%c"]).stdout.split()[0])
    high = sbatch(
        slurm_cluster, "-p", "high", "-N2", f"--ntasks-per-node={cpus}",
        "-o", str(tmp_path / "high-%j.out"), "--wrap", "sleep 2",
    )
    # Preempted: the step gets USR2 first (GraceTime leaves time to checkpoint) ...
    assert poll(seen("usr2"), 60), (events.read_text(), scontrol_job(slurm_cluster, low))
    # ... then the high job runs, and the low job is requeued and runs again.
    assert poll(seen("start restart=1"), 150, interval=1), (
        events.read_text(), scontrol_job(slurm_cluster, low), scontrol_job(slurm_cluster, high)
    )
    wait_done(slurm_cluster, low, 60)
    info = scontrol_job(slurm_cluster, low)
    assert int(info["Restarts"]) >= 1, info
    assert info["JobState"] == "COMPLETED", info
    assert wait_sacct_state(slurm_cluster, high) == "COMPLETED"
    text = events.read_text()
    assert text.index("usr2") < text.index("start restart=1"), text


def test_submitit_map_array(slurm_cluster, tmp_path):
    import submitit

    def square_plus(x, offset):  # a local function: cloudpickled by value
        import os

        return x * x + offset, os.environ["SLURMD_NODENAME"]

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(
        slurm_partition="low", timeout_min=5, nodes=1, tasks_per_node=1, cpus_per_task=1,
        mem_gb=1, slurm_array_parallelism=4,
    )
    jobs = executor.map_array(square_plus, [1, 2, 3, 4], [10, 10, 10, 10])
    assert len(jobs) == 4
    finished = poll(lambda: all(job.done() for job in jobs), 120)
    if not finished:
        slurm_cluster.run(["scancel", jobs[0].job_id.split("_")[0]])
        pytest.fail("submitit jobs did not finish: " + "\n".join(str(job.stderr()) for job in jobs))
    results = [job.result() for job in jobs]
    assert [value for value, _ in results] == [11, 14, 19, 26]
    assert {node for _, node in results} <= set(NODES)
    # With accounting, submitit sees the real final state (not UNKNOWN).
    for job in jobs:
        state = poll(lambda: job.watcher.get_state(job.job_id, mode="force") == "COMPLETED" and "ok", 30)
        assert state, job.watcher.get_state(job.job_id, mode="force")

"""Small pure pieces: launch-context detection, host lists, ports, Slurm times, schedules."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from allconv_hpc.config import ScheduleConfig
from allconv_hpc.distributed import DistributedError, detect_env, expand_hostlist, slurm_port
from allconv_hpc.preempt import SAME_SIGNAL_S, StopRequest, catch_early, sigint_deferred
from allconv_hpc.slurm import SlurmJob, parse_slurm_time
from allconv_hpc.schedule import lr_factor
from allconv_hpc.resume import TrainState
from allconv_hpc.poll import Poll, classify_stop
from proc import hold_lock


def test_expand_hostlist():
    assert expand_hostlist("n1") == ["n1"]
    assert expand_hostlist("n[1-2]") == ["n1", "n2"]
    assert expand_hostlist("gpu[01-03,07],login5") == ["gpu01", "gpu02", "gpu03", "gpu07", "login5"]
    assert expand_hostlist("n[1-2],gpu[01-03]") == ["n1", "n2", "gpu01", "gpu02", "gpu03"]
    assert expand_hostlist("node-[1,3-4]-ib") == ["node-1-ib", "node-3-ib", "node-4-ib"]
    assert expand_hostlist("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]
    for bad in ("n[1-2", "n1-2]", "n[a-b]", "n[1-2],,m", ""):
        with pytest.raises(ValueError, match="Slurm host list"):
            expand_hostlist(bad)


def test_detect_env_refuses_an_unparseable_nodelist():
    with pytest.raises(DistributedError, match="MASTER_ADDR"):
        detect_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n[1-"})


def test_detect_env_order():
    assert detect_env({}).source == "single"
    tr = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
          "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8"}
    e = detect_env(tr)  # torchrun wins over Slurm
    assert (e.source, e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == ("torchrun", 3, 4, 1, "h", 1234)
    sl = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77",
          "SLURM_STEP_NODELIST": "gpu[03-06]", "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_RESTART_COUNT": "2"}
    e = detect_env(sl)
    assert (e.source, e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_addr) == \
        ("slurm", 5, 8, 1, 2, "gpu03")
    assert e.master_port == slurm_port("77", 2)
    # two sruns of one job at once (two trainings in one allocation): a port and rendezvous keys of each its own
    other = detect_env({**sl, "SLURM_STEP_ID": "1"})
    assert other.master_port == slurm_port("77", 2, 1) != e.master_port and other.world_key != e.world_key
    assert detect_env({**sl, "SLURM_STEP_ID": "0"}) == e
    # a batch script outside srun has SLURM_PROCID but no step: one process, not a rank of 8
    assert detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}).source == "single"
    # cluster=local: submitit's LocalExecutor tasks are the ranks, also inside an inherited Slurm step
    lo = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
          "SUBMITIT_LOCAL_JOB_ID": "4242", "MASTER_PORT": "1"}
    e = detect_env({**sl, **lo})
    assert (e.source, e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_addr) == \
        ("local", 1, 2, 1, 2, "127.0.0.1")
    assert e.master_port == slurm_port("4242", 0) != detect_env({**lo, "SUBMITIT_LOCAL_JOB_ID": "4243"}).master_port
    assert detect_env({**lo, "ALLCONV_LOCAL_PORT": "23456"}).master_port == 23456  # the port `submit` found free
    assert not detect_env({**lo, "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_NTASKS": "1"}).distributed
    assert detect_env({**lo, **tr}).source == "torchrun"
    assert detect_env({**lo, **sl, "SUBMITIT_EXECUTOR": "slurm"}).source == "slurm"  # a Slurm job sent from a local task
    # half of torchrun's pair, outside a launcher: every process would run alone on the one run folder
    for half, other in (({"RANK": "1"}, "WORLD_SIZE"), ({"WORLD_SIZE": "2"}, "RANK")):
        with pytest.raises(DistributedError, match=rf"{next(iter(half))}=\d is set but {other} is not: set both"):
            detect_env(half)
        assert detect_env({**half, **sl}).source == "slurm" and detect_env({**half, **lo}).source == "local"


def test_local_world_size_is_this_nodes_entry_of_the_tasks_per_node_list():
    base = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "10", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "5",
            "SLURM_STEP_NODELIST": "a[1-3]", "SLURM_STEP_TASKS_PER_NODE": "4(x2),2"}
    assert detect_env({**base, "SLURMD_NODENAME": "a3"}).local_world_size == 2
    assert detect_env({**base, "SLURMD_NODENAME": "a2"}).local_world_size == 4
    assert detect_env({**base, "SLURM_NODEID": "2"}).local_world_size == 2  # no node name: the node index
    assert detect_env({**base, "SLURM_STEP_TASKS_PER_NODE": "8,4", "SLURMD_NODENAME": "a2"}).local_world_size == 4
    assert detect_env({**base, "SLURM_STEP_TASKS_PER_NODE": "3"}).local_world_size == 3


@pytest.mark.parametrize("source,per_task,affinity,lws,expected", [
    ("slurm", "8", 8, 4, 8),      # srun pinned each task to its 8 CPUs (task/affinity): all 8 are this rank's
    ("slurm", "8", 64, 4, 8),     # not pinned: the node's 64 are visible, the allocation says 8
    ("slurm", None, 64, 4, 16),   # no --cpus-per-task: share the node
    ("torchrun", "8", 8, 2, 4),   # torchrun's 2 workers share the one Slurm task's 8 CPUs
    ("torchrun", None, 16, 4, 4),
    ("single", "6", 64, 1, 6),    # a batch script without srun: its allocation
])
def test_threads_per_rank(monkeypatch, source, per_task, affinity, lws, expected):
    from allconv_hpc.distributed import DistEnv, set_threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    if per_task is None:
        monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    else:
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", per_task)
    before = torch.get_num_threads()
    try:
        assert set_threads(None, DistEnv(world_size=lws, local_world_size=lws, source=source)) == expected
        assert torch.get_num_threads() == expected
        assert set_threads(3, DistEnv(world_size=lws, local_world_size=lws, source=source)) == 3  # explicit wins
    finally:
        torch.set_num_threads(before)


def test_slurm_port_changes_with_restarts_and_stays_in_range():
    ports = {slurm_port("123456", r) for r in range(5)}
    assert len(ports) == 5
    # never in Linux's ephemeral range (32768-60999), where an outgoing connection may hold the port
    assert all(10000 <= slurm_port(str(j), r) < 32768 for j in range(0, 10**6, 997) for r in range(3))
    assert slurm_port("123456", 0) != slurm_port("123457", 0)


def test_parse_slurm_time_and_array_job_id():
    assert parse_slurm_time("1-02:03:04") == 93784
    assert parse_slurm_time("05:06") == 306
    assert parse_slurm_time("UNLIMITED") is None
    for unknown in ("INVALID", "NOT_SET", "", "N/A"):  # squeue's answers when it cannot tell: not "no limit"
        with pytest.raises(ValueError):
            parse_slurm_time(unknown)
    assert SlurmJob({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "3"}).job_id == "5_3"
    assert SlurmJob({"SLURM_JOB_ID": "9"}).job_id == "9"
    assert not SlurmJob({}).in_slurm


def test_schedules():
    paper = ScheduleConfig(name="paper", warmup_epochs=0.0)  # the paper's own: no warmup
    f = [lr_factor(s, paper, 10, 350) for s in (0, 1999, 2000, 2500, 3000, 3499)]
    assert f == pytest.approx([1, 1, 0.1, 0.01, 0.001, 0.001])
    warm = ScheduleConfig(name="paper")  # the default: one epoch of linear warmup, then the milestones
    assert [lr_factor(s, warm, 10, 350) for s in (0, 4, 9, 10, 2000)] == pytest.approx([0.1, 0.5, 1, 1, 0.1])
    cos = ScheduleConfig(name="cosine", warmup_epochs=1.0)
    assert lr_factor(0, cos, 10, 10) == pytest.approx(0.1) and lr_factor(9, cos, 10, 10) == pytest.approx(1.0)
    assert lr_factor(10, cos, 10, 10) == pytest.approx(1.0) and lr_factor(99, cos, 10, 10) < 0.01
    one = ScheduleConfig(name="onecycle", pct_start=0.25)
    peak = max(range(100), key=lambda s: lr_factor(s, one, 10, 10))
    assert peak == 24 and lr_factor(24, one, 10, 10) == pytest.approx(1.0)
    assert lr_factor(99, one, 10, 10) == pytest.approx(1 / 75, abs=1e-9)
    assert all(math.isfinite(lr_factor(s, one, 10, 10)) for s in range(100))
    # Keras' legacy SGD decay (the seed's decay=1e-6): lr / (1 + decay * updates so far)
    inv = ScheduleConfig(name="inverse_time", decay=1e-6, warmup_epochs=0.0)
    assert [lr_factor(s, inv, 1563, 350) for s in (0, 1, 547_050)] == pytest.approx([1.0, 1 / 1.000001, 1 / 1.54705])


def test_timeout_budget_is_per_submission():
    st = TrainState()
    assert [st.count_timeout("41", 2) for _ in range(3)] == [True, True, False]  # requeues of job 41
    assert st.timeouts == 2
    # the run resubmitted after giving up is a new job: a fresh budget, not an instant give-up
    assert st.count_timeout("57_3", 2) and st.timeouts == 1 and st.timeouts_job == "57_3"
    # the count is part of what a checkpoint restores
    again = TrainState(**asdict(st))
    assert again.count_timeout("57_3", 2) and not again.count_timeout("57_3", 2)
    assert not TrainState().count_timeout("1", 0)  # max_requeues=0: the first warning ends it


# ----------------------------------------------------------------------------- signals and Slurm's answers


def test_stop_request_keeps_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR2)
    with StopRequest("USR2") as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)  # the grace period ending: still a preemption warning
        assert stop.requested and stop.is_warning and stop.received == signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) is before
    with StopRequest("USR2") as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and not stop.is_warning
        time.sleep(SAME_SIGNAL_S)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C gets the user out at once
            os.kill(os.getpid(), signal.SIGINT)


def test_a_first_ctrl_c_is_answered_on_stderr_and_a_closed_stderr_fails_nothing(capfd):
    """The answer comes from the handler, inside whatever step it interrupts: a stderr pipe the same Ctrl-C ended
    (`train ... 2>&1 | tee`) must not fail that step with a broken pipe."""
    with StopRequest("USR2", say=True) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
    assert "allconv-hpc: Ctrl-C: stopping after the next step, with a checkpoint" in capfd.readouterr().err
    with StopRequest("USR2") as stop:  # other ranks say nothing
        os.kill(os.getpid(), signal.SIGINT)
    assert "Ctrl-C" not in capfd.readouterr().err
    saved, (r, w) = os.dup(2), os.pipe()
    os.close(r)  # the reader (tee) is gone
    os.dup2(w, 2)
    try:
        with StopRequest("USR2", say=True) as stop:
            os.kill(os.getpid(), signal.SIGINT)  # raised BrokenPipeError here
            assert stop.received == signal.SIGINT
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(w)


def test_a_ctrl_c_that_comes_twice_within_ms_is_one_stop_not_an_exit_at_once():
    """A signal to a process group reaches a rank straight and through whatever passes it on (a controller, a
    wrapper script) ms apart: that second copy must not stop the rank at once, losing the checkpoint being made."""
    with StopRequest("USR2") as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # raised KeyboardInterrupt before
        assert stop.received == signal.SIGINT


def test_a_stop_request_on_sighup_as_the_warning_signal_restores_the_handler_it_found():
    """checkpoint.signal=HUP: SIGHUP is the warning and the hang-up alike; leaving the request must put back the
    handler that was there (nohup's SIG_IGN, or the default), not the request's own."""
    before = signal.getsignal(signal.SIGHUP)
    try:
        for found in (signal.SIG_IGN, signal.SIG_DFL):
            signal.signal(signal.SIGHUP, found)
            with StopRequest("HUP") as stop:
                os.kill(os.getpid(), signal.SIGHUP)
                assert stop.requested and stop.is_warning
            assert signal.getsignal(signal.SIGHUP) == found
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_signal_during_startup_is_honoured_by_the_next_stop_request():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        catch_early("USR2")
        os.kill(os.getpid(), signal.SIGUSR2)  # arrives while imports/data/model are still being set up
        with StopRequest("USR2") as stop:
            assert stop.requested and stop.is_warning
        with StopRequest("USR2") as stop:  # consumed: the next one starts clean
            assert not stop.requested
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_both_usr_signals_are_warnings_whichever_the_config_names(monkeypatch):
    """checkpoint.signal names what Slurm is asked to send; the other USR signal (an admin's, another tool's
    requeue signal) is a warning too, before training (recorded) and during it: its default action would end the
    job with nothing saved since its last checkpoint."""
    from allconv_hpc import preempt
    sigs = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP, signal.SIGINT)  # SIGINT: a Ctrl-C as
    saved = {s: signal.getsignal(s) for s in sigs}  # the process exits would end it by the signal, not its code
    for name, value in (("_early", None), ("_warn", signal.SIGUSR2)):
        monkeypatch.setattr(preempt, name, value)
    try:
        catch_early()  # the CLI, before compose
        os.kill(os.getpid(), signal.SIGUSR1)
        catch_early("USR2")  # compose named USR2: the early USR1 stays a warning
        with StopRequest("USR2") as stop:
            assert stop.received == signal.SIGUSR1 and stop.is_warning
        for configured, sent in (("USR2", signal.SIGUSR1), ("USR1", signal.SIGUSR2), ("HUP", signal.SIGUSR1),
                                 ("HUP", signal.SIGHUP)):
            catch_early(configured)
            with StopRequest(configured) as stop:
                assert not stop.requested
                os.kill(os.getpid(), sent)
                assert stop.received == sent and stop.is_warning, (configured, sent)
        with StopRequest("USR2") as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested and not stop.is_warning
        catch_early("HUP")
        preempt.ignore_late_signals()  # what the CLI calls at the end: the configured signal too
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in sigs)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def fake_slurm(tmp_path, monkeypatch, **scripts: str) -> Path:
    """Fake Slurm commands on PATH: each prints the given text (exit 1 when it is None); calls logged."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(exist_ok=True)
    for name, out in scripts.items():
        body = "exit 1" if out is None else f"printf '%s\\n' {shlex.quote(out)}"
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n{body}\n')
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


ARRAY_TASK = {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "1"}


@pytest.mark.parametrize("scontrol_requeue,squeue_state,restarts,expected", [
    (True, None, None, True),                    # requeued by us
    (False, "PENDING", None, True),              # Slurm's own preemption requeued it already
    (False, "COMPLETING", "Restarts=2", True),   # requeued, processes still ending
    (False, "COMPLETING", "Restarts=1", False),  # cancelled (restart count unchanged): not requeued
    (False, "RUNNING", None, False),
    (False, None, None, False),                  # Slurm unreachable
])
def test_requeue_is_array_aware_and_checks_what_slurm_did(tmp_path, monkeypatch, scontrol_requeue, squeue_state,
                                                         restarts, expected):
    scontrol = ("" if scontrol_requeue else None) if restarts is None else f"JobId=9 {restarts} Requeue=1"
    calls = fake_slurm(tmp_path, monkeypatch, scontrol=scontrol, squeue=squeue_state)
    if restarts is not None:  # `scontrol requeue` fails, `scontrol show job` answers
        (tmp_path / "bin" / "scontrol").write_text(
            f'#!/bin/sh\necho "scontrol $*" >> {calls}\n[ "$1" = show ] || exit 1\necho "JobId=9 {restarts}"\n')
    job = SlurmJob(ARRAY_TASK)
    assert job.requeue() is expected
    assert job.unanswered is (squeue_state is None and not expected)  # the trainer's warning then says so
    assert all(c.endswith(" 5_3") for c in calls.read_text().splitlines() if c.startswith("scontrol"))  # the task


@pytest.mark.parametrize("shown,expected,asked", [
    ("JobState=RUNNING Reason=None Restarts=1", True, True),
    ("JobState=COMPLETING Reason=None Restarts=1", False, False),   # a user's scancel after the warning
    ("JobState=CANCELLED Reason=None Restarts=1", False, False),
    ("JobState=COMPLETING Reason=TimeLimit Restarts=1", True, True),  # the time limit: requeued
    ("JobState=COMPLETING Reason=None StartTime=2026-12-03T19:01:00 PreemptTime=2026-12-03T19:11:58 Restarts=1",
     True, True),  # preempted (CANCEL)
    ("JobState=COMPLETING Reason=None PreemptTime=None Restarts=1", False, False),
    # a scancel in a start after a preemption's requeue: that PreemptTime is the earlier start's (found by a review)
    ("JobState=CANCELLED Reason=None StartTime=2026-12-03T19:30:00 PreemptTime=2026-12-03T19:11:58 Restarts=1",
     False, False),
    ("JobState=PENDING Reason=BeginTime Restarts=2", True, False),   # Slurm's preemption requeued it
])
def test_requeue_does_not_undo_a_scancel_that_came_while_the_job_stopped(tmp_path, monkeypatch, shown, expected,
                                                                          asked):
    calls = fake_slurm(tmp_path, monkeypatch, squeue=None)
    (tmp_path / "bin" / "scontrol").write_text(
        f'#!/bin/sh\necho "scontrol $*" >> {calls}\n[ "$1" = show ] && echo "JobId=9 {shown}"\nexit 0\n')
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    job = SlurmJob(ARRAY_TASK)
    assert job.requeue() is expected and job.cancelled is (not expected)
    assert ("scontrol requeue 5_3" in calls.read_text().splitlines()) is asked


def test_a_requeue_within_killwait_gives_each_slurm_command_the_short_timeout(tmp_path, monkeypatch):
    """After the time limit's SIGTERM, KillWait (30 s by default) runs: a requeue whose commands each waited up to
    30 s on a busy controller came after the SIGKILL, and the job ended TIMEOUT unrequeued (found by a review)."""
    import time
    calls = fake_slurm(tmp_path, monkeypatch, squeue=None)
    (tmp_path / "bin" / "scontrol").write_text(f'#!/bin/sh\necho "scontrol $*" >> {calls}\nexec sleep 20\n')
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    job = SlurmJob(ARRAY_TASK)
    began = time.monotonic()
    assert job.requeue(timeout=0.5) is False and job.unanswered
    assert time.monotonic() - began < 5 and "scontrol requeue 5_3" in calls.read_text()


@pytest.mark.parametrize("squeue_left,expected", [
    ("1:30", True),        # 90 s left with a 60 s lead: the time-limit warning
    ("29:00", False),      # far from the limit: a preemption
    ("UNLIMITED", False),  # no limit at all: can only be a preemption
    ("INVALID", True),     # squeue's answer once the time left is below 0: past the limit, not "no limit"
    (None, True),          # squeue failed: counted as a time limit, so max_requeues bounds it
])
def test_timeout_or_preemption(tmp_path, monkeypatch, squeue_left, expected):
    fake_slurm(tmp_path, monkeypatch, squeue=squeue_left, scontrol=None)  # scontrol cannot tell: squeue's time left
    assert SlurmJob({"SLURM_JOB_ID": "9"}).is_timeout(lead_s=60) is expected
    # Slurm says it preempted the job in this start: a preemption, however near the limit (seen on the dev
    # cluster: a preemption 72 s before the limit used up the last requeue, and the run gave up)
    fake_slurm(tmp_path, monkeypatch, squeue=squeue_left)
    (tmp_path / "bin" / "scontrol").write_text(  # ISO times only where asked for (the user's format may differ)
        '#!/bin/sh\n[ "$SLURM_TIME_FORMAT" = standard ] && echo "JobId=9 JobState=RUNNING '
        'StartTime=2026-12-06T02:47:38 PreemptTime=2026-12-06T02:50:01"\nexit 0\n')
    monkeypatch.setenv("SLURM_TIME_FORMAT", "relative")
    assert SlurmJob({"SLURM_JOB_ID": "9"}).is_timeout(lead_s=60) is False
    # a PreemptTime of before this start (Slurm clears it as it requeues; not trusted to), none, or in a format
    # that is not ISO (asked with SLURM_TIME_FORMAT=standard; a stand-in that ignores it): the time left
    for preempt in ("2026-12-06T02:40:00", "None", "Yest 23:00"):
        fake_slurm(tmp_path, monkeypatch, squeue=squeue_left,
                   scontrol=f"JobId=9 JobState=RUNNING StartTime=2026-12-06T02:47:38 PreemptTime={preempt}")
        assert SlurmJob({"SLURM_JOB_ID": "9"}).is_timeout(lead_s=60) is expected


def test_an_array_tasks_time_left_is_its_own(tmp_path, monkeypatch):
    """A task whose raw job id is the array's id: squeue -j <that id> lists every queued task of the
    array, one line each (a real sweep's task crashed on '00\n59'). The task's own id is asked."""
    calls = fake_slurm(tmp_path, monkeypatch, squeue="29:00", scontrol="JobId=5 PreemptTime=None")
    task = {"SLURM_JOB_ID": "5", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "1"}
    assert SlurmJob(task).is_timeout(lead_s=60) is False
    assert calls.read_text().splitlines() == ["scontrol show job 5_1", "squeue -h -j 5_1 -o %L"]
    fake_slurm(tmp_path, monkeypatch, squeue="29:00\n0:59")  # more than one line anyway: not a crash
    assert SlurmJob(task).is_timeout(lead_s=60) is True


def test_stop_kind_agreed_across_ranks(tmp_path, monkeypatch):
    fake_slurm(tmp_path, monkeypatch, squeue="29:00", scontrol=None)
    slurm = SlurmJob({"SLURM_JOB_ID": "9"})
    assert classify_stop(Poll(warning=True), slurm, 60) == "preempted"
    # SIGTERM on any rank (scancel) wins over a warning seen elsewhere: checkpoint and exit, no requeue
    assert classify_stop(Poll(warning=True, terminate=True), slurm, 60) == "interrupted"
    assert classify_stop(Poll(warning=True), SlurmJob({}), 60) == "interrupted"  # not in Slurm
    fake_slurm(tmp_path, monkeypatch, squeue="0:50", scontrol=None)
    assert classify_stop(Poll(warning=True), slurm, 60) == "timeout"


@pytest.mark.parametrize("show,sig,kind", [
    ("JobState=COMPLETING Reason=TimeLimit BatchFlag=1", signal.SIGTERM, "timeout"),  # as the dev cluster shows it
    ("JobState=CANCELLED Reason=None BatchFlag=1", signal.SIGTERM, "interrupted"),    # scancel
    ("JobState=COMPLETING Reason=TimeLimit BatchFlag=0", signal.SIGTERM, "interrupted"),  # salloc: no requeue
    ("JobState=COMPLETING Reason=TimeLimit BatchFlag=1", signal.SIGINT, "interrupted"),  # a user's Ctrl-C
    (None, signal.SIGTERM, "interrupted"),                                           # scontrol did not answer
    # a preemption's grace time over may read TimeLimit: Slurm requeues a preempted job itself, uncounted
    ("JobState=COMPLETING Reason=TimeLimit BatchFlag=1 PreemptTime=2026-12-07T06:15:30 StartTime=2026-12-07T06:14:59",
     signal.SIGTERM, "interrupted")])
def test_sigterm_at_the_time_limit_of_a_batch_job_is_its_lost_warning(tmp_path, monkeypatch, caplog, show, sig, kind):
    """A warning sent while cluster.setup ran (Slurm may send it a minute early, to steps only) reached nothing: the
    job ended TIMEOUT at the limit's SIGTERM, with its checkpoint, not requeued."""
    fake_slurm(tmp_path, monkeypatch, squeue="INVALID", scontrol=None if show is None else f"JobId=9 {show}")
    with caplog.at_level(logging.WARNING, logger="allconv_hpc"):
        assert classify_stop(Poll(terminate=True, signum=sig, rank=1), SlurmJob({"SLURM_JOB_ID": "9"}), 60) == kind
    assert ("SIGTERM as Slurm ends job 9 at its time limit" in caplog.text) is (kind == "timeout"), caplog.text


@pytest.mark.parametrize("flag,kind", [("0", "interrupted"), ("1", "preempted")])
def test_a_warning_in_an_interactive_allocation_stops_the_run_without_a_requeue(tmp_path, monkeypatch, caplog, flag,
                                                                               kind):
    """`train` started by hand in an salloc: Slurm requeues batch jobs only, so the warning is no requeue (it asked
    for one, and said Slurm did not answer); a batch script running train itself is requeued, its script again."""
    calls = fake_slurm(tmp_path, monkeypatch, squeue="29:00",
                       scontrol=f"JobId=9 JobState=RUNNING Reason=None Requeue=1 Restarts=0 BatchFlag={flag}")
    with caplog.at_level(logging.WARNING, logger="allconv_hpc"):
        assert classify_stop(Poll(warning=True), SlurmJob({"SLURM_JOB_ID": "9"}), 60) == kind
    said = "job 9 is an interactive allocation (salloc, or srun without sbatch): Slurm requeues batch jobs only"
    assert (said in caplog.text) is (flag == "0"), caplog.text
    assert not any("requeue" in c for c in calls.read_text().splitlines())  # classified only: nothing asked yet


def test_the_poll_names_a_signal_with_the_rank_that_got_it():
    """Four ranks' poll reduced by an element-wise max (what gloo's all-reduce does): the signal named stays paired
    with its rank, and a terminating signal is named before a warning (the stop is then an interruption)."""
    import signal as sig
    from allconv_hpc.poll import StepPoll

    class Ranks:  # the all-reduce of every rank's numbers, in this process
        def __init__(self, others):
            self.others = others

        def max_ints_start(self, values):
            return [max(v) for v in zip(values, *self.others)]

        def max_ints_finish(self, pending):
            return pending

    class Got:  # a rank's StopRequest
        def __init__(self, received):  # warnings: USR1, USR2 and the configured one, here XCPU
            self.received, self.requested = received, received is not None
            self.is_warning = received in (sig.SIGUSR1, sig.SIGUSR2, sig.SIGXCPU)

    def agreed(got: dict, write_failed: bool = False) -> Poll:
        others = []
        for rank in (1, 2, 3):
            p = StepPoll(Ranks([]), rank, None)
            p.poll(Got(got.get(rank)))
            others.append(p._pending)
        rank0 = StepPoll(Ranks(others), 0, None)
        assert rank0.poll(Got(got.get(0)), write_failed) == Poll()  # nothing sent before: nothing agreed yet
        return rank0.poll(Got(got.get(0)))  # lagged: the first poll's answer comes with the second

    a = agreed({1: sig.SIGTERM, 3: sig.SIGUSR2})
    assert (a.terminate, a.warning, a.said()) == (True, True, "SIGTERM on rank 1"), a
    a = agreed({1: sig.SIGTERM, 2: sig.SIGXCPU})  # XCPU (24) configured as the warning: TERM (15) is named
    assert a.said() == "SIGTERM on rank 1", a
    a = agreed({2: sig.SIGUSR2, 3: sig.SIGUSR2})
    assert (a.terminate, a.said()) == (False, "SIGUSR2 on rank 3"), a
    assert agreed({}) == Poll() and Poll().said() == "a signal"
    a = agreed({}, write_failed=True)  # rank 0's checkpoint writer failed: every rank stops, no signal said
    assert (a.write_failed, a.stop, a.signum) == (True, False, 0), a


def test_a_warning_after_training_cannot_kill_the_process_at_exit():
    """Python resets its signal handlers to the default while shutting down; a time-limit warning in
    that window killed a finished job (Slurm: FAILED). After ignore_late_signals it is harmless."""
    code = ("import os, signal, sys, time; from allconv_hpc.preempt import StopRequest, ignore_late_signals\n"
            "signal.signal(signal.SIGUSR2, signal.SIG_DFL)\n"  # not an ignore inherited from the test process
            "with StopRequest('USR2'): pass\n"
            "if sys.argv[1] == 'ignore': ignore_late_signals('USR2')\n"
            "import atexit; atexit.register(lambda: os.kill(os.getpid(), signal.SIGUSR2) or time.sleep(0.2))\n")
    import subprocess
    import sys
    killed = subprocess.run([sys.executable, "-c", code, "keep"])
    # the control: the default disposition (what Python restores during shutdown) lets it kill
    assert killed.returncode == -signal.SIGUSR2
    assert subprocess.run([sys.executable, "-c", code, "ignore"]).returncode == 0


def test_snapshot_is_a_copy_that_training_cannot_change():
    from allconv_hpc.checkpoint import snapshot
    w = torch.zeros(3)
    state = {"model": {"w": w}, "opt": [(w, 1.5)], "name": "x", "n": None}
    snap = snapshot(state)
    w.add_(1)  # the next optimizer step, in place, while the snapshot is being written
    assert snap["model"]["w"].tolist() == [0, 0, 0] and snap["opt"][0][0].tolist() == [0, 0, 0]
    assert isinstance(snap["opt"][0], tuple) and snap["opt"][0][1] == 1.5 and snap["name"] == "x" and snap["n"] is None
    sd = torch.nn.BatchNorm1d(2).state_dict()  # an OrderedDict carrying module versions in _metadata
    snap = snapshot({"model": sd, "point": torch.return_types.max((torch.ones(1), torch.zeros(1)))})
    assert type(snap["model"]) is type(sd) and snap["model"]._metadata == sd._metadata
    assert snap["model"]._metadata is not sd._metadata and snap["point"].values.tolist() == [1.0]
    torch.nn.BatchNorm1d(2).load_state_dict(snap["model"])


def test_writer_keeps_order_bounds_pending_and_wait_makes_it_durable(tmp_path):
    import threading
    from allconv_hpc.checkpoint import CheckpointDir, Writer, load_file
    gate, done = threading.Event(), []

    def slow(step):
        gate.wait(10)
        done.append(step)

    w = Writer(depth=2)
    w.submit("a", slow, 1)
    w.submit("b", slow, 2)
    third = threading.Thread(target=w.submit, args=("c", slow, 3))
    third.start()
    third.join(0.3)
    assert third.is_alive() and done == []  # two pending: the third waits instead of piling up snapshots
    gate.set()
    third.join(10)
    w.wait()
    assert done == [1, 2, 3]
    d = CheckpointDir(tmp_path, keep=2)
    for step in (4, 5, 6):
        w.submit(f"step {step}", d.save, {"step": torch.tensor(step)}, step)
    w.wait()  # after wait() the files are there, last.pt is the newest, pruning ran in order
    assert [p.name for p in d.step_files()] == ["step_00000006.pt", "step_00000005.pt"]
    assert int(load_file(tmp_path / "last.pt")["step"]) == 6
    w.close()


def test_streamed_file_is_torch_save_plus_trailer_and_a_failed_stream_leaves_the_old_file(tmp_path, monkeypatch):
    import errno
    import hashlib
    import io
    from allconv_hpc import checkpoint
    from allconv_hpc.checkpoint import MAGIC, load_file, write_file
    state = {"model": {"w": torch.arange(300_000, dtype=torch.float32)}, "step": 7}
    path = tmp_path / "step.pt"
    write_file(path, state)
    ref = io.BytesIO()
    torch.save(state, ref)
    body = ref.getvalue()  # the same bytes an in-memory save gives, then the trailer over them
    assert path.read_bytes() == body + MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n"
    assert torch.equal(load_file(path)["model"]["w"], state["model"]["w"])
    before, written = path.read_bytes(), []

    class FillsUp:  # the temp file, on a disk that is full after 500 kB
        def __init__(self, f):
            self.f = f

        def write(self, b):
            if sum(written) > 500_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(len(b))
            return self.f.write(b)
    real_init = checkpoint._Hashing.__init__
    monkeypatch.setattr(checkpoint._Hashing, "__init__", lambda self, f: real_init(self, FillsUp(f)))
    # the disk's own error comes out (torch would turn it into "unexpected pos"), part-way through
    with pytest.raises(OSError, match="No space left"):
        write_file(path, {"model": {"w": torch.ones(300_000)}, "step": 8})
    assert sum(written) > 500_000
    assert path.read_bytes() == before and list(tmp_path.glob(".*.tmp")) == []


def test_writer_reports_a_failed_write_and_makes_none_after_it(tmp_path):
    """The writes queued after a failed one are not made: the files on disk stay one moment of the run (a later
    epoch's history row landed after a failed one's: a gap in history.csv; found by a checkpoint review)."""
    from allconv_hpc.checkpoint import CheckpointDir, CheckpointError, Writer
    d = CheckpointDir(tmp_path, keep=5)
    (tmp_path / "step_00000002.pt").mkdir()  # the rename onto it fails, as a full or broken disk would
    w = Writer(depth=3)
    for step in (1, 2, 3):
        w.submit(f"checkpoint step {step}", d.save, {"step": torch.tensor(step)}, step)
    deadline = time.monotonic() + 30
    while not w.failing():  # told without waiting (the step poll asks each step), not yet raised
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not w.failed
    with pytest.raises(CheckpointError, match=r"writing checkpoint step 2 failed: IsADirectoryError.*any "
                                              r"checkpoint already on disk is kept, and the writes queued after it "
                                              r"were not made \(checkpoint step 3\)"):
        w.wait()
    assert w.failed and not w.failing()
    assert (tmp_path / "step_00000001.pt").is_file() and not (tmp_path / "step_00000003.pt").exists()
    w.submit("checkpoint step 4", d.save, {"step": torch.tensor(4)}, 4)  # nothing more, and said once
    w.wait()
    w.close()
    assert not (tmp_path / "step_00000004.pt").exists()


def test_a_ctrl_c_inside_wait_does_not_lose_a_failed_write():
    import threading
    from allconv_hpc.checkpoint import CheckpointError, Writer
    w, gate = Writer(), threading.Event()

    def slow_failing_write():
        gate.wait(10)
        raise OSError("disk gone")
    w.submit("checkpoint step 1", slow_failing_write)
    # Ctrl-C while wait() blocks, sent to the main thread: os.kill lets the kernel pick any thread, and a
    # SIGINT landing on the writer or timer thread does not wake the main thread's lock wait (a CI flake)
    timer = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # an earlier in-process test may leave its own
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            w.wait()
        timer.join()
    finally:
        signal.signal(signal.SIGINT, old)
    gate.set()
    # the write was still pending when Ctrl-C came: its failure is reported by the next wait/close
    with pytest.raises(CheckpointError, match="writing checkpoint step 1 failed: OSError: disk gone"):
        w.close()


def test_precision_auto_is_bf16_only_on_a_gpu_with_native_bf16(monkeypatch):
    from allconv_hpc.scoring import resolve_precision
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [resolve_precision(p, cpu) for p in ("auto", "fp32")] == ["fp32", "fp32"]
    assert [resolve_precision(p, gpu) for p in ("fp16", "fp32", "bf16")] == ["fp16", "fp32", "bf16"]
    # the device query is CUDA's; here it is answered for an Ampere+ GPU and for a V100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_precision("auto", gpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert resolve_precision("auto", gpu) == "fp32"  # emulated bf16 is slower than fp32: not chosen


def test_a_skipped_corrupt_checkpoint_leaves_the_rotation_and_an_unreadable_one_stops(tmp_path, caplog):
    from allconv_hpc.checkpoint import CheckpointDir, CheckpointError
    d = CheckpointDir(tmp_path, keep=2)
    for step in (100, 200):
        d.save({"step": torch.tensor(step)}, step)
    bad = tmp_path / "step_00000200.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))  # also last.pt: the same inode
    assert d.load_latest()[1].name == "step_00000100.pt" and bad.exists()  # a look only (submit's check)
    (tmp_path / "step_00000200.pt.corrupt").write_bytes(b"quarantined before")  # kept, not overwritten
    state, path = d.load_latest(quarantine=True)  # the trainer resuming
    assert path.name == "step_00000100.pt" and int(state["step"]) == 100
    assert not bad.exists() and (tmp_path / "step_00000200.pt.corrupt.1").read_bytes() == bytes(data)
    assert (tmp_path / "step_00000200.pt.corrupt").read_bytes() == b"quarantined before"
    # last.pt named the damaged data: now the file resumed from (evaluate --checkpoint last before the next save)
    assert os.path.samefile(tmp_path / "last.pt", path)
    d.save({"step": torch.tensor(150)}, 150)  # the resumed run: the good step 100 keeps its keep slot
    assert [p.name for p in d.step_files()] == ["step_00000150.pt", "step_00000100.pt"]
    assert int(d.load_latest()[0]["step"]) == 150
    # a file that cannot be read (I/O error, here a folder in its place) may be fine: no silent fallback
    (tmp_path / "step_00000300.pt").mkdir()
    with pytest.raises(CheckpointError, match=r"cannot read .*step_00000300.pt: .*fix the file system problem"):
        d.load_latest(quarantine=True)


def test_a_copied_last_pt_is_taken_before_older_step_files_when_the_newest_is_damaged(tmp_path):
    """A run folder copied without hard links (cp -r, rsync without -H): last.pt is a file of its own, holding the
    newest save; a damaged newest step file must not send the resume back to an older one."""
    from allconv_hpc.checkpoint import CheckpointDir
    d = CheckpointDir(tmp_path, keep=2)
    for step in (100, 200):
        d.save({"step": torch.tensor(step)}, step)
    last = tmp_path / "last.pt"
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(data)  # a copy now, not a link
    newest = tmp_path / "step_00000200.pt"
    newest.write_bytes(data[: len(data) // 2])  # truncated
    state, path = d.load_latest(quarantine=True)
    assert (path.name, int(state["step"])) == ("last.pt", 200)
    assert (tmp_path / "step_00000200.pt.corrupt").exists() and (tmp_path / "step_00000100.pt").exists()


def test_a_file_system_without_hard_links_gets_last_pt_as_a_copy(tmp_path, monkeypatch, caplog):
    """Some FUSE, SMB and object-store mounts refuse link(2) (EPERM, EOPNOTSUPP): every save failed there, and the
    run stopped at its first checkpoint. Stand-in: os.link failing as such a mount's does (none can be mounted here)."""
    import errno
    from allconv_hpc import checkpoint
    d = checkpoint.CheckpointDir(tmp_path, keep=2)

    def refused(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(checkpoint.os, "link", refused)
    with caplog.at_level(logging.WARNING, logger="allconv_hpc.checkpoint"):
        for step in (100, 200, 300):
            d.save({"step": torch.tensor(step)}, step)
    last = tmp_path / "last.pt"
    assert last.read_bytes() == (tmp_path / "step_00000300.pt").read_bytes()
    assert not os.path.samefile(last, tmp_path / "step_00000300.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step_00000200.pt", "step_00000300.pt"]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "has no hard links (Operation not permitted): last.pt is written as a copy" in said[0]
    assert int(d.load_latest()[0]["step"]) == 300

    def full(src, dst):  # not a missing feature: the save fails, as before
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.os, "link", full)
    with pytest.raises(OSError, match="No space left"):
        d.save({"step": torch.tensor(400)}, 400)


def test_an_intact_checkpoint_that_torch_refuses_stops_the_run_instead_of_falling_back(tmp_path):
    """Its checksum holds, so the bytes are the ones written and the progress since the older file is in it:
    another torch (or a type weights_only refuses) is no corruption; nothing is renamed aside."""
    import datetime
    from allconv_hpc.checkpoint import CheckpointDir, UnloadableCheckpoint
    d = CheckpointDir(tmp_path, keep=2)
    d.save({"step": torch.tensor(100)}, 100)
    d.save({"step": torch.tensor(200), "when": datetime.date(2026, 12, 3)}, 200)
    with pytest.raises(UnloadableCheckpoint, match=r"step_00000200.pt is intact \(its checksum holds\) but torch "
                                                   r"\S+ cannot load it .*checkpoint.resume=never"):
        d.load_latest(quarantine=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step_00000100.pt", "step_00000200.pt"]


@pytest.mark.parametrize("source,in_slurm", [("local", False), ("single", True)])
def test_a_local_job_on_a_slurm_node_never_acts_on_the_slurm_job(tmp_path, monkeypatch, source, in_slurm):
    """cluster=local started inside a Slurm allocation inherits SLURM_JOB_ID: its stop must not query or
    requeue the user's allocation (it stops as interrupted, like any local job)."""
    from allconv_hpc.compose import compose
    from allconv_hpc.distributed import DistEnv
    from allconv_hpc.trainer import Trainer
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    c = compose(["data=synthetic", "data.train_size=64", "data.test_size=32", "model.width=0.125",
                 "wandb.mode=disabled", "trainer.threads=1", f"hydra.run.dir={tmp_path / 'run'}"])
    tr = Trainer(c.cfg, c.cfg_dict, c.run_dir, DistEnv(source=source)).setup()
    try:
        assert tr.slurm.in_slurm is in_slurm
    finally:
        tr.close()


def test_collective_failures_are_recognised_by_their_text():
    """DDP's all-reduce in backward raises plain RuntimeErrors; these texts mean a peer, not a bug here
    (the gloo one is what a SIGSTOPped peer gave in CI, and went unnamed)."""
    from allconv_hpc.distributed import is_comm_error
    for text in ("Application timeout caused pair closure", "[../gloo/transport/tcp/pair.cc:534] Connection closed "
                 "by peer", "NCCL error in: ...", "Socket Timeout", "operation timed out"):
        assert is_comm_error(text), text
    assert not is_comm_error("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")


def test_more_torchrun_ranks_than_gpus_are_refused_before_nccl_fails_them(monkeypatch):
    """NCCL refuses two ranks on one GPU, and the package would report it as a failed rendezvous: said first, with
    the ways out. gloo shares a GPU fine; under Slurm each task may see only its own GPU (one in view, legal)."""
    from allconv_hpc.config import Config, ConfigError
    from allconv_hpc.launch_checks import check_launch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    two = detect_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": "1"})
    with pytest.raises(ConfigError, match=r"2 ranks on this node but 1 GPU\(s\) visible: NCCL takes one rank per GPU; "
                                          r"start at most 1 \(torchrun --nproc_per_node=1\), or .*dist.backend=gloo"):
        check_launch(Config(), two)
    cfg = Config()
    cfg.dist.backend = "gloo"
    check_launch(cfg, two)
    slurm = detect_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "5",
                        "SLURM_STEP_NODELIST": "n1", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURMD_NODENAME": "n1"})
    assert slurm.source == "slurm" and slurm.local_world_size == 2
    check_launch(Config(), slurm)


def test_compile_with_a_rank_left_no_image_at_the_last_step_is_refused_before_the_queue():
    """2 ranks, 129 images, batches of 64: the last step's one image leaves rank 1 none; the compiled backward
    failed on it (an AssertionError in convolution_backward, after the data load; found by a code review)."""
    from allconv_hpc import resources
    from allconv_hpc.config import ConfigError, TrainerConfig, empty_last_shard
    from allconv_hpc.compose import compose
    t = TrainerConfig(batch_size=64, compile=True)
    assert "holds 1 of the 129 training images, fewer than the 2 ranks" in empty_last_shard(t, 129, 2)
    for n, world in ((128, 2), (130, 2), (129, 1)):  # none over, one per rank, one rank
        assert empty_last_shard(t, n, world) is None
    assert "holds 3 of the 195 training images, fewer than the 4 ranks" in empty_last_shard(t, 195, 4)
    assert empty_last_shard(TrainerConfig(batch_size=64, compile=True, drop_last=True), 129, 2) is None
    assert empty_last_shard(TrainerConfig(batch_size=64), 129, 2) is None  # eager DDP takes an empty batch
    c = compose(["cluster=slurm", "data=synthetic", "data.train_size=129", "trainer.batch_size=64",
                 "trainer.compile=true", "cluster.tasks_per_node=2"])
    with pytest.raises(ConfigError, match="fewer than the 2 ranks, and the compiled backward fails"):
        resources.validate_cluster(c.cluster, c.cfg)


def test_launch_checks_refuse_cuda_and_nccl_where_there_is_no_gpu():
    """Before any file is written (exit 2), not from inside the trainer (exit 1, a run folder made)."""
    from allconv_hpc.config import Config, ConfigError
    from allconv_hpc.launch_checks import check_launch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: there is nothing to refuse")
    two = detect_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    cfg = Config()
    cfg.trainer.device = "cuda"
    with pytest.raises(ConfigError, match="trainer.device=cuda but no CUDA device is visible here"):
        check_launch(cfg, two)
    cfg = Config()
    cfg.dist.backend = "nccl"
    with pytest.raises(ConfigError, match="dist.backend=nccl needs CUDA and none is used here"):
        check_launch(cfg, two)
    with pytest.raises(ConfigError, match="dist.backend=nccl needs CUDA"):  # one process: as submit refuses it
        check_launch(cfg, detect_env({}))
    cfg.dist.backend = "auto"
    check_launch(cfg, detect_env({}))


def test_more_threads_than_cpus_is_warned_about(caplog):
    from allconv_hpc.distributed import DistEnv, set_threads
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        with caplog.at_level("WARNING"):
            assert set_threads(cores, detect_env({})) == cores
            assert not caplog.records
            set_threads(cores + 1, detect_env({}))
        assert f"trainer.threads={cores + 1} x 1 rank(s) here is more than the {cores} CPU(s)" in caplog.text
        assert f"use trainer.threads<={cores} or null" in caplog.text
        caplog.clear()  # ranks past the CPUs at 1 thread each: fewer ranks is the fix (it said threads<=1 or null,
        with caplog.at_level("WARNING"):  # which changes nothing; a laptop journey audit)
            set_threads(1, DistEnv(world_size=cores + 1, local_world_size=cores + 1, source="torchrun"))
        assert f"steps will be slow; more ranks than CPUs: start at most {cores} here" in caplog.text, caplog.text
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("accs, rewritten", [([0.3, 0.5], True), ([0.5, 0.4, 0.5], False), ([0.2, 0.5, 0.5], False)])
def test_a_missing_best_pt_is_rewritten_only_from_the_first_epoch_that_reached_the_best(tmp_path, accs, rewritten):
    """best.pt holds the first epoch reaching the best val_acc (a tie does not replace it): a checkpoint
    whose last epoch only ties it does not hold those weights, so best.pt is not written from it."""
    from allconv_hpc.checkpoint import CheckpointDir, load_file
    from allconv_hpc.resume import best_file_holds
    st = TrainState(epoch=len(accs), global_step=5 * len(accs), best_val_acc=max(accs),
                    history=[{"epoch": e + 1, "val_acc": a} for e, a in enumerate(accs)])
    weights = {"w": torch.ones(2)}
    held = best_file_holds(st, CheckpointDir(tmp_path, keep=2), {"model": weights}, {})
    assert (tmp_path / "best.pt").exists() == rewritten
    assert held == (max(accs) if rewritten else -1.0)  # -1: the next better epoch writes it
    if rewritten:
        assert load_file(tmp_path / "best.pt")["epoch"] == len(accs)


@pytest.mark.parametrize("step, says", [
    # at the end of 2 epochs of 10 steps: cosine's last step of 20, then step 20 of 40 (halfway: lr / 2)
    (20, f"the lr jumps from {0.1 * 0.5 * (1 + math.cos(math.pi * 19 / 20)):.4g} (its last step) to 0.05 and follows "
         f"the new curve"),
    (0, "the lr (0.1 now) follows the new curve")])  # the curves agree here: no "jump" between equal values
def test_a_grown_cosine_run_says_where_its_lr_goes(caplog, step, says):
    from allconv_hpc.compose import compose
    from allconv_hpc.resume import warn_reshaped_schedule
    cfg = compose(["data=synthetic", "schedule=cosine", "schedule.warmup_epochs=0", "schedule.final_lr_ratio=0",
                   "optim.lr=0.1", "trainer.epochs=4"]).cfg
    with caplog.at_level("WARNING"):
        warn_reshaped_schedule(cfg, TrainState(global_step=step), 10, {"config": {"trainer": {"epochs": 2}}})
        assert f"trainer.epochs=4 but the checkpoint's run was planned for 2: the cosine schedule is stretched to " \
               f"the new length, so {says} (not what a run planned for 4 epochs" in caplog.text
        caplog.clear()
        warn_reshaped_schedule(cfg, TrainState(global_step=step), 10, {"config": {"trainer": {"epochs": 4}}})
        assert not caplog.text  # the run's own length: nothing to say


def test_a_damaged_recorded_config_is_said_where_it_is_all_there_is_to_compare(tmp_path, caplog):
    """No checkpoint: the run's .hydra/config.yaml is what tells its config. Unreadable, it was passed over without
    a word, and a run of another config went on in the folder."""
    from allconv_hpc.checkpoint import check_resume
    from allconv_hpc.compose import compose
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("model: [unclosed\n")
    with caplog.at_level("WARNING"):
        assert check_resume(run, compose(["data=synthetic"]).cfg) is None
    assert f"{run / '.hydra' / 'config.yaml'} does not read as a config (" in caplog.text
    assert "cannot be compared with this config" in caplog.text


def test_an_empty_recorded_config_is_no_config_and_the_hydra_files_are_replaced_whole(tmp_path, caplog):
    """A full disk at a run's first start left .hydra/config.yaml empty (written in place), and the next start read
    it as the defaults' config: "a run of a different config", with a fix that was refused too (laptop journey
    audit). The files are now replaced whole: a write refused by the kernel (here a real file size limit, EFBIG as
    ENOSPC would be) leaves the earlier file as it was and names the file, which train says in one line."""
    import textwrap
    from allconv_hpc.checkpoint import check_resume
    from allconv_hpc.compose import compose
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("")
    with caplog.at_level("WARNING"):
        assert check_resume(run, compose(["data=synthetic", "model.width=0.25"]).cfg) is None  # not refused
    assert "does not read as a config (it is empty: a write cut short, by a full disk?)" in caplog.text, caplog.text
    (run / ".hydra" / "config.yaml").write_text("kept: true\n")
    script = textwrap.dedent(f"""
        import resource, signal
        from allconv_hpc.compose import compose, write_hydra_files
        c = compose(["data=synthetic", "hydra.run.dir={run}"])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG), the process lives
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
        try:
            write_hydra_files(c)
        except OSError as e:
            print(e.errno, e.filename)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    errno_, name = r.stdout.split()
    assert int(errno_) == errno.EFBIG and Path(name).parent == run / ".hydra", r.stdout
    assert (run / ".hydra" / "config.yaml").read_text() == "kept: true\n"  # the earlier record, whole
    assert not [p.name for p in (run / ".hydra").iterdir() if p.name not in ("config.yaml",)], \
        list((run / ".hydra").iterdir())  # no temp file, no empty file left


# --------------------------------------------------------------- run lock

def _as_if_from(run_dir: Path, host: str, restart: str) -> None:
    """Rewrite the holder's record as a process of another node would have written it (the flock stays held)."""
    import json
    path = run_dir / ".train.lock"
    path.write_text(json.dumps({**json.loads(path.read_text()), "host": host, "slurm_restart": restart}))


def test_a_requeued_job_waits_out_its_dead_runs_lock_then_names_the_way_out(tmp_path, monkeypatch):
    """After a node failure the requeued job finds the lock its earlier run took (an NFS server keeps it until
    the lease ends, or for NFSv3 until the node returns): it waits STALE_WAIT_S, then says to delete it."""
    from allconv_hpc import runlock
    run = tmp_path / "run"
    holder = hold_lock(run, "77", 60)
    try:
        monkeypatch.setattr(runlock, "STALE_WAIT_S", 1.5)
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        # on this host the kernel would have dropped a dead process's lock: a live train of the same
        # allocation (its job id, too), refused at once
        with pytest.raises(runlock.RunBusy, match=r"Slurm job 77, since .*; wait for it to end"):
            runlock.check_free(run)
        _as_if_from(run, "node-dead", "1")  # another node, but this same start of the job: live as well
        with pytest.raises(runlock.RunBusy, match=r"on node-dead, Slurm job 77, since .*; wait for it to end"):
            runlock.check_free(run)
        _as_if_from(run, "node-dead", "0")  # another node, an earlier start: the dead node's lock
        monkeypatch.setenv("SLURM_JOB_ID", "78")  # ...but another job's (a resubmission): refused at once, the
        with pytest.raises(runlock.RunBusy, match=rf"wait for it to end.*; if node-dead is down \(a node failure\), "
                           rf"delete {run / '.train.lock'}$"):  # usual ways out, and the one for a dead node
            runlock.check_free(run)
        monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued: the preflight lets acquire wait
        runlock.check_free(run)
        t0 = time.monotonic()
        with pytest.raises(runlock.RunBusy, match=rf"on node-dead, Slurm job 77, .*this job's own earlier run, whose "
                           rf"node still holds the lock.*if node-dead is down \(a node failure\), delete "
                           rf"{run / '.train.lock'} and submit again"):
            runlock.acquire(run, wait_s=0)
        assert time.monotonic() - t0 >= 1.5
    finally:
        holder.kill()
        holder.wait()
    holder = hold_lock(run, "77", 1.5)  # a lock that is freed while the requeued job waits: taken
    try:
        _as_if_from(run, "node-dead", "0")
        monkeypatch.setattr(runlock, "STALE_WAIT_S", 30)
        fd = runlock.acquire(run, wait_s=0)
        assert fd is not None and runlock.holder(run)[0] is True
        os.close(fd)
    finally:
        holder.kill()
        holder.wait()


def test_the_run_lock_names_this_process_and_keeps_no_fd_when_it_cannot_record_its_holder(tmp_path):
    from allconv_hpc import runlock
    run = tmp_path / "run"
    fd = runlock.acquire(run)
    with pytest.raises(runlock.RunBusy, match=rf"by this process, pid {os.getpid()} on "):
        runlock.acquire(run, wait_s=0)
    os.close(fd)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / ".train.lock").symlink_to("/dev/full")  # takes the flock, refuses the holder record
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as e:
        runlock.acquire(odd)
    assert e.value.filename == str(odd / ".train.lock") and len(os.listdir("/proc/self/fd")) == before


def test_the_other_ranks_of_a_launch_know_their_rank_0s_lock(tmp_path, monkeypatch):
    """Rank 0 takes the lock before the rendezvous, the other ranks check the folder then: the lock of their
    own launch (same MASTER_ADDR:MASTER_PORT, one launch per port at a time) is no second writer."""
    from allconv_hpc import runlock
    run = tmp_path / "run"
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    holder = hold_lock(run, "", 60, group="10.0.0.1:12345")
    try:
        runlock.check_free(run, group="10.0.0.1:12345")
        for other in ("10.0.0.1:12346", None):
            with pytest.raises(runlock.RunBusy, match=rf"by pid {holder.pid} on "):
                runlock.check_free(run, group=other)
    finally:
        holder.kill()
        holder.wait()


def test_a_rank_looking_while_its_rank_0_writes_the_lock_record_waits_for_it(tmp_path, monkeypatch):
    """Rank 0 takes the flock, then writes its record: a rank looking in between finds the lock held under an
    empty record, or the last run's, and must not refuse its own rank 0 (the job would fail at random)."""
    import json
    import threading
    from allconv_hpc import runlock
    run, group = tmp_path / "run", "10.0.0.1:12345"
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(runlock, "RECORD_WAIT_S", 1.0)
    holder = hold_lock(run, "", 60, group=group)
    try:
        path = run / ".train.lock"
        record = path.read_text()
        last_run = json.dumps({**json.loads(record), "group": "10.0.0.1:40000", "pid": 1})
        for between in ("", last_run):
            path.write_text(between)
            written = threading.Timer(0.4, path.write_text, [record])
            written.start()
            t0 = time.monotonic()
            runlock.check_free(run, group=group)
            assert time.monotonic() - t0 >= 0.3
            written.join()
        path.write_text(last_run)  # a holder of another launch stays refused, after the wait
        t0 = time.monotonic()
        with pytest.raises(runlock.RunBusy, match=r"by pid 1 on "):
            runlock.check_free(run, group=group)
        assert time.monotonic() - t0 >= 1.0
    finally:
        holder.kill()
        holder.wait()



def test_a_resume_keeps_this_devices_sgd_kernel_not_the_checkpoints(tmp_path):
    """Optimizer.load_state_dict takes the saved groups' fused/foreach flags: a checkpoint written on a GPU
    (fused SGD) resumed on a CPU, or the other way round, must run the kernel this device was built with
    (a CUDA resume of a CPU checkpoint would otherwise run foreach while fp16's GradScaler treats it as fused)."""
    from allconv_hpc.checkpoint import load_file, write_file
    from allconv_hpc.compose import compose
    from allconv_hpc.distributed import DistEnv
    from allconv_hpc.trainer import Trainer
    c = compose(["data=synthetic", "data.train_size=64", "data.test_size=32", "model.width=0.125",
                 "wandb.mode=disabled", "trainer.threads=1", f"hydra.run.dir={tmp_path / 'run'}"])
    tr = Trainer(c.cfg, c.cfg_dict, c.run_dir, DistEnv(source="single")).setup()
    try:
        built = [(g["fused"], g["foreach"]) for g in tr.opt.param_groups]
        tr.save()
        tr.wait_checkpoints()
    finally:
        tr.close()
    assert built == [(None, True)]  # CPU: foreach
    for path in (tmp_path / "run" / "checkpoints").glob("*.pt"):  # as a GPU run writes them
        ck = load_file(path)
        for g in ck["optimizer"]["param_groups"]:
            g["fused"], g["foreach"] = True, None
        write_file(path, ck)
    tr = Trainer(c.cfg, c.cfg_dict, c.run_dir, DistEnv(source="single")).setup()
    try:
        assert tr.state.global_step == 0 and tr._resume_sums is not None  # it did resume
        assert [(g["fused"], g["foreach"]) for g in tr.opt.param_groups] == built
    finally:
        tr.close()


def test_a_json_record_that_is_not_an_object_reads_as_empty(tmp_path):
    """A hand-edited status.json (`[]`, `3`) is as good as none to train and submit, which ask it .get(...)."""
    from allconv_hpc.fsio import read_json
    path = tmp_path / "status.json"
    for text, want in (("[]", {}), ("3", {}), ("{not json", {}), ('{"state": "completed"}', {"state": "completed"})):
        path.write_text(text)
        assert read_json(path) == want, text
    assert read_json(tmp_path / "missing.json") == {}


def test_init_dropout_order_and_augmentation_draw_different_numbers_and_older_runs_keep_their_order(tmp_path):
    """torch's CPU generator reads only the low 32 bits of a seed: the shuffle order's offset 2**40 made
    each epoch's order draw the numbers of its augmentation, rank r's dropout drew epoch r+1's, and seed=0's
    init epoch 0's. A new run's streams differ; a run begun before resumes with its old order."""
    from allconv_hpc import augment as aug
    from allconv_hpc.checkpoint import load_file, write_file
    from allconv_hpc.compose import compose
    from allconv_hpc.distributed import DistEnv
    from allconv_hpc.models import build_model
    from allconv_hpc.trainer import Trainer

    def draws(seed):
        return torch.rand(64, generator=torch.Generator().manual_seed(seed))

    c = compose(["data=synthetic", "data.train_size=64", "data.test_size=32", "model.width=0.125", "seed=0",
                 "wandb.mode=disabled", "trainer.threads=1", f"hydra.run.dir={tmp_path / 'run'}"])
    tr = Trainer(c.cfg, c.cfg_dict, c.run_dir, DistEnv(source="single")).setup()
    try:
        dropout = torch.rand(64)  # the global generator, as dropout on the CPU draws it
        first_conv = next(tr.model.parameters()).detach().cpu().clone()
        orders = [tr.batches.order(e) for e in range(3)]
        tr.save()
        tr.wait_checkpoints()
    finally:
        tr.close()
    augmentation = [draws(aug.mix_seed(0, e)) for e in range(8)]
    assert not any(torch.equal(dropout, a) for a in augmentation)
    assert torch.equal(dropout, draws(aug.mix_seed(0, aug.DROPOUT_STREAM)))
    for e, order in enumerate(orders):
        assert not torch.equal(order, torch.randperm(64, generator=torch.Generator().manual_seed(aug.mix_seed(0, e))))
    torch.manual_seed(0)  # epoch 0's augmentation seed
    assert not torch.equal(next(build_model(c.cfg.model).parameters()), first_conv)
    torch.manual_seed(aug.mix_seed(0, aug.INIT_STREAM))
    assert torch.equal(next(build_model(c.cfg.model).parameters()), first_conv)

    for path in (tmp_path / "run" / "checkpoints").glob("*.pt"):  # as a run begun before wrote them
        ck = load_file(path)
        assert ck["train_state"].pop("streams") == 2
        write_file(path, ck)
    tr = Trainer(c.cfg, c.cfg_dict, c.run_dir, DistEnv(source="single")).setup()
    try:
        assert tr._resume_sums is not None and tr.state.streams == 1
        old = [torch.randperm(64, generator=torch.Generator().manual_seed(0 * 1_000_003 + e + (1 << 40)))
               for e in range(3)]
        assert all(torch.equal(tr.batches.order(e), o) for e, o in enumerate(old))
    finally:
        tr.close()


def test_a_port_in_use_requeues_only_a_slurm_jobs_rank_0_a_bounded_number_of_times(monkeypatch, tmp_path):
    """Rank 0 of a Slurm job whose rendezvous port is held requeues the job (its restart gets another port),
    at most train.PORT_REQUEUES times for it; other ranks and other launches never touch Slurm. Restarts for
    other reasons (preemptions, time limits) do not count: a long job used to fail at its first clash."""
    from allconv_hpc import train
    from allconv_hpc.distributed import DistEnv
    from allconv_hpc.runlock import PORT_FILE
    asked = []
    monkeypatch.setattr(SlurmJob, "requeue", lambda self: asked.append(self.job_id) or True)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(train.PORT_REQUEUES + 5))  # requeued often, for other reasons
    rank0 = DistEnv(rank=0, world_size=2, source="slurm")
    assert not train._requeued_for_port(DistEnv(rank=1, world_size=2, source="slurm"), tmp_path)
    assert not train._requeued_for_port(DistEnv(rank=0, world_size=2, source="local"), tmp_path)
    assert asked == [] and not (tmp_path / PORT_FILE).exists()
    for n in range(1, train.PORT_REQUEUES + 1):
        assert train._requeued_for_port(rank0, tmp_path) and len(asked) == n
    assert json.loads((tmp_path / PORT_FILE).read_text()) == {"job": "77", "count": train.PORT_REQUEUES}
    assert not train._requeued_for_port(rank0, tmp_path) and len(asked) == train.PORT_REQUEUES
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # a new job (submitted again) has its own count
    assert train._requeued_for_port(rank0, tmp_path) and asked[-1] == "78"


def test_commands_in_messages_quote_the_paths_they_name(tmp_path):
    """A hint to copy into a shell names a folder with a space or quote as one word."""
    from allconv_hpc import runlock
    odd = tmp_path / "my runs" / "it's"
    said = str(runlock.RunBusy(odd, "pid 1"))
    command = said.split("(", 2)[-1].split(")")[0]
    assert shlex.split(command) == ["allconv-hpc", "status", str(odd)], said


def test_compile_report_counts_only_this_trainers_graphs(caplog):
    """Dynamo's and inductor's counters are process-wide: a second Trainer in one process (benchmarks,
    notebooks) reports its own graphs and CUDA-graph skips, not the sum since the process began."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from allconv_hpc.trainer import Trainer, _compile_counts
    counters["stats"]["unique_graphs"] += 3  # an earlier Trainer's compile
    counters["inductor"]["cudagraph_skips"] += 2
    me = SimpleNamespace(cfg=SimpleNamespace(trainer=SimpleNamespace(compile_mode="reduce-overhead")),
                         env=SimpleNamespace(is_main=True), _graphs=True, _compile_base=_compile_counts())
    with caplog.at_level(logging.INFO, logger="allconv_hpc"):
        Trainer._report_compile(me)  # nothing compiled since: a model left eager, said so
        assert "captured no graph" in caplog.text and "CUDA graphs" not in caplog.text, caplog.text
        caplog.clear()
        counters["stats"]["unique_graphs"] += 1
        counters["inductor"]["cudagraph_skips"] += 1
        Trainer._report_compile(me)
    assert "torch.compile: 1 graph(s) compiled (mode reduce-overhead)" in caplog.text, caplog.text
    assert "did not capture 1 graph(s) as CUDA graphs" in caplog.text, caplog.text


def test_an_epoch_whose_checkpoint_was_not_written_leaves_no_history_row_or_best_pt(tmp_path, monkeypatch):
    """history.csv's row and best.pt land after the epoch's step file: a run killed (or out of disk) before that
    file would otherwise leave epochs without a checkpoint, which its next start takes for an earlier run's
    and sets aside, starting over as a new W&B run."""
    import errno
    from allconv_hpc.checkpoint import CheckpointDir, CheckpointError
    from allconv_hpc.compose import compose
    from allconv_hpc.distributed import DistEnv
    from allconv_hpc.trainer import Trainer
    c = compose(["data=synthetic", "data.train_size=64", "data.test_size=32", "model.width=0.125", "trainer.epochs=1",
                 "trainer.batch_size=16", "wandb.mode=disabled", "trainer.threads=1", f"hydra.run.dir={tmp_path / 'run'}"])
    real_save = CheckpointDir.save

    def full_disk(self, state, step):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(CheckpointDir, "save", full_disk)
    tr = Trainer(c.cfg, c.cfg_dict, c.run_dir, DistEnv(source="single")).setup()
    try:
        with pytest.raises(CheckpointError, match="No space left"):
            tr.fit()
    finally:
        tr.close(1)
    run = tmp_path / "run"
    assert (run / "history.csv").read_text().count("\n") <= 1  # the header at most
    assert not (run / "checkpoints" / "best.pt").exists()
    monkeypatch.setattr(CheckpointDir, "save", real_save)  # space again: the same run starts, not a new one
    tr = Trainer(c.cfg, c.cfg_dict, c.run_dir, DistEnv(source="single")).setup()
    try:
        assert tr.fit() == 0
    finally:
        tr.close()
    assert not (run / "checkpoints.old1").exists() and (run / "history.csv").read_text().count("\n") == 2


def test_fp16_trains_with_the_fused_kernel_through_an_overflowed_first_step():
    """fp16's GradScaler skips a step whose scaled gradients overflowed (often the first). Fused SGD, given that
    step as its first, allocates its momentum buffers empty and returns without writing them: the next step added
    stale memory to the weights. So fp16 ran foreach, whose GradScaler path reads the overflow flag back to the
    host every step (a code review found that sync). make_sgd now gives fused SGD for fp16 on CUDA too, with zero
    momentum buffers: a skipped first step leaves them zero. Run here on the CPU, whose fused kernel behaves
    alike, through the same GradScaler path."""
    from allconv_hpc.config import Config
    from allconv_hpc.trainer import make_sgd
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for device, precision, fused in ((cuda, "fp16", True), (cuda, "bf16", True), (cuda, "fp32", True),
                                     (cpu, "fp32", None)):  # the flags only: CPU tensors
        g = make_sgd([torch.nn.Parameter(torch.ones(3))], Config(), device, precision).param_groups[0]
        assert (g["fused"], g["foreach"]) == (fused, None if fused else True), (device, precision)

    def three_steps(opt) -> torch.Tensor:
        """The weights after an overflowed step (skipped) and two plain ones."""
        p = opt.param_groups[0]["params"][0]
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        for grad in (float("inf"), 1.0, 0.5):
            opt.zero_grad()
            scaler.scale((p * torch.linspace(-1, 1, p.numel()) * grad).sum()).backward()
            scaler.step(opt)
            scaler.update()
        return p.detach()

    c = Config()

    def sgd(**kernel):  # the config's SGD, on a kernel of the test's choosing
        return torch.optim.SGD([torch.nn.Parameter(torch.ones(4096))], lr=c.lr, momentum=c.optim.momentum,
                               nesterov=c.optim.nesterov, weight_decay=c.optim.weight_decay, **kernel)

    chosen = make_sgd([torch.nn.Parameter(torch.ones(4096))], c, cuda, "fp16")
    assert c.optim.momentum and chosen._step_supports_amp_scaling  # GradScaler hands it the overflow flag: no read-back per step
    expected = three_steps(sgd(foreach=True))  # skips the step whole, as it always did
    assert (expected != 1).all() and torch.allclose(three_steps(chosen), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(three_steps(sgd(fused=True)), expected, rtol=0, atol=1e-3)  # fused, without zeros
    assert torch.equal(three_steps(make_sgd([torch.nn.Parameter(torch.ones(4096))], c, cpu, "fp32")),
                       expected)  # the CPU's foreach: the zeros change no bit


def test_a_slurm_command_failing_without_a_word_is_logged_with_its_exit_status(tmp_path, caplog):
    """`scontrol requeue` racing Slurm's own requeue can exit non-zero saying nothing: the warning said
    "scontrol requeue 995: " and no more."""
    from allconv_hpc.slurm import slurm_out
    with caplog.at_level("WARNING"):
        assert slurm_out(["sh", "-c", "exit 1"], warn=True) is None
    assert "sh -c exit 1: exit status 1, no message" in caplog.text, caplog.text


def test_rank_difference_names_the_first_key_and_lets_per_rank_keys_differ():
    """What train's ranks compare (Trainer._check_same_run): a key one side lacks differs too; a node's own data
    root, threads, progress display and W&B settings may differ; a key merely starting like one of those may not."""
    from allconv_hpc.config import rank_difference
    base = {"hydra.run.dir": "/r", "optim.lr": 0.1, "data.root": "/a", "trainer.threads": 4, "wandb.project": "p"}
    assert rank_difference([base, dict(base)]) is None
    assert rank_difference([base, {**base, "data.root": "/b", "trainer.threads": 8, "wandb.project": "q"}]) is None
    assert rank_difference([base, {**base, "optim.lr": 0.2}, base]) == "rank 1 has optim.lr=0.2 where rank 0 has 0.1"
    assert rank_difference([base, base, {k: v for k, v in base.items() if k != "optim.lr"}]) == (
        "rank 2 has optim.lr=None where rank 0 has 0.1")
    assert rank_difference([base, {**base, "data.root_extra": 1}]) == (
        "rank 1 has data.root_extra=1 where rank 0 has None")


def _swallowing_a_ctrl_c() -> bool:
    """What Triton's library start-up (the first `import torch._dynamo`) did to a Ctrl-C: its code runs Python and
    drops an exception raised there. True if a KeyboardInterrupt came and was dropped."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # Python takes the signal between two operations
            time.sleep(0.001)
    except BaseException:
        return True
    return False


def test_a_ctrl_c_in_code_that_swallows_it_is_taken_when_the_block_ends():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert _swallowing_a_ctrl_c()  # unguarded: lost, and start-up went on into training
        with pytest.raises(KeyboardInterrupt):
            with sigint_deferred():
                assert not _swallowing_a_ctrl_c()  # nothing raised inside: only recorded
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # nohup, a script's `cmd &`: ignored, and stays so
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_that_the_compose_drops_stops_a_submit_before_anything_is_queued(tmp_path, monkeypatch, capsys):
    """OmegaConf, inside Hydra's compose, dropped a KeyboardInterrupt raised in it (1 in 150 Ctrl-Cs at random
    moments of a compose), and `submit` went on to queue the jobs. Here the compose drops one as it did."""
    from allconv_hpc import compose as compose_mod
    from allconv_hpc.launcher import submit_main
    real = compose_mod._hydra_config

    def dropping(*a, **kw):
        out = real(*a, **kw)
        assert not _swallowing_a_ctrl_c()  # only recorded: nothing raised where OmegaConf would drop it
        return out

    monkeypatch.setattr(compose_mod, "_hydra_config", dropping)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = submit_main(["--dry-run", "cluster=local", "data=synthetic", "model.width=0.125",
                            f"hydra.run.dir={tmp_path / 'run'}"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    out, err = capsys.readouterr()
    assert code == 130, out + err
    assert "interrupted (Ctrl-C); nothing was queued" in err
    assert str(tmp_path / "run") not in out  # no plan printed: it stopped in the compose


@pytest.mark.parametrize("args,code", [(["status", "--json", "."], 2), (["status", "--help"], 0),
                                       (["submit", "--dry-run", "cluster=local", "data=synthetic", "model.width=0.125",
                                         "hydra.run.dir=run"], 0)])
def test_a_ctrl_c_as_a_command_exits_leaves_its_exit_status(tmp_path, args, code):
    """Python puts SIGINT's default action back as it shuts down: a Ctrl-C in a command's last moments killed it
    (130, without a word; 27 in 120 near the end of a `status`), also a `submit` that had queued its job and said so.
    Here the Ctrl-C comes as the process exits (an atexit hook: Python's own handler would raise there)."""
    import sys
    script = ("import atexit, os, signal, sys, time\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.3)))\n"
              f"sys.argv = ['allconv-hpc', *{args!r}]\n"
              "from allconv_hpc.cli import entry\n"
              "entry()\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={k: v for k, v in os.environ.items() if k != "ALLCONV_DATA"})
    assert r.returncode == code and "KeyboardInterrupt" not in r.stderr and "interrupted" not in r.stderr, (
        r.returncode, r.stderr[-2000:])


def test_the_epochs_last_step_is_checkpointed_once_after_its_evaluation(tmp_path, monkeypatch):
    """checkpoint.every_steps dividing the epoch's last step wrote that step twice: before the evaluation and,
    the same step again, after it (each a full snapshot, a finite check and an fsync)."""
    from allconv_hpc.checkpoint import CheckpointDir
    from allconv_hpc.compose import compose
    from allconv_hpc.distributed import DistEnv
    from allconv_hpc.trainer import Trainer
    c = compose(["data=synthetic", "data.train_size=64", "data.test_size=32", "model.width=0.125", "trainer.epochs=2",
                 "trainer.batch_size=16", "checkpoint.every_steps=2", "wandb.mode=disabled", "trainer.threads=1",
                 f"hydra.run.dir={tmp_path / 'run'}"])
    written = []
    real_save = CheckpointDir.save

    def counted(self, state, step):
        written.append((step, state["train_state"]["step_in_epoch"]))
        return real_save(self, state, step)
    monkeypatch.setattr(CheckpointDir, "save", counted)
    tr = Trainer(c.cfg, c.cfg_dict, c.run_dir, DistEnv(source="single")).setup()
    try:
        assert tr.fit() == 0
    finally:
        tr.close()
    assert written == [(2, 2), (4, 0), (6, 2), (8, 0)], written  # 4 steps an epoch; (4, 4), (8, 4) no more


def test_an_unknown_command_names_the_nearest(capsys):
    from allconv_hpc import cli
    assert cli.main(["eval", "runs/x"]) == 2
    assert capsys.readouterr().err.startswith("allconv-hpc: unknown command 'eval' (did you mean evaluate?)\n")
    assert cli.main(["fit"]) == 2
    assert capsys.readouterr().err.startswith("allconv-hpc: unknown command 'fit'\n")
    assert cli.main([""]) == 2 and capsys.readouterr().err.startswith("allconv-hpc: unknown command ''\n")


def test_a_resume_on_other_images_is_said_with_the_fix_that_applies():
    """data=synthetic has no folder to give (a torch upgrade may change its draws: said); a recorded root spelled
    otherwise is the same folder; a checkpoint of before the fingerprints, or of the same images, passes."""
    import torch
    from allconv_hpc.config import DataConfig
    from allconv_hpc.resume import other_images_said
    ck = {"data": {"train": "300:aa", "val": None, "test": "100:bb"}, "torch_version": "0.0.1",
          "config": {"data": {"root": "/x/y/../data"}}}
    now = {"train": "300:cc", "val": None, "test": "100:bb"}
    said = other_images_said(ck, now, Path("ck.pt"), DataConfig(name="synthetic"))
    assert said == (f"checkpoint ck.pt trained on other images than data=synthetic generates now (training images: "
                    f"300 then, 300 now, other images; torch was 0.0.1, now {torch.__version__}, whose random draws "
                    f"may differ): resume it with the version it trained with, or start a new run (a new "
                    f"hydra.run.dir, a sweep's point a new hydra.sweep.dir; or checkpoint.resume=never)"), said
    said = other_images_said(ck, now, Path("ck.pt"), DataConfig(name="cifar10", root="/x/data"))
    assert said.startswith("checkpoint ck.pt trained on other images than data.root=/x/data holds (training") and \
        "(it trained on" not in said and "give data.root the folder it trained on" in said, said
    assert other_images_said({**ck, "data": now}, now, Path("ck.pt"), DataConfig(name="synthetic")) is None
    assert other_images_said({"config": {}}, now, Path("ck.pt"), DataConfig(name="synthetic")) is None


def test_rng_streams_that_cannot_be_restored_are_seeded_for_the_resume_point_not_the_first_step():
    """Another world size or device type: dropout must not draw the run's first masks again."""
    from allconv_hpc.augment import DROPOUT_STREAM, mix_seed
    from allconv_hpc.resume import restore_rngs, rng_state
    cpu = torch.device("cpu")
    before = torch.get_rng_state()
    try:
        torch.manual_seed(123)
        saved = rng_state(cpu)
        expect = torch.rand(4)
        torch.manual_seed(7)
        assert restore_rngs([saved], 0, 1, cpu, seed=0, global_step=40) is None  # the same ranks, device: exact
        assert torch.equal(torch.rand(4), expect)

        def draws(rank: int, step: int, rngs: list) -> tuple[str, torch.Tensor]:
            why = restore_rngs(rngs, rank, 2, cpu, seed=0, global_step=step)
            return why, torch.rand(4)
        why, fresh = draws(1, 40, [saved])
        assert why == "checkpoint was written by 1 rank(s), this job has 2", why
        torch.manual_seed(mix_seed(0, DROPOUT_STREAM + 1))  # rank 1's stream at the run's first step
        first = torch.rand(4)
        assert not torch.equal(fresh, first) and not torch.equal(fresh, expect)
        assert torch.equal(draws(1, 40, [saved])[1], fresh)  # a pure function of the resume point: the same again
        assert not torch.equal(draws(1, 41, [saved])[1], fresh) and not torch.equal(draws(0, 40, [saved])[1], fresh)
        on_gpu = {**saved, "cuda": torch.zeros(16, dtype=torch.uint8)}  # a GPU run's state (its CUDA generator's)
        why = restore_rngs([on_gpu], 0, 1, cpu, seed=0, global_step=40)
        assert why == "checkpoint was written on a GPU, this job trains on a CPU", why
        assert not torch.equal(torch.rand(4), expect)  # the CPU generator was not the GPU run's dropout stream
    finally:
        torch.set_rng_state(before)


@pytest.mark.parametrize("environ,said", [
    ({"SLURM_PROCID": "x", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_PROCID='x' is not a number (the launcher sets it"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_RESTART_COUNT": "?"}, "SLURM_RESTART_COUNT='?' is not"),
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "1"}, "rank 1 of a world of 1 (SLURM_PROCID, SLURM_STEP_NUM_TASKS) "
                                                         "is no rank"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a number"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 of a world of 2 (RANK, WORLD_SIZE) is no rank"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 is no local rank"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "-3"}, "SLURM_LOCALID=-3 is no local rank"),
    # read later, by the resume (which rewrote a completed run's status.json as failed) and the lock: checked here
    ({"TORCHELASTIC_RESTART_COUNT": "abc"}, "TORCHELASTIC_RESTART_COUNT='abc' is not a number"),
    ({"SLURM_RESTART_COUNT": "x"}, "SLURM_RESTART_COUNT='x' is not a number"),
    ({"SUBMITIT_LOCAL_GLOBALID": "abc"}, "SUBMITIT_LOCAL_GLOBALID='abc' is not a number"),
    ({"SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_NTASKS": "x"}, "SUBMITIT_LOCAL_NTASKS='x' is not a number"),
    ({"SUBMITIT_LOCAL_GLOBALID": "0", "ALLCONV_LOCAL_PORT": "abc"}, "ALLCONV_LOCAL_PORT='abc' is not a number"),
    ({"SUBMITIT_LOCAL_GLOBALID": "2", "SUBMITIT_LOCAL_NTASKS": "2"}, "rank 2 of a world of 2 (SUBMITIT_LOCAL_GLOBALID, "
                                                                     "SUBMITIT_LOCAL_NTASKS) is no rank"),
])
def test_launcher_variables_that_make_no_rank_are_named(environ, said):
    """Left in a shell by another job, or set by hand: one line naming the variable (a ValueError traceback, or a
    data error, after the run folder was made, before)."""
    with pytest.raises(DistributedError) as e:
        detect_env(environ)
    assert str(e.value).startswith(said) and "unset" in str(e.value), str(e.value)


def test_code_version_is_this_checkout_and_says_nothing_it_cannot_tell(monkeypatch):
    """The commit and uncommitted changes as git says them here; no git on the node: version only, no guess."""
    from allconv_hpc import provenance
    repo = Path(provenance.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout
    code = provenance.code_version.__wrapped__()
    assert code["git_sha"] == git("rev-parse", "HEAD").strip() and len(code["git_sha"]) == 40
    assert code["git_dirty"] is bool(git("status", "--porcelain", "--untracked-files=no").strip())
    monkeypatch.setenv("PATH", "/nonexistent")
    assert provenance.code_version.__wrapped__() == {"version": code["version"], "git_sha": None, "git_dirty": None}
    assert provenance.describe({"version": "1.2", "git_sha": None, "git_dirty": None}) == "allconv-hpc 1.2"
    assert provenance.describe({"version": "1.2", "git_sha": "ab" * 20, "git_dirty": True}) == (
        "allconv-hpc 1.2, git abababababab (uncommitted changes)")
    assert provenance.describe(None) == "unrecorded"
    one = {"version": "1.2", "git_sha": "ab" * 20, "git_dirty": False}
    assert provenance.code_changed(one, {**one, "git_dirty": True}) is None  # one commit: changes not compared
    assert provenance.code_changed(None, one) is None  # a checkpoint of before the record
    assert provenance.code_changed(one, {**one, "git_sha": "cd" * 20}).startswith("the code was allconv-hpc 1.2, git ab")
    assert provenance.code_changed({**one, "git_sha": None}, {**one, "git_sha": None, "version": "1.3"})
    assert provenance.code_changed({**one, "git_sha": None}, one) is None  # no commit to compare: the same version


def test_a_train_log_that_cannot_be_written_is_said_once_not_at_every_line(tmp_path, capsys):
    """A full disk: Python's handler printed a "--- Logging error ---" traceback for each line around the run's
    own error; now one line, and a later line is written once the file takes it again."""
    import errno
    import logging
    from allconv_hpc.train import LogFile

    h = LogFile(tmp_path / "train.log")
    real = h.stream

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass
    h.stream = Full()
    record = lambda msg: logging.LogRecord("x", logging.INFO, __file__, 1, msg, None, None)  # noqa: E731
    for i in range(3):
        h.emit(record(f"line {i}"))
    err = capsys.readouterr().err
    assert err == (f"allconv-hpc: cannot write {tmp_path / 'train.log'} ([Errno 28] No space left on device): its "
                   f"lines are on stderr and stdout only (a job's output files) until it can\n"), err
    h.stream = real
    h.emit(record("space again"))
    h.close()
    assert (tmp_path / "train.log").read_text() == "space again\n"


def test_in_ci_a_skipped_test_or_file_fails_the_run(tmp_path):
    """tests/conftest.py: under CI (any value but false/0) a skip fails pytest's exit code and is named; a file
    skipped whole too. Outside CI a skip is a skip."""
    import shutil
    import sys
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_skips.py").write_text("import pytest\n\ndef test_a():\n    pytest.skip('no such part')\n\n"
                                            "def test_b():\n    pass\n")
    (tmp_path / "test_whole.py").write_text("import pytest\npytest.skip('none here', allow_module_level=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    for ci, rc in ((None, 0), ("false", 0), ("1", 1), ("true", 1), ("woodpecker", 1)):
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                           env={**env, **({"CI": ci} if ci else {})}, capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
        assert r.returncode == rc, (ci, r.stdout[-2000:])
        named = "skipped in CI" in r.stdout and "test_skips.py::test_a: Skipped: no such part" in r.stdout and \
            "test_whole.py: Skipped: none here" in r.stdout
        assert named == bool(rc), (ci, r.stdout[-2000:])


def test_the_readme_contents_list_every_section_and_each_link_lands():
    """README.md's contents list is its ## and ### headings in order, each linked by GitHub's anchor for it (lower
    case, punctuation dropped, spaces as hyphens): a section added or renamed without the list fails here, and so
    does any link to a heading that is not there."""
    import re
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    heads, fenced = [], False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (m := re.match(r"(#{2,3}) (.+)", line)):
            heads.append((len(m[1]), m[2], re.sub(r"[^\w\- ]", "", m[2].lower()).replace(" ", "-")))
    contents = text.split("**Contents.**\n", 1)[1].split("\n\n", 1)[0]
    assert contents == "\n".join("  " * (depth - 2) + f"- [{title}](#{anchor})" for depth, title, anchor in heads)
    anchors = {a for _, _, a in heads}
    assert len(anchors) == len(heads), "two headings share an anchor"
    assert not [a for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in anchors]


def test_a_failed_collective_whose_ranks_all_answer_names_no_lost_peer(tmp_path):
    """Every rank reached the roll call after a collective failed (a timeout of dist.timeout_s on all of them): it
    said "peer rank(s) unknown did not answer", a peer lost that was not."""
    import sys
    script = f"""
import torch, torch.distributed as dist
from allconv_hpc.distributed import Dist, DistEnv
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
d = Dist(DistEnv(), torch.device("cpu"))
print(d._diagnose(RuntimeError("Application timeout caused pair closure")))
dist.destroy_process_group()
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == ("rank 0: a collective failed, though every rank answered the roll call after it (a "
                                "peer slower than dist.timeout_s, or a fault of the link; collective failed: "
                                "Application timeout caused pair closure)"), r.stdout


def test_a_partial_file_of_a_killed_write_is_removed_when_the_run_resumes(tmp_path):
    """Swept only as a save began: a run killed in its last write (best.pt, last.pt's copy) resumes completed and
    never saves again, and the partial file, up to a checkpoint's size, stayed (a checkpoint review)."""
    from allconv_hpc.checkpoint import CheckpointDir
    ck = CheckpointDir(tmp_path / "checkpoints", keep=2)
    ck.save({"model": {"w": torch.zeros(3)}, "step": 5}, 5)
    partial = ck.folder / ".best.pt.123.tmp"
    partial.write_bytes(b"\0" * 1000)
    assert ck.load_latest(warn=False)[1].name == "step_00000005.pt" and partial.exists()  # a look ahead: kept
    assert ck.load_latest(quarantine=True)[1].name == "step_00000005.pt" and not partial.exists()


def test_slurm_states_of_many_ended_jobs_read_the_whole_scontrol_table_by_id(tmp_path, monkeypatch):
    """Jobs squeue no longer lists are looked up in one `scontrol show job` table (by id, not a search of every line
    for every job): a plain job, an array's task with a line of its own, one inside a pending range, the array's
    own id (its every line; the last line's value wins). Lists of ids are cut to jobs.LIST_MAX (the kernel's limit
    on one argument)."""
    from allconv_hpc import jobs
    lines = [f"JobId={1000 + i} JobState=COMPLETED Restarts=0" for i in range(3000)]
    lines += ["JobId=77 ArrayJobId=77 ArrayTaskId=4-9%2 JobState=PENDING Restarts=0",
              "JobId=81 ArrayJobId=77 ArrayTaskId=3 JobState=FAILED Restarts=2",
              "JobId=80 ArrayJobId=77 ArrayTaskId=1 JobState=COMPLETED Restarts=1"]
    table = tmp_path / "table"
    table.write_text("\n".join(lines) + "\n")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in {"squeue": "exit 0", "sacct": "exit 1", "scontrol": f"cat {table}"}.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    ids = ["1005", "2999", "77_3", "77_6", "77_1", "77", "5"]
    got = jobs.slurm_states(ids)
    assert {j: got[j][:2] for j in ids} == {"1005": ("COMPLETED", 0), "2999": ("COMPLETED", 0), "77_3": ("FAILED", 2),
                                           "77_6": ("PENDING", 0), "77_1": ("COMPLETED", 1), "77": ("COMPLETED", 1),
                                           "5": (None, None)}, got
    assert got["77_6"][3] is True  # squeue lists it no more, yet the controller says PENDING: it ended
    groups = jobs.id_groups([str(i) for i in range(1, 2501)] + ["x"])
    assert [len(g) for g in groups] == [1000, 1000, 500, 1] and groups[-1] == ["x"]


def test_a_dependency_on_a_job_preemption_ended_is_refused(tmp_path, monkeypatch):
    """A job squeue no longer lists whose controller says PREEMPTED was cancelled by its preemption
    (PreemptMode=CANCEL; a requeued one is listed, PENDING): afterok on it never holds. One still listed is left
    to Slurm."""
    from allconv_hpc.config import ConfigError
    from allconv_hpc.plan import _check_dependency
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    fakes = {"squeue": "exit 0", "sacct": "exit 1", "scontrol": "echo 'JobId=4242 JobState=PREEMPTED'"}
    for name, body in fakes.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    with pytest.raises(ConfigError, match="job 4242 ended PREEMPTED, so afterok:4242 never holds"):
        _check_dependency("afterok:4242")
    _check_dependency("afternotok:4242")
    (bin_ / "squeue").write_text("#!/bin/sh\necho '4242|4242|N/A|1|PENDING|BeginTime'\n")
    _check_dependency("afterok:4242")  # requeued: queued again

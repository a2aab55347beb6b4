"""Small pure pieces: launch-context detection, host lists, ports, Slurm times, schedules."""
from __future__ import annotations

import math
from dataclasses import asdict

import pytest

from allconv_hpc.config import ScheduleConfig
from allconv_hpc.distributed import detect_env, expand_hostlist, slurm_port
from allconv_hpc.preempt import SlurmJob, parse_slurm_time
from allconv_hpc.schedule import lr_factor
from allconv_hpc.trainer import TrainState


def test_expand_hostlist():
    assert expand_hostlist("n1") == ["n1"]
    assert expand_hostlist("n[1-2]") == ["n1", "n2"]
    assert expand_hostlist("gpu[01-03,07],login5") == ["gpu01", "gpu02", "gpu03", "gpu07", "login5"]


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
    # a batch script outside srun has SLURM_PROCID but no step: one process, not a rank of 8
    assert detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}).source == "single"


def test_slurm_port_changes_with_restarts_and_stays_in_range():
    ports = {slurm_port("123456", r) for r in range(5)}
    assert len(ports) == 5 and all(20000 <= p < 60000 for p in ports)
    assert slurm_port("123456", 0) != slurm_port("123457", 0)


def test_parse_slurm_time_and_array_job_id():
    assert parse_slurm_time("1-02:03:04") == 93784
    assert parse_slurm_time("05:06") == 306
    assert parse_slurm_time("UNLIMITED") is None and parse_slurm_time("") is None
    assert SlurmJob({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "3"}).job_id == "5_3"
    assert SlurmJob({"SLURM_JOB_ID": "9"}).job_id == "9"
    assert not SlurmJob({}).in_slurm


def test_schedules():
    paper = ScheduleConfig(name="paper")
    f = [lr_factor(s, paper, 10, 350) for s in (0, 1999, 2000, 2500, 3000, 3499)]
    assert f == pytest.approx([1, 1, 0.1, 0.01, 0.001, 0.001])
    cos = ScheduleConfig(name="cosine", warmup_epochs=1.0)
    assert lr_factor(0, cos, 10, 10) == pytest.approx(0.1) and lr_factor(9, cos, 10, 10) == pytest.approx(1.0)
    assert lr_factor(10, cos, 10, 10) == pytest.approx(1.0) and lr_factor(99, cos, 10, 10) < 0.01
    one = ScheduleConfig(name="onecycle", pct_start=0.25)
    peak = max(range(100), key=lambda s: lr_factor(s, one, 10, 10))
    assert peak == 24 and lr_factor(24, one, 10, 10) == pytest.approx(1.0)
    assert lr_factor(99, one, 10, 10) == pytest.approx(1 / 75, abs=1e-9)
    assert all(math.isfinite(lr_factor(s, one, 10, 10)) for s in range(100))


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

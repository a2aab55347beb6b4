"""`submit` and `status` without a cluster: the sbatch script the launcher's executor renders, every
refusal (injection, bad types, sweeps over resources, busy or foreign run folders, sbatch rejecting
the job), the default cluster, requeued jobs writing no result, and status with fake Slurm commands
(no accounting, a job Slurm has forgotten)."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from allconv_hpc import data, executor, folder_checks, jobs, launcher, resources, status
from allconv_hpc.plan import _warn_short_starts, hydra_value
from allconv_hpc.submit_lock import submit_lock
from allconv_hpc.sweep import default_sweep_dir, earlier_sweep_dirs, expand_sweep, point_dirname
from allconv_hpc.checkpoint import CheckpointDir
from allconv_hpc.cli import main
from allconv_hpc.compose import check_sweep_dir, compose
from allconv_hpc.config import MODEL_NAMES, ConfigError
from allconv_hpc.data import write_cifar

TINY = ["data=synthetic", "data.train_size=60", "data.test_size=20", "model.width=0.125", "trainer.epochs=1",
        "trainer.batch_size=60", "wandb.mode=disabled"]


# ------------------------------------------------------------------------------ helpers

def fake_bin(tmp: Path, **scripts: str) -> Path:
    """A folder of fake commands (name -> sh body), put first on PATH by the caller."""
    d = tmp / "bin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (d / name).write_text(f"#!/bin/sh\n{body}\n")
        (d / name).chmod(0o755)
    return d


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    """on_path(sbatch=..., squeue=...): fake Slurm commands (and an srun, which submitit looks for, and an
    scontrol, which releases what submit queued held) on PATH, and no real one behind them."""
    def put(**scripts: str) -> Path:
        d = fake_bin(tmp_path, **{"srun": "exit 0", "scontrol": "exit 0", **scripts})
        monkeypatch.setenv("PATH", f"{d}:{Path(sys.executable).parent}")
        monkeypatch.delenv("SLURM_CONF", raising=False)  # a shell's, naming a dev cluster since removed, is not theirs
        return d
    return put


@functools.lru_cache(maxsize=None)
def composed(*overrides: str):
    return compose(["cluster=slurm", *TINY, *overrides])


def cluster_of(*overrides: str) -> dict:
    c = composed(*overrides)
    return resources.validate_cluster(c.cluster, c.cfg)


def render(cluster: dict, tmp: Path) -> str:
    """The sbatch script submitit would write for this cluster (nothing is submitted)."""
    ex = executor.make_executor(cluster, tmp / ".submitit" / "%j")
    return ex._make_submission_file_text("python -m submitit.core._submit FOLDER", "uid")


def sbatch_lines(script: str) -> set[str]:
    return {ln for ln in script.splitlines() if ln.startswith("#SBATCH ")}


def refused(cluster: dict, key: str, value) -> str:
    with pytest.raises(ConfigError) as e:
        resources.validate_cluster({**cluster, key: value}, composed().cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cluster.{key}"), msg
    return msg


def run_submit(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["submit", *args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------- the rendered script

def test_sbatch_script_carries_every_job_parameter(tmp_path, on_path):
    on_path()
    cluster = cluster_of("cluster.nodes=2", "cluster.gpus_per_node=4", "cluster.tasks_per_node=4",
                         "cluster.cpus_per_task=8", "cluster.mem_gb=200", "cluster.timeout_min=240",
                         "cluster.partition=gpu", "cluster.account=proj123", "cluster.qos=high",
                         "cluster.constraint='a100|h100'", "cluster.exclude='n[3-4]'",
                         "+cluster.additional_parameters.mail-type=END", "+cluster.additional_parameters.exclusive=true",
                         "cluster.setup=['module load cuda/12.4','source $HOME/venv/bin/activate']",
                         "cluster.signal_lead_s=180", "trainer.batch_size=64")
    script = render(cluster, tmp_path)
    lines = sbatch_lines(script)
    for want in ("--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=8", "--mem=200GB",
                 "--time=240", "--partition=gpu", "--account=proj123", "--qos=high", "--constraint='a100|h100'",
                 "--exclude='n[3-4]'", "--mail-type=END", "--exclusive", "--signal=USR2@180", "--requeue",
                 "--job-name=allconv"):
        assert f"#SBATCH {want}" in lines, (want, script)
    assert "--signal=B:" not in script  # the signal goes to the srun tasks, not the batch shell
    assert not any(ln.startswith("#SBATCH --array") for ln in lines)
    # submitit's own handler (until the trainer's are in) takes cluster.signal; then the user's lines, each
    # one that ends the job if it fails (its run: test_slurm_system)
    head = "trap 'ALLCONV_WARNED=1' USR2 USR1\nexport SUBMITIT_PREEMPT_SIGNAL=USR2\n"
    setup = executor._slurm_setup(["module load cuda/12.4", "source $HOME/venv/bin/activate"])
    assert script.split("# setup\n", 1)[1].startswith(head + "\n".join(setup + executor._requeue_if_warned(True)) + "\n"), script
    said = 'echo "allconv-hpc: cluster.setup line failed (exit $rc): $ALLCONV_SETUP_LINE" >&2'
    # Slurm's SIGTERM during a line (a preemption past its grace time, scancel) is said as such (its run: test_slurm_system)
    ended = ('[ -n "${ALLCONV_TERM:-}" ] && echo "allconv-hpc: SIGTERM during cluster.setup (a preemption, scancel or '
             'the time limit), in: $ALLCONV_SETUP_LINE; nothing was trained" >&2 || echo "allconv-hpc: cluster.setup '
             'line ended the job before training (exit $rc): $ALLCONV_SETUP_LINE" >&2; exit $((rc ? rc : 1))')
    assert executor._slurm_setup(["module load x"]) == [
        f"trap 'rc=$?; {ended}' EXIT", "trap 'ALLCONV_TERM=1; exit 143' TERM", "ALLCONV_SETUP_LINE='module load x'",
        f"{{ :\nmodule load x\n\n}} || {{ rc=$?; trap - EXIT; {said}; exit 1; }}",
        "trap - EXIT TERM; unset ALLCONV_SETUP_LINE"]
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "--cpus-per-task=8" in srun, srun


def test_the_defaults_render_no_optional_option(tmp_path, on_path):
    on_path()
    lines = sbatch_lines(render(cluster_of(), tmp_path))
    for absent in ("--mem", "--partition", "--account", "--qos", "--constraint", "--exclude", "--gpus-per-node"):
        assert not any(ln.startswith(f"#SBATCH {absent}") for ln in lines), (absent, lines)
    assert "#SBATCH --signal=USR2@120" in lines and "#SBATCH --requeue" in lines
    assert "#SBATCH --no-requeue" not in lines


def test_requeue_false_renders_no_requeue(tmp_path, on_path):
    """Without --no-requeue the site's JobRequeue default would still requeue the job."""
    on_path()
    lines = sbatch_lines(render(cluster_of("cluster.requeue=false"), tmp_path))
    assert "#SBATCH --no-requeue" in lines and "#SBATCH --requeue" not in lines, lines


def test_another_signal_is_submitits_from_the_start(tmp_path, on_path):
    """With cluster.signal=USR1, submitit's handler (in place while the job starts) must take USR1: it
    reads SUBMITIT_PREEMPT_SIGNAL when the job imports submitit, so the script exports it before srun."""
    on_path()
    c = compose(["cluster=slurm", *TINY, "cluster.signal=USR1", "checkpoint.signal=USR1",
                 "cluster.setup=['module load x']"])
    script = render(resources.validate_cluster(c.cluster, c.cfg), tmp_path)
    assert "#SBATCH --signal=USR1@120" in sbatch_lines(script)
    assert script.split("# setup\n", 1)[1].startswith("trap 'ALLCONV_WARNED=1' USR1 USR2\n"
                                                     "export SUBMITIT_PREEMPT_SIGNAL=USR1\n"
                                                     + "\n".join(executor._slurm_setup(["module load x"]))), script
    # what the job's python then handles, as submitit computes it at import
    env = {**os.environ, "SUBMITIT_PREEMPT_SIGNAL": "USR1"}
    out = subprocess.run([sys.executable, "-c", "from submitit.slurm.slurm import SlurmJobEnvironment as E; "
                          "print(E._usr_sig().name)"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "SIGUSR1"


def test_the_gpu_example_profile_renders(tmp_path, on_path):
    on_path()
    c = compose(["cluster=gpu_example", *TINY, "trainer.batch_size=128", "cluster.constraint='a100|h100'"])
    lines = sbatch_lines(render(resources.validate_cluster(c.cluster, c.cfg), tmp_path))
    assert {"#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --constraint='a100|h100'",
            "#SBATCH --signal=USR2@180"} <= lines


@pytest.mark.parametrize("constraint", ["a100|h100", "a100&ib", "[rack1|rack2]", "(a100|h100)*2", "!old", "gpu:a100"])
def test_constraint_takes_slurms_syntax(tmp_path, on_path, constraint):
    on_path()
    cluster = {**cluster_of(), "constraint": constraint}
    lines = sbatch_lines(render(resources.validate_cluster(cluster, composed().cfg), tmp_path))
    (line,) = [ln for ln in lines if ln.startswith("#SBATCH --constraint=")]
    # shlex-quoted by submitit; sbatch strips the quotes (seen on the dev cluster) and gets the value back
    assert shlex.split(line.split("=", 1)[1]) == [constraint]


# ------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("key,value", [
    ("mem_gb", "4'\ntouch /tmp/PWNED #"), ("mem_gb", "4GB"), ("mem_gb", 4.5), ("mem_gb", 0), ("mem_gb", True),
    ("mem_gb", "$(touch pwned)"),
    ("partition", "low\ntouch pwned"), ("partition", "low\n"), ("partition", "low;touch pwned"),
    ("partition", "$(touch pwned)"), ("partition", "`touch pwned`"), ("partition", "'low'"), ("partition", '"low"'),
    ("partition", "lo w"), ("account", "a\x00b"), ("qos", "$(id)"), ("exclude", "n1\nn2"), ("signal", "USR2\n"),
    ("constraint", "a100\n"), ("constraint", "a100\r"), ("constraint", "a100\x00"), ("constraint", "$(id)"),
    ("constraint", "`id`"), ("constraint", "a100'"), ("constraint", 'a"b'),
    ("setup", "module load cuda"), ("setup", ["module load cuda", "echo a\ntouch pwned"]), ("setup", [1]),
    ("additional_parameters", {"mail-type": "END\ntouch pwned"}), ("additional_parameters", {"comment": "$(id)"}),
    ("additional_parameters", {"comment": "`id`"}), ("additional_parameters", {"comment": "it's"}),
    ("additional_parameters", {"bad key": "x"}), ("additional_parameters", {"a\nb": "x"}),
    ("additional_parameters", {"time": 5}), ("additional_parameters", {"signal": "B:USR2@60"}),
    ("additional_parameters", {"output": "/tmp/x"}), ("additional_parameters", "mail-type=END"),
    ("nodes", "2"), ("nodes", True), ("nodes", 0), ("array_parallelism", 0), ("gpus_per_node", -1),
    ("cpus_per_task", 1.5), ("timeout_min", None), ("requeue", "yes"), ("signal_lead_s", 5),
    ("signal_lead_s", 65536), ("partition", ""), ("account", ""), ("constraint", ""),
    ("additional_parameters", {"comment": ""}), ("additional_parameters", {"no-requeue": True}),
    ("backend", "pbs"), ("gpu_type", "a100;id"), ("gpu_type", ""), ("gpu_type", "a100:2"),
    ("gpu_type", "a100"),  # with cluster.gpus_per_node=0: nothing to type
])
def test_bad_cluster_values_are_refused_with_one_line(key, value):
    refused(cluster_of(), key, value)


def test_a_string_setup_gets_a_hint():
    msg = refused(cluster_of(), "setup", "module load cuda")
    assert "must be a list of shell lines" in msg and "cluster.setup='[module load cuda/12.4]'" in msg
    msg = refused(cluster_of(), "setup", [False])  # 'cluster.setup=[false]': Hydra reads a bool
    assert "cluster.setup item False was read as a bool, not a shell line; quote it: 'cluster.setup=[\"false\"]'" in msg


def test_sbatch_signal_flags_are_refused_with_the_plain_name():
    """B:USR2 (sbatch's form) read as differing from checkpoint.signal=USR2, whose fix (make them equal) they were."""
    msg = refused(cluster_of(), "signal", "B:USR2")
    assert msg == ("cluster.signal=B:USR2: sbatch's B: flags are not taken (B: would signal the batch shell alone, "
                   "not the training tasks); give the name alone: cluster.signal=USR2"), msg
    assert refused(cluster_of(), "signal", "B:USR2@120").endswith("cluster.signal=USR2 (the lead: "
                                                                   "cluster.signal_lead_s=120)")


def test_a_signal_the_job_would_not_take_as_its_warning_is_refused(tmp_path):
    """cluster.signal=HUP with checkpoint.signal=USR2: the job would take Slurm's HUP as a stop, not the warning.
    USR1 and USR2 are warnings whichever is configured: sent as USR1, caught as one (it was refused as not caught)."""
    assert "differs from checkpoint.signal=USR2: the job would not catch" in refused(cluster_of(), "signal", "HUP")
    usr1 = cluster_of("cluster.signal=USR1")  # checkpoint.signal stays USR2
    assert re.search(r"^#SBATCH --signal=USR1@\d+$", render(usr1, tmp_path), re.M)


def test_additional_parameters_name_the_key_to_use():
    assert "use cluster.timeout_min" in refused(cluster_of(), "additional_parameters", {"time": 5})
    # the job's shape under other option names: it was validated as nodes x tasks_per_node
    assert "use cluster.nodes and cluster.tasks_per_node" in refused(cluster_of(), "additional_parameters",
                                                                    {"ntasks": 16})
    assert "use cluster.mem_gb" in refused(cluster_of(), "additional_parameters", {"mem_per_cpu": "4G"})
    assert "use cluster.gpus_per_node" in refused(cluster_of(), "additional_parameters", {"gpus": 8})
    assert "remove it" in refused(cluster_of(), "additional_parameters", {"distribution": "arbitrary"})
    for other, use in [("gpus-per-socket", "cluster.gpus_per_node"), ("tres_per_task", "cluster.gpus_per_node"),
                       ("ntasks-per-core", "cluster.tasks_per_node"), ("mincpus", "cluster.cpus_per_task"),
                       ("no_requeue", "cluster.requeue"), ("sockets-per-node", "remove it"),
                       ("cores-per-socket", "remove it")]:
        assert use in refused(cluster_of(), "additional_parameters", {other: 2}), other


@pytest.mark.parametrize("key,means,use", [
    ("tim", "time", "cluster.timeout_min"), ("ti", "time", "cluster.timeout_min"),
    ("parti", "partition", "cluster.partition"), ("sig", "signal", "cluster.signal"),
    ("ntasks-per", "ntasks-per-core or --ntasks-per-gpu or --ntasks-per-node", "cluster.tasks_per_node"),
    ("no-r", "no-requeue", "cluster.requeue"), ("cpus_per_t", "cpus-per-task", "cluster.cpus_per_task")])
def test_abbreviations_of_own_options_are_refused(key, means, use):
    """sbatch's getopt_long takes any unambiguous prefix: --tim=5 is --time=5."""
    msg = refused(cluster_of(), "additional_parameters", {key: 5})
    assert f"(sbatch reads it as --{means})" in msg and f"use {use}" in msg, msg


def test_other_sbatch_options_still_pass(tmp_path, on_path):
    on_path()
    extra = {"mail-type": "END", "time-min": 30, "exclusive": True, "comment": "x", "nice": 10, "gres": "tmpdisk:10"}
    lines = sbatch_lines(render(resources.validate_cluster({**cluster_of(), "additional_parameters": extra},
                                                          composed().cfg), tmp_path))
    assert {"#SBATCH --mail-type=END", "#SBATCH --time-min=30", "#SBATCH --exclusive", "#SBATCH --nice=10"} <= lines


def test_typed_gpus_go_through_gpu_type_not_gres(tmp_path, on_path):
    on_path()
    gpus = cluster_of("cluster.gpus_per_node=2", "cluster.tasks_per_node=2", "trainer.batch_size=64")
    lines = sbatch_lines(render(resources.validate_cluster({**gpus, "gpu_type": "a100_80gb"}, composed().cfg),
                                tmp_path))
    assert "#SBATCH --gpus-per-node=a100_80gb:2" in lines, lines
    msg = refused(gpus, "additional_parameters", {"gres": "gpu:a100:2"})
    assert "asks for GPUs: use cluster.gpus_per_node=N (and cluster.gpu_type=TYPE" in msg
    refused(gpus, "additional_parameters", {"gres": "tmpdisk:10,gpu:1"})
    other = resources.validate_cluster({**gpus, "additional_parameters": {"gres": "tmpdisk:10"}}, composed().cfg)
    assert "#SBATCH --gres=tmpdisk:10" in sbatch_lines(render(other, tmp_path))
    assert "needs cluster.gpus_per_node >= 1" in refused(cluster_of(), "gpu_type", "a100")
    local = compose(["cluster=local", *TINY, "cluster.gpu_type=a100"])  # ignored there, as documented
    assert resources.validate_cluster(local.cluster, local.cfg)["gpu_type"] == "a100"


def test_unknown_cluster_key_is_refused():
    with pytest.raises(ConfigError, match=r"unknown cluster key\(s\) cluster.nodez"):
        resources.validate_cluster({**cluster_of(), "nodez": 1}, composed().cfg)


def test_injection_through_the_cli_reaches_nothing(tmp_path, on_path, capsys, monkeypatch):
    on_path(sbatch=f"echo called >> {tmp_path / 'sbatch-called'}; exit 1")
    monkeypatch.chdir(tmp_path)
    for bad in (f"cluster.mem_gb='4\ntouch {tmp_path / 'pwned'} #'", f"cluster.mem_gb=\"4'\ntouch {tmp_path}/pwned #\"",
                "cluster.setup='module load cuda'", f"cluster.partition='low\ntouch {tmp_path / 'pwned'}'"):
        code, out, err = run_submit(capsys, "cluster=slurm", *TINY, bad, f"hydra.run.dir={tmp_path / 'run'}")
        assert code == 2 and len(err.strip().splitlines()) == 1, (bad, err)
        assert err.startswith("allconv-hpc submit: error: "), err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "sbatch-called").exists()
    assert not (tmp_path / "run").exists()


def test_a_sweep_over_cluster_settings_is_refused(tmp_path, on_path):
    on_path(sbatch="exit 1")
    mail = "+cluster.additional_parameters.mail-type=END,FAIL"
    for sweep in (["cluster=slurm", "cluster.nodes=1,2"], ["cluster=slurm", "cluster.partition=a,b"],
                  ["cluster=local,slurm"], ["cluster=slurm", mail]):
        with pytest.raises(ConfigError, match="one job array has one resource shape") as e:
            launcher.plan([*sweep, *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}"], multirun=True)
        assert "cluster." in str(e.value)
        # Slurm's own list (the first partition that can start it, mail types) is one value, quoted: said how
        assert (('quote it as one value: \'cluster.partition="a,b"\'' in str(e.value))
                is ("cluster.partition=a,b" in sweep)), str(e.value)
        assert (("quote it as one value: '+cluster.additional_parameters.mail-type=\"END,FAIL\"'" in str(e.value))
                is (mail in sweep)), str(e.value)
    with pytest.raises(ConfigError, match="one resource shape") as e:  # a choice(...) is meant as a sweep: no hint
        launcher.plan(["cluster=slurm", "cluster.partition=choice(a,b)", *TINY, f"hydra.sweep.dir={tmp_path / 'sw'}"],
                      multirun=True)
    assert "quote it" not in str(e.value), str(e.value)
    assert not (tmp_path / "sweep").exists()
    composed_ = compose(["cluster=slurm", *TINY, 'cluster.partition="a,b"'])  # as told: one value
    assert composed_.cluster["partition"] == "a,b"


def test_a_local_sweep_wider_than_array_parallelism_is_refused(tmp_path):
    sweep = ["cluster=local", *TINY, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    with pytest.raises(ConfigError, match="starts every sweep point at once.*cluster.array_parallelism=2"):
        launcher.plan(sweep, multirun=True)
    points, _, _ = launcher.plan(sweep + ["cluster.array_parallelism=2"], multirun=True)
    assert len(points) == 2
    # submitted again while a point's job runs: it runs beside the new ones (a local audit: 2 ran at
    # array_parallelism=1)
    one = ["cluster=local", *TINY, "seed=choice(0)", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    [running] = launcher.plan(one, multirun=True)[0]
    controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "allconv_hpc.localcontrol"])
    try:
        running.run_dir.mkdir(parents=True)
        (running.run_dir / "submission.json").write_text(json.dumps(
            {"job_id": str(controller.pid), "backend": "local", "run_dir": str(running.run_dir),
             "overrides": running.overrides, "submitit_folder": str(tmp_path / "sub"), "submitted": time.time()}))
        with pytest.raises(ConfigError, match=r"this sweep has 2 \(1 to start, 1 still running\) > "
                                              r"cluster.array_parallelism=1; .* or submit again once they have ended"):
            launcher.plan(sweep, multirun=True)
        points, _, _ = launcher.plan(sweep + ["cluster.array_parallelism=2"], multirun=True)
        assert [p.skip is None for p in points] == [False, True]
        # a point added by a submit of its own (choice: the sweep's key, another value) runs beside it all the same
        added = ["cluster=local", *TINY, "seed=choice(7)", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
        with pytest.raises(ConfigError, match=r"this sweep has 2 \(1 to start, 1 still running\) > "):
            launcher.plan(added, multirun=True)
        assert len(launcher.plan(added + ["cluster.array_parallelism=2"], multirun=True)[0]) == 1
    finally:
        controller.kill()
        controller.wait()
    points, _, _ = launcher.plan(sweep[:-2] + ["seed=1", sweep[-1]], multirun=True)  # none running: one fits
    assert len(points) == 1


# -------------------------------------------------------------------------- sweeps

def sweep_name(*overrides: str) -> str:
    return default_sweep_dir(*expand_sweep(list(overrides), multirun=True))


def test_the_sweep_folder_ignores_launch_only_keys_and_value_order():
    """What a resume may change (config.RESUMABLE_CHANGES), cluster.* however given, and the order of the
    swept values or keys: the same sweep, so a resubmission resumes every point in the same folder."""
    base = sweep_name("cluster=slurm", "optim.lr=0.05", "seed=0,1", "model=allcnn_c,model_c")
    for same in (["cluster=slurm", "optim.lr=0.05", "seed=1,0", "model=model_c,allcnn_c"],
                 ["cluster=slurm", "optim.lr=0.05", "model=allcnn_c,model_c", "seed=0,1"],
                 ["cluster=slurm", "optim.lr=0.05", "seed=0,1", "model=allcnn_c,model_c",
                  "+cluster.additional_parameters.mail-type=END", "++cluster.nodes=2", "trainer.epochs=500",
                  "data.root=/elsewhere", "data.download=true", "trainer.eval_batch_size=10", "trainer.device=cpu",
                  "trainer.precision=fp32", "trainer.channels_last=true", "trainer.compile=true",
                  "trainer.deterministic=true", "trainer.log_every_steps=5", "trainer.threads=2",
                  "trainer.progress=log", "checkpoint.keep=5", "wandb.mode=offline", "++wandb.project=p",
                  "dist.timeout_s=60", "~wandb.entity"]):
        assert sweep_name(*same) == base, same
    for spelled in (["optim.lr=0.050", "seed=0,1", "cluster=slurm", "model=allcnn_c,model_c"],  # the value, not its text
                    ["cluster=slurm", "optim.lr=5e-2", "seed=0,1", "model=allcnn_c,model_c"],
                    ["cluster=slurm", "optim.lr=0.1", "optim.lr=0.05", "seed=0,1", "model=allcnn_c,model_c"]):
        assert sweep_name(*spelled) == base, spelled
    for other in (["cluster=slurm", "optim.lr=0.1", "seed=0,1", "model=allcnn_c,model_c"],
                  ["cluster=slurm", "optim.lr=0.05", "seed=0,2", "model=allcnn_c,model_c"],
                  ["cluster=slurm", "optim.lr=0.05", "seed=0,1", "model=allcnn_c,model_c", "trainer.batch_size=64"],
                  ["cluster=slurm", "optim.lr=0.05", "seed=0,1", "model=allcnn_c,model_c", "+trainer.drop_last=true"]):
        assert sweep_name(*other) != base, other


def test_an_existing_sweep_folder_of_an_earlier_name_is_still_resumed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["cluster=local", *TINY, "seed=1,0", "cluster.array_parallelism=2"]
    common, swept = expand_sweep(args, multirun=True)
    new, (typed, spelled, legacy) = default_sweep_dir(common, swept), earlier_sweep_dirs(common, swept)
    # the fixed overrides as values (quoted strings, here), TINY's trainer.epochs and wandb.mode, the order 1,0
    assert len({new, spelled, legacy}) == 3 and typed == new  # no key with + or ++: named so before too
    assert launcher.plan(args, multirun=True)[1] == tmp_path / new
    for old in (legacy, spelled):  # a sweep submitted before (the newer name first): resubmitting resumes it
        (tmp_path / old).mkdir(parents=True)
        points, sweep_dir, _ = launcher.plan(args, multirun=True)
        assert sweep_dir == tmp_path / old and points[0].run_dir.parent == tmp_path / old
    (tmp_path / new).mkdir(parents=True)  # there too: the current name wins
    assert launcher.plan(args, multirun=True)[1] == tmp_path / new


def test_a_sweep_is_named_alike_with_or_without_plus_on_its_keys(tmp_path, monkeypatch):
    """`++optim.lr=0.01,0.02` is the sweep `optim.lr=0.01,0.02` (++ says how to apply the key): it named a folder and
    points of its own, so the same sweep spelled plainly trained every point again. A folder of such a sweep
    submitted before keeps its points."""
    monkeypatch.chdir(tmp_path)
    plain = ["cluster=local", *TINY, "optim.lr=0.01,0.02", "seed=0", "cluster.array_parallelism=2"]
    plussed = ["cluster=local", *TINY, "++optim.lr=0.01,0.02", "++seed=0", "cluster.array_parallelism=2"]
    assert sweep_name(*plain) == sweep_name(*plussed)
    assert point_dirname(["++optim.lr=0.01", "+cluster.additional_parameters.x=a"]) == \
        "cluster.additional_parameters.x=a,optim.lr=0.01"
    points, sweep_dir, _ = launcher.plan(plussed, multirun=True)
    assert sorted(p.run_dir.name for p in points) == ["optim.lr=0.01", "optim.lr=0.02"]
    assert launcher.plan(plain, multirun=True)[1] == sweep_dir
    typed = earlier_sweep_dirs(*expand_sweep(plussed, multirun=True))[0]  # the name such a sweep had before
    assert typed != str(sweep_dir.relative_to(tmp_path)) and "++optim.lr" in typed
    (tmp_path / typed / "++optim.lr=0.01").mkdir(parents=True)  # one point of it submitted before
    points, sweep_dir, _ = launcher.plan(plussed, multirun=True)
    assert sweep_dir == tmp_path / typed
    assert sorted(p.run_dir.name for p in points) == ["++optim.lr=0.01", "optim.lr=0.02"]
    # a key given twice, with + and without, counts once, at its last value (the value decides, not the spelling)
    assert sweep_name("model.width=0.25", "++model.width=0.5", "optim.lr=0.1,0.2") == \
        sweep_name("model.width=0.5", "optim.lr=0.1,0.2") != sweep_name("model.width=0.5", "++model.width=0.25",
                                                                     "optim.lr=0.1,0.2")
    # nor does a running point's job differ from one submitted again with + or ++ (folder_checks._changes)
    from allconv_hpc.folder_checks import _changes
    assert _changes(["++optim.lr=0.01", "seed=0"], ["optim.lr=0.01", "++seed=0"]) == ""
    assert _changes(["++optim.lr=0.01"], ["optim.lr=0.02"]) == "optim.lr=0.02 given now, the job has optim.lr=0.01"
    assert _changes(["cluster.array_parallelism=2"], ["cluster.array_parallelism=3"]) == ""  # the submit's, not the job's
    # grown (0.01,0.02,0.03) with the default folder: that older sweep's points are found, not trained again
    from omegaconf import OmegaConf
    (tmp_path / typed / "++optim.lr=0.01" / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(compose(["cluster=local", *TINY, "optim.lr=0.01", "seed=0"]).cfg_dict),
                   tmp_path / typed / "++optim.lr=0.01" / ".hydra" / "config.yaml")
    (tmp_path / typed / "sweep.json").write_text(json.dumps({"sweep_dir": str(tmp_path / typed), "jobs": []}))
    grown = ["cluster=local", *TINY, "++optim.lr=0.01,0.02,0.03", "++seed=0", "cluster.array_parallelism=3"]
    with pytest.raises(ConfigError, match=r"1 of this sweep's points \(optim.lr=0.01\) is a run of .*\+\+optim.lr-"):
        launcher.plan(grown, multirun=True)
    plainly = ["cluster=local", *TINY, "optim.lr=0.01,0.02,0.03", "seed=0", "cluster.array_parallelism=3"]
    with pytest.raises(ConfigError, match=r"1 of this sweep's points \(optim.lr=0.01\) is a run of .*\+\+optim.lr-"):
        launcher.plan(plainly, multirun=True)  # spelled plainly now: the same points
    points, _, _ = launcher.plan(plainly + [f"hydra.sweep.dir={tmp_path / typed}"], multirun=True)  # as told
    assert sorted(p.run_dir.name for p in points) == ["++optim.lr=0.01", "optim.lr=0.02", "optim.lr=0.03"]


def test_sweep_points_of_one_folder_name_and_a_swept_sweep_folder_are_refused(tmp_path):
    """Values that differ only in characters a folder name drops ('a b', a_b) were told to be given once; and
    hydra.sweep.dir=a,b, one folder per point of a sweep of one folder, was told so too (the same config)."""
    where = f"hydra.sweep.dir={tmp_path / 's'}"
    with pytest.raises(ConfigError, match=r"the sweep points wandb.name='a b' and wandb.name='a_b' map to the same run "
                                          r"folder wandb.name=_a_b_ .*give values that differ in those"):
        launcher.plan(["cluster=local", *TINY, "wandb.name='a b','a_b'", "cluster.array_parallelism=2", where],
                      multirun=True)
    with pytest.raises(ConfigError, match="same run folder seed=0; give each swept value once"):
        launcher.plan(["cluster=local", *TINY, "seed=0,0", "cluster.array_parallelism=2", where], multirun=True)
    with pytest.raises(ConfigError, match="hydra.sweep.dir is the one folder of a sweep and cannot be swept"):
        launcher.plan(["cluster=local", *TINY, f"hydra.sweep.dir={tmp_path / 'a'},{tmp_path / 'b'}"], multirun=True)
    assert list(tmp_path.iterdir()) == []


def test_each_sweep_point_trains_on_its_own_relative_data_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    points, _, _ = launcher.plan(["cluster=local", *TINY, "data=cifar10", "data.download=true", "data.root=a,b",
                                  "cluster.array_parallelism=2", f"hydra.sweep.dir={tmp_path / 'sw'}"], multirun=True,
                                 dry_run=True)  # a real submit would download each root first
    roots = {p.run_dir.name: compose(p.overrides).cfg.data.root for p in points}
    assert roots == {"data.root=a": str(tmp_path / "a"), "data.root=b": str(tmp_path / "b")}, roots


def test_glob_sweeps_config_group_options(tmp_path):
    common, swept = expand_sweep(["model=glob(allcnn_*,exclude=allcnn_seed)", "seed=range(0,2)"],
                                          multirun=True)
    assert sorted(tuple(p) for p in swept) == [(f"model=allcnn_{m}", f"seed={s}") for m in "abc" for s in (0, 1)]


def test_a_swept_name_swap_is_told_to_sweep_the_group(tmp_path):
    """model.name=a,b swaps only the name at each point: refused, and the advice is the sweep of the options
    (a point's own fix, model=allcnn_seed, would drop the other point); a name swap common to every point keeps
    the one-run advice."""
    where = f"hydra.sweep.dir={tmp_path / 's'}"
    with pytest.raises(ConfigError, match=r"model.name=allcnn_seed swaps the architecture.*In this sweep: "
                                          r"model=allcnn_c,allcnn_seed sweeps the options as defined$"):
        launcher.plan(["cluster=local", *TINY, "model.name=allcnn_c,allcnn_seed", where], multirun=True)
    with pytest.raises(ConfigError, match=r"swaps the architecture") as e:
        launcher.plan(["cluster=local", *TINY, "model.name=allcnn_seed", "seed=0,1", where], multirun=True)
    assert "In this sweep" not in str(e.value)
    assert not (tmp_path / "s").exists()


def test_resume_never_on_folders_that_hold_runs_is_said_before_the_queue(tmp_path, capsys):
    """checkpoint.resume=never on a sweep whose points hold runs (one completed) starts each over: legal, the old
    files are kept, but a completed run was silently queued again (without it: skipped)."""
    where = f"hydra.sweep.dir={tmp_path / 's'}"
    sweep = ["cluster=local", "cluster.array_parallelism=3", *TINY, "seed=0,1,2", where]
    points, _, _ = launcher.plan(sweep + ["checkpoint.resume=never"], multirun=True)
    assert "checkpoint.resume=never starts" not in capsys.readouterr().err  # nothing to start over yet
    for p, state in zip(points[:2], ("completed", "interrupted")):
        (p.run_dir / "checkpoints").mkdir(parents=True)
        (p.run_dir / "checkpoints" / "step_00000005.pt").touch()
        (p.run_dir / "status.json").write_text(json.dumps({"state": state}))
    capsys.readouterr()
    points, _, _ = launcher.plan(sweep + ["checkpoint.resume=never"], multirun=True)
    assert all(p.skip is None for p in points)
    err = capsys.readouterr().err
    assert (f"checkpoint.resume=never starts 2 run(s) over that hold training (1 completed): {points[0].run_dir}, "
            f"{points[1].run_dir}; their files move to checkpoints.oldN/") in err, err


@pytest.mark.parametrize("sweep,values", [
    ("optim.lr=range(0.1,0.4,0.1)", ["0.1", "0.2", "0.3"]),  # Hydra: 0.30000000000000004 and 0.4 as well
    ("optim.lr=range(0.01,0.05,0.01)", ["0.01", "0.02", "0.03", "0.04"]),
    ("optim.lr=range(0.1,0.35,0.1)", ["0.1", "0.2", "0.3"]),
    ("optim.lr=range(0.5,0.05,-0.2)", ["0.5", "0.3", "0.1"]),
    ("seed=range(3,0,-1)", ["3", "2", "1"]), ("seed=range(3)", ["0", "1", "2"])])
def test_range_sweeps_step_the_numbers_as_written_and_leave_out_the_stop(sweep, values):
    _, swept = expand_sweep([sweep], multirun=True)
    key = sweep.split("=")[0]
    assert swept == [[f"{key}={v}"] for v in values]
    _, shuffled = expand_sweep([f"{key}=shuffle({sweep.split('=', 1)[1]})"], multirun=True)
    assert sorted(shuffled) == sorted(swept)


@pytest.mark.parametrize("sweep,says", [
    ("seed=range(0,3,0)", "a range's step must not be 0"), ("optim.lr=range(0.1,0.3,0.0)", "a range's step must not be 0"),
    ("seed=range(0,inf,1)", "must be finite numbers"), ("optim.lr=range(0.1,nan,0.1)", "must be finite numbers"),
    ("seed=range(true,3)", "must be finite numbers"), ("optim.lr=range(0,1,1e-30)", "gives 10{30} points"),
    ("seed=sort(range(10,0,-3))", "sort\\(\\) of a range is not supported"),  # Hydra: 3, 6, 9, 12
    ("seed=sort(shuffle(range(0,9,3)))", "sort\\(\\) of a range is not supported"),
    # floats without a step: Hydra's step is 1, one point where a sweep was meant
    ("optim.lr=shuffle(range(0.01,0.03))", r"gives one value \(0.01\): a range's step is 1 unless given; give it as the third "
                                  r"number, range\(start,stop,step\)")])
def test_a_range_that_cannot_be_stepped_is_one_line(sweep, says):
    with pytest.raises(ConfigError, match=says):
        expand_sweep([sweep], multirun=True)
    # one value where the step was written (third, or by name), or the bounds are whole numbers: as asked
    for one in ("optim.lr=range(0.5,1.0,1.0)", "optim.lr=range(0.5,1.0,step=1.0)", "seed=range(3,4)"):
        assert len(expand_sweep([one], multirun=True)[1]) == 1, one


@pytest.mark.parametrize("sweep,says", [
    ("optim.lr=interval(0.01,0.1)", "interval(...) is for optimizing sweepers, which submit does not run; give the "
                                    "values: a comma list, range(start,stop,step) or choice(...)"),
    ("seed=glob(*)", "gives no values to submit: use a comma list, range(...), choice(...) or glob(...) of a config "
                     "group's options"),
    ("model=glob(nothing_*)", "gives no values to submit"),
    ("optim.lr=0.1,0.2,", "a comma with no item beside it: did you mean optim.lr=0.1,0.2?"),
    ("optim.lr=,0.1", "a comma with no item beside it: did you mean optim.lr=0.1?"),
    ("schedule.milestones=[1,,2],[3]", "did you mean schedule.milestones=[1,2],[3]?")])
def test_sweeps_without_values_to_submit_are_one_line(tmp_path, capsys, monkeypatch, sweep, says):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_submit(capsys, "-m", "cluster=local", *TINY, sweep)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"'{sweep}'" in err and says in err and "expecting {" not in err, err
    assert not (tmp_path / "sweeps").exists()


def test_hydra_run_dir_in_a_sweep_is_refused_and_sweep_dir_is_recognised(tmp_path):
    for run_dir in ("hydra.run.dir", "++hydra.run.dir"):
        with pytest.raises(ConfigError, match=r"hydra.run.dir is set per point in a sweep \(-m\): give the "
                                              r"sweep's folder with hydra.sweep.dir=\.\.\. instead"):
            launcher.plan(["cluster=local", *TINY, "seed=0", f"{run_dir}={tmp_path / 'r'}"], multirun=True)
    _, sweep_dir, _ = launcher.plan(["cluster=local", *TINY, "seed=0", f"++hydra.sweep.dir={tmp_path / 's'}"],
                                    multirun=True)
    assert sweep_dir == tmp_path / "s"


def test_sbatch_refusing_a_sweep_leaves_no_sweeps_folder(tmp_path, on_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    on_path(sbatch="echo 'sbatch: error: Batch job submission failed: Invalid account' >&2; exit 1")
    code, _, err = run_submit(capsys, "-m", "cluster=slurm", *TINY, "seed=0,1")
    assert code == 2 and "sbatch refused the job" in err, err
    assert list(tmp_path.iterdir()) == [tmp_path / "bin"]  # no sweeps/, no sweeps/<name>/
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "other").mkdir()  # a folder that was there before stays
    code, _, err = run_submit(capsys, "-m", "cluster=slurm", *TINY, "seed=0,1")
    assert code == 2 and [d.name for d in (tmp_path / "sweeps").iterdir()] == ["other"]


def test_a_folder_submit_cannot_make_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """os.access (the checks before) passes where mkdir fails (a full quota, NFS's root squash; here /proc): the
    error names the folder and the keys that move it, as train's does."""
    monkeypatch.chdir(tmp_path)
    for args in (["cluster=local", *TINY, "hydra.run.dir=/proc/allconv_x/run"],
                 ["-m", "cluster=local", *TINY, "seed=0,1", "cluster.array_parallelism=2",
                  "hydra.sweep.dir=/proc/allconv_x/sweep"]):
        code, out, err = run_submit(capsys, *args)
        assert code == 2 and err.strip() == (
            "allconv-hpc submit: error: cannot write /proc/allconv_x (No such file or directory); give a folder "
            "this user can write (hydra.run.dir, or hydra.sweep.dir for a sweep)"), err
        assert not out, out
    from allconv_hpc.submit_lock import submit_lock
    with pytest.raises(ConfigError, match="File name too long"):  # the folders made before the failing one go too
        with submit_lock(tmp_path / "new" / "deeper" / ("x" * 300)):
            pass
    assert not (tmp_path / "new").exists()


def test_newlines_in_folders_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="hydra.sweep.dir="):
        launcher.plan(["cluster=local", *TINY, "seed=0", f"hydra.sweep.dir='{tmp_path}/a\nb'"], multirun=True)


# --------------------------------------------------------------------- which cluster

def test_without_cluster_submit_takes_slurm_where_sbatch_is(tmp_path, on_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    on_path(sbatch="exit 1")
    assert launcher.auto_cluster(["optim.lr=0.1"]) == "slurm"
    assert launcher.auto_cluster(["cluster=local"]) is None and launcher.auto_cluster(["+cluster=slurm"]) is None
    code, out, _ = run_submit(capsys, "--dry-run", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0 and out.startswith("cluster=slurm (sbatch is on PATH"), out
    assert "cluster=slurm" in out.splitlines()[1]
    (tmp_path / "bin" / "sbatch").unlink()
    assert launcher.auto_cluster([]) == "local"
    code, out, err = run_submit(capsys, "--dry-run", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0 and out.startswith("cluster=local (no sbatch on PATH"), out
    assert err.endswith("allconv-hpc submit: dry run: nothing was submitted (1 run(s) would be, cluster=local)\n"), err
    assert "data.root" not in out  # generated data: no root to pin for the job


def test_a_key_given_twice_is_warned_once_per_submit(tmp_path, capsys):
    code, out, err = run_submit(capsys, "--dry-run", "-m", "cluster=local", "cluster.array_parallelism=2", *TINY,
                                "seed=0,1", "trainer.epochs=2", f"hydra.sweep.dir={tmp_path / 'sw'}")
    assert code == 0 and err.count("trainer.epochs is given twice (trainer.epochs=1 then trainer.epochs=2): the "
                                   "last, trainer.epochs=2, is the one used") == 1, err
    assert out.count("trainer.epochs=2") == 2, out  # both points: their jobs' Hydra keeps the last, as here


def test_ctrl_c_on_submit_wait_stops_watching_in_one_line(tmp_path, on_path, capsys, monkeypatch):
    on_path(sbatch="echo 'Submitted batch job 77'", squeue=squeue_says("PENDING"))

    def interrupted(folder, poll_s=5.0, jobs=None):
        assert jobs == {"77"}  # the job this submit queued
        raise KeyboardInterrupt
    monkeypatch.setattr(status, "wait_for", interrupted)
    code, out, err = run_submit(capsys, "--wait", "cluster=slurm", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 130 and out.startswith("job 77 ")
    assert err == f"stopped watching (Ctrl-C); the jobs go on; allconv-hpc status {tmp_path / 'run'}\n"


def test_jobs_are_queued_held_and_released_and_a_failed_release_says_how(tmp_path, on_path, capsys):
    """Slurm opens a task's log in .submitit/<job id>/ as it starts, which submitit makes only after sbatch
    answers: the job goes in held and is released then. Its python starts with the warning signal ignored."""
    cluster = cluster_of("cluster.signal=USR1", "checkpoint.signal=USR1")
    assert re.search(r"^#SBATCH --hold$", render(cluster, tmp_path), re.M)
    command = executor.make_executor(cluster, tmp_path / ".submitit" / "%j")._submitit_command_str
    assert command.startswith(f"""/bin/sh -c 'trap "" USR1 USR2; exec "$0" "$@"' {sys.executable} -u -m submitit"""), command
    # the task's python, as srun starts it, begins with USR1 and USR2 ignored (a real process; then the handlers)
    prefix = command.split(" -u -m submitit")[0]
    probe = ("import signal, os\nfor s in (signal.SIGUSR1, signal.SIGUSR2):\n    print(signal.getsignal(s)); "
             "os.kill(os.getpid(), s)\nprint('alive')")
    r = subprocess.run(f"{prefix} -c {shlex.quote(probe)}", shell=True, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == [str(int(signal.SIG_IGN))] * 2 + ["alive"], (r.stdout, r.stderr)
    hup = executor.make_executor(cluster_of("cluster.signal=HUP", "checkpoint.signal=HUP"), tmp_path / "%j")
    assert hup._submitit_command_str.startswith("""/bin/sh -c 'trap "" HUP USR1 USR2; exec"""), hup._submitit_command_str
    calls = tmp_path / "calls"
    on_path(sbatch="echo 'Submitted batch job 77'", scontrol=f'echo "scontrol $*" >> {calls}')
    code, out, err = run_submit(capsys, "cluster=slurm", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0 and calls.read_text() == "scontrol release 77\n", (err, calls.read_text())
    on_path(sbatch="echo 'Submitted batch job 78'", scontrol="echo 'Access/permission denied' >&2; exit 1")
    code, out, err = run_submit(capsys, "cluster=slurm", *TINY, f"hydra.run.dir={tmp_path / 'run2'}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("job(s) 78 are queued held and `scontrol release` failed (Access/permission denied); start them with: "
            "scontrol release 78") in err
    assert json.loads((tmp_path / "run2" / "submission.json").read_text())["job_id"] == "78"  # status knows it
    on_path(sbatch="echo 'Submitted batch job 80'", scontrol="exit 1")  # a failure that says nothing
    code, out, err = run_submit(capsys, "cluster=slurm", *TINY, f"hydra.run.dir={tmp_path / 'run4'}")
    assert code == 2 and "`scontrol release` failed (exit status 1); start them with: scontrol release 80" in err, err
    # held by its user's own wish (cluster.additional_parameters): left held
    on_path(sbatch="echo 'Submitted batch job 79'", scontrol=f'echo "scontrol $*" >> {calls}')
    code, out, err = run_submit(capsys, "cluster=slurm", *TINY, "+cluster.additional_parameters.hold=true",
                                f"hydra.run.dir={tmp_path / 'run3'}")
    assert code == 0 and calls.read_text() == "scontrol release 77\n", (err, calls.read_text())
    assert "held, as cluster.additional_parameters.hold asks: nothing starts until scontrol release 79" in out, out


def test_cluster_slurm_without_sbatch_is_refused_before_any_folder(tmp_path, on_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    on_path()
    code, out, err = run_submit(capsys, "-m", "cluster=slurm", *TINY, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sw'}")
    assert code == 2 and "sbatch is not on PATH" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "sw").exists()
    # a dry run shows the points all the same (a plan looked at from a laptop), and says what it cannot show
    code, out, err = run_submit(capsys, "--dry-run", "-m", "cluster=slurm", *TINY, "seed=0,1",
                                f"hydra.sweep.dir={tmp_path / 'sw'}")
    assert code == 0 and "sbatch not on PATH: the points below are what a Slurm login node would submit" in err, err
    assert [ln.split()[0] for ln in out.splitlines()] == [str(tmp_path / "sw" / f"seed={i}") for i in (0, 1)], out
    assert not (tmp_path / "sw").exists()


def test_a_module_in_the_submit_folder_that_would_shadow_the_jobs_imports_is_refused(tmp_path, capsys,
                                                                                    monkeypatch):
    """The job runs in the folder submit runs in, and its `python -m` puts it first on sys.path: a grp.py there
    stops submitit's own entry point (shown with the real one), after the queue. Refused before; a module of the
    user's own name is not, nor this package's source (a checkout submitted from its root)."""
    (tmp_path / "grp.py").write_text('raise SystemExit("the grp.py of the submit folder")\n')
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "__init__.py").write_text("")
    (tmp_path / "statistics.py").write_text("")  # imported by the job only later (by wandb), not by submit
    (tmp_path / "my_notes.py").write_text("")
    (tmp_path / "test.py").write_text("")  # Python's test package: the job never imports it
    (tmp_path / "smtplib.py").write_text("")  # nor Python's smtplib
    job = subprocess.run([sys.executable, "-m", "submitit.core._submit", str(tmp_path / "none")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert "the grp.py of the submit folder" in job.stderr, job.stderr
    monkeypatch.chdir(tmp_path)
    code, out, err = run_submit(capsys, "--dry-run", "cluster=local", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and f"{tmp_path} holds grp.py, statistics.py, yaml, named as module(s) of Python or of an " \
        f"installed package" in err, err
    assert "my_notes" not in err and "test.py" not in err and "smtplib" not in err and "submit from another folder, or rename them" in err and out == "", err
    (tmp_path / "kept").mkdir()  # out of the way: a folder without __init__.py is no module
    for p in ("grp.py", "statistics.py", "yaml"):
        shutil.move(tmp_path / p, tmp_path / "kept" / p)
    code, out, err = run_submit(capsys, "--dry-run", "cluster=local", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the checkout's root: allconv_hpc/ is this package
    code, out, err = run_submit(capsys, "--dry-run", "cluster=local", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err


def test_every_module_a_job_imports_is_one_the_shadowing_check_looks_for(tmp_path):
    """What the check looks for (plan.job_modules, as submit has it when it checks) holds every module a real job
    imports (its entry point, submitit.core._submit; its training, W&B offline) that a module of its folder could
    stand in for (found on sys.path: not built in, not frozen, not a module installed nowhere). A dependency that
    imports more, later, fails here, not in a user's job after the queue."""
    import importlib.machinery as machinery
    from proc import PY, clean_env

    def imported(*args: str) -> set:
        r = subprocess.run([PY, "-X", "importtime", *args], env=clean_env(tmp_path), capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$",
                                                                r.stderr, re.M)}
    job = imported("-c", "import submitit.core._submit") | imported(
        "-m", "allconv_hpc", "train", *TINY, "wandb.mode=offline", f"hydra.run.dir={tmp_path / 'run'}")
    checked = subprocess.run(  # job_modules() at the check, in a submit of its own
        [PY, "-c", "import sys; from allconv_hpc import cli, plan; seen = []; check = plan._refuse_shadowing_modules; "
                   "plan._refuse_shadowing_modules = lambda cwd: (seen.append(plan.job_modules()), check(cwd)); "
                   "code = cli.main(sys.argv[1:]); print(' '.join(sorted(seen[0]))); sys.exit(code)",
         "submit", "--dry-run", "cluster=local", *TINY, f"hydra.run.dir={tmp_path / 'run2'}"],
        env=clean_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr[-3000:]
    looked_for = set(checked.stdout.split())
    assert {"wandb", "torch", "hydra", "statistics", "cloudpickle"} <= job, sorted(job)
    # (importtime also lists what a package only tried: a module installed nowhere shadows nothing)
    missed = {m for m in job - looked_for if m not in sys.builtin_module_names
              and machinery.FrozenImporter.find_spec(m) is None and machinery.PathFinder.find_spec(m) is not None}
    assert not missed, " ".join(sorted(missed))


@pytest.mark.parametrize("cluster", ["slurm", "local"])
def test_torchrun_variables_left_in_the_shell_are_refused_before_the_queue(tmp_path, on_path, capsys, monkeypatch,
                                                                           cluster):
    """The jobs inherit them: on the dev cluster every task of a 2-rank job took RANK=0 over Slurm's rank and waited
    for a peer that never came, after the queue (a local job's tasks likewise)."""
    monkeypatch.chdir(tmp_path)
    on_path(sbatch=f"echo x >> {tmp_path / 'sbatch_calls'}; echo 'Submitted batch job 5'")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = run_submit(capsys, f"cluster={cluster}", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and "RANK=0 and WORLD_SIZE=2 are set in this shell" in err, err
    assert "unset RANK WORLD_SIZE, then submit again" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "sbatch_calls").exists() and not (tmp_path / "run").exists() and out == ""
    monkeypatch.delenv("WORLD_SIZE")  # RANK alone is no launch (detect_env reads both): not refused
    code, out, err = run_submit(capsys, "--dry-run", f"cluster={cluster}", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0 and "RANK" not in err, err


@pytest.mark.parametrize("given", ["cluster=slurm cluster.backend=local", "cluster=local cluster.backend=slurm",
                                   "cluster=local +cluster.backend=slurm"])
def test_cluster_backend_given_is_refused_for_the_profile(tmp_path, on_path, capsys, monkeypatch, given):
    """Quietly obeyed, it trained on the login node with the slurm profile's keys, or queued local's week."""
    monkeypatch.chdir(tmp_path)
    on_path()
    code, out, err = run_submit(capsys, "--dry-run", *given.split(), *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and err.strip() == ("allconv-hpc submit: error: cluster.backend is the cluster profile's own: "
                                         "choose it with cluster=local or cluster=slurm (or a site's profile), not "
                                         "cluster.backend="), err


def test_a_point_newly_named_with_the_config_of_an_earlier_point_is_refused(tmp_path, on_path, capsys, monkeypatch):
    """A sweep over seed, grown by sweeping optim.lr too: optim.lr=0.05,seed=7 is the old seed=7 under a new name,
    and would train it again from scratch (a second W&B run of it in the group)."""
    from omegaconf import OmegaConf
    monkeypatch.chdir(tmp_path)
    on_path()
    sweep = tmp_path / "sw"
    old = sweep / "seed=7"
    (old / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(compose(["cluster=local", *TINY, "seed=7", "optim.lr=0.05"]).cfg_dict),
                   old / ".hydra" / "config.yaml")
    (old / "status.json").write_text(json.dumps({"state": "completed", "updated": time.time()}))
    base = ["--dry-run", "-m", "cluster=local", "cluster.array_parallelism=4", *TINY, f"hydra.sweep.dir={sweep}"]
    code, out, err = run_submit(capsys, *base, "optim.lr=0.05,0.1", "seed=7,8", "trainer.epochs=3")
    assert code == 2 and ("sweep point optim.lr=0.05,seed=7 has the config of seed=7, already in this sweep under "
                          "another name: it would train it again from scratch") in err, err
    code, out, err = run_submit(capsys, *base, "optim.lr=0.1", "seed=8,8,9")  # a value twice: named
    assert code == 2 and err.strip().endswith("two sweep points map to the same run folder seed=8; give each swept "
                                              "value once"), err
    # an int recorded for a float key is the same value (optim.lr=1 then, optim.lr=1.0 now)
    (sweep / "seed=9" / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(compose(["cluster=local", *TINY, "seed=9", "optim.lr=1"]).cfg_dict),
                   sweep / "seed=9" / ".hydra" / "config.yaml")
    (sweep / "seed=9" / "status.json").write_text(json.dumps({"state": "completed", "updated": time.time()}))
    code, out, err = run_submit(capsys, *base, "optim.lr=1.0,0.1", "seed=9")
    assert code == 2 and "sweep point optim.lr=1.0 has the config of seed=9" in err, err
    # a sweep submitted again with a swept key given one value (seed=3,4 of optim.lr=0.01,0.05 x seed=3,4): the fix
    # names the choice(...) that keeps that key naming the folders
    (sweep / "optim.lr=0.01,seed=3" / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(compose(["cluster=local", *TINY, "seed=3", "optim.lr=0.01"]).cfg_dict),
                   sweep / "optim.lr=0.01,seed=3" / ".hydra" / "config.yaml")
    (sweep / "optim.lr=0.01,seed=3" / "status.json").write_text(json.dumps({"state": "completed", "updated": 1.0}))
    code, out, err = run_submit(capsys, *base, "optim.lr=0.01", "seed=3,4")
    assert code == 2 and ("sweep point seed=3 has the config of optim.lr=0.01,seed=3, already in this sweep under "
                          "another name") in err and "(here: 'optim.lr=choice(0.01)')" in err, err
    code, out, err = run_submit(capsys, *base, "optim.lr=choice(0.1)", "seed=7,8")  # the new values only
    assert code == 0, err
    assert [ln.split()[0] for ln in out.splitlines()] == [str(sweep / f"optim.lr=0.1,seed={s}") for s in (7, 8)]
    # a sweep over a key a resume may change (one identity): its points are distinct runs, submitted again as such
    long, tiny = tmp_path / "long", [o for o in TINY if not o.startswith("trainer.epochs=")]
    first = long / "trainer.epochs=1"
    (first / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(compose(["cluster=local", *tiny, "trainer.epochs=1"]).cfg_dict),
                   first / ".hydra" / "config.yaml")
    (first / "status.json").write_text(json.dumps({"state": "interrupted", "updated": time.time()}))
    code, out, err = run_submit(capsys, "--dry-run", "-m", "cluster=local", "cluster.array_parallelism=2", *tiny,
                                "trainer.epochs=1,2", f"hydra.sweep.dir={long}")
    assert code == 0 and "has the config of" not in err, err


def test_points_added_to_a_sweep_keep_every_key_that_names_its_folders(tmp_path, on_path, capsys, monkeypatch):
    """`optim.lr=choice(0.01) seed=2` into a sweep over optim.lr x seed named its point `optim.lr=0.01`, beside the
    `optim.lr=...,seed=...` ones, and the next such point was refused as another config: refused at once, with the
    choice(...) that keeps the key swept."""
    monkeypatch.chdir(tmp_path)
    on_path(sbatch='[ "$1" = --test-only ] && exit 0; echo "Submitted batch job 77"', squeue=squeue_says("PENDING"))
    sweep = tmp_path / "sw"
    base = ["-m", "cluster=slurm", *TINY, f"hydra.sweep.dir={sweep}"]
    code, out, err = run_submit(capsys, *base, "optim.lr=0.01,0.02", "seed=0,1")
    assert code == 0, err
    code, out, err = run_submit(capsys, "--dry-run", *base, "optim.lr=choice(0.01)", "seed=2")
    assert code == 2 and err.strip() == (
        "allconv-hpc submit: error: seed names this sweep's point folders (optim.lr=0.01,seed=0, ...) but is not "
        "swept now, so the new points would be named without it: give 'seed=choice(2)' to keep it swept (README, "
        "\"Submitting a sweep again\")"), err
    code, out, err = run_submit(capsys, "--dry-run", *base, "seed=2,3")  # optim.lr left out
    assert code == 2 and "optim.lr names this sweep's point folders" in err and "'optim.lr=choice(<value>)'" in err
    code, out, err = run_submit(capsys, "--dry-run", *base, "optim.lr=choice(0.01)", "seed=choice(2)")
    assert code == 0 and out.startswith(f"{sweep / 'optim.lr=0.01,seed=2'}  "), out


def test_a_sweep_grown_without_its_folder_is_refused_where_it_would_retrain(tmp_path, on_path, capsys, monkeypatch):
    """optim.lr=0.05,0.1 and then 0.05,0.1,0.2 with no hydra.sweep.dir: the default folder names the values, so the
    second is a new folder, where 0.05 and 0.1 would train again from scratch: refused, naming the first sweep."""
    from omegaconf import OmegaConf
    monkeypatch.chdir(tmp_path)
    on_path()
    base = ["cluster=local", "cluster.array_parallelism=4", *TINY]
    first = tmp_path / sweep_name(*base, "optim.lr=0.05,0.1")
    for lr in ("0.05", "0.1"):
        point = first / f"optim.lr={lr}"
        (point / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(compose([*base, f"optim.lr={lr}"]).cfg_dict), point / ".hydra" / "config.yaml")
    (first / "sweep.json").write_text(json.dumps({"sweep_dir": str(first), "jobs": []}))
    code, out, err = run_submit(capsys, "--dry-run", "-m", *base, "optim.lr=0.05,0.1,0.2")
    assert code == 2 and err.strip() == (
        f"allconv-hpc submit: error: 2 of this sweep's points (optim.lr=0.05, optim.lr=0.1) are runs of {first} "
        f"already, an earlier sweep over the same keys; this sweep's own folder "
        f"{tmp_path / sweep_name(*base, 'optim.lr=0.05,0.1,0.2')} would train them again from scratch. To add to that "
        f"sweep, give hydra.sweep.dir={first} (its points go on from where they are: a completed one gets no new job, "
        f"a larger trainer.epochs trains it on); for a sweep of its own, another "
        f"hydra.sweep.dir"), err
    code, out, err = run_submit(capsys, "--dry-run", "-m", *base, "optim.lr=0.05,0.1,0.2", f"hydra.sweep.dir={first}")
    assert code == 0, err
    code, out, err = run_submit(capsys, "--dry-run", "-m", *base, "optim.lr=0.2,0.3")  # none held: a sweep of its own
    assert code == 0, err
    code, out, err = run_submit(capsys, "--dry-run", "-m", *base, "optim.weight_decay=0.01", "optim.lr=0.05,0.1,0.2")
    assert code == 0, err  # another config is another run
    code, out, err = run_submit(capsys, "--dry-run", "-m", *base, "trainer.epochs=2", "optim.lr=0.05,0.1,0.2")
    assert code == 2 and "are runs of" in err, err  # a longer run of them: that sweep's runs train on (a resume)
    # queued, not started yet (no .hydra: hours on a busy cluster): its points are its submissions' configs
    on_path(sbatch='[ "$1" = --test-only ] && exit 0; echo "Submitted batch job 77"', squeue=squeue_says("PENDING"))
    slurm = ["cluster=slurm", *TINY]
    code, out, err = run_submit(capsys, "-m", *slurm, "optim.lr=0.01,0.02")
    assert code == 0, err
    queued = tmp_path / sweep_name(*slurm, "optim.lr=0.01,0.02")
    assert (queued / "optim.lr=0.01" / "submission.json").is_file() and not (queued / "optim.lr=0.01" / ".hydra").exists()
    code, out, err = run_submit(capsys, "--dry-run", "-m", *slurm, "optim.lr=0.01,0.02,0.03")
    assert code == 2 and f"2 of this sweep's points (optim.lr=0.01, optim.lr=0.02) are runs of {queued} already" in err
    # ... and in their own folder, under another name (a key newly swept)
    code, out, err = run_submit(capsys, "--dry-run", "-m", *slurm, "optim.lr=0.01,0.05", "seed=0,1",
                                f"hydra.sweep.dir={queued}")
    assert code == 2 and "sweep point optim.lr=0.01,seed=0 has the config of optim.lr=0.01, already in this sweep" in err


def test_a_sweep_with_nothing_swept_says_so(tmp_path, on_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    on_path()
    # a list Hydra reads as one value of a group (model=[a,b]) is refused, not first called "nothing swept"
    code, out, err = run_submit(capsys, "--dry-run", "-m", "cluster=local", *TINY, "model=[allcnn_c,model_a]",
                                f"hydra.sweep.dir={tmp_path / 'sw'}")
    assert code == 2 and "picks 2 model options at once" in err and "nothing is swept" not in err, err
    code, out, err = run_submit(capsys, "--dry-run", "-m", "cluster=local", *TINY, f"hydra.sweep.dir={tmp_path / 'sw'}")
    assert code == 0 and [ln.split()[0] for ln in out.splitlines()] == [str(tmp_path / "sw" / "run")], out
    assert (f"warning: -m but nothing is swept (no comma list, range, choice or glob): one run, in {tmp_path / 'sw'}"
            f"/run; without -m it trains in hydra.run.dir") in err, err
    code, out, err = run_submit(capsys, "--dry-run", "-m", "cluster=local", "cluster.array_parallelism=2", *TINY,
                                "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sw'}")
    assert code == 0 and "nothing is swept" not in err, err


def test_a_subset_larger_than_the_data_is_refused_before_the_queue(tmp_path, on_path, capsys, monkeypatch):
    """A rebuilt or cut CIFAR copy holds fewer images than the official release, so the config cannot know;
    submit reads the counts (once for the sweep) and refuses the point before anything queues."""
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "sbatch.log"
    on_path(sbatch=f"echo called >> {log}; exit 1")
    images, labels = torch.zeros(20, 3, 32, 32, dtype=torch.uint8), torch.arange(20) % 10
    write_cifar(tmp_path / "c10", "cifar10", images, labels, images[:8], labels[:8], [str(i) for i in range(10)])
    tiny = [o for o in TINY if not o.startswith(("data=", "data.train_size", "data.test_size", "trainer.batch_size"))]
    args = ["-m", "cluster=slurm", *tiny, "data=cifar10", f"data.root={tmp_path / 'c10'}", "trainer.batch_size=4",
            f"hydra.sweep.dir={tmp_path / 'sw'}"]
    code, out, err = run_submit(capsys, *args, "data.train_size=10,30")
    assert code == 2 and "data.train_size=30 is larger than the 20 images available; use <= 20" in err, err
    code, out, err = run_submit(capsys, *args, "data.test_size=9")
    assert code == 2 and "data.test_size=9 is larger than the 8 images available; use <= 8" in err, err
    # a drop_last batch the cut copy cannot fill (the config's own check knows only the official 50,000 images);
    # it was refused in the job, after the queue
    args = [a for a in args if not a.startswith("trainer.batch_size")]
    code, out, err = run_submit(capsys, *args, "trainer.drop_last=true", "trainer.batch_size=8,24")
    assert code == 2 and (f"trainer.batch_size=24 with trainer.drop_last=true leaves no step for 20 training images in "
                          f"{tmp_path / 'c10'}") in err, err
    code, out, err = run_submit(capsys, *args, "trainer.drop_last=true", "trainer.batch_size=24", "data.val_size=5",
                                "--dry-run")
    assert code == 2 and "leaves no step for 15 training images" in err, err  # what the held-out images leave
    assert not (tmp_path / "sw").exists() and not log.exists()  # no folder, nothing handed to sbatch
    on_path(sbatch="exit 0")  # --test-only
    code, out, err = run_submit(capsys, *args, "trainer.drop_last=true", "trainer.batch_size=20", "--dry-run")
    assert code == 0, err  # one step: the batch fits


def test_a_sweep_over_slurms_max_array_size_is_refused_before_the_queue(tmp_path, on_path, capsys, monkeypatch):
    """sbatch says only "Invalid job array specification" (after minutes of planning a large sweep): the limit and
    the fix are said instead."""
    monkeypatch.chdir(tmp_path)
    on_path(sbatch="exit 0", scontrol='[ "$1 $2" = "show config" ] && echo "MaxArraySize            = 3"; exit 0')
    args = ["--dry-run", "-m", "cluster=slurm", *TINY, f"hydra.sweep.dir={tmp_path / 'sw'}"]
    import allconv_hpc.compose as compose_mod
    composed_points = []
    real = compose_mod.compose
    monkeypatch.setattr(compose_mod, "compose", lambda ov, *a, **k: composed_points.append(ov) or real(ov, *a, **k))
    code, out, err = run_submit(capsys, *args, "seed=0,1,2,3")
    assert len(composed_points) <= 2, len(composed_points)  # said after the first point, not after every one
    assert code == 2 and err.strip() == (
        "allconv-hpc submit: error: the sweep submits 4 points as one job array, but Slurm's MaxArraySize here is 3 "
        "(scontrol show config): submit it in parts of at most 3 points, e.g. a range(...) or choice(...) of fewer "
        "values in each submit into the same hydra.sweep.dir"), err
    code, out, err = run_submit(capsys, *args, "seed=0,1,2")
    assert code == 0, err


def test_sbatch_rejecting_the_job_is_one_line_and_leaves_no_folder(tmp_path, on_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    on_path(sbatch="echo 'sbatch: error: invalid partition specified: nope' >&2\n"
                   "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\nexit 1")
    code, out, err = run_submit(capsys, "cluster=slurm", "cluster.partition=nope", *TINY,
                                f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2, err
    assert err.strip().splitlines() == [
        "allconv-hpc submit: error: sbatch refused the job: invalid partition specified: nope; Batch job submission "
        "failed: Invalid partition name specified (check cluster.partition, cluster.account, cluster.qos and the "
        "other cluster.* values)"], err
    assert not (tmp_path / "run").exists()
    # the partitions there are, where sinfo tells
    on_path(sbatch="echo 'sbatch: error: invalid partition specified: nope' >&2\nexit 1", sinfo="printf 'low*\\nhigh\\n'")
    code, out, err = run_submit(capsys, "cluster=slurm", "cluster.partition=nope", *TINY,
                                f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and err.strip().endswith("invalid partition specified: nope (give cluster.partition one of: low "
                                              "(the default), high)"), err
    # Slurm not configured on this host: not the job's settings
    on_path(sbatch="echo 'sbatch: error: Could not establish a configuration source' >&2\nexit 1")
    code, _, err = run_submit(capsys, "cluster=slurm", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and ("error: Slurm does not answer here, sbatch said: Could not establish a configuration "
                          "source (check SLURM_CONF and that slurmctld runs" in err), err
    on_path(sbatch="echo 'sbatch: error: s_p_parse_file: cannot stat file /nonexistent: No such file or directory, "
                   "retrying in 1sec up to 60sec' >&2\nexit 1")  # SLURM_CONF naming no file: not the job's settings
    code, _, err = run_submit(capsys, "cluster=slurm", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and "cannot stat file /nonexistent" in err and "(check SLURM_CONF and that slurmctld" in err, err
    # the test passes (or timed out: a warning) and sbatch itself fails: submitit's script and pickle go too
    on_path(sbatch='[ "$1" = --test-only ] && { echo "sbatch: Job 3 to start at now" >&2; exit 0; }\n'
                   "echo 'sbatch: error: Batch job submission failed: Invalid account' >&2\nexit 1")
    for sweep in ([], ["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'run'}"]):
        code, _, err = run_submit(capsys, "cluster=slurm", *TINY, *(sweep or [f"hydra.run.dir={tmp_path / 'run'}"]))
        assert code == 2 and "sbatch refused the job: Batch job submission failed: Invalid account" in err, err
        assert not (tmp_path / "run").exists(), sorted((tmp_path / "run").rglob("*"))
    # GPUs the partition has not: the hint names the GPU keys
    on_path(sbatch="echo 'sbatch: error: Batch job submission failed: Invalid generic resource (gres) "
                   "specification' >&2\nexit 1")
    code, _, err = run_submit(capsys, "cluster=slurm", *TINY, "cluster.gpus_per_node=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and "(check cluster.gpus_per_node and cluster.gpu_type against the partition's GPUs" in err, err


# ------------------------------------------------------------------ the run folder

def test_a_run_folder_with_a_queued_job_is_refused(tmp_path, on_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "submission.json").write_text(json.dumps({"job_id": "42", "backend": "slurm", "run_dir": str(run)}))
    on_path(sbatch="exit 1", squeue='[ "$3" = 42 ] && ' + squeue_says("RUNNING"))
    with pytest.raises(ConfigError, match=r"already has job 42 \(RUNNING\).*scancel 42"):
        launcher.plan(["cluster=slurm", *TINY, f"hydra.run.dir={run}"], multirun=False)
    # another config: refused as such now (else once the job was scancelled as advised, refused a second time)
    rec = json.loads((run / "submission.json").read_text())
    (run / "submission.json").write_text(json.dumps({**rec, "overrides": [*TINY]}))
    with pytest.raises(ConfigError, match=r"holds a run of a different config \(optim.lr: 0.05 -> 0.02\).*; job 42 "
                                          r"\(RUNNING\) trains it now, with the config it was submitted with$"):
        launcher.plan(["cluster=slurm", *TINY, "optim.lr=0.02", f"hydra.run.dir={run}"], multirun=False)
    with pytest.raises(ConfigError, match=r"already has job 42 \(RUNNING\).*scancel 42"):  # a start over: any config
        launcher.plan(["cluster=slurm", *TINY, "optim.lr=0.02", "checkpoint.resume=never", f"hydra.run.dir={run}"],
                      multirun=False)
    on_path(sbatch="exit 1", squeue='[ "$3" = 42 ] && ' + squeue_says("COMPLETING"))  # scancelled a moment ago: nothing to stop
    with pytest.raises(ConfigError, match=r"has job 42 still ending \(COMPLETING\).*submit again in a few seconds$"):
        launcher.plan(["cluster=slurm", *TINY, f"hydra.run.dir={run}"], multirun=False)
    # a sweep's point: skipped with the same advice (it was "job 42 (COMPLETING)", as if it ran on)
    assert folder_checks.check_run_folder(run, composed(*TINY).cfg, sweep=True) == (
        "job 42 is still ending (COMPLETING); if it did not complete the run, submit again in a few seconds")
    on_path(squeue="exit 0")  # ended: resubmitting resumes
    assert launcher.plan(["cluster=slurm", *TINY, f"hydra.run.dir={run}"], multirun=False)[0][0].run_dir == run


def test_train_by_hand_into_a_folder_a_job_trains_into_is_refused(tmp_path, on_path):
    run = write_run(tmp_path, "running")  # submission.json: Slurm job 42
    on_path(squeue='[ "$3" = 42 ] && ' + squeue_says("RUNNING"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "train", *TINY, f"hydra.run.dir={run}"], env=env,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"run folder {run} has job 42 (RUNNING) training into it" in r.stderr and "(scancel 42)" in r.stderr
    assert not (run / "train.log").exists()  # refused before any work
    # the job's own ranks, also after a requeue, never ask squeue and go on
    assert jobs.other_jobs_state(run, {"SLURM_JOB_ID": "42"}) is None
    assert jobs.other_jobs_state(run, {"SLURM_JOB_ID": "43"})[1] == "RUNNING"  # another job: refused
    (run / "submission.json").write_text(json.dumps({"job_id": "40_2", "backend": "slurm", "run_dir": str(run)}))
    on_path(squeue='[ "$3" = 40_2 ] && ' + squeue_says("RUNNING"))
    assert jobs.other_jobs_state(run, {"SLURM_JOB_ID": "41", "SLURM_ARRAY_JOB_ID": "40",
                                         "SLURM_ARRAY_TASK_ID": "2"}) is None  # array task 40_2 itself
    assert jobs.other_jobs_state(run, {})[1] == "RUNNING"
    on_path(squeue="exit 0")  # it ended: training by hand resumes the run
    assert jobs.other_jobs_state(run, {}) is None


def test_a_sweep_submitted_again_asks_squeue_once_for_all_its_points_jobs(tmp_path, on_path, capsys, monkeypatch):
    """Each point's last job is checked before anything is queued, and again under the submit lock: one squeue
    call for every point's job each time (it was one a point: 200 for a sweep of 200, twice)."""
    monkeypatch.chdir(tmp_path)
    calls = tmp_path / "calls"
    on_path(sbatch="[ \"$1\" = --test-only ] && exit 0; echo 'Submitted batch job 77'",
            squeue=f'echo "$3" >> {calls}; exit 0', sacct=NO_ACCOUNTING)  # none queued any more
    sweep = tmp_path / "sw"
    for i in range(5):
        (sweep / f"seed={i}").mkdir(parents=True)
        (sweep / f"seed={i}" / "submission.json").write_text(json.dumps(
            {"job_id": str(50 + i), "backend": "slurm", "run_dir": str(sweep / f"seed={i}")}))
    code, out, err = run_submit(capsys, "-m", "cluster=slurm", *TINY, "seed=0,1,2,3,4", f"hydra.sweep.dir={sweep}")
    assert code == 0, err
    assert calls.read_text().splitlines() == ["50,51,52,53,54"] * 2, calls.read_text()


def test_a_resubmitted_sweep_submits_only_what_is_left(tmp_path, on_path, capsys, monkeypatch):
    """Resubmitting a sweep fills it in: a completed point and one whose job is still queued get no new
    job (each would start only to stop, or train twice into one folder); sweep.json keeps every point."""
    monkeypatch.chdir(tmp_path)
    on_path(sbatch=f"[ \"$1\" = --test-only ] && exit 0; echo x >> {tmp_path / 'sbatch_calls'}; "
                   f"echo 'Submitted batch job 77'", squeue='[ "$3" = 42 ] && ' + squeue_says("RUNNING") + '; exit 0')
    sweep = tmp_path / "sw"
    done, busy, new = (sweep / f"seed={i}" for i in range(3))
    identity = compose(["cluster=slurm", *TINY, "seed=0"]).cfg.identity()
    CheckpointDir(done / "checkpoints", keep=2).save(
        {"identity": identity, "train_state": {"epoch": 1, "step_in_epoch": 0}}, step=1)  # TINY: 1 epoch
    (done / "status.json").write_text(json.dumps({"state": "completed", "updated": time.time()}))
    busy.mkdir(parents=True)
    args = ["cluster=slurm", *TINY, "seed=0,1,2", f"hydra.sweep.dir={sweep}"]
    busy_ov = next(p.overrides for p in launcher.plan(args, multirun=True)[0] if p.run_dir == busy)
    (busy / "submission.json").write_text(json.dumps({"job_id": "42", "backend": "slurm", "run_dir": str(busy),
                                                      "overrides": busy_ov}))
    cfg = compose(busy_ov).cfg
    assert folder_checks.check_run_folder(busy, cfg, sweep=True, overrides=busy_ov) == "job 42 (RUNNING)"
    more = busy_ov + ["trainer.epochs=3"]  # a change a resume takes: it waits for a later submit, said so
    assert ("runs it with the settings it was submitted with, not these (trainer.epochs=3 given now, the job has "
            "trainer.epochs=1); submit again when it has ended to apply them") in folder_checks.check_run_folder(
        busy, compose(more).cfg, sweep=True, overrides=more)
    assert folder_checks._changes(["a=1", "b=2", "c=3"], ["a=1", "b=5", "d=4"]) == (  # read as the job's (audit)
        "b=5 given now, the job has b=2; c=3 in the job, left out now; d=4 given now, not in the job")
    assert folder_checks._changes(["b=2", "a=1", "b=3"], ["a=1", "b=3"]) == ""  # Hydra's last wins, in any order
    # the sweep's folder named, as status's sweep command does: no change to apply (it said one; laptop audit)
    named = busy_ov
    busy_ov = [o for o in busy_ov if not o.startswith("hydra.sweep.dir=")]  # submitted with the folder's name unsaid
    (busy / "submission.json").write_text(json.dumps({"job_id": "42", "backend": "slurm", "run_dir": str(busy),
                                                      "overrides": busy_ov}))
    assert named != busy_ov
    assert folder_checks.check_run_folder(busy, compose(named).cfg, sweep=True, overrides=named) == "job 42 (RUNNING)"
    assert folder_checks.check_run_folder(busy, cfg, sweep=True, overrides=busy_ov[::-1]) == "job 42 (RUNNING)"
    other = busy_ov + ["optim.lr=0.1"]  # another config: refused now, as it would be once the job has ended
    with pytest.raises(ConfigError, match=r"holds a run of a different config \(optim.lr: 0.05 -> 0.1\); use another "
                       r"hydra.sweep.dir.*; job 42 \(RUNNING\) trains it now, with the config it was submitted with"):
        folder_checks.check_run_folder(busy, compose(other).cfg, sweep=True, overrides=other)
    code, out, err = run_submit(capsys, "-m", *args)
    assert code == 0, err
    assert f"not submitted again (completed): {done}" in out and f"not submitted again (job 42 (RUNNING)): {busy}" in out
    assert [ln for ln in out.splitlines() if ln.startswith("job ")] == [f"job 77  {new}"], out
    assert [r["job_id"] for r in json.loads((sweep / "sweep.json").read_text())["jobs"]] == [None, "42", "77"]
    # sweep.json damaged, nothing left to submit: written anew (status's fix for it said so, and did nothing)
    CheckpointDir(new / "checkpoints", keep=2).save(  # job 77 completed it
        {"identity": compose(["cluster=slurm", *TINY, "seed=2"]).cfg.identity(),
         "train_state": {"epoch": 1, "step_in_epoch": 0}}, step=1)
    (new / "status.json").write_text(json.dumps({"state": "completed", "updated": time.time()}))
    later = sweep / "seed=9"  # a point a later submit added: its folder's own record
    later.mkdir()
    (later / "submission.json").write_text(json.dumps({"job_id": "90", "backend": "slurm", "run_dir": str(later)}))
    for damaged in ('{"jobs": [', '{"jobs": []}', '{"jobs": [3]}', None):  # status refuses each (None: deleted)
        if damaged is None:
            (sweep / "sweep.json").unlink()
        else:
            (sweep / "sweep.json").write_text(damaged)
        code, out, err = run_submit(capsys, "-m", *args)
        assert code == 0 and "nothing to submit" in out and f"wrote {sweep / 'sweep.json'} anew" in out, (out, err)
        assert [r["job_id"] for r in json.loads((sweep / "sweep.json").read_text())["jobs"]] == [None, "42", "77", "90"]
    code, out, err = run_submit(capsys, "-m", *args)  # whole: left as it is
    assert code == 0 and "anew" not in out, out
    shutil.rmtree(later)
    # one completed run: no job at all; with more epochs it trains on
    code, out, err = run_submit(capsys, "--dry-run", "cluster=slurm", *TINY, "seed=0", f"hydra.run.dir='{done}'")
    assert code == 0 and out.splitlines()[-1] == ("nothing to submit: every run is completed or queued "
                                                  "(trainer.epochs=N grows a completed run)"), out  # a dry run too
    code, out, err = run_submit(capsys, "cluster=slurm", *TINY, "seed=0", f"hydra.run.dir='{done}'")
    assert code == 0 and "nothing to submit" in out and (tmp_path / "sbatch_calls").read_text() == "x\n", err
    (done / "status.json").write_text(json.dumps({"state": "running", "updated": time.time()}))  # killed at the end
    code, out, _ = run_submit(capsys, "cluster=slurm", *TINY, "seed=0", f"hydra.run.dir='{done}'")
    assert code == 0 and f"job 77  {done}" in out, out  # the job finishes it (status, W&B) at once
    code, out, _ = run_submit(capsys, "cluster=slurm", *TINY, "seed=0", "trainer.epochs=2", f"hydra.run.dir='{done}'")
    assert code == 0 and f"job 77  {done}" in out, out
    # squeue not answering: job 77 may still run, so nothing is submitted into its folder
    on_path(sbatch=f"[ \"$1\" = --test-only ] && exit 0; echo x >> {tmp_path / 'sbatch_calls'}; "
                   f"echo 'Submitted batch job 78'",
            squeue="echo 'slurm_load_jobs error: Socket timed out' >&2; exit 1")
    calls = (tmp_path / "sbatch_calls").read_text()
    code, _, err = run_submit(capsys, "cluster=slurm", *TINY, "seed=0", "trainer.epochs=2", f"hydra.run.dir='{done}'")
    assert code == 2 and "squeue did not answer whether job 77" in err and "squeue -j 77" in err, err
    assert "(squeue: slurm_load_jobs error: Socket timed out)" in err, err  # why, in squeue's words
    assert (tmp_path / "sbatch_calls").read_text() == calls


def test_a_moved_sweep_keeps_its_wandb_group(tmp_path, on_path, capsys, monkeypatch):
    """The group was the folder's name at each submit: a sweep moved (or renamed) and resubmitted put each resumed
    point's W&B run into a second group, unsaid (found by a sweep journey audit). Its sweep.json keeps it now."""
    monkeypatch.chdir(tmp_path)
    on_path(sbatch="[ \"$1\" = --test-only ] && exit 0; echo 'Submitted batch job 77'", squeue="exit 0")
    first, moved = tmp_path / "it's first", tmp_path / "moved"
    group = lambda folder: {c.cfg.wandb.group for c in (compose(p.overrides) for p in  # noqa: E731
                                                        launcher.plan(["cluster=slurm", *TINY, "seed=0,1",
                                                                       f'hydra.sweep.dir="{folder}"'], True)[0])}
    assert group(first) == {"it's first"}  # no sweep.json yet: the folder's name
    code, out, err = run_submit(capsys, "-m", "cluster=slurm", *TINY, "seed=0,1", f'hydra.sweep.dir="{first}"')
    assert code == 0, err
    first.rename(moved)
    assert group(moved) == {"it's first"}
    (moved / "sweep.json").unlink()  # nothing recorded: the name, as before
    assert group(moved) == {"moved"}
    # a group the user gave is theirs, not the sweep's: not taken on by a later submit without it
    mine = tmp_path / "mine"
    code, out, err = run_submit(capsys, "-m", "cluster=slurm", *TINY, "seed=0,1", 'wandb.group="my grp"',
                                f"hydra.sweep.dir={mine}")
    assert code == 0 and json.loads((mine / "sweep.json").read_text())["wandb_group"] == "mine", err
    assert group(mine) == {"mine"}


def test_a_subset_resubmitted_into_a_sweep_keeps_the_other_points(tmp_path, on_path, capsys, monkeypatch):
    """sweep.json is merged by run_dir: the points not submitted now stay tracked, each with its cluster."""
    monkeypatch.chdir(tmp_path)
    count = tmp_path / "count"
    on_path(sbatch=f'[ "$1" = --test-only ] && exit 0; n=76; [ -f {count} ] && read n < {count}; n=$((n + 1)); '
                   f'echo $n > {count}; echo "Submitted batch job $n"', squeue="exit 0")  # no cat on PATH
    sweep = tmp_path / "sw"
    code, out, err = run_submit(capsys, "-m", "cluster=slurm", *TINY, "seed=0,1,2,3", f"hydra.sweep.dir={sweep}")
    assert code == 0, err
    code, out, err = run_submit(capsys, "-m", "cluster=slurm", *TINY, "seed=1,3", "cluster.timeout_min=30",
                                f"hydra.sweep.dir={sweep}")
    assert code == 0 and out.count("\njob ") + out.startswith("job ") == 2, out
    doc = json.loads((sweep / "sweep.json").read_text())
    assert [(Path(r["run_dir"]).name, r["job_id"], r["cluster"]["timeout_min"]) for r in doc["jobs"]] == [
        ("seed=0", "77_0", 60), ("seed=1", "78_0", 30), ("seed=2", "77_2", 60), ("seed=3", "78_1", 30)], doc["jobs"]
    assert doc["cluster"]["timeout_min"] == 30  # the last submission's
    assert [r["folder"] for r in status.run_rows(sweep)] == ["seed=0", "seed=1", "seed=2", "seed=3"]
    # moved (off scratch), then reached through a link: a point is its folder's name, tracked once, where it is now
    moved = tmp_path / "archive" / "sw"
    moved.parent.mkdir()
    sweep.rename(moved)
    (tmp_path / "link").symlink_to(tmp_path / "archive")
    for where, n in ((moved, 79), (tmp_path / "link" / "sw", 80)):  # their jobs ended without a word: all again
        code, out, err = run_submit(capsys, "-m", "cluster=slurm", *TINY, "seed=0,1,2,3", f"hydra.sweep.dir={where}")
        assert code == 0 and out.count(f"job {n}_") == 4, (out, err)
        doc = json.loads((moved / "sweep.json").read_text())
        assert [(Path(r["run_dir"]).name, r["job_id"]) for r in doc["jobs"]] == [
            (f"seed={i}", f"{n}_{i}") for i in range(4)], doc["jobs"]
        assert [r["folder"] for r in status.run_rows(where)] == ["seed=0", "seed=1", "seed=2", "seed=3"]
    doc["jobs"].append({**doc["jobs"][0], "job_id": "76_0", "submitted": 1.0})  # as written before: a point twice,
    doc["jobs"].append({**doc["jobs"][1], "job_id": "75_1", "submitted": 1.0,  # also through a link to its folder
                        "run_dir": str(tmp_path / "link" / "sw" / "seed=1")})
    (moved / "sweep.json").write_text(json.dumps(doc))
    assert [(r["folder"], r["job"]) for r in status.run_rows(moved)] == [(f"seed={i}", f"80_{i}") for i in range(4)]


def test_status_names_the_submit_command_that_goes_on_with_a_stopped_run(tmp_path, on_path, capsys, monkeypatch):
    """"the same `submit -m` command (the whole sweep)" named none for points a later submit added (the first
    command never resumes them), nor for a sweep copied elsewhere (found by a sweep journey audit). Each job
    records its submit command; status gives it, aimed at the folder where the run is now, and it resumes it."""
    monkeypatch.chdir(tmp_path)
    count = tmp_path / "count"
    on_path(sbatch=f'[ "$1" = --test-only ] && exit 0; n=76; [ -f {count} ] && read n < {count}; n=$((n + 1)); '
                   f'echo $n > {count}; echo "Submitted batch job $n"', squeue="exit 0")
    sweep, copy = tmp_path / "sw", tmp_path / "copy of sw"
    first = ["-m", "cluster=slurm", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}"]
    added = ["-m", "cluster=slurm", *TINY, "seed=choice(7)", f"hydra.sweep.dir={sweep}"]
    for args in (first, added):
        assert run_submit(capsys, *args)[0] == 0
    for point in sweep.glob("seed=*"):  # each job stopped with a checkpoint (scancel)
        (point / "status.json").write_text(json.dumps({"state": "interrupted", "epoch": 0, "epochs": 1}))
    shutil.copytree(sweep, copy)

    def said(folder):
        assert status.status_main([str(folder)]) == 0
        out = capsys.readouterr().out
        return out, [ln.split(": ", 1)[1] for ln in out.splitlines() if ln.startswith("sweep submit command: ")]
    out, commands = said(copy)
    assert out.count("its sweep's submit command (below) starts it") == 3, out
    assert commands == [shlex.join(["allconv-hpc", "submit", *first[:-1], f'hydra.sweep.dir="{copy}"']),
                        shlex.join(["allconv-hpc", "submit", *added[:-1], f'hydra.sweep.dir="{copy}"'])], out
    assert status.status_main(["--json", str(copy)]) == 0  # no "below" in JSON: each note names its command
    rows = {r["folder"]: r for r in json.loads(capsys.readouterr().out)}
    assert [n.endswith(f"`{commands[1]}` starts it") and "below" not in n for n in rows["seed=7"]["notes"]] == [True]
    for command, todo in zip(commands, (["seed=0", "seed=1"], ["seed=7"])):  # each resumes its points, in the copy
        code, out, err = run_submit(capsys, *shlex.split(command)[2:])
        assert code == 0 and sorted(ln.split("/")[-1] for ln in out.splitlines() if ln.startswith("job ")) == todo, err
        assert all(f"{copy}/" in ln for ln in out.splitlines() if ln.startswith("job "))
    assert status.status_main([str(copy / "seed=0")]) == 0  # a point alone: its own record, the sweep's command
    assert f"`{commands[0]}` starts it" in capsys.readouterr().out
    # a run's own command, in its note; a path Hydra must have quoted (é, a space)
    run = tmp_path / "café run"
    assert run_submit(capsys, "cluster=slurm", *TINY, f'hydra.run.dir="{run}"')[0] == 0
    (run / "status.json").write_text(json.dumps({"state": "interrupted", "epoch": 0, "epochs": 1}))
    assert status.status_main([str(run)]) == 0
    out = capsys.readouterr().out
    wanted = shlex.join(["allconv-hpc", "submit", "cluster=slurm", *TINY, f'hydra.run.dir="{run}"'])
    assert f"`{wanted}` starts it" in out, out
    (run / "submission.json").unlink()  # its job gone: the command submits it again
    code, out, err = run_submit(capsys, *shlex.split(wanted)[2:])
    assert code == 0 and f"  {run}" in out, err


def test_sbatch_test_only_that_cannot_answer_does_not_block(tmp_path, on_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(executor, "TEST_ONLY_TIMEOUT_S", 0.5)
    sleep = shutil.which("sleep")  # not on the fake PATH
    on_path(sbatch=f'[ "$1" = --test-only ] && exec {sleep} 5; echo "Submitted batch job 77"')
    code, out, err = run_submit(capsys, "cluster=slurm", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0 and out.startswith("job 77 "), (out, err)
    assert err == ("allconv-hpc submit: warning: sbatch --test-only did not answer in 0.5 s; submitting without "
                   "knowing whether the cluster can ever start the job\n"), err
    on_path(sbatch='[ "$1" = --test-only ] && { echo "sbatch: unrecognized option \'--test-only\'" >&2; exit 1; }; '
                   'echo "Submitted batch job 78"')
    code, out, err = run_submit(capsys, "cluster=slurm", *TINY, f"hydra.run.dir={tmp_path / 'run2'}")
    assert code == 0 and out.startswith("job 78 ") and "warning: sbatch --test-only failed without a reason" in err


def test_signal_lead_longer_than_the_time_limit_says_both_in_seconds():
    with pytest.raises(ConfigError) as e:
        resources.validate_cluster({**cluster_of(), "timeout_min": 1}, composed().cfg)
    assert str(e.value) == ("cluster.signal_lead_s=120 s must be shorter than cluster.timeout_min=1 (60 s): lower "
                            "cluster.signal_lead_s (at least 10) or raise cluster.timeout_min above 2")


def test_a_signal_lead_over_half_the_time_limit_is_warned_once(tmp_path, capsys):
    launcher.plan(["cluster=local", *TINY, "cluster.timeout_min=3", "cluster.signal_lead_s=100", "seed=0,1",
                   "cluster.array_parallelism=2",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}"], multirun=True)
    err = capsys.readouterr().err
    assert err.count("warning: cluster.signal_lead_s=100 s is over half of cluster.timeout_min=3 (180 s): each start "
                     "trains at most 80 s before it checkpoints and stops (cluster=local does not requeue)") == 1, err
    launcher.plan(["cluster=local", *TINY, "cluster.timeout_min=3", "cluster.signal_lead_s=90",
                   f"hydra.run.dir={tmp_path / 'run'}"], multirun=False)
    assert "warning" not in capsys.readouterr().err  # exactly half: fine
    # under Slurm the signal may come up to 60 s early (seen on the dev cluster: a 20 s lead of 60 s at 15-20 s)
    slurm = {"backend": "slurm", "timeout_min": 1, "signal_lead_s": 20}
    _warn_short_starts(slurm)
    assert ("warning: cluster.signal_lead_s=20 s, plus the up to 60 s Slurm may send the signal early, is over half "
            "of cluster.timeout_min=1 (60 s): each start trains 0-40 s before it checkpoints and is requeued, and each "
            "time limit counts against checkpoint.max_requeues") in capsys.readouterr().err
    _warn_short_starts({**slurm, "timeout_min": 4})  # 2 x (20 + 60) = 160 s <= 240 s
    assert "warning" not in capsys.readouterr().err


def test_sweep_and_run_folders_are_not_mixed(tmp_path):
    """A sweep into a run folder (or a folder of other things), or a run into a sweep's folder: refused before
    anything is queued; status and evaluate would read one as the other. A sweep's own folder is resumed."""
    sweep = tmp_path / "sweep"
    (sweep / "notes.txt").parent.mkdir(parents=True)
    (sweep / "notes.txt").write_text("mine")  # a sweep's folder (sweep.json) may hold anything else
    (sweep / "sweep.json").write_text("{}")
    launcher.plan(["cluster=local", *TINY, "seed=0", f"hydra.sweep.dir={sweep}"], multirun=True)
    with pytest.raises(ConfigError, match=r"run folder .*/sweep is a sweep's folder \(sweep.json\)"):
        launcher.plan(["cluster=local", *TINY, f"hydra.run.dir={sweep}"], multirun=False)
    aside = tmp_path / "r" / "checkpoints.old1"  # resume=never's: step files and .hydra/ side by side, no checkpoints/
    aside.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"is a run that checkpoint.resume=never set aside, not a run folder .*: copy "
                                          r"it into a new run folder as README's \"Starting over\" shows"):
        launcher.plan(["cluster=local", *TINY, f"hydra.run.dir={aside}"], multirun=False)
    run = tmp_path / "run"
    CheckpointDir(run / "checkpoints", keep=2).save({"identity": compose([*TINY]).cfg.identity()}, step=5)
    (run / "status.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"hydra.sweep.dir .*/run is a run folder \(checkpoints, status.json\)"):
        launcher.plan(["cluster=local", *TINY, "seed=0", f"hydra.sweep.dir={run}"], multirun=True)
    # a new folder inside a run (its checkpoints.old1-to-be, wandb/): that run's status and evaluate read its files
    for inside in (run / "checkpoints.old1", run / "wandb" / "x"):
        with pytest.raises(ConfigError, match=rf"run folder {inside} is inside the run folder {run}, .*; give a "
                                              rf"hydra.run.dir outside it"):
            launcher.plan(["cluster=local", *TINY, f"hydra.run.dir={inside}"], multirun=False)
    with pytest.raises(ConfigError, match=rf"is inside the run folder {run}, .*; give a hydra.sweep.dir outside it"):
        launcher.plan(["cluster=local", *TINY, "seed=0", f"hydra.sweep.dir={run / 'sweep'}"], multirun=True)
    data = tmp_path / "data"
    (data / "cifar-10-batches-py").mkdir(parents=True)
    (data / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"hydra.sweep.dir .*/data holds other files \(cifar-10-batches-py\)"):
        launcher.plan(["cluster=local", *TINY, "seed=0", f"hydra.sweep.dir={data}"], multirun=True)
    # a sweep folder that lost its sweep.json: its point folders (runs) and submit's files only
    lost = tmp_path / "lost"
    (lost / "seed=0").mkdir(parents=True)
    (lost / "seed=0" / "submission.json").write_text("{}")
    (lost / ".submit.lock").touch()
    (lost / ".DS_Store").touch()  # a desktop's clutter
    (lost / "._seed=0").touch()  # macOS's AppleDouble twin of the point folder
    check_sweep_dir(lost)
    (lost / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds other files \(notes.txt\)"):
        check_sweep_dir(lost)


def test_a_run_folder_of_another_config_is_refused(tmp_path):
    run = tmp_path / "run"
    theirs = compose(["cluster=local", *TINY, "optim.lr=0.1"]).cfg
    CheckpointDir(run / "checkpoints", keep=2).save({"identity": theirs.identity()}, step=5)
    with pytest.raises(ConfigError, match=r"holds a run of a different config \(optim.lr: 0.1 -> 0.05\)"):
        launcher.plan(["cluster=local", *TINY, f"hydra.run.dir={run}"], multirun=False)
    for ok in (["optim.lr=0.1"], ["optim.lr=0.1", "trainer.epochs=5"], ["checkpoint.resume=never"]):
        launcher.plan(["cluster=local", *TINY, *ok, f"hydra.run.dir={run}"], multirun=False)
    # a sweep's point: the way out is another hydra.sweep.dir (a sweep refuses hydra.run.dir)
    sweep = tmp_path / "sweep"
    points, _, _ = launcher.plan(["cluster=local", *TINY, "seed=0", f"hydra.sweep.dir={sweep}"], multirun=True)
    CheckpointDir(points[0].run_dir / "checkpoints", keep=2).save({"identity": theirs.identity()}, step=5)
    with pytest.raises(ConfigError, match=r"different config \(optim.lr: 0.1 -> 0.05\); use another hydra.sweep.dir"):
        launcher.plan(["cluster=local", *TINY, "seed=0", f"hydra.sweep.dir={sweep}"], multirun=True)
    # a run that has begun epoch 3 cannot be cut back to 2 (it could grow): refused before the queue
    CheckpointDir(run / "checkpoints", keep=2).save({"identity": theirs.identity(),
                                                     "train_state": {"epoch": 2, "step_in_epoch": 1}}, step=9)
    with pytest.raises(ConfigError, match=r"trainer.epochs=2 but the run in .* has begun epoch 3"):
        launcher.plan(["cluster=local", *TINY, "optim.lr=0.1", "trainer.epochs=2", f"hydra.run.dir={run}"],
                      multirun=False)
    with pytest.raises(ConfigError, match="checkpoint.resume=must but .* holds no checkpoint; give the run folder that "
                                          "has them \\(hydra.run.dir\\), or checkpoint.resume=auto"):
        launcher.plan(["cluster=local", *TINY, "checkpoint.resume=must", f"hydra.run.dir={tmp_path / 'new'}"],
                      multirun=False)


def test_run_folders_a_job_could_only_fail_on_are_refused_before_the_queue(tmp_path):
    plan = lambda run: launcher.plan(["cluster=local", *TINY, f"hydra.run.dir={run}"], multirun=False)  # noqa: E731
    for key, value in (("hydra.run.dir", tmp_path / "r%j"), ("hydra.sweep.dir", tmp_path / "s%A")):
        # submitit and Slurm read it as a pattern in the job's log paths: the job was lost after it started
        with pytest.raises(ConfigError, match=f"{key}=.*: '%' in a folder submit runs in is not supported"):
            sweep = key == "hydra.sweep.dir"
            launcher.plan(["cluster=local", *TINY, f"{key}={value}", "seed=0,1" if sweep else "seed=0"], multirun=sweep)
        assert not os.path.exists(value)
    (tmp_path / "afile").write_text("")
    for run in (tmp_path / "afile", tmp_path / "afile" / "sub"):  # the folder, or one above it, is a file
        with pytest.raises(ConfigError, match=f"{tmp_path / 'afile'} is a file, not a folder"):
            plan(run)
    odd = tmp_path / "odd"
    (odd / "checkpoints").mkdir(parents=True)
    (odd / ".hydra").write_text("")
    with pytest.raises(ConfigError, match=r"odd/.hydra is a file, not a folder"):
        plan(odd)
    (odd / ".hydra").unlink()
    (odd / "checkpoints" / "last.pt").symlink_to("step_00000009.pt")  # dangling: replaced, link and all
    (odd / "status.json").write_text("{}")
    (odd / "status.json").chmod(0o444)  # replaced by a rename: a read-only file of one's own is no obstacle
    plan(odd)
    # found at the epoch's end before, after a whole epoch's work. As root (CI) an immutable file, appended or
    # replaced; as a user, a read-only one appended in place
    rooted = os.geteuid() == 0
    for name in ("history.csv", "status.json") if rooted else ("train.log",):
        if (odd / name).exists():
            (odd / name).chmod(0o644)
        (odd / name).write_text("epoch\n")
        if rooted:
            subprocess.run(["chattr", "+i", odd / name], check=True)
        else:
            (odd / name).chmod(0o444)
        try:
            with pytest.raises(ConfigError, match=rf"{name} cannot be rewritten here \(its owner, mode or an "
                                                  rf"immutable flag\), and the run rewrites it; make it writable"):
                plan(odd)
        finally:
            if rooted:
                subprocess.run(["chattr", "-i", odd / name], check=True)
            (odd / name).unlink()
    run = tmp_path / "run"
    CheckpointDir(run / "checkpoints", keep=2).save({"identity": {}}, step=5)
    (run / "checkpoints" / "step_00000005.pt").write_bytes(b"garbage")  # last.pt is a hard link: both damaged
    with pytest.raises(ConfigError, match="every checkpoint in .* is unusable"):
        plan(run)
    for damaged in ("{", "[1, 2]", "{}"):
        (tmp_path / "r2").mkdir(exist_ok=True)
        (tmp_path / "r2" / "submission.json").write_text(damaged)
        with pytest.raises(ConfigError, match=r"submission.json: .*; delete it and submit the run again"):
            plan(tmp_path / "r2")


# --------------------------------------------------------------- cluster=local

def test_local_executor_gets_what_it_supports(tmp_path):
    c = compose(["cluster=local", *TINY, "cluster.signal_lead_s=45", "cluster.setup=['export A=1']"])
    ex = executor.make_executor(resources.validate_cluster(c.cluster, c.cfg), tmp_path / "%j")
    setup = ex.parameters["setup"]  # the log named, its Ctrl-C trapped, the lines, the trap let go
    assert ex.parameters["signal_delay_s"] == 45 and len(setup) == 4 and setup[1].endswith(" INT") and \
        setup[3] == "trap - INT", setup
    assert setup[2].startswith(f"{{ {{ :\nexport A=1\n\n}}\n}} >> {tmp_path / 'setup-'}$$.log 2>&1 || ")
    assert ex.parameters["timeout_min"] == 7 * 24 * 60 and ex.parameters["tasks_per_node"] == 1


def test_local_setup_lines_keep_their_own_comments_and_operators(tmp_path):
    """Each line runs as written, as in an sbatch script: a trailing comment, `;` or `&` does not swallow the
    rest, exports reach the job, and a run folder named with `"` or `$` is quoted (the shell is submitit's)."""
    folder = tmp_path / 'odd "$HOME" name' / ".submitit" / "%j"
    folder.parent.mkdir(parents=True)
    lines = ["# load the cluster's modules", "", "export A=1  # the cluster's module", "B=2;", "sleep 0 &",
             "echo a=$A b=$B \\"]  # a trailing backslash (a continued line) ends with its own line
    setup = executor._local_setup(lines, folder)
    r = subprocess.run(["sh", "-c", " && ".join(setup + ['echo "job sees A=$A B=$B"; echo $$ > pid'])],
                       capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert r.returncode == 0 and r.stdout == "job sees A=1 B=2\n", (r.stdout, r.stderr)
    log = folder.parent / f"setup-{(tmp_path / 'pid').read_text().strip()}.log"
    assert log.read_text() == "a=1 b=2\n"
    r = subprocess.run(["sh", "-c", " && ".join(executor._local_setup(["false # no"], folder) + ["echo job"])],
                       capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert r.returncode == 1 and r.stdout == "" and f"failed (exit 1); its output is in {folder.parent}/setup-" in r.stderr


def test_local_gpus_are_this_shells_not_the_first_n(tmp_path, monkeypatch):
    """cluster=local inside an allocation given GPUs 2,3: its tasks see 2,3 (submitit alone makes it
    0,1), checked with submitit's real local executor; too few or non-index ids are refused up front."""
    c = compose(["cluster=local", *TINY, "cluster.gpus_per_node=2", "cluster.tasks_per_node=2"])
    real_count = torch.cuda.device_count
    # stand-in for CUDA on this CPU machine: it counts the GPUs CUDA_VISIBLE_DEVICES names
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(os.environ["CUDA_VISIBLE_DEVICES"].split(",")))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    ex = executor.make_executor(resources.validate_cluster(c.cluster, c.cfg), tmp_path / "%j")
    job = ex.submit(os.getenv, "CUDA_VISIBLE_DEVICES")  # read in each task (a module function pickles by name)
    assert job.results() == ["2,3", "2,3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    with pytest.raises(ConfigError, match=r"gpus_per_node=2 but CUDA sees 1 GPU\(s\) of CUDA_VISIBLE_DEVICES=7; "
                                          r"use cluster.gpus_per_node<=1"):
        resources.validate_cluster(c.cluster, c.cfg)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1f2e,GPU-99aa")
    with pytest.raises(ConfigError, match="set it to indices"):
        resources.validate_cluster(c.cluster, c.cfg)
    monkeypatch.setattr(torch.cuda, "device_count", real_count)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # names GPUs this machine may not have
    if real_count() < 2:  # CI: none, so the job would train on the CPU, unasked
        with pytest.raises(ConfigError, match=rf"gpus_per_node=2 but CUDA sees {real_count()} GPU\(s\) of "
                                              rf"CUDA_VISIBLE_DEVICES=0,1"):
            resources.validate_cluster(c.cluster, c.cfg)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # the machine's own GPUs: as many as CUDA counts
    have = torch.cuda.device_count()
    if have < 2:  # CI: no GPU, so the job would train on the CPU, unasked
        with pytest.raises(ConfigError, match=rf"gpus_per_node=2 but CUDA sees {have} GPU\(s\) on this machine"):
            resources.validate_cluster(c.cluster, c.cfg)
    else:
        assert resources.validate_cluster(c.cluster, c.cfg)["gpus_per_node"] == 2


# ---------------------------------------------------------------- requeued jobs

@pytest.fixture
def job_signals():
    """submitit's process_job installs its own signal handlers: give the test process its own back."""
    sigs = (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR1, signal.SIGUSR2)
    saved = {s: signal.getsignal(s) for s in sigs}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("final,result", [("requeued", None), ("completed", ("success", 0))])
def test_a_requeued_job_writes_no_result(tmp_path, monkeypatch, job_signals, final, result):
    """Through submitit's own process_job: a requeued call leaves no result pickle (job.done() stays
    False while it waits in the queue); a completed one writes ("success", 0)."""
    from submitit.core.submission import process_job
    from submitit.core.utils import DelayedSubmission

    import allconv_hpc.preempt
    import allconv_hpc.train

    run = tmp_path / "run"
    run.mkdir()

    def fake_run(overrides, submitted, entry_point):  # what train.run returns after a requeue, or a completed run
        assert submitted and entry_point  # train then does not warn that it ignores the cluster.* overrides
        return allconv_hpc.preempt.EXIT_REQUEUED if final == "requeued" else 0
    monkeypatch.setattr(allconv_hpc.train, "run", fake_run)
    monkeypatch.setenv("ALLCONV_SIGNAL_LEAD_S", "0")  # TrainJob sets it in this process: restored after
    monkeypatch.setattr(allconv_hpc.preempt, "catch_early", lambda *a: None)
    for k, v in dict(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="7", SUBMITIT_LOCAL_GLOBALID="0",
                     SUBMITIT_LOCAL_LOCALID="0", SUBMITIT_LOCAL_NTASKS="1", SUBMITIT_LOCAL_JOB_NUM_NODES="1",
                     SUBMITIT_LOCAL_NODEID="0").items():
        monkeypatch.setenv(k, v)
    folder = tmp_path / "sub"
    folder.mkdir()
    DelayedSubmission(launcher.TrainJob(["x=1"], 60)).dump(folder / "7_submitted.pkl")
    if final == "requeued":
        with pytest.raises(SystemExit) as e:
            process_job(folder)
        assert e.value.code == 0
        assert not (folder / "7_0_result.pkl").exists()
    else:
        process_job(folder)
        assert pickle.loads((folder / "7_0_result.pkl").read_bytes()) == result


# ------------------------------------------------------- status with fake Slurm commands

def write_run(tmp: Path, run_state: str | None, job: str = "42", backend: str = "slurm", **rec) -> Path:
    run = tmp / "run"
    run.mkdir(exist_ok=True)
    (run / "submission.json").write_text(json.dumps({"job_id": job, "backend": backend, "run_dir": str(run), **rec}))
    if run_state:
        (run / "status.json").write_text(json.dumps({"state": run_state, "epoch": 1, "epochs": 3}))
    return run


NO_ACCOUNTING = "echo 'sacct: error: Slurm accounting storage is disabled' >&2; exit 1"
FORGOTTEN = "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1"


def squeue_says(state: str, reason: str = "", restarts: int = 0) -> str:
    """A fake squeue's answer for one job it lists (jobs.SQUEUE_FIELDS: id, array, task, restarts, state, reason)."""
    return f"echo '42|42|N/A|{restarts}|{state}|{reason}'"


def test_a_folder_whose_job_never_starts_says_so_to_a_new_submit(tmp_path, on_path):
    """A job pending with DependencyNeverSatisfied (its dependency failed): a new submit into its folder was told to
    wait for it, for ever; a sweep's point was skipped as `job N (PENDING)`, nothing said why."""
    from allconv_hpc.folder_checks import check_run_folder
    run = write_run(tmp_path, None, job="77")
    on_path(squeue=squeue_says("PENDING", "DependencyNeverSatisfied"))
    with pytest.raises(ConfigError, match=r"already has job 77 \(PENDING, DependencyNeverSatisfied: a job it depends on "
                                          r"ended otherwise .* scontrol update JobId=77 Dependency= starts it without, "
                                          r"scancel 77 ends it\); a second job would train into the same folder"):
        check_run_folder(run, None)
    assert check_run_folder(run, None, sweep=True).startswith("job 77 (PENDING, DependencyNeverSatisfied: ")


def test_status_works_without_accounting(tmp_path, on_path, capsys):
    run = write_run(tmp_path, "running")
    on_path(squeue=squeue_says("RUNNING", restarts=1), sacct=NO_ACCOUNTING)
    assert status.status_main([str(run)]) == 0
    rows = status.run_rows(run)
    assert (rows[0]["state"], rows[0]["restarts"]) == ("RUNNING", 1)


@pytest.mark.parametrize("run_state,state,rc,wait_rc", [
    ("running", "LOST", 1, 1), ("requeued", "LOST", 1, 1), (None, "LOST", 1, 1), ("completed", "COMPLETED", 0, 0),
    ("gave_up", "GAVE UP", 0, 3)])  # gave up after max_requeues time limits: stopped with a checkpoint, resumable
def test_a_job_slurm_forgot_is_lost_unless_the_run_finished(tmp_path, on_path, capsys, run_state, state, rc, wait_rc):
    run = write_run(tmp_path, run_state)
    on_path(squeue=FORGOTTEN, sacct=NO_ACCOUNTING, scontrol=FORGOTTEN)
    assert status.run_rows(run)[0]["state"] == state
    assert status.status_main([str(run)]) == rc
    assert status.wait_for(run, poll_s=0.01) == wait_rc  # ends at once: no endless RUNNING?


def test_a_forgotten_job_that_left_no_task_log_never_started(tmp_path, on_path):
    """An array task scancelled while pending: its submitit folder holds what submit wrote, no task's log."""
    sub = tmp_path / "sub"
    run = write_run(tmp_path, None, job="7_2", submitit_folder=str(sub))
    (sub / "7_2").mkdir(parents=True)
    (sub / "7_2" / "7_submission.sh").write_text("#!/bin/bash\n")
    on_path(squeue=FORGOTTEN, sacct=NO_ACCOUNTING, scontrol=FORGOTTEN)
    row = status.run_rows(run)[0]
    # nothing ran, nothing failed: as CANCELLED (never started) while Slurm knew it, which the same submit starts
    assert (row["state"], row["failed"]) == ("LOST (never started)", False), row
    assert status.status_main([str(run)]) == 0 and status.wait_for(run, poll_s=0) == status.EXIT_STOPPED
    (sub / "7_2" / "7_2_0_log.out").write_text("submitit INFO - Starting\n")  # it started: killed without a word
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("LOST", True), row
    # cluster=local: a controller killed before it started a task (no cluster.setup) is the same, not a failure
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid: the local job's id, a process no more
    (tmp_path / "local").mkdir()
    local = write_run(tmp_path / "local", None, job=str(gone.pid), backend="local", submitit_folder=str(sub))
    (sub / str(gone.pid)).mkdir()
    (sub / str(gone.pid) / f"{gone.pid}_submission.sh").write_text("#!/bin/bash\n")
    row = status.run_rows(local)[0]
    assert (row["state"], row["failed"]) == ("LOST (never started)", False), row
    assert status.status_main([str(local)]) == 0 and status.wait_for(local, poll_s=0) == status.EXIT_STOPPED


def test_a_job_scancelled_while_pending_is_cancelled_not_failed(tmp_path, on_path, capsys):
    """Slurm still knows it CANCELLED; it never started (no task log): nothing ran and nothing failed, so `status`
    exits 0 and `submit --wait` 3 (unfinished: the same submit starts it). It showed "CANCELLED -" and exit 1."""
    sub = tmp_path / "sub"
    run = write_run(tmp_path, None, job="1203", submitit_folder=str(sub))
    (sub / "1203").mkdir(parents=True)
    (sub / "1203" / "1203_submission.sh").write_text("#!/bin/bash\n")
    on_path(squeue="exit 0", sacct=NO_ACCOUNTING, scontrol='echo "JobState=CANCELLED Restarts=0"')
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("CANCELLED (never started)", False), row
    assert status.status_main([str(run)]) == 0 and status.wait_for(run, poll_s=0) == status.EXIT_STOPPED
    out = capsys.readouterr().out  # below the table, what to do: --wait's exit 3 alone would not say
    assert out.rstrip().endswith("run: job 1203 ended before it started (scancel?); nothing ran: the same submit "
                                 "command starts it"), out
    (run / "checkpoints").mkdir()  # an earlier job trained it part-way: the next one resumes, not starts, it
    (run / "checkpoints" / "step_00000012.pt").write_bytes(b"")
    assert status.status_main([str(run)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("nothing ran: the same submit command resumes it from its newest "
                                                     "checkpoint, step 12")
    said = status.notes({**status.run_rows(run)[0], "starts_over": True})  # checkpoint.resume=never: over again
    assert said[-1].endswith("nothing ran: the same submit command starts it over again (checkpoint.resume=never "
                             "sets its checkpoints aside); with checkpoint.resume=auto instead it resumes from its "
                             "newest checkpoint, step 12"), said
    (run / "checkpoints" / "step_00000012.pt").unlink()
    # it started, then was cancelled before its run wrote a word (in its imports, or KillWait's SIGKILL in a long
    # start-up): a stop, which the same submit starts over (no checkpoint), unless a rank's log says it failed
    (sub / "1203" / "1203_0_log.out").write_text("submitit INFO - Starting\n")
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("CANCELLED", False), row
    assert status._errors([row]).endswith("the same submit (or train) command starts it over: it stopped before its "
                                          "first checkpoint")
    (sub / "1203" / "1203_0_log.err").write_text("Traceback (most recent call last):\n  f()\nOSError: [Errno 5] x\n")
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"], row["error"]) == ("CANCELLED", True, "rank 0: OSError: [Errno 5] x"), row


def test_wait_on_a_big_sweep_prints_counts_and_the_jobs_that_changed(tmp_path, on_path, capsys):
    """A line naming every job grows with the sweep: beyond status.WIDE jobs it counts the states instead."""
    sweep = tmp_path / "sw"
    recs = []
    for i in range(12):
        point = sweep / f"p{i}"
        point.mkdir(parents=True)
        recs.append({"job_id": f"77_{i}", "backend": "slurm", "run_dir": str(point)})
        state = "failed" if i == 3 else "completed"
        (point / "status.json").write_text(json.dumps({"state": state, "epoch": 2, "epochs": 2, "slurm_job_id": f"77_{i}"}))
    (sweep / "sweep.json").write_text(json.dumps({"sweep_dir": str(sweep), "jobs": recs}))
    on_path(squeue="exit 0", sacct=NO_ACCOUNTING,
            scontrol='i=0; while [ $i -lt 12 ]; do s=COMPLETED; [ $i = 3 ] && s=FAILED; '  # every job: 12 asked at once
                     'echo "JobId=$((100 + i)) ArrayJobId=77 ArrayTaskId=$i JobState=$s Restarts=0"; i=$((i + 1)); done')
    assert status.wait_for(sweep, poll_s=0) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.split(" ", 1)[1] == "12 jobs: 11 COMPLETED, 1 FAILED", first  # nothing changed yet: no names
    snap = [(f"77_{i}", "RUNNING", 1) for i in range(12)]
    later = [(j, "COMPLETED", 2) if j in ("77_0", "77_5") else x for j, *_ in snap for x in [(j, "RUNNING", 1)]]
    assert status._progress(later, snap) == ("12 jobs: 2 COMPLETED, 10 RUNNING; changed: 77_0:COMPLETED(2)  "
                                             "77_5:COMPLETED(2)")
    many = [(j, "RUNNING", 2) for j, *_ in snap]
    assert status._progress(many, snap).endswith("77_7:RUNNING(2) +4 more")
    assert status._progress(snap[:2], None) == "77_0:RUNNING(1)  77_1:RUNNING(1)"  # a small sweep: every job


def test_wait_after_a_sweeps_point_is_submitted_again_watches_that_job_alone(tmp_path, on_path):
    """A sweep whose point 1340_2 failed long ago, another point submitted again as job 1343, which completes:
    `submit --wait` exits 0 on 1343's end, not 1 for the old failure (`status` of the sweep still shows it)."""
    sweep = tmp_path / "sw"
    recs = []
    for i, (job, state) in enumerate((("1343", "completed"), ("1340_2", "failed"))):
        point = sweep / f"p{i}"
        point.mkdir(parents=True)
        recs.append({"job_id": job, "backend": "slurm", "run_dir": str(point)})
        (point / "status.json").write_text(json.dumps({"state": state, "epoch": 1, "epochs": 1, "slurm_job_id": job}))
    (sweep / "sweep.json").write_text(json.dumps({"sweep_dir": str(sweep), "jobs": recs}))
    on_path(squeue="exit 0", sacct=NO_ACCOUNTING,
            scontrol='echo "JobId=1343 JobState=COMPLETED Restarts=0"; '  # every job: both asked at once
                     'echo "JobId=1342 ArrayJobId=1340 ArrayTaskId=2 JobState=FAILED Restarts=0"')
    assert status.wait_for(sweep, poll_s=0, jobs={"1343"}) == 0
    assert status.wait_for(sweep, poll_s=0) == 1 and status.status_main([str(sweep)]) == 1
    # none of its jobs in the records any more (another submit rewrote them meanwhile): it reads the folder's rows
    assert status.wait_for(sweep, poll_s=0, jobs={"1299"}) == 1


def test_a_held_job_is_not_told_to_be_resubmitted(tmp_path, on_path, capsys):
    run = write_run(tmp_path, "requeued")  # requeuehold: its run checkpointed and waits to be released
    on_path(squeue=squeue_says("PENDING", "JobHeldUser", restarts=1), sacct=NO_ACCOUNTING)
    assert status.status_main([str(run)]) == 1
    out = capsys.readouterr().out
    assert "PENDING (held: scontrol release 42)" in out and "resumes it" not in out, out
    # submitting into it again: waiting for it would never end either
    with pytest.raises(ConfigError, match=r"already has job 42 \(PENDING, held: scontrol release 42\); a second job "
                                          r"would train into the same folder: release it, or stop it \(scancel 42\)"):
        folder_checks.check_run_folder(run, composed().cfg)
    # a sweep's point held: skipped, saying so (it was told to wait for the job to end, which never comes)
    ov = json.loads((run / "submission.json").read_text()).get("overrides")
    said = folder_checks.check_run_folder(run, composed().cfg, sweep=True, overrides=ov)
    assert said == ("job 42 (PENDING, held: scontrol release 42): it starts once released; or stop it (scancel 42) "
                    "and submit again"), said


def test_wait_tells_a_stopped_run_from_a_completed_one(tmp_path, on_path, capsys):
    run = write_run(tmp_path, "interrupted")  # stopped on a signal with a checkpoint; its job has left Slurm
    on_path(squeue=FORGOTTEN, sacct=NO_ACCOUNTING, scontrol=FORGOTTEN)
    assert status.run_rows(run)[0]["state"] == "INTERRUPTED"
    assert status.status_main([str(run)]) == 0  # status: nothing failed
    assert status.wait_for(run, poll_s=0.01) == status.EXIT_STOPPED == 3  # --wait: not done either
    assert capsys.readouterr().out.rstrip().endswith(  # an epoch done, and no checkpoint: gone since
        "run: stopped with epoch 1/3 done (step 0); the same submit (or train) command starts it over: its "
        "checkpoints are gone (deleted?), and the epochs it recorded are set aside in checkpoints.oldN/")
    (run / "checkpoints").mkdir()
    for name in ("step_00000012.pt", "step_00000032.pt", "last.pt"):  # the resume's step, not status.json's
        (run / "checkpoints" / name).touch()
    assert status.status_main([str(run)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("resumes it from its newest checkpoint, step 32")
    (run / ".hydra").mkdir()  # started with checkpoint.resume=never: the same command starts it over again
    (run / ".hydra" / "config.yaml").write_text("checkpoint:\n  resume: never\n")
    assert status.status_main([str(run)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(
        "the same submit (or train) command starts it over again (checkpoint.resume=never sets its checkpoints "
        "aside); with checkpoint.resume=auto instead it resumes from its newest checkpoint, step 32")


def test_a_killed_job_names_its_error_and_the_resume_and_a_lost_status_json_is_no_failure(tmp_path, on_path, capsys):
    """A job a signal ended (kill -9, the OOM killer) before its run said a word failed, and its run resumes from
    its newest checkpoint: both said. A run folder whose status.json was deleted (the fix status names for a
    damaged one) but holds checkpoints is no failure: the same command resumes it."""
    sub = tmp_path / "sub"
    run = write_run(tmp_path, None, job="77", submitit_folder=str(sub), submitted=1000.0)
    (run / "status.json").write_text(json.dumps({"state": "running", "epoch": 2, "epochs": 30, "global_step": 150,
                                                 "slurm_job_id": "77", "updated": 1100.0}))
    (sub / "77").mkdir(parents=True)
    (sub / "77" / "77_0_log.err").write_text("srun: error: n1: task 0: Killed\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step_00000140.pt").touch()
    on_path(squeue="exit 0", sacct=NO_ACCOUNTING, scontrol='echo "JobState=FAILED Restarts=0"')
    assert status.status_main([str(run)]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().endswith("run: rank 0: ended by a signal (srun: error: n1: task 0: Killed)\nrun: stopped with "
                                 "epoch 2/30 done (step 150); the same submit (or train) command resumes it from its "
                                 "newest checkpoint, step 140"), out
    hand = tmp_path / "hand"
    (hand / "checkpoints").mkdir(parents=True)
    (hand / "checkpoints" / "step_00000140.pt").touch()
    row = status.run_rows(hand)[0]
    assert (row["state"], row["failed"]) == (status.NO_RECORD, False), row
    assert status.status_main([str(hand)]) == 0 and status.wait_for(hand, poll_s=0) == status.EXIT_STOPPED
    assert capsys.readouterr().out.rstrip().endswith(
        "hand: no status.json (deleted?): history.csv has epoch 0/?; the same train command resumes it from "
        "its newest checkpoint, step 140")  # started by hand, no job: train, not submit
    # its history.csv and .hydra/config.yaml say how far it got (the epochs whose checkpoint landed) of how many
    (hand / "history.csv").write_text("epoch,train_loss,val_acc\n1,2.3,0.4\n2,2.2,0.3\n")
    (hand / ".hydra").mkdir()
    (hand / ".hydra" / "config.yaml").write_text("trainer:\n  epochs: 3\n")
    (hand / "wandb_id.txt").write_text("abc123\n")
    row = status.run_rows(hand)[0]
    assert (row["epoch"], row["epochs"], row["step"]) == (2, 3, 140), row
    # and its accuracies and W&B id (the row showed none)
    assert (row["last_val_acc"], row["best_val_acc"], row["wandb_id"]) == (0.3, 0.4, "abc123"), row
    (hand / "history.csv").write_text("epoch,train_loss\n1,2.3\n2,2.2\n3,2.1\n")  # every epoch: it completed
    assert status.status_main([str(hand)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(
        "hand: no status.json (deleted?): history.csv has epoch 3/3; the same train command finds it completed (nothing "
        "to train) and writes its status.json again")
    # the overrides its last start recorded name that command, aimed at the folder where it is now
    (hand / "history.csv").write_text("epoch,train_loss\n1,2.3\n")
    (hand / ".hydra" / "overrides.yaml").write_text("- data=synthetic\n- optim.lr=0.01\n- hydra.run.dir=old/place\n")
    assert status.status_main([str(hand)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(
        f"the same train command (`allconv-hpc train data=synthetic optim.lr=0.01 hydra.run.dir={hand}`) resumes it "
        f"from its newest checkpoint, step 140")
    # a data.root given relative: the absolute one the run recorded, which reads the same folder from anywhere
    (hand / ".hydra" / "overrides.yaml").write_text("- data.root=data\n- optim.lr=0.01\n")
    (hand / ".hydra" / "config.yaml").write_text(f"trainer:\n  epochs: 3\ndata:\n  root: {tmp_path}/my data\n")
    assert status.run_rows(hand)[0]["train_command"] == shlex.join(
        ["allconv-hpc", "train", "optim.lr=0.01", f"data.root='{tmp_path}/my data'", f"hydra.run.dir={hand}"])
    # damaged or hand-edited files are read as far as they go, no traceback (a status audit): a note past the
    # columns, a cell that is no number, bytes that are not UTF-8
    (hand / "history.csv").write_text("epoch,train_loss,val_acc\n1,2.3,0.4,my note\n2,2.2,n/a\n")
    row = status.run_rows(hand)[0]
    assert (row["epoch"], row["last_val_acc"], row["best_val_acc"]) == (2, None, 0.4), row
    (hand / "history.csv").write_bytes(b"epoch,train_loss\n1,\xff\xfe\n")
    (hand / ".hydra" / "config.yaml").write_bytes(b"trainer:\n  epochs: \xff\n")
    row = status.run_rows(hand)[0]
    assert (row["epoch"], row["epochs"]) == (0, None), row
    assert status.status_main([str(hand)]) == 0


def test_a_job_scancelled_before_its_run_said_a_word_is_a_stop(tmp_path, on_path, capsys):
    """A resubmitted job scancelled in its start-up and SIGKILLed by KillWait before it wrote status.json (which is
    still the last job's: older than this submission): CANCELLED, resumable from the checkpoint the run had, not
    a failure. One that never started is told apart (CANCELLED (never started))."""
    sub = tmp_path / "sub"
    run = write_run(tmp_path, None, job="88", submitit_folder=str(sub), submitted=1000.0)
    (run / "status.json").write_text(json.dumps({"state": "completed", "epoch": 1, "epochs": 1, "global_step": 5,
                                                 "slurm_job_id": "87", "updated": 900.0}))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step_00000005.pt").touch()
    (sub / "88").mkdir(parents=True)
    (sub / "88" / "88_0_log.err").write_text("srun: error: n1: task 0: Killed\n")  # it started
    on_path(squeue="exit 0", sacct=NO_ACCOUNTING, scontrol='echo "JobState=CANCELLED Restarts=0"')
    row = status.run_rows(run)[0]
    assert (row["job"], row["state"], row["failed"]) == ("88", "CANCELLED", False), row
    assert status.wait_for(run, poll_s=0) == status.EXIT_STOPPED
    assert capsys.readouterr().out.rstrip().endswith(
        "run: stopped with epoch 1/1 done (step 5); the same submit (or train) command resumes it from its newest "
        "checkpoint, step 5")
    # a rank said why it failed (its node lacks the data), another hung, and the job was scancelled: a failure
    (sub / "88" / "88_1_log.err").write_text("allconv-hpc: error: data.root /d: no CIFAR-10 files there\n")
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"], row["error"]) == ("CANCELLED", True, "rank 1: data.root /d: no CIFAR-10 "
                                                                                "files there"), row
    (sub / "88" / "88_1_log.err").unlink()
    # the run itself failed (a non-finite loss), then the job was scancelled: its error, and no resume line
    (run / "status.json").write_text(json.dumps({"state": "failed", "epoch": 1, "epochs": 2, "global_step": 5,
                                                 "slurm_job_id": "88", "updated": 1100.0, "error": "non-finite loss"}))
    assert status.status_main([str(run)]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().endswith("run: non-finite loss") and "resumes it" not in out, out
    (sub / "88" / "88_0_log.err").unlink()  # no task log: it never started
    (run / "status.json").write_text(json.dumps({"state": "completed", "epoch": 1, "epochs": 1, "updated": 900.0}))
    assert status.run_rows(run)[0]["state"] == "CANCELLED (never started)"


def test_no_answer_from_slurm_is_not_lost(tmp_path, on_path):
    run = write_run(tmp_path, "running")
    down = "echo 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)' >&2; exit 1"
    on_path(squeue=down, sacct=down, scontrol=down)
    assert status.run_rows(run)[0]["state"] == "RUNNING?"
    # a stop Slurm may have requeued since (SIGTERM preemption, scontrol requeue): not said final, and --wait waits
    (tmp_path / "b").mkdir()
    run = write_run(tmp_path / "b", "interrupted")
    row = status.run_rows(run)[0]
    assert (row["state"], row["no_answer"], row["active"]) == ("INTERRUPTED?", True, True), row
    assert status.status_main([str(run)]) == status.EXIT_NO_ANSWER


def test_a_requeued_job_waiting_in_the_queue_is_not_done(tmp_path, on_path):
    run = write_run(tmp_path, "requeued")
    on_path(squeue=squeue_says("PENDING", restarts=1), sacct=NO_ACCOUNTING)
    row = status.run_rows(run)[0]
    assert row["state"] == "PENDING" and row["state"] in jobs.ACTIVE_STATES and not status.is_failed(row)


@pytest.mark.parametrize("ended", ["NODE_FAIL", "CANCELLED"])  # a scancel is a stop, but not with the lock held
def test_a_job_that_ended_while_its_dead_node_holds_the_lock_is_not_running(tmp_path, on_path, ended):
    """A network file system keeps a dead node's lock a while (NFSv3: until the node is back): Slurm's word that
    the job is over (NODE_FAIL) wins over the lock the job's run took, and the row says what to delete."""
    from proc import hold_lock
    run = write_run(tmp_path, None)
    holder = hold_lock(run, "42", 60)  # taken by the job's run, which then wrote its records
    try:
        (run / "status.json").write_text(json.dumps({"state": "running", "epoch": 1, "epochs": 3, "slurm_job_id": "42",
                                                     "updated": time.time() + 1}))
        on_path(squeue="exit 0", sacct=NO_ACCOUNTING, scontrol=f"echo 'JobId=42 JobState={ended} Restarts=0'")
        row = status.run_rows(run)[0]
        assert (row["state"], row["failed"], row["active"]) == (ended, True, False), row
        assert f"the job ended ({ended}) with its run lock still held by pid " in row["error"], row
        assert f"delete {run / '.train.lock'} before resuming" in row["error"], row
        # a train started by hand after the job's last record: it does run
        (run / "status.json").write_text(json.dumps({"state": "running", "epoch": 1, "epochs": 3, "slurm_job_id": "42",
                                                     "updated": time.time() - 100}))
        assert status.run_rows(run)[0]["state"] == "RUNNING"
    finally:
        holder.kill()
        holder.wait()


def test_a_run_stopped_by_sigterm_whose_job_slurm_requeued_is_pending(tmp_path, on_path):
    """sbatch slurm/train.sbatch, preempted by SIGTERM alone: the run stops `interrupted` and Slurm requeues the
    job (--requeue). status, submit and train see the queued job; an allocation that outlives a run started in
    it by hand (salloc, RUNNING) is no job training the folder."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "interrupted", "epoch": 1, "epochs": 3, "slurm_job_id": "4242"}))
    on_path(squeue='[ "$3" = 4242 ] && ' + squeue_says("PENDING", restarts=1), sacct=NO_ACCOUNTING)
    row = status.run_rows(run)[0]
    assert (row["job"], row["state"], row["active"]) == ("4242", "PENDING", True), row
    assert jobs.other_jobs_state(run, environ={})[1] == "PENDING"
    with pytest.raises(ConfigError, match="already has job 4242 \\(PENDING\\) training into it"):
        folder_checks.check_run_folder(run, composed().cfg)
    on_path(squeue='[ "$3" = 4242 ] && ' + squeue_says("RUNNING"), sacct=NO_ACCOUNTING)
    row = status.run_rows(run)[0]
    assert (row["state"], row["active"]) == ("INTERRUPTED", False), row
    assert jobs.other_jobs_state(run, environ={}) is None


def test_a_copy_of_a_folder_a_job_started_without_submit_trains_is_no_folder_of_that_job(tmp_path, on_path):
    """sbatch slurm/train.sbatch trains run/, and run/ is copied (cp -r): the copy was shown as that job's (RUNNING)
    and training into it refused, as for a submitted job's copy before status.json named its folder (a wall the
    twelfth session left). The original is the job's; the copy is a COPY, and may be trained."""
    run, copy = tmp_path / "run", tmp_path / "copy"
    run.mkdir()
    st = {"state": "running", "epoch": 1, "epochs": 3, "slurm_job_id": "42", "run_dir": str(run), "updated": 1.0}
    (run / "status.json").write_text(json.dumps(st))
    shutil.copytree(run, copy)
    on_path(squeue='[ "$3" = 42 ] && ' + squeue_says("RUNNING") + '; exit 0', sacct=NO_ACCOUNTING,
            scontrol="echo 'JobId=42 JobState=RUNNING Restarts=0'")
    original, copied = status.run_rows(run)[0], status.run_rows(copy)[0]
    assert (original["job"], original["state"]) == ("42", "RUNNING"), original
    assert (copied["job"], copied["state"], copied["failed"], copied["copy_of"], copied["copy_job"]) == (
        "-", "COPY (its job trains the original)", False, str(run), "42"), copied
    assert jobs.other_jobs_state(copy, environ={}) is None and jobs.other_jobs_state(run, environ={})[1] == "RUNNING"
    assert folder_checks.check_run_folder(copy, composed().cfg) is None
    with pytest.raises(ConfigError, match="already has job 42 \\(RUNNING\\) training into it"):
        folder_checks.check_run_folder(run, composed().cfg)
    alias = tmp_path / "alias"  # the folder itself by another path: the job's
    alias.symlink_to(run)
    assert status.run_rows(alias)[0]["state"] == "RUNNING"
    shutil.rmtree(run)  # moved, not copied: the job trains the folder where it is now
    assert status.run_rows(copy)[0]["state"] == "RUNNING"


def test_status_follows_a_job_started_by_hand_into_a_folder_submitted_to_before(tmp_path, on_path):
    """submission.json names job 100 (timed out); the run was resumed since by sbatch slurm/train.sbatch as job 200,
    now requeued: the row is job 200's, as submit already sees it."""
    run = write_run(tmp_path, None, job="100")
    (run / "status.json").write_text(json.dumps({"state": "requeued", "epoch": 2, "epochs": 3, "slurm_job_id": "200"}))
    on_path(squeue='[ "$3" = 200 ] && ' + squeue_says("PENDING", restarts=1) + '; exit 0', sacct=NO_ACCOUNTING,
            scontrol='[ "$4" = 200 ] && echo "JobState=PENDING Restarts=1" || echo "JobState=TIMEOUT"')
    row = status.run_rows(run)[0]
    assert (row["job"], row["state"], row["active"], row["failed"]) == ("200", "PENDING", True, False), row


def test_a_run_submitted_again_shows_its_new_job_not_the_stopped_one_its_status_names(tmp_path, on_path):
    """Job 1032 was scancelled (status.json: interrupted, its id); the run was submitted again as job 1034, which
    has not written status.json yet (pending on a busy cluster). The row is 1034's: status showed CANCELLED 1032
    and told the user to submit again (which is refused), and `submit --wait` returned at once with exit 1."""
    run = write_run(tmp_path, None, job="1034", submitted=1000.0)
    (run / "status.json").write_text(json.dumps({"state": "interrupted", "epoch": 2, "epochs": 30,
                                                 "slurm_job_id": "1032", "updated": 900.0}))
    on_path(squeue='[ "$3" = 1034 ] && ' + squeue_says("PENDING") + '; exit 0', sacct=NO_ACCOUNTING,
            scontrol='[ "$4" = 1034 ] && echo "JobState=PENDING Restarts=0" || echo "JobState=CANCELLED"')
    row = status.run_rows(run)[0]
    assert (row["job"], row["state"], row["active"], row["failed"]) == ("1034", "PENDING", True, False), row


@pytest.mark.parametrize("run_state,slurm_says,shown", [("interrupted", "FAILED", "INTERRUPTED"),
                                                         ("interrupted", "CANCELLED", "CANCELLED"),
                                                         ("gave_up", "FAILED", "GAVE UP"),
                                                         # scancel and KillWait's SIGKILL before the run said a word
                                                         ("requeued", "CANCELLED", "CANCELLED"),
                                                         ("running", "CANCELLED", "CANCELLED")])
def test_a_slurm_job_whose_run_stopped_with_a_checkpoint_is_stopped_not_failed(tmp_path, on_path, run_state,
                                                                                slurm_says, shown):
    """train exits 3 after a stop on a signal (USR2 with cluster.requeue=false: Slurm records FAILED; scancel's
    SIGTERM: CANCELLED), or 4 when it gave up after checkpoint.max_requeues time limits (FAILED): the run is
    resumable, so the row is not failed, and `submit --wait` exits 3, "stopped unfinished", as README says (it
    exited 1, "a job failed", under Slurm; only cluster=local exited 3)."""
    run = write_run(tmp_path, None, job="1011", submitted=1000.0)
    (run / "status.json").write_text(json.dumps({"state": run_state, "epoch": 2, "epochs": 30,
                                                 "slurm_job_id": "1011", "updated": 1100.0}))
    on_path(squeue="exit 0", sacct=NO_ACCOUNTING, scontrol=f'echo "JobState={slurm_says} Restarts=0"')
    row = status.run_rows(run)[0]
    assert (row["state"], row["run"], row["failed"]) == (shown, run_state, False), row
    assert status.wait_for(run, poll_s=0) == status.EXIT_STOPPED
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step_00000040.pt").touch()
    gave_up = (", giving up: its time limit came more than checkpoint.max_requeues times" if run_state == "gave_up"
               else "")
    assert status._errors([status.run_rows(run)[0]]).endswith(
        f"run: stopped with epoch 2/30 done (step 0){gave_up}; the same submit (or train) command resumes it from its "
        f"newest checkpoint, step 40" + (" (with a larger cluster.timeout_min, each start trains longer)" if gave_up
                                         else ""))  # GAVE UP too: the same submit gets a fresh max_requeues
    st = json.loads((run / "status.json").read_text())  # a stop by hand (`train`, no job) since: not this job's
    (run / "status.json").write_text(json.dumps({k: v for k, v in st.items() if k != "slurm_job_id"}))
    assert status.run_rows(run)[0]["failed"]
    (run / "status.json").write_text(json.dumps(st))
    (run / "status.json").write_text(json.dumps({"state": "failed", "epoch": 2, "epochs": 30, "slurm_job_id": "1011",
                                                 "updated": 1100.0, "error": "boom"}))
    assert status.run_rows(run)[0]["failed"] and status.wait_for(run, poll_s=0) == 1  # a failure stays one


def test_a_sweep_point_submitted_again_on_its_own_shows_its_new_job_in_the_sweeps_status(tmp_path, on_path):
    """sweep.json names the point's array task 1008_0 (it stopped); the point was submitted since on its own (job
    1013, pending): `status SWEEP` shows 1013, as `status POINT` does, not 1008_0 with "submit again" advice."""
    sweep, point = tmp_path / "sw", tmp_path / "sw" / "optim.lr=0.01"
    point.mkdir(parents=True)
    old = {"job_id": "1008_0", "backend": "slurm", "run_dir": str(point), "submitted": 1000.0}
    (sweep / "sweep.json").write_text(json.dumps({"sweep_dir": str(sweep), "submitted": 1000.0, "jobs": [old]}))
    (point / "submission.json").write_text(json.dumps({**old, "job_id": "1013", "submitted": 1200.0}))
    (point / "status.json").write_text(json.dumps({"state": "interrupted", "epoch": 2, "epochs": 30,
                                                   "slurm_job_id": "1008_0", "updated": 1100.0}))
    on_path(squeue='[ "$3" = 1013 ] && ' + squeue_says("PENDING") + '; exit 0', sacct=NO_ACCOUNTING,
            scontrol='[ "$4" = 1013 ] && echo "JobState=PENDING Restarts=0" || echo "JobState=COMPLETED"')
    for folder in (sweep, point):
        row = status.run_rows(folder)[0]
        assert (row["job"], row["state"], row["active"], row["failed"]) == ("1013", "PENDING", True, False), row


def test_a_local_job_whose_controller_died_is_lost(tmp_path):
    p = subprocess.Popen(["true"])
    p.wait()  # a pid that no longer runs
    run = write_run(tmp_path, "running", job=str(p.pid), backend="local", submitit_folder=str(tmp_path / "sub"))
    assert status.run_rows(run)[0]["state"] == "LOST"
    res = tmp_path / "sub" / str(p.pid) / f"{p.pid}_0_result.pkl"
    res.parent.mkdir(parents=True)
    res.write_bytes(pickle.dumps(("success", 0)))
    assert status.run_rows(run)[0]["state"] == "COMPLETED"
    # a result planted in a shared folder is read without running its code (a checkpoint review): no state from it
    planted = tmp_path / "planted"
    res.write_bytes(pickle.dumps(("success", _Planted(str(planted)))))
    assert status.run_rows(run)[0]["state"].startswith("LOST") and not planted.exists()


class _Planted:
    """Unpickled, it makes a file: what a pickle planted in a run folder could do to whoever reads it."""
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_status_table_names_lost(tmp_path, on_path, capsys):
    run = write_run(tmp_path, "running")
    on_path(squeue=FORGOTTEN, sacct=NO_ACCOUNTING, scontrol=FORGOTTEN)
    status.status_main([str(run)])
    assert re.search(r"^42\s+LOST\s+running", capsys.readouterr().out, re.M)


def test_status_table_shows_test_acc_only_for_runs_that_have_it(tmp_path, on_path, capsys):
    run = write_run(tmp_path, "completed")
    on_path(squeue=FORGOTTEN, sacct=NO_ACCOUNTING, scontrol=FORGOTTEN)
    status.status_main([str(run)])
    assert "test_acc" not in capsys.readouterr().out  # data.val_size=0: val_acc is the test accuracy
    (run / "status.json").write_text(json.dumps({"state": "completed", "epoch": 3, "epochs": 3, "test_acc": 0.8125}))
    status.status_main([str(run)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split().index("test_acc") == out[1].split().index("0.8125")


def test_an_earlier_jobs_final_state_is_not_the_new_jobs(tmp_path, on_path, capsys):
    """Resubmitted after the last job gave up: the new job is pending; status.json is the old job's."""
    run = write_run(tmp_path, "gave_up", submitted=2000.0, epochs=8)  # resubmitted with trainer.epochs=8
    st = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**st, "updated": 1000.0, "restarts": 3}))
    on_path(squeue=squeue_says("PENDING"), sacct=NO_ACCOUNTING)
    row = status.run_rows(run)[0]
    # the old job's progress towards the new job's target, not the old target
    assert (row["state"], row["run"], row["epoch"], row["epochs"], row["restarts"]) == ("PENDING", "-", 1, 8, 0), row
    assert not status.is_failed(row) and row["active"]
    assert status.status_main([str(run)]) == 0
    # the new job vanished without a word: LOST, not the old run's final state
    for old in ("completed", "gave_up"):
        (run / "status.json").write_text(json.dumps({**st, "state": old, "updated": 1000.0}))
        on_path(squeue=FORGOTTEN, sacct=NO_ACCOUNTING, scontrol=FORGOTTEN)
        assert status.run_rows(run)[0]["state"] == "LOST", old
        assert status.status_main([str(run)]) == 1
    # written by this submission's job: trusted
    (run / "status.json").write_text(json.dumps({**st, "state": "completed", "updated": 2001.0}))
    assert status.run_rows(run)[0]["state"] == "COMPLETED" and status.status_main([str(run)]) == 0
    assert status.run_rows(run)[0]["epochs"] == 3  # its own word on its target
    # a submission.json without a submit time (written before there was one): trusted as before
    (run / "submission.json").write_text(json.dumps({"job_id": "42", "backend": "slurm", "run_dir": str(run)}))
    (run / "status.json").write_text(json.dumps({**st, "state": "completed", "updated": 1000.0}))
    assert status.run_rows(run)[0]["state"] == "COMPLETED"


def test_submit_records_a_submit_time_before_the_job_can_write(tmp_path, on_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    on_path(sbatch="echo 'Submitted batch job 77'")
    t0 = time.time()
    code, out, err = run_submit(capsys, "cluster=slurm", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err
    rec = json.loads((tmp_path / "run" / "submission.json").read_text())
    assert rec["job_id"] == "77" and t0 <= rec["submitted"] <= time.time() and rec["epochs"] == 1


@pytest.mark.parametrize("final", ["PREEMPTED", "SPECIAL_EXIT", "STOPPED", "REQUEUED"])
def test_a_job_squeue_no_longer_lists_has_ended(tmp_path, on_path, capsys, final):
    """PreemptMode=CANCEL (or no preempt_send_user_signal): squeue no longer lists the job and accounting
    says PREEMPTED (REQUEUED: seen on the dev cluster for a job cancelled while it waited to restart).
    Not active: --wait returns, a resubmission is allowed; not a success either."""
    run = write_run(tmp_path, "running")
    on_path(squeue="exit 0", sacct=f"echo '42|42|{final}'", scontrol=FORGOTTEN, sbatch="exit 1")
    row = status.run_rows(run)[0]
    assert row["state"] == final and status.is_failed(row) and not row["active"]
    assert status.status_main([str(run)]) == 1
    assert status.wait_for(run, poll_s=0.01) == 1
    folder_checks.check_run_folder(run, composed().cfg)  # no "already has job"
    on_path(squeue="exit 0", sacct=NO_ACCOUNTING, scontrol=f"echo 'JobId=42 JobState={final} Restarts=0'")
    assert status.is_failed(status.run_rows(run)[0])
    # while squeue lists it, the same state is not final (PREEMPTED: on its way back to the queue)
    on_path(squeue=squeue_says(final), sacct=f"echo '42|42|{final}'", scontrol="exit 1", sbatch="exit 1")
    row = status.run_rows(run)[0]
    assert row["state"] == final and row["active"] and not status.is_failed(row)
    with pytest.raises(ConfigError, match=f"already has job 42 \\({final}\\)"):
        folder_checks.check_run_folder(run, composed().cfg)


def test_the_controllers_final_state_beats_accountings(tmp_path, on_path):
    run = write_run(tmp_path, "requeued")
    on_path(squeue="exit 0", sacct="echo '42|42|REQUEUED'", scontrol="echo 'JobId=42 JobState=CANCELLED Restarts=1'")
    row = status.run_rows(run)[0]
    assert (row["state"], row["restarts"], row["active"], row["failed"]) == ("CANCELLED", 1, False, True), row


def test_no_answer_from_slurm_keeps_wait_waiting_and_status_non_zero(tmp_path, on_path, capsys):
    """A pending job (no status.json yet) while squeue fails and there is no accounting: UNKNOWN is not
    done; --wait polls on until Slurm answers, status exits 3."""
    run = write_run(tmp_path, None)
    down = "echo 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)' >&2; exit 1"
    on_path(squeue=down, sacct=down, scontrol=down)
    row = status.run_rows(run)[0]
    assert row["state"] == "UNKNOWN" and row["active"] and not status.is_failed(row)
    assert status.status_main([str(run)]) == status.EXIT_NO_ANSWER == 3
    # the run completes during squeue's 3rd call; from its 4th call on, squeue answers: the job has ended
    calls, done = tmp_path / "squeue-calls", json.dumps({"state": "completed", "epoch": 3, "epochs": 3})
    on_path(squeue=f"echo x >> {calls}\nn=0; while read -r _; do n=$((n + 1)); done < {calls}\n"
                   f"[ $n -lt 3 ] || echo '{done}' > {run / 'status.json'}\n[ $n -ge 4 ] || {{ {down}; }}",
            sacct=down, scontrol=FORGOTTEN)
    capsys.readouterr()

    def hung(*_):
        raise TimeoutError("wait_for did not return after Slurm answered")
    signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        assert status.wait_for(run, poll_s=0.01) == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert len(calls.read_text().splitlines()) == 4  # it did not stop on UNKNOWN
    out = capsys.readouterr().out
    assert " 42:UNKNOWN(0/?)" in out and re.search(r"^42\s+COMPLETED\s+completed", out, re.M), out


def _owner(proc: Path):
    try:
        return proc.stat().st_uid
    except OSError:  # gone since it was listed
        return None


def test_a_local_pid_of_another_user_is_not_running():
    """A cluster=local job's pid, reused by another user's process, is no job of the run's: the kernel's EPERM.
    Not root: a process of another user (pid 1, root's, as a rule). Root may signal anyone, so there a process of
    user nobody is looked at as a third user. CI runs as root."""
    import tempfile
    root = os.geteuid() == 0
    other = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: os.setuid(65534)) if root else None
    theirs = [] if root else [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _owner(d) not in
                              (None, os.getuid())]
    if not root and not theirs:
        pytest.skip("no process of another user to look at (a container run as one user)")
    folder = Path(tempfile.mkdtemp(prefix="allconv-pid-"))  # pytest's tmp_path is root's alone
    try:
        folder.chmod(0o755)
        pid = str(other.pid if root else min(theirs))
        run = write_run(folder, "running", job=pid, backend="local", submitit_folder=str(folder / "sub"))
        for f in (run, run / "submission.json", run / "status.json"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        if root:
            os.seteuid(65533)
        try:
            with pytest.raises(PermissionError):
                os.kill(int(pid), 0)
            assert status.run_rows(run)[0]["state"] == "LOST"
            assert jobs.queued_state(json.loads((run / "submission.json").read_text())) is None
        finally:
            if root:
                os.seteuid(0)
    finally:
        shutil.rmtree(folder)
        if other:
            other.kill()
            other.wait()


def test_precision_on_a_cpu_only_cluster_is_checked_before_the_queue():
    with pytest.raises(ConfigError, match="trainer.precision=bf16 needs GPUs but cluster.gpus_per_node=0"):
        cluster_of("trainer.precision=bf16", "cluster.gpus_per_node=0")
    for bad in ("trainer.device=cuda", "dist.backend=nccl"):  # refused here, not after the queue
        with pytest.raises(ConfigError, match=f"{bad} needs GPUs but cluster.gpus_per_node=0"):
            cluster_of(bad, "cluster.gpus_per_node=0")
    # auto is fp32 on a CPU node: allowed (experiment=fast runs on a CPU partition too)
    assert cluster_of("trainer.precision=auto", "cluster.gpus_per_node=0")["gpus_per_node"] == 0


def test_the_readme_model_comparison_sweep_plans_48_points_with_the_paper_recipe(tmp_path, on_path):
    """The README's command for the paper's model comparison, as written there, plans 12 models x 4 lrs."""
    on_path(sbatch="exit 1")  # planning must not submit
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```bash\n(allconv-hpc submit -m [^`]*experiment=paper_allcnn_c_cifar10[^`]*)```", readme)
    argv = shlex.split(block.group(1).replace("\\\n", " "))
    assert argv[:3] == ["allconv-hpc", "submit", "-m"]
    images, labels = torch.zeros(20, 3, 32, 32, dtype=torch.uint8), torch.arange(20) % 10
    write_cifar(tmp_path / "c10", "cifar10", images, labels, images, labels, [str(i) for i in range(10)])
    points, sweep_dir, _ = launcher.plan([*argv[3:], f"data.root={tmp_path / 'c10'}",
                                          f"hydra.sweep.dir={tmp_path / 'sweep'}"], multirun=True)
    assert len(points) == 48 and len({p.run_dir for p in points}) == 48
    models = {o.split("=", 1)[1] for p in points for o in p.overrides if o.startswith("model=")}
    assert models == set(MODEL_NAMES) - {"allcnn_seed"}
    for p in points[::13]:  # plan() validated all 48; spot-check that the recipe survives the swap
        cfg = compose(p.overrides).cfg
        assert (cfg.data.augment, cfg.optim.nesterov, cfg.schedule.name, cfg.model.final_relu) == \
            ("none", False, "paper", True), p.overrides
        assert cfg.optim.lr in (0.25, 0.1, 0.05, 0.01)
    assert not (tmp_path / "sweep").exists()  # planning makes no folder


def test_a_local_jobs_failed_setup_is_logged_in_the_run_folder(tmp_path):
    """cluster=local runs cluster.setup in the submitting terminal: its output goes to .submitit/setup.log,
    a failure is one line, and `status` points at the log instead of a bare LOST."""
    from proc import PY, clean_env
    run = tmp_path / "run"
    path = ":".join(d for d in clean_env(tmp_path)["PATH"].split(":") if not (Path(d) / "sbatch").exists())
    r = subprocess.run([PY, "-m", "allconv_hpc", "submit", "--wait", "cluster=local", *TINY,
                        "cluster.setup=['export GREETING=hi','echo $GREETING from setup','no_such_command_x']",
                        f"hydra.run.dir={run}"], env=clean_env(tmp_path, PATH=path), capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    log = run / ".submitit" / f"setup-{json.loads((run / 'submission.json').read_text())['job_id']}.log"
    assert f"cluster.setup failed (exit 127); its output is in {log}" in r.stderr, r.stderr
    text = log.read_text()
    assert "hi from setup" in text and "no_such_command_x" in text  # the exports reach later lines
    row = status.run_rows(run)[0]
    assert row["state"] == f"LOST (never started: cluster.setup failed? see {log})" and row["failed"]


def test_a_local_jobs_setup_stopped_by_ctrl_c_is_a_stop_not_a_failure(tmp_path):
    """A Ctrl-C in the terminal of submit --wait (its process group: the setup runs there) during a long
    cluster.setup: the setup's shell ended on it before it could log anything, and status read "cluster.setup
    failed?", a failure. Now the log says the signal, and the row is a stop: the same submit starts it."""
    from proc import PY, clean_env
    run = tmp_path / "run"
    path = ":".join(d for d in clean_env(tmp_path)["PATH"].split(":") if not (Path(d) / "sbatch").exists())
    p = subprocess.Popen([PY, "-m", "allconv_hpc", "submit", "--wait", "cluster=local", *TINY,
                          f"cluster.setup=['echo setting up','{shutil.which('sleep')} 60']", f"hydra.run.dir={run}"],
                         env=clean_env(tmp_path, PATH=path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         cwd=tmp_path, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's job
    deadline = time.monotonic() + 120
    while not list((run / ".submitit").glob("setup-*.log")) or "setting up" not in next(
            (run / ".submitit").glob("setup-*.log")).read_text():
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()[0]
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)  # the terminal's Ctrl-C
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130, out
    log = run / ".submitit" / f"setup-{json.loads((run / 'submission.json').read_text())['job_id']}.log"
    assert log.read_text() == "setting up\ncluster.setup stopped by SIGINT\n"
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("INTERRUPTED (never started: SIGINT in cluster.setup)", False), row
    assert "ended before it started (stopped in its cluster.setup); nothing ran: `" in status.notes(row)[0]
    assert status.exit_code([row]) == 0


@pytest.mark.parametrize("line,logged", [("test -e /no/such/file", "cluster.setup failed (exit 1)\n"),
                                         ("exit 3", "")])  # ends the setup's shell before the failure line
def test_a_local_jobs_silent_setup_failure_is_named_too(tmp_path, line, logged):
    from proc import PY, clean_env
    run = tmp_path / "run"
    path = ":".join(d for d in clean_env(tmp_path)["PATH"].split(":") if not (Path(d) / "sbatch").exists())
    r = subprocess.run([PY, "-m", "allconv_hpc", "submit", "--wait", "cluster=local", *TINY,
                        f"cluster.setup=['{line}']", f"hydra.run.dir={run}"], env=clean_env(tmp_path, PATH=path),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    log = run / ".submitit" / f"setup-{json.loads((run / 'submission.json').read_text())['job_id']}.log"
    assert log.read_text() == logged
    assert status.run_rows(run)[0]["state"] == f"LOST (never started: cluster.setup failed? see {log})"


@pytest.mark.slow
def test_a_rank_that_fails_before_the_rendezvous_is_named_by_status(tmp_path):
    """A node without the data (here: rank 1's data.root is missing) fails that rank before its trainer starts,
    so no status.json says why; `status` finds the rank's own error in its .err file, ahead of rank 0's
    rendezvous timeout that follows from it, and calls the job FAILED, not LOST. Rank 0, waiting at the
    rendezvous, is ended by a SIGTERM LOCAL_KILL_WAIT_S after rank 1 failed (as srun --kill-on-bad-exit does),
    not after dist.timeout_s."""
    from proc import PY, clean_env
    torch.manual_seed(0)
    x, y = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (40,))
    write_cifar(tmp_path / "d0", "cifar10", x, y, x[:20], y[:20], [f"c{i}" for i in range(10)])
    run = tmp_path / "run"
    path = ":".join(d for d in clean_env(tmp_path)["PATH"].split(":") if not (Path(d) / "sbatch").exists())
    r = subprocess.run([PY, "-m", "allconv_hpc", "submit", "--wait", "cluster=local", "cluster.tasks_per_node=2",
                        "cluster.cpus_per_task=1", *TINY, "data=cifar10", "data.train_size=null", "data.test_size=null",
                        f"data.root={tmp_path}/d${{oc.env:SUBMITIT_LOCAL_GLOBALID,0}}", "trainer.batch_size=20",
                        "dist.timeout_s=600", f"hydra.run.dir={run}"],
                       env=clean_env(tmp_path, PATH=path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    row = status.run_rows(run)[0]
    assert row["state"] == "FAILED" and row["failed"], row
    assert row["error"].startswith(f"rank 1: CIFAR-10 not found: expected {tmp_path}/d1/cifar-10-batches-py "), row
    job = json.loads((run / "submission.json").read_text())["job_id"]
    err0, err1 = ((run / ".submitit" / job / f"{job}_{t}_log.err").read_text() for t in (0, 1))
    assert "rendezvous with 2 ranks" not in err0, err0[-2000:]  # killed while waiting, not timed out
    # the rank says whose refusal it is, also where several ranks share one console (torchrun)
    assert "allconv-hpc: error: rank 1: CIFAR-10 not found" in err1, err1[-2000:]
    assert re.search(r"note: this rank failed, and its job's other ranks still ran: sent SIGTERM to \d+ at 30 s "
                     r"\(cluster=local has no srun --kill-on-bad-exit\)", err1), err1[-2000:]


@pytest.mark.slow
def test_a_hung_rank_of_a_local_job_is_ended_with_it(tmp_path):
    """cluster=local: rank 1 stops mid-training (SIGSTOP: hung in its own code, a stuck file system). Rank 0's
    collective times out after dist.timeout_s and fails naming it; the hung rank is killed 2 x LOCAL_KILL_WAIT_S later,
    so the job ends FAILED instead of holding on until cluster.timeout_min (submitit's controller waits for all)."""
    from proc import PY, clean_env, wait_for_line
    run = tmp_path / "run"
    path = ":".join(d for d in clean_env(tmp_path)["PATH"].split(":") if not (Path(d) / "sbatch").exists())
    r = subprocess.run([PY, "-m", "allconv_hpc", "submit", "cluster=local", "cluster.tasks_per_node=2",
                        "cluster.cpus_per_task=1", *TINY, "trainer.epochs=100000", "trainer.progress=log",
                        "trainer.log_every_steps=1", "dist.timeout_s=10", f"hydra.run.dir={run}"],
                       env=clean_env(tmp_path, PATH=path), stdout=(tmp_path / "submit.out").open("w"),
                       stderr=subprocess.STDOUT, timeout=120, cwd=tmp_path)  # not a pipe: the job holds it
    assert r.returncode == 0, (tmp_path / "submit.out").read_text()
    controller = int(json.loads((run / "submission.json").read_text())["job_id"])

    def alive(pid):
        st = jobs.process_stat(pid)
        return st is not None and st[0] != "Z"
    try:
        wait_for_line(run / "train.log", "epoch 2 step", timeout=120)
        rank1 = [pid for pid in jobs.children(controller)
                 if b"SUBMITIT_LOCAL_GLOBALID=1\0" in Path(f"/proc/{pid}/environ").read_bytes()]
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGSTOP)
        t0 = time.monotonic()
        while alive(controller) and time.monotonic() - t0 < 120:
            time.sleep(0.5)
        took = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(controller, signal.SIGTERM)
    assert not alive(rank1[0]) and not alive(controller), "the hung rank still holds the job"
    assert took < 10 + 60 + 30, f"the job took {took:.0f} s to end"  # dist.timeout_s + 2 x LOCAL_KILL_WAIT_S + slack
    job = str(controller)
    err0 = (run / ".submitit" / job / f"{job}_0_log.err").read_text()
    assert re.search(rf"sent SIGTERM to {rank1[0]} at 30 s; SIGKILL to {rank1[0]} at 60 s", err0), err0[-2000:]
    row = status.run_rows(run)[0]
    assert row["state"] == "FAILED" and "peer rank(s) 1 did not answer" in row["error"], row
    # a peer lost without a word is no failure of the run's own: the same submit resumes it (no such line before)
    # submitted in tmp_path, looked at from here: it goes there first, where its relative values are
    assert status.notes(row)[-1].startswith("stopped with epoch ") and f"`cd {tmp_path} && allconv-hpc submit " \
        f"cluster=local " in status.notes(row)[-1] and "` resumes it" in status.notes(row)[-1], status.notes(row)


def test_a_rank_killed_while_its_peer_waits_at_the_rendezvous_ends_the_job(tmp_path):
    """cluster=local: rank 1 is SIGKILLed (the OOM killer, a kill -9) before its rendezvous, where rank 0 waits for
    it. It left no reaper (it ran no code), so rank 0 waited up to dist.timeout_s (300 s on CPU, 1800 with NCCL).
    The controller now does what srun's --kill-on-bad-exit does: its word in rank 1's .err, which status shows, and
    rank 0 ended LOCAL_KILL_WAIT_S later."""
    from proc import wait_for_line
    from allconv_hpc.localjob import LOCAL_KILL_WAIT_S
    run = tmp_path / "run"
    job = _submit_local_pair(tmp_path, run)
    rank1, deadline = [], time.monotonic() + 60
    try:
        while not rank1:
            assert _alive(job) and time.monotonic() < deadline, "no rank 1 seen"
            for pid in jobs.children(job):
                with contextlib.suppress(FileNotFoundError):
                    if b"SUBMITIT_LOCAL_GLOBALID=1\0" in Path(f"/proc/{pid}/environ").read_bytes():
                        rank1.append(pid)
        os.kill(rank1[0], signal.SIGSTOP)  # held before its rendezvous, while rank 0 gets to its own
        wait_for_line(run / "train.log", "run folder", timeout=60)  # rank 0's line just before its rendezvous
        time.sleep(1)
        os.kill(rank1[0], signal.SIGKILL)
        t0 = time.monotonic()
        _watch_until_ended(run, [job], timeout=90)
        took = time.monotonic() - t0
    finally:
        _kill_all([*rank1, job])
    assert took < LOCAL_KILL_WAIT_S + 30, f"the job took {took:.0f} s to end"
    err1 = run / ".submitit" / str(job) / f"{job}_1_log.err"
    assert "allconv-hpc (controller): ended by SIGKILL, without a word of its own" in err1.read_text()
    wait_for_line(err1, "sent SIGTERM to", timeout=10)  # the reaper's note, as it leaves
    row = status.run_rows(run)[0]
    assert row["state"] == "FAILED" and row["error"].startswith("rank 1: ended by SIGKILL"), row


def test_a_rank_killed_in_training_has_its_log_named_beside_its_peers_error(tmp_path):
    """cluster=local: rank 1 SIGKILLed while training (the OOM killer). Rank 0 fails saying its peer did not answer;
    status named that alone, while the controller's word that a SIGKILL ended rank 1 was only in rank 1's .err
    (a wall the twelfth session left). The row names that file."""
    run = tmp_path / "run"
    controller, ranks = _start_local_job(tmp_path, run, 2)
    try:
        rank1 = [p for p in ranks if b"SUBMITIT_LOCAL_GLOBALID=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
        os.kill(rank1[0], signal.SIGKILL)
        _watch_until_ended(run, [controller], timeout=90)
    finally:
        _kill_all([*ranks, controller])
    row = status.run_rows(run)[0]
    assert (row["state"], row["peer_lost"]) == ("FAILED", True), row
    assert row["error"].startswith("rank 0: peer rank(s) 1 did not answer"), row
    err1 = run / ".submitit" / str(controller) / f"{controller}_1_log.err"
    assert row["error"].endswith(f"; the lost rank's own log (srun's or the controller's word on a signal that ended "
                                 f"one): {err1}"), row
    assert "allconv-hpc (controller): ended by SIGKILL" in err1.read_text()  # which says why


def test_a_reaper_is_no_rank_and_outlasts_the_ranks_signals(tmp_path):
    """The controller's reaper (a rank ended by a signal) is its child, as the ranks are: a rank that fails next
    passes its Ctrl-C on to its peers (end_local_peers), which must not take the reaper for one (a SIGINT ended
    it with a traceback, and the hung peer it was to end stayed). It ignores such signals."""
    from allconv_hpc import localjob
    peer = subprocess.Popen(["sleep", "60"])
    try:
        before = set(jobs.children(os.getpid()))
        localjob.start_reaper(os.getpid(), [peer.pid], stderr=(tmp_path / "err").open("w"), who="rank 1 ended")
        deadline = time.monotonic() + 30
        while not (reaper := set(jobs.children(os.getpid())) - before):
            assert time.monotonic() < deadline, "no reaper seen"
        [pid] = reaper
        while not localjob.is_reaper(pid):  # its exec
            assert time.monotonic() < deadline, Path(f"/proc/{pid}/cmdline").read_bytes()
        held = (1 << signal.SIGINT - 1) | (1 << signal.SIGTERM - 1) | (1 << signal.SIGHUP - 1)
        while int(re.search(r"SigIgn:\s*([0-9a-f]+)", Path(f"/proc/{pid}/status").read_text())[1], 16) & held != held:
            assert time.monotonic() < deadline, "the reaper does not ignore the ranks' signals"  # its python, in _reap
        assert not localjob.is_reaper(peer.pid) and not localjob.is_reaper(os.getpid())
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(pid, sig)
        time.sleep(0.5)
        assert _alive(pid) and peer.poll() is None
    finally:
        peer.kill()
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(pid, signal.SIGKILL)


def test_a_requeued_slurm_job_in_its_start_up_shows_starting(tmp_path, on_path):
    """Slurm says RUNNING while the requeued job's new start (rendezvous, data, model) holds the run lock over the
    last start's record (interrupted, requeued): it showed `RUNNING interrupted` for that while."""
    from allconv_hpc import runlock
    run = write_run(tmp_path, None)
    on_path(squeue='[ "$3" = 42 ] && ' + squeue_says("RUNNING"), sacct=NO_ACCOUNTING)
    for last in ("requeued", "interrupted", "running"):
        (run / "status.json").write_text(json.dumps({"state": last, "epoch": 1, "epochs": 3, "updated": 1.0,
                                                     "slurm_job_id": "42"}))
        fd = runlock.acquire(run)  # taken after the record: a new start
        try:
            row = status.run_rows(run)[0]
        finally:
            os.close(fd)
        want = "RUNNING" if last == "running" else "RUNNING (starting)"  # training: its own record says so
        assert (row["state"], row["active"], row["failed"]) == (want, True, False), (last, row)
        assert status.run_rows(run)[0]["state"] == "RUNNING"  # lock let go: Slurm's word alone


def test_a_key_swept_twice_is_refused(tmp_path, monkeypatch):
    """Hydra keeps the last value: `seed=0,1 seed=2,3` would make 4 points of 2 configs, named after both."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"seed is given twice in a sweep \(seed=0,1 and seed=2,3\); give it once"):
        launcher.plan(["cluster=local", *TINY, "seed=0,1", "seed=2,3"], multirun=True)


def test_sweep_values_that_give_one_config_are_refused(tmp_path, monkeypatch):
    """optim.lr=1,1.0: two folder names, one float; both points would train the same run. (0.05,0.050 is caught
    earlier, as one folder.)"""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"sweep points optim.lr=1 and optim.lr=1.0 give the same config"):
        launcher.plan(["cluster=local", "cluster.array_parallelism=2", *TINY, "optim.lr=1,1.0"], multirun=True)
    points = launcher.plan(["cluster=local", "cluster.array_parallelism=4", *TINY, "optim.lr=1,2", "seed=0,1"],
                           multirun=True)[0]
    assert len(points) == 4


def test_a_local_job_at_its_time_limit_says_to_submit_again(tmp_path):
    """Nothing requeues a cluster=local job: at cluster.timeout_min it checkpoints, stops, and says how to go on."""
    from proc import PY, clean_env
    run = tmp_path / "run"
    path = ":".join(d for d in clean_env(tmp_path)["PATH"].split(":") if not (Path(d) / "sbatch").exists())
    r = subprocess.run([PY, "-m", "allconv_hpc", "submit", "--wait", "cluster=local", *TINY, "trainer.epochs=100000",
                        "cluster.timeout_min=1", "cluster.signal_lead_s=45", f"hydra.run.dir={run}"],
                       env=clean_env(tmp_path, PATH=path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr  # status.EXIT_STOPPED
    text = (run / "train.log").read_text()
    assert ("a cluster=local job gets SIGUSR2 signal_lead_s before cluster.timeout_min (or when sent by hand), and "
            "nothing requeues it: submit the same command again to resume") in text, text[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"


def _start_local_job(tmp_path: Path, run: Path, ntasks: int, ignore_int: bool = False) -> tuple[int, list[int]]:
    """A cluster=local job that trains until stopped, in a session of its own (no terminal whose Ctrl-C would reach
    its ranks too) with SIGHUP as in a terminal; (its controller's pid, the job id; its ranks' pids) once it trains.
    `ignore_int`: submit started with SIGINT ignored, as a script's `submit &` is."""
    def preexec():
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        if ignore_int:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    from proc import PY, clean_env, wait_for_line
    path = ":".join(d for d in clean_env(tmp_path)["PATH"].split(":") if not (Path(d) / "sbatch").exists())
    r = subprocess.run([PY, "-m", "allconv_hpc", "submit", "cluster=local", f"cluster.tasks_per_node={ntasks}",
                        "cluster.cpus_per_task=1", *TINY, "trainer.epochs=100000", "trainer.progress=log",
                        "trainer.log_every_steps=1", f"hydra.run.dir={run}"],
                       env=clean_env(tmp_path, PATH=path), stdout=(tmp_path / "submit.out").open("w"),
                       stderr=subprocess.STDOUT, timeout=120, cwd=tmp_path, start_new_session=True,
                       preexec_fn=preexec)
    assert r.returncode == 0, (tmp_path / "submit.out").read_text()
    controller = int(json.loads((run / "submission.json").read_text())["job_id"])
    wait_for_line(run / "train.log", "epoch 2 step", timeout=120)
    ranks = jobs.children(controller)
    assert len(ranks) == ntasks, ranks
    return controller, ranks


def _kill_all(pids) -> None:
    """SIGKILL each of pids still there (a test's clean-up of the processes it started)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    st = jobs.process_stat(pid)
    return st is not None and st[0] != "Z"


def _watch_until_ended(run: Path, pids: list[int], timeout: float = 60, controller: Optional[int] = None) -> list[str]:
    """status's states of run until every process of pids ended; a LOST while one still runs fails, and so does
    `controller` ending before them."""
    seen, end = [], time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        state = status.run_rows(run)[0]["state"]
        running = [p for p in pids if _alive(p)]  # alive now: alive while status looked too
        assert not (state.startswith("LOST") and running), f"status said {state} while {running} ran"
        assert controller is None or not running or _alive(controller), f"{running} run on without their controller"
        seen.append(state)
        assert time.monotonic() < end, f"{running} still run {timeout:g} s on; status said {sorted(set(seen))}"
        time.sleep(0.2)
    return seen


@pytest.mark.parametrize("sig,ntasks,ignore_int", [(signal.SIGUSR2, 2, False), (signal.SIGHUP, 1, False),
                                                   (signal.SIGINT, 1, False), (signal.SIGINT, 1, True)])
def test_a_signal_sent_to_a_local_job_id_stops_its_ranks_under_their_controller(tmp_path, sig, ntasks, ignore_int):
    """`kill -USR2 <job id>`, as `scancel --signal=USR2` on Slurm: the controller passes the signal on to every rank
    and stays, so they checkpoint and stop while it still supervises them (it used to die of it, leaving the ranks
    training with no cluster.timeout_min), and `status` says RUNNING until they have stopped, then INTERRUPTED.
    A `kill -INT` too where submit was started ignoring SIGINT (a script's `submit &`): the job trained on (found by
    a laptop journey audit)."""
    run = tmp_path / "run"
    controller, ranks = _start_local_job(tmp_path, run, ntasks, ignore_int)
    try:
        os.kill(controller, sig)
        seen = _watch_until_ended(run, ranks, controller=controller)
        assert "RUNNING" in seen, seen
        _watch_until_ended(run, [controller], timeout=30)  # it ends with them
    finally:
        _kill_all([*ranks, controller])
    text = (run / "train.log").read_text()
    assert f"stop requested ({sig.name}) during" in text, text[-3000:]
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("INTERRUPTED", False), row


def test_a_copy_of_a_running_jobs_folder_is_no_folder_of_that_job(tmp_path):
    """A copy of the folder a running cluster=local job trains was shown as that job's (RUNNING), and training into
    the copy was refused, 'job N (RUNNING) training into it' (found by a laptop journey audit). The job trains the
    original, still where submit recorded it: the copy has no job, its progress its own, and it may be trained."""
    run, copy = tmp_path / "run", tmp_path / "copy"
    controller, ranks = _start_local_job(tmp_path, run, 1)
    try:
        for _ in range(5):  # as cp -r would, while the job writes (a file renamed away mid-copy: again)
            try:
                shutil.copytree(run, copy, symlinks=True, ignore=shutil.ignore_patterns(".train.lock", "*.tmp"))
                break
            except (shutil.Error, FileNotFoundError):
                shutil.rmtree(copy, ignore_errors=True)
        original, copied = status.run_rows(run)[0], status.run_rows(copy)[0]
        assert (original["job"], original["state"]) == (str(controller), "RUNNING"), original
        assert (copied["job"], copied["state"], copied["failed"], copied["copy_of"]) == (
            "-", "COPY (its job trains the original)", False, str(run)), copied
        assert status.notes(copied)[0].startswith(f"a copy of {run}, which its job {controller} trains now, not "
                                                  f"this folder; "), status.notes(copied)
        assert jobs.other_jobs_state(copy) is None and jobs.other_jobs_state(run)[1] == "RUNNING"
        ov = json.loads((copy / "submission.json").read_text())["overrides"]
        assert folder_checks.check_run_folder(copy, compose(ov).cfg, overrides=ov) is None  # submit takes it too
        with pytest.raises(ConfigError, match=rf"run folder {run} already has job {controller} \(RUNNING\)"):
            folder_checks.check_run_folder(run, compose(ov).cfg, overrides=ov)
        alias = tmp_path / "alias"  # the folder itself, by another path: the job's (a bind mount, as a link here)
        alias.symlink_to(run)
        assert status.run_rows(alias)[0]["state"] == "RUNNING"
        # a copy of a sweep: each point's job trains the original sweep's point
        sweep = {"jobs": [{"job_id": str(controller), "run_dir": str(run), "backend": "local"}]}
        (tmp_path / "sweep.json").write_text(json.dumps(sweep))
        assert jobs.trains_elsewhere(sweep["jobs"][0], tmp_path / "elsewhere", sweep=True)
        assert not jobs.trains_elsewhere(sweep["jobs"][0], tmp_path, sweep=True)  # the sweep itself
        run.rename(tmp_path / "moved")  # moved away, not copied: the job's folder is the one it is in now (a
        # rename, as mv does: an rmtree raced the job's own writes, "Directory not empty", in one CI run)
        assert not jobs.trains_elsewhere(json.loads((copy / "submission.json").read_text()), copy)
    finally:
        _kill_all([*ranks, controller])


def test_a_sigint_to_a_local_jobs_process_group_reaches_its_ranks_once(tmp_path):
    """`kill -INT -- -PGID` (a CI cancel, a supervisor): the ranks, in a group of their own, get it once, from the
    controller. In the controller's group they got it straight and again from it ms later, and that second copy
    stopped a rank at once, mid-checkpoint, losing the steps since the last one (1 trial in 14)."""
    run = tmp_path / "run"
    controller, ranks = _start_local_job(tmp_path, run, 2)
    try:
        assert [os.getpgid(r) for r in ranks] == ranks  # each leads its own group, apart from the controller's
        os.killpg(os.getpgid(controller), signal.SIGINT)
        _watch_until_ended(run, ranks, controller=controller)
        _watch_until_ended(run, [controller], timeout=30)
    finally:
        _kill_all([*ranks, controller])
    text = (run / "train.log").read_text()
    assert "stop requested (SIGINT) during" in text and "stopped at once" not in text, text[-3000:]
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("INTERRUPTED", False), row


def _in_a_terminal(argv: list[str], env: dict, cwd: Path, until: Path, needle: str, out: Path) -> int:
    """Runs argv as a terminal's foreground job (a pty of its own, as in an ssh session), types Ctrl-C once `needle`
    is in the file `until`, and returns its exit status; what it printed goes to `out`."""
    import pty
    import select
    pid, fd = pty.fork()
    if pid == 0:  # the child: session leader, the pty its controlling terminal, its group in the foreground
        os.chdir(cwd)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a runner started as `cmd &` ignores it
        os.execve(argv[0], argv, env)
    said, typed, end = b"", False, time.monotonic() + 240
    try:
        while time.monotonic() < end:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    break
                said += chunk
            if not typed and until.is_file() and needle in until.read_text():
                os.write(fd, b"\x03")  # the terminal sends SIGINT to its foreground process group
                typed = True
        else:
            os.kill(pid, signal.SIGKILL)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finally:
        os.close(fd)
        out.write_bytes(said)


def test_ctrl_c_in_the_terminal_of_submit_wait_stops_the_local_job_with_a_checkpoint(tmp_path):
    """Ctrl-C while `submit --wait` watches a cluster=local job: submit stops watching and says the job got it too,
    the controller passes it on, and every rank checkpoints and stops (the ranks, in a group of their own, get it
    from the controller alone)."""
    from proc import PY, clean_env
    run = tmp_path / "run"
    path = ":".join(d for d in clean_env(tmp_path)["PATH"].split(":") if not (Path(d) / "sbatch").exists())
    code = _in_a_terminal([PY, "-m", "allconv_hpc", "submit", "--wait", "cluster=local", "cluster.tasks_per_node=2",
                           "cluster.cpus_per_task=1", *TINY, "trainer.epochs=100000", "trainer.progress=log",
                           "trainer.log_every_steps=1", f"hydra.run.dir={run}"], clean_env(tmp_path, PATH=path),
                          tmp_path, run / "train.log", "epoch 2 step", tmp_path / "submit.out")
    said = (tmp_path / "submit.out").read_text(errors="replace")
    assert code == 130 and "reached the local job too: it checkpoints and stops" in said, said[-3000:]
    job = int(json.loads((run / "submission.json").read_text())["job_id"])
    _watch_until_ended(run, [job], timeout=60)
    text = (run / "train.log").read_text()
    assert text.count("stop requested (SIGINT) during") == 1 and "stopped at once" not in text, text[-3000:]
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("INTERRUPTED", False), row


def test_sigint_to_submit_wait_alone_says_the_local_job_goes_on(tmp_path):
    """`kill -INT` of a `submit --wait` process (no terminal): the watcher stops, and it must not claim the local
    job stops too (it said so, and the job trained on)."""
    from proc import PY, clean_env, wait_for_line
    run = tmp_path / "run"
    path = ":".join(d for d in clean_env(tmp_path)["PATH"].split(":") if not (Path(d) / "sbatch").exists())
    p = subprocess.Popen([PY, "-m", "allconv_hpc", "submit", "--wait", "cluster=local", "cluster.cpus_per_task=1",
                          *TINY, "trainer.epochs=100000", "trainer.progress=log", "trainer.log_every_steps=1",
                          f"hydra.run.dir={run}"], env=clean_env(tmp_path, PATH=path), cwd=tmp_path,
                         stdout=(tmp_path / "submit.out").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a `cmd &` ignores it
    job = None
    try:  # (its output to a file: the job, its child, holds a pipe open as long as it runs)
        wait_for_line(run / "train.log", "epoch 2 step", timeout=120, proc=p)
        job = int(json.loads((run / "submission.json").read_text())["job_id"])
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
        out = (tmp_path / "submit.out").read_text()
        assert p.returncode == 130 and (f"a SIGINT to this process alone leaves the local job going (stop it with "
                                        f"kill -INT {job})") in out, out[-3000:]
        assert _alive(job) and "stop requested" not in (run / "train.log").read_text()
    finally:
        p.kill()
        if job is not None:
            os.kill(job, signal.SIGINT)
            _watch_until_ended(run, [job], timeout=60)


def test_a_local_job_submitted_without_wait_has_a_session_and_output_of_its_own(tmp_path):
    """Without --wait, submit returns and so does a pipe from it (`$(allconv-hpc submit ...)` waited for the job's
    end: its controller held submit's stdout), and the controller leads a session of its own, so a terminal closed
    without job control (ssh -t) no longer sends it SIGHUP. Its own output goes to .submitit/controller-<id>.log."""
    from proc import PY, clean_env, wait_for_line
    run = tmp_path / "run"
    path = ":".join(d for d in clean_env(tmp_path)["PATH"].split(":") if not (Path(d) / "sbatch").exists())
    r = subprocess.run([PY, "-m", "allconv_hpc", "submit", "cluster=local", "cluster.cpus_per_task=1", *TINY,
                        "trainer.epochs=100000", "trainer.progress=log", "trainer.log_every_steps=1",
                        f"hydra.run.dir={run}"], env=clean_env(tmp_path, PATH=path), cwd=tmp_path, timeout=60,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # the pipe closes with submit
    assert r.returncode == 0, r.stdout
    job = int(json.loads((run / "submission.json").read_text())["job_id"])
    try:
        assert os.getsid(job) == job != os.getsid(0)
        assert (run / ".submitit" / f"controller-{job}.log").is_file()
        wait_for_line(run / "train.log", "epoch 1 step", timeout=120)  # it trains on after submit's end
        os.kill(job, signal.SIGINT)
        _watch_until_ended(run, [job], timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(job, signal.SIGKILL)
    row = status.run_rows(run)[0]
    assert (row["state"], row["started_by"]) == ("INTERRUPTED", "submit"), row
    assert json.loads((run / "status.json").read_text())["local_job_id"] == str(job)  # its record names its job


def test_a_local_job_whose_controller_is_killed_stops_its_ranks(tmp_path):
    """A SIGKILLed controller cannot pass anything on: its ranks' parent-death signal (SIGTERM) stops them with a
    checkpoint, and `status` does not say LOST while they finish."""
    run = tmp_path / "run"
    controller, ranks = _start_local_job(tmp_path, run, 2)
    try:
        os.kill(controller, signal.SIGKILL)
        _watch_until_ended(run, ranks)
    finally:
        _kill_all(ranks)
    text = (run / "train.log").read_text()
    assert "stop requested (SIGTERM) during" in text, text[-3000:]
    assert status.run_rows(run)[0]["state"] == "INTERRUPTED"


def _submit_local_pair(tmp_path: Path, run: Path) -> int:
    """A cluster=local job of 2 ranks (TINY) submitted in a session of its own; its job id, as soon as submit is done."""
    from proc import PY, clean_env
    path = ":".join(d for d in clean_env(tmp_path)["PATH"].split(":") if not (Path(d) / "sbatch").exists())
    r = subprocess.run([PY, "-m", "allconv_hpc", "submit", "cluster=local", "cluster.tasks_per_node=2",
                        "cluster.cpus_per_task=1", *TINY, f"hydra.run.dir={run}"], env=clean_env(tmp_path, PATH=path),
                       stdout=(tmp_path / "submit.out").open("w"), stderr=subprocess.STDOUT, timeout=120, cwd=tmp_path,
                       start_new_session=True)
    assert r.returncode == 0, (tmp_path / "submit.out").read_text()
    return int(json.loads((run / "submission.json").read_text())["job_id"])


def test_ctrl_c_while_local_ranks_import_torch_is_a_start_up_interrupt(tmp_path):
    """A Ctrl-C that reaches the ranks of a cluster=local DDP job while they import torch (its first seconds) ends
    them with the start-up line, as anywhere else in start-up: not a KeyboardInterrupt traceback from inside
    `import torch`, which `status` read as FAILED."""
    run = tmp_path / "run"
    job = str(_submit_local_pair(tmp_path, run))
    interrupted, loading, deadline = set(), set(), time.monotonic() + 60
    try:
        # both ranks at once, once both load torch's library (only their imports load torch): one rank stopped
        # alone would end the job, and with it the other before it got there
        while len(loading) < 2:
            assert _alive(int(job)) and time.monotonic() < deadline, f"ranks {loading} of 2 seen importing torch"
            for pid in set(jobs.children(int(job))) - loading:
                with contextlib.suppress(FileNotFoundError):
                    if b"libtorch" in Path(f"/proc/{pid}/maps").read_bytes():
                        loading.add(pid)
            time.sleep(0.01)
        for pid in loading:
            os.kill(pid, signal.SIGINT)
            interrupted.add(pid)
        _watch_until_ended(run, [int(job)], timeout=60)
    finally:
        _kill_all([*interrupted, int(job)])
    for task in (0, 1):
        err = (run / ".submitit" / job / f"{job}_{task}_log.err").read_text()
        assert "Traceback" not in err and "allconv-hpc: interrupted (Ctrl-C) during start-up" in err, err[-3000:]
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("INTERRUPTED", False), row


@pytest.mark.parametrize("target", ["controller", "rank"])
def test_a_signal_in_a_local_jobs_first_moments_interrupts_it_in_start_up(tmp_path, target):
    """SIGINT to the job id (its controller) as soon as submit returns, or to a rank as soon as it is forked: held
    until the controller has ranks to pass it on to and until train.run's guard is there. Before, the controller
    died of it with a traceback (status: LOST), or a rank inside submitit's start did (FAILED)."""
    run = tmp_path / "run"
    job = _submit_local_pair(tmp_path, run)
    ranks, deadline = [], time.monotonic() + 60
    try:
        if target == "controller":
            os.kill(job, signal.SIGINT)
        else:
            while not ranks:  # the first rank the moment it exists (its python not yet started)
                assert _alive(job) and time.monotonic() < deadline, "no rank seen"
                ranks = jobs.children(job)
            os.kill(ranks[0], signal.SIGINT)
        _watch_until_ended(run, [job], timeout=90)
    finally:
        _kill_all([*ranks, job])
    errs = [p.read_text() for p in (run / ".submitit" / str(job)).glob("*_log.err")]
    assert len(errs) == 2 and not any("Traceback" in e for e in errs), errs
    assert "Traceback" not in (tmp_path / "submit.out").read_text()
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("INTERRUPTED", False), (row, errs)


def test_a_run_resumed_by_hand_after_its_job_ended_is_running_not_lost(tmp_path, on_path):
    from allconv_hpc import runlock
    run = write_run(tmp_path, "running")  # its submitted job is gone without a word...
    on_path(squeue=FORGOTTEN, sacct=NO_ACCOUNTING, scontrol=FORGOTTEN)
    assert status.run_rows(run)[0]["state"] == "LOST"
    fd = runlock.acquire(run)  # ...and `train` by hand trains into it now
    try:
        row = status.run_rows(run)[0]
        assert (row["state"], row["failed"], row["active"]) == ("RUNNING", False, True)
    finally:
        os.close(fd)
    assert status.run_rows(run)[0]["state"] == "LOST"


def test_a_comma_list_outside_a_sweep_says_how_to_quote_it(tmp_path):
    with pytest.raises(ConfigError, match=r"'cluster.exclude=n1,n2' is a sweep \(`allconv-hpc submit -m` submits one "
                                          r"job per value\); one value holding commas is quoted: "
                                          r"'cluster.exclude=\"n1,n2\"'"):
        launcher.plan(["cluster=local", *TINY, "cluster.exclude=n1,n2", f"hydra.run.dir={tmp_path / 'r'}"],
                      multirun=False)
    c = compose(["cluster=local", *TINY, 'cluster.exclude="n1,n2"'])  # what the hint says to type
    assert c.cluster["exclude"] == "n1,n2"
    with pytest.raises(ConfigError, match=r"one list is given in brackets: 'schedule.milestones=\[1,2\]'"):
        launcher.plan(["cluster=local", *TINY, "schedule.milestones=1,2", f"hydra.run.dir={tmp_path / 'r'}"],
                      multirun=False)
    assert compose([*TINY, "schedule.milestones=[1,2]"]).cfg.schedule.milestones == [1, 2]  # what that hint says
    with pytest.raises(ConfigError, match=r"cluster.nodes takes one value"):
        launcher.plan(["cluster=local", *TINY, "cluster.nodes=1,2", f"hydra.run.dir={tmp_path / 'r'}"], multirun=False)



def test_submitting_a_run_that_diverged_warns_it_will_likely_diverge_again(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "failed", "global_step": 56, "error": "non-finite loss or "
                                                 "weights found at global step 60 (epoch 8); ..."}))
    mine = compose(["cluster=local", *TINY]).cfg
    CheckpointDir(run / "checkpoints", keep=2).save({"identity": mine.identity(), "train_state": {"epoch": 0}}, step=56)
    launcher.plan(["cluster=local", *TINY, f"hydra.run.dir={run}"], multirun=False)
    err = capsys.readouterr().err
    # where it diverged, and the checkpoint it resumes: it said "at step 56", the checkpoint's (Slurm audit)
    assert (f"warning: {run} stopped on a non-finite loss or weights found at global step 60 (epoch 8); its job "
            f"resumes the newest checkpoint kept (step 56) and will likely") in err, err
    assert "lower optim.lr in a new hydra.run.dir, or add checkpoint.resume=never" in err, err
    launcher.plan(["cluster=local", *TINY, "checkpoint.resume=never", f"hydra.run.dir={run}"], multirun=False)
    assert "non-finite" not in capsys.readouterr().err  # starting over is the fix
    # a sweep's point: starting over (or a new sweep folder) would redo the whole sweep, its completed points too
    sweep = tmp_path / "sw"
    sweep.mkdir()
    shutil.copytree(run, sweep / "seed=0")
    launcher.plan(["cluster=local", "cluster.array_parallelism=2", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}"],
                  multirun=True)
    err = capsys.readouterr().err
    assert (f"warning: {sweep / 'seed=0'} stopped on a non-finite loss or weights found at global step 60 (epoch 8); "
            f"its job resumes the newest checkpoint kept (step 56) and will likely diverge again: leave its value out of the sweep (choice(...) of the others) and "
            f"sweep a lower optim.lr as new points; checkpoint.resume=never, or a new hydra.sweep.dir, would train "
            f"every point again") in err, err


def test_a_list_where_slurm_takes_one_string_says_how_to_write_it(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster.exclude=\['n1', 'n2'\] is a list; Slurm takes one comma-separated "
                                          r"string: 'cluster.exclude=\"n1,n2\"'"):
        launcher.plan(["cluster=slurm", *TINY, "cluster.exclude=[n1,n2]", f"hydra.run.dir={tmp_path / 'r'}"],
                      multirun=False)
    assert compose(["cluster=slurm", *TINY, 'cluster.exclude="n1,n2"']).cluster["exclude"] == "n1,n2"  # as told


def test_a_diverged_run_with_a_damaged_or_checkpointless_record_is_said_right(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text("[]")  # not a record: no warning, no traceback
    launcher.plan(["cluster=local", *TINY, f"hydra.run.dir={run}"], multirun=False)
    assert "non-finite" not in capsys.readouterr().err
    (run / "status.json").write_text(json.dumps({"state": "failed", "global_step": 3, "error": "non-finite loss"}))
    launcher.plan(["cluster=local", *TINY, f"hydra.run.dir={run}"], multirun=False)
    assert "it diverged before its first checkpoint, and its job starts over" in capsys.readouterr().err


def test_a_sweep_over_a_key_its_schedule_never_reads_is_warned_once(tmp_path, capsys):
    launcher.plan(["cluster=local", *TINY, "schedule=onecycle", "schedule.warmup_epochs=0,1,2",
                   "cluster.array_parallelism=3", f"hydra.sweep.dir={tmp_path / 's'}"], multirun=True)
    err = capsys.readouterr().err
    assert err.count("the sweep varies schedule.warmup_epochs, which schedule=onecycle does not read: such points "
                     "train alike") == 1, err
    launcher.plan(["cluster=local", *TINY, "schedule.warmup_epochs=0,1", "cluster.array_parallelism=2",
                   f"hydra.sweep.dir={tmp_path / 't'}"], multirun=True)  # the paper schedule reads it
    assert "does not read" not in capsys.readouterr().err
    launcher.plan(["cluster=local", *TINY, "schedule.decay=0.5", f"hydra.run.dir={tmp_path / 'r'}"], multirun=False)
    assert "schedule.decay=0.5: schedule=paper does not read it, so it changes nothing" in capsys.readouterr().err


def test_a_run_or_sweep_folder_named_by_the_clock_is_warned_and_pinned(tmp_path, capsys, monkeypatch):
    """submit resolves a ${now:...} folder once: the job (and its requeues) keep it, while submitting the same
    command again would start over in a new one, which is warned with the folder to give."""
    monkeypatch.chdir(tmp_path)
    points, _, _ = launcher.plan(["cluster=local", *TINY, "hydra.run.dir=runs/r-${now:%Y%m%d}"], multirun=False)
    run = points[0].run_dir
    assert run.parent == tmp_path / "runs"
    assert [o for o in points[0].overrides if o.startswith("hydra.run.dir=")] == [  # the job's, and its requeues'
        f"hydra.run.dir={hydra_value(run, 'hydra.run.dir')}"]
    assert (f"hydra.run.dir=runs/r-${{now:%Y%m%d}} names a new folder at each start ({run} this time): the same "
            f"command run again starts over instead of resuming; give hydra.run.dir={run} to resume this one"
            in capsys.readouterr().err)
    points, sweep, _ = launcher.plan(["cluster=local", *TINY, "seed=0,1", "cluster.array_parallelism=2",
                                      "hydra.sweep.dir=sw/${now:%Y%m%d}"], multirun=True)
    err = capsys.readouterr().err
    assert sweep.parent == tmp_path / "sw" and all(p.run_dir.parent == sweep for p in points)
    assert err.count(f"hydra.sweep.dir=sw/${{now:%Y%m%d}} names a new folder at each start ({sweep} this time)") == 1
    assert "hydra.run.dir" not in err  # the points' folders are the sweep's, named by their values


def test_a_refused_submit_takes_back_only_the_folders_it_made(tmp_path, monkeypatch):
    """Two submits into a new run folder at once: the later one finds the earlier one's job and is refused. It
    saw the folder missing, but the other made it (and queued a job that trains there): it must be left whole.
    A refused submit alone leaves no folder behind."""
    import sys
    folder = tmp_path / "runs" / "twin"
    code = ("import sys, time; from pathlib import Path; from allconv_hpc.submit_lock import submit_lock\n"
            "with submit_lock(Path(sys.argv[1])):\n"
            "    (Path(sys.argv[1]) / 'submission.json').write_text('{}'); print('held', flush=True); time.sleep(1)\n")
    real_mkdir, other = Path.mkdir, []

    def late_mkdir(self, *args, **kwargs):  # the other submit makes the folders just before this one does
        if self == folder.parent and not other:
            other.append(subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True))
            assert other[0].stdout.readline() == "held\n"
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", late_mkdir)
    with pytest.raises(ConfigError, match="refused"):
        with submit_lock(folder):  # waits for the other's lock, then finds its job
            raise ConfigError("refused: the other submit's job trains here")
    assert other and other[0].wait(timeout=30) == 0
    assert sorted(os.listdir(folder)) == [".submit.lock", "submission.json"]
    monkeypatch.undo()
    alone = tmp_path / "new" / "run"
    with pytest.raises(ConfigError):
        with submit_lock(alone):
            (alone / ".submitit" / "%j").mkdir(parents=True)  # what submitit may have made by then
            raise ConfigError("refused")
    assert sorted(os.listdir(tmp_path)) == ["runs"]  # new/ and new/run/ were this submit's: gone


def test_a_resubmit_from_another_folder_keeps_the_runs_recorded_data_root(tmp_path, on_path, monkeypatch, capsys):
    """The default data.root (./data) resolves where submit starts; a run's jobs read the root it recorded."""
    from allconv_hpc.compose import write_hydra_files
    on_path(sbatch="exit 1")  # planning must not submit
    images, labels = torch.zeros(20, 3, 32, 32, dtype=torch.uint8), torch.arange(20) % 10
    write_cifar(tmp_path / "first" / "data", "cifar10", images, labels, images, labels, [str(i) for i in range(10)])
    ov = ["data=cifar10", "cluster=local", f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.chdir(tmp_path / "first")
    first = launcher.plan(ov, multirun=False)[0][0]
    assert f"data.root='{tmp_path / 'first' / 'data'}'" in first.overrides
    c = compose(first.overrides)
    c.run_dir.mkdir()
    write_hydra_files(c)  # what the run's first start records
    (tmp_path / "second").mkdir()
    monkeypatch.chdir(tmp_path / "second")  # no ./data here: it was refused as missing
    again = launcher.plan(ov, multirun=False)[0][0]
    assert f"data.root='{tmp_path / 'first' / 'data'}'" in again.overrides
    assert f"data.root {tmp_path / 'first' / 'data'}: this run's" in capsys.readouterr().err


# --------------------------------------------------------- caught before the queue, not in the job

CIFAR_TINY = [o for o in TINY if not o.startswith(("data=", "data.train_size", "data.test_size", "trainer.batch_size"))] \
    + ["data=cifar10", "trainer.batch_size=4"]


def test_data_download_happens_once_here_before_the_queue(tmp_path, on_path, capsys, monkeypatch):
    """data.download=true with the data missing: a compute node often has no network, and a sweep's jobs would all
    write one archive at once. submit downloads it once, on this host, and a failure refuses before sbatch."""
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "sbatch.log"
    on_path(sbatch=f'[ "$1" = --test-only ] && exit 0; echo called >> {log}; echo "Submitted batch job 77"')
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):  # no network, also where there is one
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    root, sweep = tmp_path / "c10", tmp_path / "sw"
    args = ["-m", "cluster=slurm", *CIFAR_TINY, f"data.root={root}", "data.download=true", "seed=0,1",
            f"hydra.sweep.dir={sweep}"]
    code, out, err = run_submit(capsys, "--dry-run", *args)
    assert code == 0 and err.count(f"{root / 'cifar-10-batches-py'} is missing: submit without --dry-run downloads "
                                   f"cifar10 here, once, before anything is queued") == 1, err
    assert not root.exists()  # a dry run downloads nothing
    code, out, err = run_submit(capsys, *args)
    assert code == 2 and f"error: downloading CIFAR-10 into {root} failed (URLError" in err, err
    assert not log.exists() and not sweep.exists()  # nothing handed to sbatch, no folder
    fetched = []

    def download(cfg):  # what torchvision unpacks, in the official layout
        fetched.append(cfg.root)
        images, labels = torch.zeros(20, 3, 32, 32, dtype=torch.uint8), torch.arange(20) % 10
        write_cifar(cfg.root, "cifar10", images, labels, images[:8], labels[:8], [str(i) for i in range(10)])
    monkeypatch.setattr(data, "_download", download)
    code, out, err = run_submit(capsys, *args, "data.test_size=9")  # the sizes are checked once it is there
    assert code == 2 and "data.test_size=9 is larger than the 8 images available" in err and fetched == [str(root)]
    assert not log.exists()
    shutil.rmtree(root)
    code, out, err = run_submit(capsys, *args)
    assert code == 0 and fetched == [str(root)] * 2, err  # once for the sweep's two points
    assert err.count(f"downloading cifar10 into {root} here, once, before anything is queued") == 1, err
    assert log.read_text() == "called\n"


@pytest.mark.parametrize("override,use", [
    ("+hydra.launcher.timeout_min=600", "(here: cluster.timeout_min=600)"),
    ("hydra.launcher.gpus_per_node=1", "(here: cluster.gpus_per_node=1)"),
    ("++hydra.launcher.signal_delay_s=60", "(here: cluster.signal_lead_s=60)"),
    ("+hydra.launcher.comment=x", "(e.g. cluster.timeout_min=600, cluster.gpus_per_node=1)"),
    ("hydra/launcher=submitit_slurm", "(e.g. cluster.timeout_min=600, cluster.gpus_per_node=1)"),
])
def test_hydra_submitit_launcher_settings_are_refused_with_ours(tmp_path, override, use):
    """Hydra would ignore +hydra.launcher.* silently, and fail on hydra/launcher=... with a plugin error."""
    for multirun in (False, True):
        with pytest.raises(ConfigError) as e:
            launcher.plan(["cluster=slurm", *TINY, "seed=0", override, f"hydra.run.dir={tmp_path / 'r'}"][:None if
                          not multirun else -1], multirun=multirun, dry_run=True)
        assert str(e.value) == (f"{override}: submit does not use Hydra's launcher plugins; this tool's cluster "
                                f"settings are cluster=slurm and cluster.<key> {use}")


def test_a_sweep_folder_without_m_and_an_unquoted_node_range_say_the_fix(tmp_path, capsys):
    code, _, err = run_submit(capsys, "--dry-run", "cluster=local", *TINY, f"hydra.sweep.dir={tmp_path / 's'}")
    assert code == 2 and err == ("allconv-hpc submit: error: hydra.sweep.dir is the folder of a sweep and read only "
                                 "with -m: add -m to submit a sweep, or give hydra.run.dir=... for one run\n"), err
    code, _, err = run_submit(capsys, "--dry-run", "cluster=slurm", *TINY, "cluster.exclude=n[1-3]")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "mismatched input '['" in err, err
    fix = err.split("quote a value holding '[': ")[1].split(" (")[0]
    assert fix == """cluster.exclude='"n[1-3]"'"""
    assert cluster_of(*shlex.split(fix))["exclude"] == "n[1-3]"  # what the shell passes on, Hydra takes


def test_a_sweep_point_name_over_name_max_maps_to_the_same_short_folder(tmp_path, on_path, capsys, monkeypatch):
    """A point folder is named from its swept values; past 255 bytes (NAME_MAX) its start and a hash of the whole,
    so a resubmission finds the same folder. A file system allowing less is refused before the queue."""
    monkeypatch.chdir(tmp_path)
    on_path(sbatch='[ "$1" = --test-only ] && exit 0; echo "Submitted batch job 77"',  # each task asked: running
            squeue='IFS=,; for j in $3; do echo "$j|77|${j#77_}|0|RUNNING|"; done')
    a, b = (point_dirname([f"wandb.name={'n' * 300}{end}"]) for end in "ab")
    assert len(a) == len(b) == 255 and a != b and a.startswith("wandb.name=nnn")
    assert point_dirname(["seed=1", "optim.lr=0.1"]) == "optim.lr=0.1,seed=1"  # short names as ever
    sweep = tmp_path / "sw"
    args = ["-m", "cluster=slurm", *TINY, f"wandb.name={'n' * 300},b"]
    code, out, err = run_submit(capsys, *args, f"hydra.sweep.dir={sweep}")
    assert code == 0, err
    long = sweep / point_dirname([f"wandb.name={'n' * 300}"])
    assert (long / "submission.json").is_file() and (sweep / "wandb.name=b" / "submission.json").is_file()
    code, out, err = run_submit(capsys, *args, f"hydra.sweep.dir={sweep}")
    assert code == 0 and re.search(rf"not submitted again \(job 77_\d \(RUNNING\)\): {re.escape(str(long))}\n", out), out
    monkeypatch.setattr(os, "pathconf", lambda path, name: 143)  # e.g. eCryptfs
    code, out, err = run_submit(capsys, *args, f"hydra.sweep.dir={tmp_path / 'sw2'}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("error: the sweep point folder: the name wandb.name=nnnnnnnnnnnnnnnnnnnnnnnnnnnnn... is 255 bytes, "
            f"over the 143 this file system allows (under {tmp_path}); sweep fewer keys at once") in err, err
    assert not (tmp_path / "sw2").exists()


def test_a_slurm_job_without_gpus_on_real_data_is_warned_once(tmp_path, on_path, capsys):
    on_path(sbatch="exit 0")
    images, labels = torch.zeros(20, 3, 32, 32, dtype=torch.uint8), torch.arange(20) % 10
    write_cifar(tmp_path / "c10", "cifar10", images, labels, images[:8], labels[:8], [str(i) for i in range(10)])
    said = ("warning: cluster.gpus_per_node=0: this job trains on CPUs only (2 per task); add "
            "cluster.gpus_per_node=1 for a GPU per task")
    sweep = ["seed=0,1", f"hydra.sweep.dir={tmp_path / 'sw'}"]
    launcher.plan(["cluster=slurm", *CIFAR_TINY, f"data.root={tmp_path / 'c10'}", *sweep], multirun=True, dry_run=True)
    assert capsys.readouterr().err.count(said) == 1  # once for the sweep
    for quiet in (["cluster=slurm", *CIFAR_TINY, f"data.root={tmp_path / 'c10'}", "cluster.gpus_per_node=1"],
                  ["cluster=local", "cluster.array_parallelism=2", *CIFAR_TINY, f"data.root={tmp_path / 'c10'}"],
                  ["cluster=slurm", *TINY]):
        launcher.plan([*quiet, *sweep], multirun=True, dry_run=True)
        assert "gpus_per_node=0" not in capsys.readouterr().err


def test_more_threads_than_a_slurm_task_has_cpus_is_warned(tmp_path, on_path, capsys):
    """trainer.threads over cluster.cpus_per_task: legal, but the rank's threads share the CPUs Slurm binds it to.
    cluster=local pins no CPUs (its cpus_per_task is recorded only): no warning there."""
    on_path(sbatch="exit 0")
    launcher.plan(["cluster=slurm", *TINY, "trainer.threads=8", f"hydra.run.dir={tmp_path / 'a'}"], multirun=False,
                  dry_run=True)
    assert ("warning: trainer.threads=8 is more than cluster.cpus_per_task=2: each rank's threads share its 2 CPU(s), "
            "which slows it; give trainer.threads=null (the task's CPUs) or raise cluster.cpus_per_task"
            ) in capsys.readouterr().err
    for quiet in (["cluster=slurm", "trainer.threads=2"], ["cluster=local", "trainer.threads=8"]):
        launcher.plan([*TINY, *quiet, f"hydra.run.dir={tmp_path / 'b'}"], multirun=False, dry_run=True)
        assert "trainer.threads" not in capsys.readouterr().err


def test_a_misspelt_submit_option_is_named_alone_with_the_closest_one(capsys):
    """argparse named every override after an unknown option as unrecognized too."""
    with pytest.raises(SystemExit) as e:
        launcher.submit_main(["cluster=local", "--wiat", "data=synthetic", "model.width=0.125"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().endswith(
        "error: unrecognized argument --wiat (did you mean --wait?); submit takes -m/--multirun, --wait, --dry-run "
        "and Hydra overrides (key=value)"), err


def test_a_ctrl_c_while_sbatch_queues_is_taken_once_the_jobs_are_recorded(tmp_path, on_path):
    """A SIGINT to submit while sbatch ran raised at once: the job was queued but neither recorded (a second
    submit queued it again) nor released (held for ever); one before sbatch was a traceback. Real processes,
    real SIGINTs (the fake sbatch sends it to submit, its parent)."""
    calls = tmp_path / "calls"
    sleep = shutil.which("sleep")  # not on the fake PATH

    def submit(sbatch: str, run: str) -> subprocess.CompletedProcess:
        on_path(sbatch=sbatch, scontrol=f'echo "scontrol $*" >> {calls}')
        env = {**os.environ, "PATH": os.environ["PATH"]}  # on_path's: the fake commands first
        return subprocess.run([sys.executable, "-m", "allconv_hpc", "submit", "cluster=slurm", *TINY,
                               f"hydra.run.dir={tmp_path / run}"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)

    # while sbatch queues: recorded, released, said, 130
    r = submit('[ "$1" = --test-only ] && exit 0; kill -INT $PPID; echo "Submitted batch job 77"', "run")
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith("job 77 ") and ("interrupted (Ctrl-C) while submitting: the jobs above were queued "
                                               "and recorded first") in r.stderr, (r.stdout, r.stderr)
    assert json.loads((tmp_path / "run" / "submission.json").read_text())["job_id"] == "77"
    assert calls.read_text() == "scontrol release 77\n"
    # the terminal's Ctrl-C stops sbatch as well: nothing queued, no folder left
    r = submit('[ "$1" = --test-only ] && exit 0; kill -INT $PPID; kill -INT $$', "run2")
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().endswith("allconv-hpc submit: interrupted (Ctrl-C); nothing was queued"), r.stderr
    assert not (tmp_path / "run2").exists()
    # before sbatch (its --test-only): nothing queued either
    r = submit(f'[ "$1" = --test-only ] && {{ kill -INT $PPID; exec {sleep} 5; }}; echo "Submitted batch job 78"',
               "run3")
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().endswith("allconv-hpc submit: interrupted (Ctrl-C); nothing was queued"), r.stderr
    assert not (tmp_path / "run3").exists() and calls.read_text() == "scontrol release 77\n"


def test_a_ctrl_c_after_the_jobs_are_queued_names_them_not_nothing_queued(tmp_path, on_path, capsys, monkeypatch):
    """A Ctrl-C once sbatch had queued and submit had recorded the jobs, as it said them: it said "nothing was
    queued" (exit 130), with the job queued and running. Now the jobs are said, then the Ctrl-C."""
    calls = tmp_path / "calls"
    on_path(sbatch='[ "$1" = --test-only ] && exit 0; echo "Submitted batch job 77"', scontrol=f'echo "scontrol $*" >> {calls}')
    real = launcher._print_skipped

    def ctrl_c_then(points):  # the first thing submit does once the jobs are queued, recorded and released
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # Python takes the signal between two operations
        return real(points)

    monkeypatch.setattr(launcher, "_print_skipped", ctrl_c_then)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, out, err = run_submit(capsys, "cluster=slurm", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and "nothing was queued" not in err, err
    assert out.startswith(f"job 77  {tmp_path / 'run'}\n") and "watch it with: allconv-hpc status" in out, out
    assert "interrupted (Ctrl-C) while submitting: the jobs above were queued and recorded first" in err, err
    assert calls.read_text() == "scontrol release 77\n"


def test_a_record_that_cannot_be_written_after_sbatch_names_the_held_jobs(tmp_path, on_path, capsys, monkeypatch):
    """submission.json unwritable once sbatch queued (a full disk, a quota; a stand-in raises ENOSPC): it was a
    traceback, with the job queued, unrecorded (the next submit queued it again) and held."""
    import errno
    calls = tmp_path / "calls"
    on_path(sbatch="echo 'Submitted batch job 77'", scontrol=f'echo "scontrol $*" >> {calls}')

    def full(path, doc):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(launcher, "_write_json", full)
    code, out, err = run_submit(capsys, "cluster=slurm", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert ("job(s) 77 are queued held, but their record could not be written ([Errno 28] No space left on device: "
            f"'{tmp_path / 'run' / 'submission.json'}'); nothing started: scancel 77, make room") in err, err
    assert not calls.exists()  # not released: it stays held until cancelled


def test_a_local_job_that_compiles_is_refused_at_submit_without_a_compiler_here(tmp_path):
    """cluster=local runs the job on this machine: a missing C++ compiler was found only by the job's train, after
    submit said it started (cluster=slurm's nodes may have one the login node lacks: not checked there)."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++")}
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "submit", "--dry-run", "cluster=local", *TINY,
                        "trainer.compile=true", f"hydra.run.dir={tmp_path / 'run'}"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and (f"allconv-hpc submit: error: trainer.compile=true needs a C++ compiler (inductor "
                                  f"builds CPU kernels with $CXX, here '{tmp_path / 'no-such-g++'}')") in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_a_resubmitted_run_on_other_images_is_refused_before_the_queue(tmp_path, on_path, capsys, monkeypatch):
    """The job's own check, made by submit where the run is resubmitted with another data.root than its checkpoint
    trained on: an exact copy (a node's scratch) passes, other images are refused before anything is queued."""
    monkeypatch.chdir(tmp_path)
    on_path(sbatch="exit 0")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (60,), generator=g)
    write_cifar(tmp_path / "a", "cifar10", x[:40], y[:40], x[40:], y[40:], [str(i) for i in range(10)])
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    write_cifar(tmp_path / "b", "cifar10", x[20:], y[20:], x[:20], y[:20], [str(i) for i in range(10)])
    run = tmp_path / "run"
    ov = ["cluster=slurm", *[o for o in TINY if not o.startswith("data.")], "data=cifar10", f"hydra.run.dir={run}"]
    c = compose([*ov, f"data.root={tmp_path / 'a'}"])
    CheckpointDir(run / "checkpoints", keep=2).save(
        {"identity": c.cfg.identity(), "train_state": {"epoch": 0}, "config": c.cfg_dict,
         "data": data.fingerprint(data.load(c.cfg.data, c.cfg.seed))}, step=3)
    code, out, err = run_submit(capsys, "--dry-run", *ov, f"data.root={tmp_path / 'copy'}")
    assert code == 0, err
    code, out, err = run_submit(capsys, "--dry-run", *ov, f"data.root={tmp_path / 'b'}")
    assert code == 2 and (f"trained on other images than data.root={tmp_path / 'b'} holds (it trained on "
                          f"{tmp_path / 'a'}) (training images: 40 then, 40 now, other images; test images: 20 then, "
                          f"20 now, other images): give data.root the folder it trained on") in err, err


def test_sbatchs_gpu_complaint_names_a_partition_that_is_not_there(on_path):
    """sbatch speaks of the GPUs before the partition: a partition sinfo (hidden ones too) does not list is named,
    also one of a list (Slurm takes a,b); where every one is there, the GPUs are what to check."""
    from allconv_hpc.executor import sbatch_refused
    on_path(sinfo="[ \"$1\" = -a ] && printf 'gpu*\\ngpu-long\\ncpu\\n'")
    gres = "Invalid generic resource (gres) specification"
    assert str(sbatch_refused(gres, "gpu,gpux")).endswith(
        "(cluster.partition=gpu,gpux: gpux is no partition here: give cluster.partition one of: gpu (the default), "
        "gpu-long, cpu)")
    for there in ("gpu,gpu-long", "cpu", None):
        assert "check cluster.gpus_per_node and cluster.gpu_type" in str(sbatch_refused(gres, there)), there

"""`allconv-hpc submit`: validate every point on the login node, then hand them to submitit and return.

A sweep (`-m`, Hydra's sweep syntax) becomes one Slurm job array; each point gets a deterministic
run folder named from its swept overrides (never a timestamp, so a requeued task finds its
checkpoint) and one W&B group for the sweep. Everything that could fail in the queue is checked
here first: the composed config, the dataset at `data.root`, the batch vs the job's world size,
and every value that goes into the sbatch script.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import ConfigError

# Values written into "#SBATCH --key=value" lines: no newlines, no shell syntax.
_SAFE = re.compile(r"[A-Za-z0-9_.,:@%+=/\[\]\-]*")  # used with fullmatch: "$" would let "x\n" through
CLUSTER_KEYS = {"backend", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min",
                "partition", "account", "qos", "constraint", "exclude", "additional_parameters", "setup",
                "signal", "signal_lead_s", "requeue", "array_parallelism"}


@dataclass
class Point:
    overrides: list          # the user's overrides for this point (sweep values expanded)
    run_dir: Path


def expand_sweep(overrides: list[str], multirun: bool) -> tuple[list[str], list[list[str]]]:
    """(common overrides, one list of swept overrides per point) using Hydra's own parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]}") from None
    common, axes = [], []
    for o in parsed:
        if o.is_sweep_override():
            if not multirun:
                raise ConfigError(f"{o.input_line!r} is a sweep; add -m to submit a sweep")
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            common.append(o.input_line)
    points = [list(p) for p in itertools.product(*axes)] if axes else [[]]
    return common, points


def point_dirname(swept: list[str]) -> str:
    """Deterministic folder name from the swept overrides, e.g. 'model=allcnn_c,optim.lr=0.05'."""
    name = ",".join(sorted(swept)) or "run"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def default_sweep_dir(common: list[str], swept: list[list[str]]) -> str:
    """sweeps/<swept keys>-<hash of the sweep's definition>: the same command maps to the same folder
    (so a resubmission resumes), a different sweep to another one."""
    import hashlib
    keys = sorted({o.split("=", 1)[0] for o in swept[0]})
    defining = sorted(o for o in common if not o.split("=", 1)[0].startswith(("cluster", "hydra", "wandb.mode")))
    digest = hashlib.sha1(json.dumps([defining, swept]).encode()).hexdigest()[:8]
    return f"sweeps/{'+'.join(keys) or 'sweep'}-{digest}"


def hydra_value(value) -> str:
    """A value quoted for a Hydra override (paths hold '=', ',' and spaces Hydra would parse)."""
    v = str(value)
    if "\\" in v or "\n" in v or "\r" in v or "${" in v:
        raise ConfigError(f"{v!r}: backslashes, newlines and '${{' are not supported in paths given to submit")
    return "'" + v.replace("'", "\\'") + "'"


def validate_cluster(cluster: dict, cfg) -> dict:
    unknown = sorted(set(cluster) - CLUSTER_KEYS)
    if unknown:
        raise ConfigError(f"unknown cluster key(s) {', '.join('cluster.' + k for k in unknown)}")
    c = dict(cluster)
    if c.get("backend") not in ("local", "slurm"):
        raise ConfigError(f"cluster.backend={c.get('backend')!r} must be local or slurm")
    for k in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min", "array_parallelism"):
        if not isinstance(c.get(k), int) or c[k] < 1:
            raise ConfigError(f"cluster.{k}={c.get(k)!r} must be an integer >= 1")
    if not isinstance(c.get("gpus_per_node"), int) or c["gpus_per_node"] < 0:
        raise ConfigError(f"cluster.gpus_per_node={c.get('gpus_per_node')!r} must be an integer >= 0")
    if c["gpus_per_node"] and c["tasks_per_node"] != c["gpus_per_node"]:
        raise ConfigError(f"cluster.tasks_per_node={c['tasks_per_node']} must equal cluster.gpus_per_node="
                          f"{c['gpus_per_node']} (one rank per GPU)")
    for k in ("partition", "account", "qos", "constraint", "exclude", "signal"):
        v = c.get(k)
        if v is not None and not _SAFE.fullmatch(str(v)):
            raise ConfigError(f"cluster.{k}={v!r} has characters that are not allowed in an sbatch option")
    for k, v in (c.get("additional_parameters") or {}).items():
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", str(k)) or (v is not True and not _SAFE.fullmatch(str(v))):
            raise ConfigError(f"cluster.additional_parameters.{k}={v!r} is not a safe sbatch option")
    for line in c.get("setup") or []:
        if "\n" in str(line) or "\r" in str(line):
            raise ConfigError("cluster.setup lines must not contain newlines (give one list item per line)")
    if not isinstance(c.get("signal_lead_s"), int) or c["signal_lead_s"] < 10:
        raise ConfigError(f"cluster.signal_lead_s={c.get('signal_lead_s')!r} must be an integer >= 10 seconds")
    if c["signal_lead_s"] >= c["timeout_min"] * 60:
        raise ConfigError(f"cluster.signal_lead_s={c['signal_lead_s']} must be shorter than cluster.timeout_min")
    if str(c.get("signal", "")).upper().removeprefix("SIG") != cfg.checkpoint.signal.upper().removeprefix("SIG"):
        raise ConfigError(f"cluster.signal={c.get('signal')} differs from checkpoint.signal={cfg.checkpoint.signal}: "
                          f"the job would not catch the signal Slurm sends; make them equal")
    world = c["nodes"] * c["tasks_per_node"]
    if cfg.trainer.batch_size % world:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is not divisible by the job's "
                          f"{world} ranks (cluster.nodes x cluster.tasks_per_node); use a multiple of {world}")
    if cfg.trainer.precision != "fp32" and c["gpus_per_node"] == 0:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision} needs GPUs but cluster.gpus_per_node=0")
    if c["backend"] == "local" and c["nodes"] > 1:
        raise ConfigError("cluster=local runs on this machine: cluster.nodes must be 1")
    return c


def plan(overrides: list[str], multirun: bool) -> tuple[list[Point], Optional[Path], dict]:
    """Compose and validate every point before anything is submitted."""
    from .compose import compose
    from .data import check_present

    common, swept = expand_sweep(overrides, multirun)
    first = compose(common + swept[0])
    sweep_dir = None
    if multirun:
        explicit = any(o.startswith("hydra.sweep.dir=") for o in common)
        sweep_dir = Path(first.hydra["sweep"]["dir"] if explicit else default_sweep_dir(common, swept)).absolute()
    points, cluster = [], None
    extra = []
    if not Path(first.cfg.data.root).is_absolute():  # the jobs may start in another folder
        extra.append(f"data.root={hydra_value(Path(first.cfg.data.root).absolute())}")
    for s in swept:
        ov = common + s + extra
        if sweep_dir is not None:
            run_dir = sweep_dir / point_dirname(s)
            ov = ov + [f"hydra.run.dir={hydra_value(run_dir)}"]
            if not any(o.startswith("wandb.group=") for o in common + s):
                ov.append(f"wandb.group={hydra_value(sweep_dir.name)}")
        c = compose(ov)
        check_present(c.cfg.data)
        cluster = validate_cluster(c.cluster, c.cfg)
        if sweep_dir is None:
            ov = ov + [f"hydra.run.dir={hydra_value(c.run_dir)}"]
        points.append(Point(overrides=ov, run_dir=c.run_dir))
    dirs = [p.run_dir for p in points]
    if len(set(dirs)) != len(dirs):
        raise ConfigError("two sweep points map to the same run folder; make the swept values distinct")
    return points, sweep_dir, cluster


class TrainJob:
    """The callable submitit pickles: runs `allconv-hpc train` in the job, one call per rank."""

    def __init__(self, overrides: list[str], signal_lead_s: int, signal: str = "USR2"):
        self.overrides, self.signal_lead_s, self.signal = list(overrides), signal_lead_s, signal

    def __call__(self) -> int:
        from .preempt import catch_early
        from .train import run
        # replace submitit's USR2/TERM handlers for the whole call: a warning during start-up is
        # honoured at the first step boundary, one after training is ignored (never a requeue then)
        catch_early(self.signal)
        os.environ["ALLCONV_SIGNAL_LEAD_S"] = str(self.signal_lead_s)
        code = run(self.overrides)
        if code not in (0,):
            # non-zero makes submitit record a failure and srun/Slurm mark the job FAILED
            raise SystemExit(code)
        return code

    def checkpoint(self):
        """Only reached if Slurm's warning arrives while submitit itself starts (before __call__):
        requeue the same call; it resumes from the run folder."""
        import submitit
        return submitit.helpers.DelayedSubmission(TrainJob(self.overrides, self.signal_lead_s, self.signal))


def make_executor(cluster: dict, folder: Path):
    import submitit

    if cluster["backend"] == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=cluster["timeout_min"], nodes=1, tasks_per_node=cluster["tasks_per_node"],
                             cpus_per_task=cluster["cpus_per_task"], gpus_per_node=cluster["gpus_per_node"])
        return ex
    if shutil.which("sbatch") is None:
        raise ConfigError("cluster=slurm but sbatch is not on PATH; submit from a Slurm login node, "
                          "or use cluster=local to run here")
    ex = submitit.SlurmExecutor(folder=str(folder))
    extra = dict(cluster.get("additional_parameters") or {})
    if cluster.get("requeue"):
        extra["requeue"] = True
    # our signal, sent to the srun tasks (no "B:"): the trainer checkpoints at a step boundary
    extra["signal"] = f"{str(cluster['signal']).upper().removeprefix('SIG')}@{cluster['signal_lead_s']}"
    params = dict(nodes=cluster["nodes"], ntasks_per_node=cluster["tasks_per_node"],
                  cpus_per_task=cluster["cpus_per_task"], time=cluster["timeout_min"],
                  signal_delay_s=cluster["signal_lead_s"], array_parallelism=cluster["array_parallelism"],
                  setup=list(cluster.get("setup") or []), additional_parameters=extra,
                  srun_args=["--kill-on-bad-exit=1"], stderr_to_stdout=False, job_name="allconv")
    if cluster["gpus_per_node"]:
        params["gpus_per_node"] = cluster["gpus_per_node"]
    if cluster.get("mem_gb"):
        params["mem"] = f"{cluster['mem_gb']}GB"
    for k in ("partition", "account", "qos", "constraint", "exclude"):
        if cluster.get(k):
            params[k] = str(cluster[k])
    ex.update_parameters(**params)
    return ex


def submit(points: list[Point], sweep_dir: Optional[Path], cluster: dict) -> list:
    base = sweep_dir if sweep_dir is not None else points[0].run_dir
    base.mkdir(parents=True, exist_ok=True)
    ex = make_executor(cluster, base / ".submitit" / "%j")
    calls = [TrainJob(p.overrides, cluster["signal_lead_s"], str(cluster["signal"])) for p in points]
    if len(calls) == 1:
        jobs = [ex.submit(calls[0])]
    else:
        with ex.batch():
            pending = [ex.submit(c) for c in calls]
        jobs = pending
    now = time.time()
    records = []
    for p, j in zip(points, jobs):
        p.run_dir.mkdir(parents=True, exist_ok=True)
        rec = {"job_id": str(j.job_id), "backend": cluster["backend"], "run_dir": str(p.run_dir),
               "overrides": p.overrides, "submitted": now, "submitit_folder": str(base / ".submitit")}
        _write_json(p.run_dir / "submission.json", rec)
        records.append(rec)
    if sweep_dir is not None:
        _write_json(sweep_dir / "sweep.json", {"sweep_dir": str(sweep_dir), "submitted": now, "cluster": cluster,
                                               "jobs": records})
    return jobs


def _write_json(path: Path, doc: dict) -> None:
    from .fsio import write_atomic
    write_atomic(path, json.dumps(doc, indent=1).encode())


def submit_main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="allconv-hpc submit", description="Validate, then submit training to Slurm.")
    ap.add_argument("-m", "--multirun", action="store_true", help="sweep: comma lists become one job array")
    ap.add_argument("--wait", action="store_true", help="stream job states until every job ends")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan; submit nothing")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. optim.lr=0.1 cluster=slurm")
    args = ap.parse_intermixed_args(argv)  # flags anywhere among the overrides
    try:
        points, sweep_dir, cluster = plan(args.overrides, args.multirun)
        if args.dry_run:
            for p in points:
                print(f"{p.run_dir}  {' '.join(p.overrides)}")
            return 0
        jobs = submit(points, sweep_dir, cluster)
    except ConfigError as e:
        print(f"allconv-hpc submit: error: {e}", file=sys.stderr)
        return 2
    for p, j in zip(points, jobs):
        print(f"job {j.job_id}  {p.run_dir}")
    where = sweep_dir if sweep_dir is not None else points[0].run_dir
    print(f"{'sweep' if sweep_dir is not None else 'run'} folder: {where}")
    print(f"watch it with: allconv-hpc status {where}")
    if args.wait:
        from .status import wait_for
        return wait_for(where)
    return 0

"""`allconv-hpc submit`: validate every point on the login node, then hand them to submitit and return.

A sweep (`-m`, Hydra's sweep syntax) becomes one Slurm job array; each point gets a deterministic
run folder named from its swept overrides (never a timestamp, so a requeued task finds its
checkpoint) and one W&B group for the sweep. Everything that could fail in the queue is checked
here first: the composed config, the dataset at `data.root`, the batch vs the job's world size,
and every value that goes into the sbatch script.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .compose import override_key as _key
from .config import CLUSTER_KEYS, ConfigError, resumable_change
from . import runlock
from .fsio import read_json, write_atomic
from .preempt import EXIT_GAVE_UP, EXIT_INTERRUPTED, EXIT_REQUEUED, ignore_late_signals

# Values written into "#SBATCH --key=value" lines (shlex-quoted by submitit, and sbatch strips the
# quotes): letters, digits and the punctuation Slurm's own syntax uses, nothing a shell would act on.
_SAFE = re.compile(r"[A-Za-z0-9_.,:@%+=/\[\]\-]+")  # used with fullmatch: "$" would let "x\n" through
_GPU_TYPE = re.compile(r"[A-Za-z0-9_.\-]+")  # --gpus-per-node=<type>:<count>, e.g. a100, h100_80gb
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.,:@%+=/\[\]\-|&*!()]+")  # features: a100|h100, [a&b], (x*2)
# sbatch options that come from cluster.* keys or that submit sets itself: additional_parameters may not
# override them (the job would get another shape than the one validated, or lose its signal or logs)
_OWN_OPTIONS = {"nodes": "cluster.nodes", "ntasks-per-node": "cluster.tasks_per_node",
                "cpus-per-task": "cluster.cpus_per_task", "gpus-per-node": "cluster.gpus_per_node",
                "mem": "cluster.mem_gb", "time": "cluster.timeout_min", "partition": "cluster.partition",
                "account": "cluster.account", "qos": "cluster.qos", "constraint": "cluster.constraint",
                "exclude": "cluster.exclude", "signal": "cluster.signal and cluster.signal_lead_s",
                "requeue": "cluster.requeue", "no-requeue": "cluster.requeue", "array": "cluster.array_parallelism",
                "output": None, "error": None,
                "open-mode": None, "job-name": None,
                # the same shape by other names (sbatch refuses some pairs, e.g. --mem with --mem-per-cpu)
                "ntasks": "cluster.nodes and cluster.tasks_per_node", "ntasks-per-gpu": "cluster.tasks_per_node",
                "gpus": "cluster.gpus_per_node", "gpus-per-task": "cluster.gpus_per_node",
                "cpus-per-gpu": "cluster.cpus_per_task", "mem-per-cpu": "cluster.mem_gb",
                "mem-per-gpu": "cluster.mem_gb", "gpus-per-socket": "cluster.gpus_per_node",
                "tres-per-task": "cluster.gpus_per_node and cluster.cpus_per_task",
                "ntasks-per-core": "cluster.tasks_per_node", "mincpus": "cluster.cpus_per_task",
                "sockets-per-node": None, "cores-per-socket": None,
                "distribution": None}  # rank 0 must run on the first node: it hosts the rendezvous
SIGNAL_LEAD_MAX = 65535  # sbatch --signal=SIG@TIME takes at most this many seconds


@dataclass
class Point:
    overrides: list          # the user's overrides for this point (sweep values expanded)
    run_dir: Path
    skip: Optional[str] = None  # why it is not submitted again: "completed", or its queued job
    cfg: object = field(default=None, repr=False)  # its composed config: the run folder is checked again under the lock


def auto_cluster(overrides: list[str]) -> Optional[str]:
    """The cluster profile for a `submit` without `cluster=`: slurm where sbatch is on PATH, else local.
    None when the overrides choose one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return None  # plan() reports the bad override
    if any(o.key_or_group == "cluster" for o in parsed):
        return None
    return "slurm" if shutil.which("sbatch") else "local"


def expand_sweep(overrides: list[str], multirun: bool) -> tuple[list[str], list[list[str]]]:
    """(common overrides, one list of swept overrides per point) using Hydra's own parser."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from .compose import CONFIG_MODULE, override_error

    common, axes = [], []
    GlobalHydra.instance().clear()
    try:  # glob(...) lists a config group's options through the config loader
        with initialize_config_module(CONFIG_MODULE, version_base=None):
            loader = GlobalHydra.instance().config_loader()
            try:
                parsed = OverridesParser.create(config_loader=loader).parse_overrides(overrides)
            except HydraException as e:
                raise ConfigError(override_error(overrides, e)) from None
            seen: dict[str, tuple[str, bool]] = {}  # key -> (its override, a sweep); Hydra keeps the last value
            for o in parsed:
                key, first = o.key_or_group, seen.get(o.key_or_group)
                if first and multirun and (first[1] or o.is_sweep_override()):  # points named after both, twice
                    raise ConfigError(f"{key} is given twice in a sweep ({first[0]} and {o.input_line}); give it "
                                      f"once, with every value in one list ({key}=a,b,c)")
                seen[key] = (o.input_line, o.is_sweep_override())
                if not o.is_sweep_override():
                    common.append(o.input_line)
                    continue
                if not multirun:
                    key, value = o.input_line.split("=", 1)
                    raise ConfigError(f"{o.input_line!r} is a sweep; add -m to submit a sweep, or quote a value that "
                                      f"holds commas: '{key}=\"{value}\"'")
                try:
                    values = _range_values(o) if o.is_range_sweep() else list(o.sweep_string_iterator())
                except HydraException:  # interval(...): for optimizing sweepers, nothing to enumerate
                    values = []
                if not values:
                    raise ConfigError(f"{o.input_line!r} gives no values to submit: use a comma list, range(...), "
                                      f"choice(...) or glob(...) of a config group's options (e.g. "
                                      f"model=glob(allcnn_*))")
                axes.append([f"{o.get_key_element()}={v}" for v in values])
    finally:
        GlobalHydra.instance().clear()
    points = [list(p) for p in itertools.product(*axes)] if axes else [[]]
    return common, points


MAX_RANGE_POINTS = 100_000  # a range(0,1,1e-30) would build its list forever


def _range_values(o) -> list[str]:
    """range(start, stop[, step]) as Python's range, also for floats: Hydra steps floats in the binary
    values' Decimals, so range(0.1,0.4,0.1) gave 0.30000000000000004 and a fourth point, 0.4. Here the
    numbers as written are stepped exactly, the stop left out."""
    import decimal
    import math
    import random

    r = o.value()
    if "sort(" in o.input_line.split("=", 1)[1]:  # Hydra's sort() rewrites the bounds, wrongly when descending
        raise ConfigError(f"{o.input_line!r}: sort() of a range is not supported; write the range in the order "
                          f"wanted (a negative step counts down)")
    bounds = (r.start, r.stop, r.step)
    if any(isinstance(v, bool) or not math.isfinite(v) for v in bounds):
        raise ConfigError(f"{o.input_line!r}: a range's start, stop and step must be finite numbers")
    start, stop, step = (decimal.Decimal(repr(v)) for v in bounds)
    if step == 0:
        raise ConfigError(f"{o.input_line!r}: a range's step must not be 0")
    n = max(0, int(((stop - start) / step).to_integral_value(rounding=decimal.ROUND_CEILING)))
    if n > MAX_RANGE_POINTS:
        raise ConfigError(f"{o.input_line!r} gives {n} points (at most {MAX_RANGE_POINTS}); use a larger step")
    as_int = all(isinstance(v, int) for v in bounds)
    values = [str(int(v)) if as_int else repr(float(v)) for v in (start + i * step for i in range(n))]
    if r.shuffle:
        random.shuffle(values)
    return values


def point_dirname(swept: list[str]) -> str:
    """Deterministic folder name from the swept overrides, e.g. 'model=allcnn_c,optim.lr=0.05'."""
    name = ",".join(sorted(swept)) or "run"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def _launch_only(key: str) -> bool:
    """Keys that do not change what a run learns: the launch settings, and what a resume may change."""
    return resumable_change(key, also=("cluster", "hydra"))


def _sweep_name(swept: list[list[str]], definition: list) -> str:
    """sweeps/<swept keys>-<hash of the definition>."""
    import hashlib
    keys = sorted({o.split("=", 1)[0] for o in swept[0]})
    digest = hashlib.sha1(json.dumps(definition).encode()).hexdigest()[:8]
    return f"sweeps/{'+'.join(keys) or 'sweep'}-{digest}"


def default_sweep_dir(common: list[str], swept: list[list[str]]) -> str:
    """The sweep's folder: the same sweep maps to the same folder (so a resubmission resumes, also with
    launch-only keys changed or values reordered), a different sweep to another one."""
    defining = sorted(o for o in common if not _launch_only(_key(o)))
    return _sweep_name(swept, [defining, sorted(sorted(p) for p in swept)])


def _legacy_sweep_dir(common: list[str], swept: list[list[str]]) -> str:
    """The name sweeps got before default_sweep_dir ignored launch-only keys and value order: an
    existing sweep folder of that name is still resumed."""
    defining = sorted(o for o in common if not o.split("=", 1)[0].startswith(("cluster", "hydra", "wandb.mode")))
    return _sweep_name(swept, [defining, swept])


def hydra_value(value, key: str) -> str:
    """A value quoted for a Hydra override (paths hold '=', ',' and spaces Hydra would parse)."""
    v = str(value)
    if any(ch in v for ch in "\\\n\r\0") or "${" in v:
        raise ConfigError(f"{key}={v!r}: backslashes, newlines, NUL and '${{' are not supported in paths given "
                          f"to submit; use a plain path")
    return "'" + v.replace("'", "\\'") + "'"


def _one_line(value, key: str) -> None:
    """Nothing that lands in the sbatch script may hold a newline (a new shell line) or NUL."""
    if isinstance(value, dict):
        for k, v in value.items():
            _one_line(str(k), f"{key} key")
            _one_line(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _one_line(v, f"{key}[{i}]")
    elif isinstance(value, str) and any(ch in value for ch in "\n\r\0"):
        raise ConfigError(f"{key}={value!r} holds a newline or NUL, which would start a new line in the sbatch "
                          f"script; give it on one line (setup: one list item per line)")


def _need_int(c: dict, key: str, low: int, null_ok: bool = False) -> None:
    v = c.get(key)
    if v is None and null_ok:
        return
    if type(v) is not int or v < low:  # not isinstance: True is an int
        raise ConfigError(f"cluster.{key}={v!r} must be {'null or ' if null_ok else ''}an integer >= {low}")


def _need_word(c: dict, key: str, allowed: re.Pattern, chars: str) -> None:
    v = c.get(key)
    if v is None:
        return
    if (key in ("exclude", "partition") and isinstance(v, (list, tuple)) and v  # sbatch takes "a,b" for these
            and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v)):
        joined = ",".join(map(str, v))  # 'cluster.exclude=[n1,n2]': Hydra's list, where sbatch takes one string
        raise ConfigError(f"cluster.{key}={v!r} is a list; Slurm takes one comma-separated string: "
                          f"'cluster.{key}=\"{joined}\"'")
    if isinstance(v, bool) or not isinstance(v, (str, int)) or not allowed.fullmatch(str(v)):
        raise ConfigError(f"cluster.{key}={v!r} is not allowed in an sbatch option: use only letters, digits "
                          f"and {chars}")


def validate_cluster(cluster: dict, cfg) -> dict:
    """Every cluster value checked against what it becomes in the sbatch script; one-line errors."""
    unknown = sorted(set(cluster) - CLUSTER_KEYS)
    if unknown:
        raise ConfigError(f"unknown cluster key(s) {', '.join('cluster.' + k for k in unknown)}; "
                          f"known: {', '.join(sorted(CLUSTER_KEYS))}")
    c = dict(cluster)
    for k in sorted(c):
        _one_line(c[k], f"cluster.{k}")
    if c.get("backend") not in ("local", "slurm"):
        raise ConfigError(f"cluster.backend={c.get('backend')!r} must be local or slurm")
    for k in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min", "array_parallelism"):
        _need_int(c, k, 1)
    _need_int(c, "gpus_per_node", 0)
    _need_int(c, "mem_gb", 1, null_ok=True)
    if c["gpus_per_node"] and c["tasks_per_node"] != c["gpus_per_node"]:
        raise ConfigError(f"cluster.tasks_per_node={c['tasks_per_node']} must equal cluster.gpus_per_node="
                          f"{c['gpus_per_node']} (one rank per GPU)")
    for k in ("partition", "account", "qos", "exclude", "signal"):
        _need_word(c, k, _SAFE, "_.,:@%+=/[]-")
    _need_word(c, "constraint", _CONSTRAINT, "_.,:@%+=/[]-|&*!()")
    if c.get("gpu_type") is not None and c.get("backend") == "slurm":  # cluster=local ignores it
        _need_word(c, "gpu_type", _GPU_TYPE, "_.-")
        if not c["gpus_per_node"]:
            raise ConfigError(f"cluster.gpu_type={c['gpu_type']} needs cluster.gpus_per_node >= 1 (it types that "
                              f"request: --gpus-per-node={c['gpu_type']}:N)")
    extra = c.get("additional_parameters") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"cluster.additional_parameters={extra!r} must be a mapping, e.g. {{mail-type: END}}")
    for k, v in extra.items():
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", str(k)):
            raise ConfigError(f"cluster.additional_parameters.{k}: not an sbatch option name (e.g. mail-type)")
        name = str(k).replace("_", "-")
        # sbatch takes an unambiguous abbreviation of an option (--tim=5 is --time=5)
        owned = [name] if name in _OWN_OPTIONS else [o for o in sorted(_OWN_OPTIONS) if o.startswith(name)]
        if owned:
            use = " or ".join(dict.fromkeys(_OWN_OPTIONS[o] for o in owned if _OWN_OPTIONS[o]))
            what = "" if owned == [name] else f" (sbatch reads it as --{' or --'.join(owned)})"
            raise ConfigError(f"cluster.additional_parameters.{k} would override what submit sets itself{what}"
                              + (f"; use {use}" if use else "; remove it"))
        if str(k) == "gres" and any(g.split(":")[0] == "gpu" for g in str(v).split(",")):
            # GPUs requested twice, or beside the validated shape; other gres (tmpdisk, ...) are fine
            raise ConfigError(f"cluster.additional_parameters.gres={v} asks for GPUs: use cluster.gpus_per_node=N "
                              f"(and cluster.gpu_type=TYPE for a typed request such as gpu:a100:N)")
        if v is not True and (isinstance(v, bool) or not isinstance(v, (str, int)) or not _SAFE.fullmatch(str(v))):
            raise ConfigError(f"cluster.additional_parameters.{k}={v!r} is not a safe sbatch value: use true (a flag) "
                              f"or only letters, digits and _.,:@%+=/[]-")
    setup = c.get("setup")
    if setup is None:
        c["setup"] = []
    elif isinstance(setup, list) and any(not isinstance(line, str) for line in setup):  # Hydra typed the item
        bad = next(line for line in setup if not isinstance(line, str))
        raise ConfigError(f"cluster.setup item {bad!r} was read as a {type(bad).__name__}, not a shell line; quote "
                          f"it: 'cluster.setup=[\"{str(bad).lower() if isinstance(bad, bool) else bad}\"]'")
    elif not isinstance(setup, list):
        raise ConfigError(f"cluster.setup={setup!r} must be a list of shell lines, e.g. "
                          f"cluster.setup='[module load cuda/12.4]'")
    if not isinstance(c.get("requeue"), bool):
        raise ConfigError(f"cluster.requeue={c.get('requeue')!r} must be true or false")
    _need_int(c, "signal_lead_s", 10)
    if c["signal_lead_s"] > SIGNAL_LEAD_MAX:
        raise ConfigError(f"cluster.signal_lead_s={c['signal_lead_s']} is more than sbatch --signal takes "
                          f"({SIGNAL_LEAD_MAX} s); use a shorter lead")
    if c["signal_lead_s"] >= c["timeout_min"] * 60:
        raise ConfigError(f"cluster.signal_lead_s={c['signal_lead_s']} s must be shorter than cluster.timeout_min="
                          f"{c['timeout_min']} ({c['timeout_min'] * 60} s): lower cluster.signal_lead_s (at least 10) "
                          f"or raise cluster.timeout_min above {c['signal_lead_s'] / 60:g}")
    if _signal_name(c) != _signal_name({"signal": cfg.checkpoint.signal}):
        raise ConfigError(f"cluster.signal={c.get('signal')} differs from checkpoint.signal={cfg.checkpoint.signal}: "
                          f"the job would not catch the signal Slurm sends; make them equal")
    world = c["nodes"] * c["tasks_per_node"]
    if cfg.trainer.batch_size % world:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is not divisible by the job's "
                          f"{world} ranks (cluster.nodes x cluster.tasks_per_node); use a multiple of {world}")
    if c["gpus_per_node"] == 0:  # what the job would refuse at start, after its wait in the queue
        for key, value, fix in (("trainer.precision", cfg.trainer.precision, "fp32 or auto"),
                                ("trainer.device", cfg.trainer.device, "cpu or auto"),
                                ("dist.backend", cfg.dist.backend, "gloo or auto")):
            if value in ("bf16", "fp16", "cuda", "nccl"):
                raise ConfigError(f"{key}={value} needs GPUs but cluster.gpus_per_node=0; set cluster.gpus_per_node "
                                  f"or {key}={fix}")
    if c["backend"] == "local" and c["nodes"] > 1:
        raise ConfigError("cluster=local runs on this machine: cluster.nodes must be 1")
    if c["backend"] == "local":
        local_gpus(c["gpus_per_node"])
    return c


def local_gpus(n: int) -> tuple:
    """The GPUs a cluster=local job may use: the first n of this shell's CUDA_VISIBLE_DEVICES (submitit
    would otherwise make it 0..n-1, whatever this shell was given, e.g. GPUs 2,3 of an allocation)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not n:
        return ()
    import torch
    have = torch.cuda.device_count()  # of the visible ones: there must be n (or the job trains on the CPU unasked)
    if n > have:
        use = "cluster.gpus_per_node=0 to train on the CPU" if not have else \
            f"cluster.gpus_per_node<={have} (0: train on the CPU)"
        seen = f" of CUDA_VISIBLE_DEVICES={visible}" if visible is not None else " on this machine"
        raise ConfigError(f"cluster.gpus_per_node={n} but CUDA sees {have} GPU(s){seen}; use {use}")
    if visible is None:
        return ()
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(i.isdigit() for i in ids):
        raise ConfigError(f"cluster=local passes GPUs to its tasks by index, and CUDA_VISIBLE_DEVICES={visible} "
                          f"holds other ids (UUIDs, MIG); set it to indices, e.g. CUDA_VISIBLE_DEVICES=0,1")
    if n > len(ids):
        raise ConfigError(f"cluster.gpus_per_node={n} but CUDA_VISIBLE_DEVICES={visible} gives this shell "
                          f"{len(ids)} GPU(s); use cluster.gpus_per_node<={len(ids)} (and as many tasks)")
    return tuple(int(i) for i in ids[:n])


def plan(overrides: list[str], multirun: bool, dry_run: bool = False) -> tuple[list[Point], Optional[Path], dict]:
    """Compose and validate every point before anything is submitted or any folder is made. `dry_run`: only
    shown, so a Slurm plan may be looked at where Slurm's commands are not (a laptop)."""
    from .compose import check_run_dir, compose
    from .data import check_present
    from .tracking import check_names, preflight_mode

    common, swept = expand_sweep(overrides, multirun)
    keys = {_key(o) for o in common + swept[0]}
    sweep_dir = None
    if multirun:
        if "hydra.run.dir" in keys:
            raise ConfigError("hydra.run.dir is set per point in a sweep (-m): give the sweep's folder with "
                              "hydra.sweep.dir=... instead")
        if "hydra.sweep.dir" in keys:
            sweep_dir = Path(compose(common + swept[0]).hydra["sweep"]["dir"]).expanduser().absolute()
        else:
            name, legacy = default_sweep_dir(common, swept), _legacy_sweep_dir(common, swept)
            sweep_dir = Path(legacy if Path(legacy).is_dir() and not Path(name).exists() else name).absolute()
        hydra_value(sweep_dir, "hydra.sweep.dir")
    points, cluster, warned = [], None, set()
    for s in swept:
        ov = common + s
        if sweep_dir is not None:
            run_dir = sweep_dir / point_dirname(s)
            ov = ov + [f"hydra.run.dir={hydra_value(run_dir, 'hydra.run.dir')}"]
            if "wandb.group" not in {_key(o) for o in common + s}:
                ov.append(f"wandb.group={hydra_value(sweep_dir.name, 'wandb.group')}")
        c = compose(ov)
        check_present(c.cfg.data)
        if not Path(c.cfg.data.root).is_absolute():  # the jobs may start in another folder
            ov = [o for o in ov if _key(o) != "data.root"] + [
                f"data.root={hydra_value(Path(c.cfg.data.root).expanduser().absolute(), 'data.root')}"]
        mine = validate_cluster(c.cluster, c.cfg)
        for said in c.cfg.warnings():
            if said not in warned:  # once for a sweep
                warned.add(said)
                _warn(said)
        mode = None
        try:
            mode = preflight_mode(c.cfg.wandb.mode)  # the jobs inherit this environment
        except ConfigError as e:
            if not mine["setup"]:
                raise
            # a setup line may set it for the job (an export, a sourced file, a module): the job's train checks
            _warn(f"{e} (unless cluster.setup sets it for the job, whose train then refuses to start)")
        if mode != "disabled":
            check_names(c.cfg.wandb)  # a project or tag W&B would refuse at wandb.init
        if cluster is not None and mine != cluster:
            diff = ", ".join(f"cluster.{k}" for k in sorted(CLUSTER_KEYS) if mine.get(k) != cluster.get(k))
            raise ConfigError(f"the sweep varies {diff}: one job array has one resource shape; submit one sweep "
                              f"per cluster setting instead")
        cluster = mine
        if sweep_dir is None:  # pinned absolute, in place of the one given
            ov = [o for o in ov if _key(o) != "hydra.run.dir"] + [f"hydra.run.dir={hydra_value(c.run_dir, 'hydra.run.dir')}"]
        check_run_dir(c.run_dir)
        skip = check_run_folder(c.run_dir, c.cfg, sweep=sweep_dir is not None, overrides=ov)
        if skip is None:
            _warn_diverged(c.run_dir, c.cfg)
        points.append(Point(overrides=ov, run_dir=c.run_dir, skip=skip, cfg=c.cfg))
    dirs = [p.run_dir for p in points]
    if len(set(dirs)) != len(dirs):
        raise ConfigError("two sweep points map to the same run folder; make the swept values distinct")
    lead, limit = cluster["signal_lead_s"], cluster["timeout_min"] * 60
    if 2 * lead > limit:  # legal, but each start trains little and every time limit uses up a requeue
        then = ("and is requeued, and each time limit counts against checkpoint.max_requeues"
                if cluster["backend"] == "slurm" else "and stops (cluster=local does not requeue)")
        _warn(f"cluster.signal_lead_s={lead} s is over half of cluster.timeout_min={cluster['timeout_min']} "
              f"({limit} s): each start trains at most {limit - lead} s before it checkpoints {then}")
    missing = [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None]  # submitit needs both
    if cluster["backend"] == "slurm" and missing and dry_run:
        _warn(f"{' and '.join(missing)} not on PATH: the points below are what a Slurm login node would submit "
              f"(the sbatch options, which submitit writes only where srun is, and sbatch --test-only are not shown)")
    elif cluster["backend"] == "slurm" and missing:
        raise ConfigError(f"cluster=slurm but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on "
                          f"PATH; submit from a Slurm login node, or use cluster=local to run here")
    todo = sum(p.skip is None for p in points)
    if cluster["backend"] == "local" and todo > cluster["array_parallelism"]:
        raise ConfigError(f"cluster=local starts every sweep point at once, and this sweep has {todo} > "
                          f"cluster.array_parallelism={cluster['array_parallelism']}; set "
                          f"cluster.array_parallelism={todo} if this machine can run them together")
    return points, sweep_dir, cluster


def check_run_folder(run_dir: Path, cfg, sweep: bool = False, overrides: Optional[list] = None) -> Optional[str]:
    """Refuse a run folder that a queued job still trains into, or whose checkpoint is of another config
    (what the trainer would refuse on resume, found here before anything is queued). Returns why the
    run needs no new job: "completed" (all trainer.epochs done), or, for a sweep point, its queued job
    (a resubmitted sweep fills in the rest); None when it does."""
    from .jobs import (ACTIVE_STATES, JOB_KEYS, NO_ANSWER, DamagedFile, check_keys, queued_state, read_record,
                       started_unrecorded, stop_command)

    sub = run_dir / "submission.json"
    try:  # status's reading: a damaged record is named with its fix
        rec = read_record(sub)
        if rec is not None:
            check_keys(rec, JOB_KEYS, sub)
    except DamagedFile as e:
        raise ConfigError(str(e)) from None
    if rec is not None:
        state = queued_state(rec)
        if state == NO_ANSWER:  # it may still run: a second job could train into the same folder
            raise ConfigError(f"squeue did not answer whether job {rec['job_id']}, the last one submitted into "
                              f"{run_dir}, is still queued or running; submit again when `squeue -j "
                              f"{rec['job_id']}` answers")
        if state in ACTIVE_STATES and sweep:
            if overrides is not None and sorted(rec.get("overrides") or []) != sorted(overrides):
                return (f"job {rec['job_id']} ({state}) runs it with the settings it was submitted with; submit "
                        f"again when it has ended to apply these")
            return f"job {rec['job_id']} ({state})"
        if state == "COMPLETING":  # cancelled or done, its processes still ending: nothing to stop
            raise ConfigError(f"run folder {run_dir} has job {rec['job_id']} still ending (COMPLETING); a second job "
                              f"would train into the same folder: submit again in a few seconds")
        if state in ACTIVE_STATES:
            raise ConfigError(f"run folder {run_dir} already has job {rec['job_id']} ({state}); a second job would "
                              f"train into the same folder: wait for it (allconv-hpc status {run_dir}) or stop it "
                              f"({stop_command(rec)}), then submit again")
    started = started_unrecorded(run_dir, rec)
    if started is not None:
        job, state = started["job_id"], queued_state(started)
        if state == NO_ANSWER and shutil.which("squeue"):  # no Slurm here at all: a folder copied from a cluster
            raise ConfigError(f"squeue did not answer whether job {job}, which {run_dir / 'status.json'} says trains "
                              f"into {run_dir}, is still queued or running; submit again when `squeue -j {job}` "
                              f"answers")
        if state in ACTIVE_STATES and sweep:
            return f"job {job} ({state}), started without submit"
        if state in ACTIVE_STATES:
            raise ConfigError(f"run folder {run_dir} already has job {job} ({state}) training into it (started without "
                              f"submit, e.g. sbatch slurm/train.sbatch); a second job would train into the same "
                              f"folder: wait for it (allconv-hpc status {run_dir}) or stop it (scancel {job}), then "
                              f"submit again")
    held, who = runlock.holder(run_dir)  # a train started by hand, which no record names
    if held and sweep:
        return f"{who} trains it now"
    if held:
        raise runlock.RunBusy(run_dir, who)
    from .checkpoint import CheckpointError, check_resume
    try:
        ts = check_resume(run_dir, cfg, folder_key="hydra.sweep.dir" if sweep else "hydra.run.dir")
    except (CheckpointError, ConfigError) as e:  # every checkpoint unusable or unreadable, another config...
        raise ConfigError(str(e)) from None  # ...: the job could only fail on it
    if ts is None:
        return None
    finished = read_json(run_dir / "status.json").get("state") == "completed"
    if finished and ts.get("epoch") == cfg.trainer.epochs and not ts.get("step_in_epoch"):
        return "completed"  # a job would start only to find nothing to do
    return None


def _warn_diverged(run_dir: Path, cfg) -> None:
    """A run that stopped on a non-finite loss resumes the checkpoint it diverged after: said before it queues."""
    from .checkpoint import CheckpointDir
    st = read_json(run_dir / "status.json")
    if (cfg.checkpoint.resume == "never" or st.get("state") != "failed"
            or not str(st.get("error", "")).startswith("non-finite")):
        return
    if CheckpointDir(run_dir / "checkpoints", cfg.checkpoint.keep).exists():
        what = "its job resumes the newest checkpoint kept and will likely diverge again"
    else:  # it diverged before its first checkpoint: the job starts over with the same config
        what = "it diverged before its first checkpoint, and its job starts over with the same config"
    _warn(f"{run_dir} stopped on a non-finite loss at step {st.get('global_step', '?')}; {what}: lower optim.lr in "
          f"a new hydra.run.dir (for a sweep, hydra.sweep.dir), or add checkpoint.resume=never to start it over (the "
          f"old run is kept)")


def free_ports(n: int) -> list[int]:
    """n distinct ports free on this machine now (held open together while the OS picks them): each
    cluster=local DDP job's rendezvous, instead of one derived from its pid, which another job or
    program may hold."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


# cluster=local has no `srun --kill-on-bad-exit`: submitit's local controller waits for every task. A rank that
# fails leaves this behind to end its job's other ranks (the controller's other children) still running
# LOCAL_KILL_WAIT_S later: SIGTERM (a rank waiting at the rendezvous ends at once), then SIGKILL as many seconds
# after (a rank hung in its own code), as Slurm does with KillWait. They usually end long before: their next
# collective fails on the closed connection, or they failed alike (a diverged run) and rank 0 is finishing its
# W&B upload, which the wait leaves time for. Checkpoints are written by rename, never half, whatever is killed.
LOCAL_KILL_WAIT_S = 30
_REAPER = ("import sys; from allconv_hpc.launcher import _reap; "
           "_reap(int(sys.argv[1]), float(sys.argv[2]), [int(p) for p in sys.argv[3:]])")


def _reap(controller: int, wait_s: float, pids: list[int]) -> None:
    """Run by the reaper process: SIGTERM then SIGKILL, wait_s apart, to those of pids still the controller's
    running children (a pid reused since is not its child); a note on stderr (the failed rank's .err) says so."""
    from .jobs import children
    said = []
    for n, sig in enumerate((signal.SIGTERM, signal.SIGKILL), 1):
        end = time.monotonic() + wait_s
        while set(pids) & set(children(controller)) and time.monotonic() < end:
            time.sleep(0.5)
        sent = []
        for pid in set(pids) & set(children(controller)):
            try:
                os.kill(pid, sig)
                sent.append(str(pid))
            except OSError:  # ended meanwhile (or no longer ours)
                pass
        if sent:
            said.append(f"{signal.Signals(sig).name} to {', '.join(sorted(sent))} at {n * wait_s:g} s")
    if said:
        print(f"note: this rank failed, and its job's other ranks still ran: sent {'; '.join(said)} (cluster=local "
              f"has no srun --kill-on-bad-exit)", file=sys.stderr, flush=True)


def end_local_peers(controller: int) -> None:
    """After this rank failed in a cluster=local job: end the job's other ranks that do not end by themselves
    (see LOCAL_KILL_WAIT_S), from a process of its own, so that this one exits now and its peers see it go.
    `controller`: this rank's parent when it started; if that is no longer its parent (the controller died, and
    this process now belongs to init or a subreaper), its children are not this job's ranks: nothing is done."""
    ppid = os.getppid()
    if ppid != controller or ppid <= 1:
        return
    from .jobs import children
    try:
        peers = [str(pid) for pid in children(ppid) if pid != os.getpid()]
        if peers:
            subprocess.Popen([sys.executable, "-c", _REAPER, str(ppid), str(LOCAL_KILL_WAIT_S), *peers],
                             stdin=subprocess.DEVNULL, start_new_session=True)
    except (OSError, subprocess.SubprocessError) as e:  # never hide the rank's own failure
        print(f"note: could not look for this job's other ranks to end them ({e}); a hung one holds the job "
              f"until cluster.timeout_min", file=sys.stderr)


class TrainJob:
    """The callable submitit pickles: runs `allconv-hpc train` in the job, one call per rank."""

    def __init__(self, overrides: list[str], signal_lead_s: int, signal: str = "USR2",
                 local_port: Optional[int] = None):
        self.overrides, self.signal_lead_s, self.signal = list(overrides), signal_lead_s, signal
        self.local_port = local_port  # cluster=local with several tasks: the rendezvous port (free at submit)

    def __call__(self) -> int:
        from .preempt import catch_early
        from .train import run
        # replace submitit's USR2/TERM handlers for the whole call: a warning during start-up is
        # honoured at the first step boundaries, one after training is ignored (never a requeue then)
        catch_early(self.signal)
        os.environ["ALLCONV_SIGNAL_LEAD_S"] = str(self.signal_lead_s)
        if self.local_port:
            from .distributed import LOCAL_PORT_ENV
            os.environ[LOCAL_PORT_ENV] = str(self.local_port)
        controller = os.getppid()  # submitit's local controller, whose other children are this job's ranks
        try:
            code = run(self.overrides, submitted=True)
        except BaseException:
            if self.local_port:
                end_local_peers(controller)
            raise
        finally:
            ignore_late_signals(self.signal)
        if self.local_port and code not in (0, EXIT_REQUEUED, EXIT_INTERRUPTED, EXIT_GAVE_UP):
            end_local_peers(controller)  # a failure (the stops above are agreed by all ranks, which leave together)
        if code == EXIT_REQUEUED:
            # back in the queue: leave without a result, or submitit would report the job done. SystemExit
            # passes through submitit's `except Exception` (core/submission.py), so no result is written.
            raise SystemExit(0)
        if code != 0:
            # non-zero makes submitit record a failure and srun/Slurm mark the job FAILED
            raise SystemExit(code)
        return code

    def checkpoint(self):
        """Only reached if Slurm's warning arrives while submitit itself starts (before __call__):
        requeue the same call; it resumes from the run folder."""
        import submitit
        return submitit.helpers.DelayedSubmission(TrainJob(self.overrides, self.signal_lead_s, self.signal,
                                                           self.local_port))


def _signal_name(cluster: dict) -> str:
    return str(cluster.get("signal", "")).upper().removeprefix("SIG")


def _setup_group(line) -> str:
    """One cluster.setup line as a { ... } group of its own, run as written: ":" keeps a blank or comment-only
    line a valid group, and the blank line ends one that ends in a backslash."""
    return "{ :\n" + str(line) + "\n\n}"


def _local_setup(lines: list, folder: Path) -> list:
    """cluster.setup for a local job: its output into .submitit/setup-<job id>.log (submitit's local controller
    runs it in the submitting terminal, so without --wait a failure would leave no trace), and a failure named
    on stderr. The job id is the pid of submitit's shell, `$$` in it. Each line is a { ... } group of its own, not
    a subshell, so what it exports reaches the job, and a trailing comment, `;` or `&` of a line stays its own."""
    if not lines:
        return []
    import shlex
    log = shlex.quote(str(Path(folder).parent / "setup-")) + "$$.log"
    body = " && ".join(_setup_group(line) for line in lines)
    return [f"{{ {body}\n}} >> {log} 2>&1 || {{ rc=$?; echo \"cluster.setup failed (exit $rc)\" >> {log}; "
            f"echo \"allconv-hpc: cluster.setup failed (exit $rc); its output is in \"{log} >&2; exit 1; }}"]


def _slurm_setup(lines: list) -> list:
    """cluster.setup in the batch script, each line a { ... } group (as for a local job) that ends the job when
    it fails: a module that did not load or a venv that is not there is named at once, in the job's .err file,
    not found later as an import error or a run on the wrong software. `|| true` lets a line fail."""
    import shlex
    return [_setup_group(line) + " || { rc=$?; echo \"allconv-hpc: cluster.setup line failed (exit $rc): \""
            + shlex.quote(str(line)) + " >&2; exit 1; }" for line in lines]


def make_executor(cluster: dict, folder: Path):
    """submitit's executor for the validated cluster. SUBMITIT_PREEMPT_SIGNAL (read when the job imports
    submitit) makes submitit's own handler, in place until TrainJob installs ours, take our signal."""
    import submitit

    if cluster["backend"] == "local":
        # what submitit's LocalExecutor supports; the rest of the profile does not apply here
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=cluster["timeout_min"], nodes=1, tasks_per_node=cluster["tasks_per_node"],
                             cpus_per_task=cluster["cpus_per_task"], gpus_per_node=cluster["gpus_per_node"],
                             signal_delay_s=cluster["signal_lead_s"], setup=_local_setup(cluster["setup"], folder),
                             visible_gpus=local_gpus(cluster["gpus_per_node"]))
        return ex
    # the task's python starts with our signal ignored (SIG_IGN survives exec): a warning in the ~0.3 s
    # before submitit's handler is in place killed the task, and the job ended FAILED, not requeued
    import shlex
    ignoring = f'trap "" {_signal_name(cluster)}; exec "$0" "$@"'
    ex = submitit.SlurmExecutor(folder=str(folder),
                                python=f"/bin/sh -c {shlex.quote(ignoring)} {shlex.quote(sys.executable)}")
    extra = dict(cluster.get("additional_parameters") or {})
    # queued held, released once submitit has made the job's folder (see release_held)
    extra.setdefault("hold", True)
    # explicit both ways: without --no-requeue the site's default (JobRequeue) decides
    extra["requeue" if cluster["requeue"] else "no_requeue"] = True
    # our signal, sent to the srun tasks (no "B:"): the trainer checkpoints at a step boundary
    extra["signal"] = f"{_signal_name(cluster)}@{cluster['signal_lead_s']}"
    # srun no longer inherits the job's --cpus-per-task (Slurm 22.05): give it explicitly
    srun_args = ["--kill-on-bad-exit=1", f"--cpus-per-task={cluster['cpus_per_task']}"]
    params = dict(nodes=cluster["nodes"], ntasks_per_node=cluster["tasks_per_node"],
                  cpus_per_task=cluster["cpus_per_task"], time=cluster["timeout_min"],
                  signal_delay_s=cluster["signal_lead_s"], array_parallelism=cluster["array_parallelism"],
                  setup=[f"export SUBMITIT_PREEMPT_SIGNAL={_signal_name(cluster)}", *_slurm_setup(cluster["setup"])],
                  additional_parameters=extra,
                  srun_args=srun_args, stderr_to_stdout=False, job_name="allconv")
    if cluster["gpus_per_node"]:
        gpus = cluster["gpus_per_node"]
        params["gpus_per_node"] = f"{cluster['gpu_type']}:{gpus}" if cluster.get("gpu_type") else gpus
    if cluster.get("mem_gb") is not None:
        params["mem"] = f"{cluster['mem_gb']}GB"
    for k in ("partition", "account", "qos", "constraint", "exclude"):
        if cluster.get(k) is not None:
            params[k] = str(cluster[k])
    ex.update_parameters(**params)
    return ex


LOCK_NAME = ".submit.lock"  # in the run (or sweep) folder: one submit at a time checks it and queues into it
TEST_ONLY_TIMEOUT_S = 30
# what sbatch --test-only (or sbatch under EnforcePartLimits) says of a job no node or partition limit allows
# (not its "allocation failure: " prefix, which it puts before any reason, e.g. an invalid partition)
_NEVER = ("requested node configuration is not available", "invalid feature specification",
          "requested time limit", "node count specification invalid", "more processors requested than permitted",
          "memory required by task is not available", "requested partition configuration not available")


def _sbatch_said(text: str) -> str:
    return "; ".join(ln.strip().removeprefix("sbatch: error: ") for ln in str(text).splitlines() if ln.strip())


def sbatch_refused(text: str) -> ConfigError:
    """sbatch's complaint (already on one line) with the fix."""
    text = text or "no reason given"
    unreachable = any(m in text.lower() for m in ("configuration source", "unable to contact",
                                                 "connection refused", "slurm.conf"))
    if unreachable:  # not a verdict on the job: no controller answered
        return ConfigError(f"Slurm does not answer here, sbatch said: {text} (check SLURM_CONF and that slurmctld "
                           f"runs, or use cluster=local)")
    gres = "gres" in text.lower() or "generic resource" in text.lower()
    fix = ("check cluster.gpus_per_node and cluster.gpu_type against the partition's GPUs (sinfo -o '%P %G'), "
           "and cluster.partition" if gres else
           "check cluster.partition, cluster.account, cluster.qos and the other cluster.* values")
    return ConfigError(f"sbatch refused the job: {text} ({fix})")


def _warn(msg: str) -> None:
    print(f"allconv-hpc submit: warning: {msg}", file=sys.stderr)


def sbatch_script(points: list[Point], sweep_dir: Optional[Path], cluster: dict) -> Optional[str]:
    """The batch script submitit would queue for the points to submit (None: nothing for Slurm)."""
    todo = [p for p in points if p.skip is None]
    if cluster["backend"] != "slurm" or not todo:
        return None
    base = sweep_dir if sweep_dir is not None else todo[0].run_dir
    ex = make_executor(cluster, base / ".submitit" / "%j")
    if len(todo) > 1:
        ex.parameters["map_count"] = len(todo)  # the job array, as SlurmExecutor renders it for a batch
    return ex._make_submission_file_text(ex._submitit_command_str, "test-only")


def check_can_start(points: list[Point], sweep_dir: Optional[Path], cluster: dict) -> None:
    """`sbatch --test-only` on the very script submit would queue. Under EnforcePartLimits=NO (Slurm's default)
    sbatch queues a job that asks for more than its partition ever has (nodes, CPUs, memory, time, features),
    and it pends forever (PartitionConfig, PartitionNodeLimit, ...); the test says so at once. When the test
    cannot be run (no answer, an sbatch without --test-only), submission goes on with a warning."""
    script = sbatch_script(points, sweep_dir, cluster)
    if script is None:
        return
    try:
        r = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True,
                           timeout=TEST_ONLY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return _warn(f"sbatch --test-only did not answer in {TEST_ONLY_TIMEOUT_S} s; submitting without knowing "
                     f"whether the cluster can ever start the job")
    except OSError as e:
        return _warn(f"sbatch --test-only could not run ({e}); submitting without that check")
    if r.returncode == 0:
        # --test-only passes a --time over the partition's limit (the job would pend: PartitionTimeLimit)
        over = _over_partition(cluster, _where(cluster), features=False)
        if over:
            raise ConfigError(_never_message(cluster, "sinfo: the partition's time limit", over))
        return
    said = _sbatch_said(r.stderr + "\n" + r.stdout)
    if not said or "unrecognized option" in said or "invalid option" in said:
        return _warn(f"sbatch --test-only failed without a reason ({said or f'exit {r.returncode}'}); submitting "
                     f"without knowing whether the cluster can ever start the job")
    if any(m in said.lower() for m in _NEVER):
        raise ConfigError(_never_message(cluster, f"sbatch --test-only: {said}",
                                         _over_partition(cluster, _where(cluster), "feature" in said.lower())))
    raise sbatch_refused(said)


def _where(cluster: dict) -> str:
    part = cluster.get("partition")
    return f"partition {part}" if part is not None else "the default partition"


def _never_message(cluster: dict, why: str, over: list[str]) -> str:
    part, where = cluster.get("partition"), _where(cluster)
    asked = [f"{cluster['nodes']} node(s) of {cluster['tasks_per_node']} task(s) x {cluster['cpus_per_task']} CPU(s)"]
    if cluster["gpus_per_node"]:
        asked.append(f"{cluster['gpus_per_node']} GPU(s) per node")
    if cluster.get("mem_gb") is not None:
        asked.append(f"{cluster['mem_gb']} GB per node")
    asked.append(f"{cluster['timeout_min']} min")
    if cluster.get("constraint") is not None:
        asked.append(f"features {cluster['constraint']}")
    if cluster.get("exclude") is not None:
        asked.append(f"not on {cluster['exclude']}")
    fix = "; ".join(over) if over else (
        f"lower cluster.nodes, cluster.tasks_per_node, cluster.cpus_per_task, cluster.gpus_per_node, cluster.mem_gb or "
        f"cluster.timeout_min, or fix cluster.constraint{' or cluster.exclude' if cluster.get('exclude') else ''}, "
        f"to what {where} has (sinfo -N -l{f' -p {part}' if part is not None else ''})")
    return (f"Slurm can never start this job on {where}: it asks for {', '.join(asked)} ({why}); {fix}, or choose "
            f"another cluster.partition")


def _over_partition(cluster: dict, where: str, features: bool) -> list[str]:
    """What the job asks beyond its partition's nodes and limits, with the value to use, from sinfo; [] when
    sinfo does not tell (the caller then names every key)."""
    from .preempt import parse_slurm_time, slurm_out

    out = slurm_out(["sinfo", "-h", "-o", "%P|%D|%c|%m|%l|%f|%N"])
    part = cluster.get("partition")
    rows = [ln.split("|") for ln in (out or "").splitlines() if ln.count("|") == 6]
    rows = [r for r in rows if (r[0].rstrip("*") == str(part) if part is not None else r[0].endswith("*"))]
    if not rows:
        return []
    num = lambda v: int(re.match(r"\d*", v).group() or 0)  # noqa: E731  "2+": at least 2 (mixed nodes)
    nodes, cpus, mem = sum(num(r[1]) for r in rows), max(num(r[2]) for r in rows), max(num(r[3]) for r in rows)
    over = []
    if cluster["nodes"] > nodes:
        over.append(f"cluster.nodes={cluster['nodes']} but {where} has {nodes} node(s): use cluster.nodes<={nodes}")
    elif cluster.get("exclude") is not None:
        from .distributed import expand_hostlist
        try:
            names = {n for r in rows for n in expand_hostlist(r[6])}
            left = names - set(expand_hostlist(str(cluster["exclude"])))
        except ValueError:  # a host list we cannot read: sinfo's word stands
            left = names = set()
        if names and len(left) < cluster["nodes"]:
            over.append(f"cluster.exclude={cluster['exclude']} leaves {len(left)} of the {len(names)} node(s) of "
                        f"{where} ({', '.join(sorted(left)) or 'none'}) for cluster.nodes={cluster['nodes']}: exclude "
                        f"fewer")
    need = cluster["tasks_per_node"] * cluster["cpus_per_task"]
    if need > cpus:
        over.append(f"cluster.tasks_per_node x cluster.cpus_per_task = {need} CPUs per node but the nodes of {where} "
                    f"have {cpus}: use cluster.cpus_per_task<={max(cpus // cluster['tasks_per_node'], 1)}")
    if cluster.get("mem_gb") is not None and mem and cluster["mem_gb"] * 1024 > mem:
        over.append(f"cluster.mem_gb={cluster['mem_gb']} but the nodes of {where} have {mem / 1024:g} GB: use "
                    f"cluster.mem_gb<={mem // 1024} (or null)")
    try:
        limit = parse_slurm_time(rows[0][4].upper().replace("INFINITE", "UNLIMITED"))
    except ValueError:
        limit = None
    if limit is not None and cluster["timeout_min"] * 60 > limit:
        over.append(f"cluster.timeout_min={cluster['timeout_min']} but {where} allows {limit / 60:g} min: use "
                    f"cluster.timeout_min<={int(limit // 60)}")
    if features and cluster.get("constraint") is not None:
        have = sorted({f for r in rows for f in r[5].split(",") if f and f != "(null)"})
        over.append(f"cluster.constraint={cluster['constraint']} names features the nodes of {where} lack (they have: "
                    f"{', '.join(have) or 'none'})")
    return over


@contextlib.contextmanager
def submit_lock(folder: Path):
    """Holds an exclusive lock on folder/.submit.lock while the folder is checked again and queued into, so two
    submits started at once cannot both queue a job into one folder (the later one then finds the earlier one's
    job). Folders made here are removed again when the submission is refused (ConfigError). Where the file system
    has no flock (Lustre without -o flock), submission goes on unlocked, with a warning."""
    import fcntl
    while True:
        created = [d for d in (folder, *folder.parents) if not d.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another submit into {folder} to finish", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in runlock.NO_LOCKS:
                os.close(fd)
                raise
            _warn(f"cannot lock {path} ({e.strerror}); submitting without the lock that keeps two submits at once "
                  f"out of one folder")
            break
        try:  # the earlier holder may have removed the folder (its submission refused): lock the new one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    except ConfigError:
        if created:
            shutil.rmtree(created[0], ignore_errors=True)
            for d in created[1:]:
                try:
                    d.rmdir()
                except OSError:  # not empty (someone else's) or gone
                    break
        raise
    finally:
        os.close(fd)


def submit(points: list[Point], sweep_dir: Optional[Path], cluster: dict) -> list:
    """Submit the points not marked `skip` (one job, or one array); returns their submitit jobs. Under the
    folder's lock every point is checked again first (another submit may have queued it since `plan`); a
    point now refused raises ConfigError, one now queued by a sweep's other submit is skipped."""
    todo = [p for p in points if p.skip is None]
    base = sweep_dir if sweep_dir is not None else todo[0].run_dir
    check_can_start(points, sweep_dir, cluster)
    with submit_lock(base):
        for p in todo:
            if p.cfg is not None:
                p.skip = check_run_folder(p.run_dir, p.cfg, sweep=sweep_dir is not None, overrides=p.overrides)
        jobs = _submit_locked(points, sweep_dir, cluster, base)
    if jobs and cluster["backend"] == "slurm" and not (cluster.get("additional_parameters") or {}).get("hold"):
        release_held(jobs)  # after the lock: a failure must not remove the folders of queued jobs
    return jobs


def _submit_locked(points: list[Point], sweep_dir: Optional[Path], cluster: dict, base: Path) -> list:
    import io
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    every, points = points, [p for p in points if p.skip is None]
    if not points:
        return []
    ports = free_ports(len(points)) if cluster["backend"] == "local" and cluster["tasks_per_node"] > 1 else None
    calls = [TrainJob(p.overrides, cluster["signal_lead_s"], str(cluster["signal"]), ports and ports[i])
             for i, p in enumerate(points)]
    if cluster["backend"] == "local":  # the controller and its tasks inherit it (Slurm: in the script)
        os.environ["SUBMITIT_PREEMPT_SIGNAL"] = _signal_name(cluster)
    sbatch_err = io.StringIO()  # submitit prints sbatch's complaint itself; we say it once, below
    now = time.time()  # before sbatch: a status.json from any job of this submission is newer (status.py)
    try:
        with contextlib.redirect_stderr(sbatch_err):
            ex = make_executor(cluster, base / ".submitit" / "%j")
            if len(calls) == 1:
                jobs = [ex.submit(calls[0])]
            else:
                with ex.batch():
                    jobs = [ex.submit(c) for c in calls]
    except (FailedJobError, FailedSubmissionError) as e:
        raise sbatch_refused(_sbatch_said(str(e))) from None
    finally:
        with contextlib.suppress(OSError):  # submitit makes the folder template itself, "%j" unreplaced, empty
            # (cluster=local: its controller makes it again, in the background)
            (base / ".submitit" / "%j").rmdir()
    records = []
    for p, j in zip(points, jobs):
        p.run_dir.mkdir(parents=True, exist_ok=True)
        rec = {"job_id": str(j.job_id), "backend": cluster["backend"], "run_dir": str(p.run_dir),
               "overrides": p.overrides, "submitted": now, "submitit_folder": str(base / ".submitit"),
               "epochs": p.cfg.trainer.epochs if p.cfg is not None else None}  # status: progress before the job starts
        _write_json(p.run_dir / "submission.json", rec)
        records.append(rec)
    if sweep_dir is not None:
        _write_sweep(sweep_dir, every, records, cluster, now)
    return jobs


def release_held(jobs: list) -> None:
    """Start the jobs submit queued held. Slurm opens a task's log in .submitit/<job id>/ as the task
    starts, and submitit makes that folder only after sbatch has answered: an idle cluster started a job
    first (seen: FAILED in 0.04 s, no log, "Could not open stdout file")."""
    ids = sorted({str(j.job_id).split("_")[0] for j in jobs})  # an array's tasks: its own id
    try:
        r = subprocess.run(["scontrol", "release", *ids], capture_output=True, text=True, timeout=60)
        said = ((r.stderr or r.stdout).strip() or f"exit status {r.returncode}") if r.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        said = str(e)
    if said:
        raise ConfigError(f"job(s) {' '.join(ids)} are queued held and `scontrol release` failed ({said}); "
                          f"start them with: scontrol release {' '.join(ids)}")


def _write_sweep(sweep_dir: Path, every: list[Point], records: list[dict], cluster: dict, now: float) -> None:
    """sweep.json: the points it already tracks, in their order, then this submission's new ones, keyed by
    run_dir; a point submitted now gets its new record (with its cluster), the others keep theirs. A
    submission of a subset of the sweep so leaves the rest tracked. A damaged sweep.json is written anew."""
    from .jobs import DamagedFile, read_record
    try:
        old = read_record(sweep_dir / "sweep.json") or {}
    except DamagedFile:
        old = {}
    earlier = [r for r in old.get("jobs") or [] if isinstance(r, dict) and isinstance(r.get("run_dir"), str)]
    new = {r["run_dir"]: {**r, "cluster": cluster} for r in records}
    mine = {str(p.run_dir): p for p in every}
    # a point in this sweep but not submitted now: the record of its last submission (or none)
    now_doc = {d: new.get(d) or _earlier_record(mine[d].run_dir) for d in mine}
    jobs_doc = [now_doc.pop(r["run_dir"], r) for r in earlier] + list(now_doc.values())
    _write_json(sweep_dir / "sweep.json", {"sweep_dir": str(sweep_dir), "submitted": now, "cluster": cluster,
                                           "jobs": jobs_doc})


def _earlier_record(run_dir: Path) -> dict:
    """A point not submitted again: the record of its last submission, or (trained by hand) none."""
    return read_json(run_dir / "submission.json") or {"job_id": None, "backend": "none", "run_dir": str(run_dir)}


def _write_json(path: Path, doc: dict) -> None:
    write_atomic(path, json.dumps(doc, indent=1).encode())


def _print_skipped(points: list[Point]) -> None:
    for p in points:
        if p.skip is not None:
            print(f"not submitted again ({p.skip}): {p.run_dir}")


def submit_main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="allconv-hpc submit", description="Validate, then submit training to Slurm "
                                 "(cluster=slurm) or start it on this machine (cluster=local).",
                                 epilog="exit status: 0 submitted (with --wait: every run completed), 2 refused before "
                                        "anything was queued; with --wait also 1 a job failed, 3 none failed but a run "
                                        "stopped unfinished (a signal: resumable), 130 stopped watching (Ctrl-C)")
    ap.add_argument("-m", "--multirun", action="store_true",
                    help="sweep (comma lists, range, choice, glob): one Slurm job array, or one local job per point")
    ap.add_argument("--wait", action="store_true", help="stream job states until every job ends")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan; submit nothing")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. optim.lr=0.1 cluster=slurm")
    args = ap.parse_intermixed_args(argv)  # flags anywhere among the overrides
    overrides = list(args.overrides)
    chosen = auto_cluster(overrides)
    if chosen is not None:
        why = "sbatch is on PATH" if chosen == "slurm" else "no sbatch on PATH"
        print(f"cluster={chosen} ({why}; pass cluster=... to choose)")
        overrides = [f"cluster={chosen}"] + overrides
    try:
        points, sweep_dir, cluster = plan(overrides, args.multirun, dry_run=args.dry_run)
        if args.dry_run:
            _print_skipped(points)
            for p in points:
                if p.skip is None:
                    print(f"{p.run_dir}  {' '.join(o for o in p.overrides if not o.startswith('hydra.'))}")
            slurm_here = shutil.which("sbatch") and shutil.which("srun")
            script = sbatch_script(points, sweep_dir, cluster) if slurm_here or cluster["backend"] != "slurm" else None
            if script is not None:  # what Slurm would get, before asking it whether it can ever run it
                print("sbatch options:\n" + "\n".join(f"  {ln[len('#SBATCH '):]}" for ln in script.splitlines()
                                                    if ln.startswith("#SBATCH ")))
            if cluster["setup"]:  # run before the job starts, each line as written; a failing one stops it
                print("setup:\n" + "\n".join(f"  {line}" for line in cluster["setup"]))
            if slurm_here:
                check_can_start(points, sweep_dir, cluster)
            return 0
        jobs = submit(points, sweep_dir, cluster) if any(p.skip is None for p in points) else []
        _print_skipped(points)  # also what another submit queued meanwhile
        todo = [p for p in points if p.skip is None]
    except ConfigError as e:
        print(f"allconv-hpc submit: error: {e}", file=sys.stderr)
        return 2
    for p, j in zip(todo, jobs):
        print(f"job {j.job_id}  {p.run_dir}")
    where = sweep_dir if sweep_dir is not None else points[0].run_dir
    if not todo:
        grow = " (trainer.epochs=N grows a completed run)" if any(p.skip == "completed" for p in points) else ""
        print(f"nothing to submit: every run is completed or queued{grow}")
    print(f"{'sweep' if sweep_dir is not None else 'run'} folder: {where}")
    print(f"watch it with: allconv-hpc status {where}")
    if args.wait:
        from .status import wait_for
        try:
            return wait_for(where)
        except KeyboardInterrupt:  # the watcher stops; Slurm jobs go on (local ones got the Ctrl-C too)
            then = ("the local job got it too: it checkpoints and stops; submit again to resume"
                    if cluster["backend"] == "local" else "the jobs go on")
            print(f"stopped watching (Ctrl-C); {then}; allconv-hpc status {where}", file=sys.stderr)
            return 130
    return 0

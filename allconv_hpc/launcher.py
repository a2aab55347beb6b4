"""`allconv-hpc submit`: validate every point on the login node, then hand them to submitit and return.

A sweep (`-m`, Hydra's sweep syntax) becomes one Slurm job array; each point gets a deterministic
run folder named from its swept overrides (never a timestamp, so a requeued task finds its
checkpoint) and one W&B group for the sweep. Everything that could fail in the queue is checked
here first: the composed config, the dataset at `data.root`, the batch vs the job's world size,
and every value that goes into the sbatch script.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from .compose import override_key as _key
from .config import CLUSTER_KEYS, ConfigError, config_key, flatten
from .executor import (array_too_large, base_job_ids, check_can_start, make_executor, max_array_size, release_held,
                       sbatch_refused, sbatch_said, sbatch_script)
from .folder_checks import check_run_folder, warn_diverged, warn_starts_over
from .fsio import name_too_long, read_json, write_atomic
from .localjob import DEATH_SIGNAL, LOCAL_PORT_ENV, controller_gone, end_local_peers, free_ports
from .preempt import AGREED_EXITS, EXIT_REQUEUED, SIGNAL_LEAD_ENV, ignore_late_signals, sigint_deferred
from .resources import signal_name, validate_cluster, warn
from .slurm import slurm_conf_missing
from .submit_lock import submit_lock
from .sweep import Point, default_sweep_dir, earlier_sweep_dirs, expand_sweep, point_dirname


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


def hydra_value(value, key: str) -> str:
    """A value quoted for a Hydra override (paths hold '=', ',' and spaces Hydra would parse)."""
    v = str(value)
    if any(ch in v for ch in "\\\n\r\0") or "${" in v:
        raise ConfigError(f"{key}={v!r}: backslashes, newlines, NUL and '${{' are not supported in paths given "
                          f"to submit; use a plain path")
    if "%" in v and key in ("hydra.run.dir", "hydra.sweep.dir"):  # the job's log folder lies inside it
        raise ConfigError(f"{key}={v!r}: '%' in a folder submit runs in is not supported: submitit and Slurm read "
                          f"%j, %A, %a ... in the job's log paths as patterns, and its logs would land elsewhere; "
                          f"use a path without '%'")
    return "'" + v.replace("'", "\\'") + "'"


def plan(overrides: list[str], multirun: bool, dry_run: bool = False) -> tuple[list[Point], Optional[Path], dict]:
    """Compose and validate every point before anything is submitted or any folder is made. `dry_run`: only
    shown, so a Slurm plan may be looked at where Slurm's commands are not (a laptop)."""
    from .compose import (NameSwap, check_run_dir, check_sweep_dir, compose, dated_dir_warning, pin_data_root,
                          repeated_overrides, unread_said)
    from .data import check_files, check_present, expected_files, fetch_for_submit, to_download
    from .wandb_mode import check_environment, check_names, preflight_mode

    common, swept = expand_sweep(overrides, multirun)
    for said in repeated_overrides(common):  # a swept key given twice is refused by expand_sweep
        warn(said)
    keys = {_key(o) for o in common + swept[0]}
    _refuse_hydra_launcher(common + swept[0])
    if "cluster.backend" in keys:  # a profile's own: slurm's keys run here, or local's (a week's --time) queued
        raise ConfigError("cluster.backend is the cluster profile's own: choose it with cluster=local or "
                          "cluster=slurm (or a site's profile), not cluster.backend=")
    if "hydra.sweep.dir" in keys and not multirun:  # Hydra reads it only for a multirun: ignored, silently
        raise ConfigError("hydra.sweep.dir is the folder of a sweep and read only with -m: add -m to submit a sweep, "
                          "or give hydra.run.dir=... for one run")
    sweep_dir = None
    if multirun:
        if "hydra.run.dir" in keys:
            raise ConfigError("hydra.run.dir is set per point in a sweep (-m): give the sweep's folder with "
                              "hydra.sweep.dir=... instead")
        if "hydra.sweep.dir" in keys:
            first = compose(common + swept[0])
            sweep_dir = Path(first.hydra["sweep"]["dir"]).expanduser().absolute()
            for said in dated_dir_warning(first, "hydra.sweep.dir", sweep_dir):
                warn(said)
        else:
            name = default_sweep_dir(common, swept)
            earlier = [d for d in earlier_sweep_dirs(common, swept) if d != name and Path(d).is_dir()]
            sweep_dir = Path(earlier[0] if earlier and not Path(name).exists() else name).absolute()
        hydra_value(sweep_dir, "hydra.sweep.dir")
        _check_name_max(sweep_dir, "hydra.sweep.dir", "give a shorter hydra.sweep.dir")
        check_sweep_dir(sweep_dir)
    points, cluster, warned, compiler_found, env_checked = [], None, set(), False, False
    fetch = {}  # (dataset, root) -> its data config: what data.download=true would fetch in every job
    for s in swept:
        ov = common + s
        if sweep_dir is not None:
            run_dir = sweep_dir / point_dirname(s)
            ov = ov + [f"hydra.run.dir={hydra_value(run_dir, 'hydra.run.dir')}"]
            if "wandb.group" not in {_key(o) for o in common + s}:
                ov.append(f"wandb.group={hydra_value(sweep_dir.name, 'wandb.group')}")
        try:
            c = compose(ov)
        except NameSwap as e:  # the advice names this point's value: a swept name wants the group swept instead
            swept_name = [o for o in overrides if _key(o) == f"{e.group}.name" and any(_key(x) == _key(o) for x in s)]
            if not swept_name:
                raise
            instead = swept_name[-1].lstrip("+").replace(f"{e.group}.name=", f"{e.group}=", 1)
            raise ConfigError(f"{e}. In this sweep: {shlex.quote(instead)} sweeps the options as defined") from None
        if sweep_dir is not None:  # its name is cut to NAME_MAX (point_dirname); a file system may allow less
            _check_name_max(c.run_dir, "the sweep point folder", "sweep fewer keys at once, or shorter values "
                                                                 "(its name is made of them)")
        else:
            _check_name_max(c.run_dir, "hydra.run.dir", "give a shorter hydra.run.dir")
        given_root = c.cfg.data.root
        root_said = pin_data_root(c)  # absolute; a resubmitted run keeps its recorded root over the default
        if root_said and root_said[0]:
            warn(root_said[1])
        elif root_said:
            print(f"allconv-hpc submit: {root_said[1]}", file=sys.stderr)
        check_present(c.cfg.data)
        # a file damaged inside, a subset (or a drop_last batch) larger than the files: now, not after the queue
        check_files(c.cfg.data, _drop_last_batch(c.cfg))
        if to_download(c.cfg.data):
            fetch.setdefault((c.cfg.data.name, c.cfg.data.root), c.cfg.data)
        if c.cfg.data.root != given_root and c.cfg.data.name != "synthetic":  # the jobs may start elsewhere
            ov = [o for o in ov if _key(o) != "data.root"] + [f"data.root={hydra_value(c.cfg.data.root, 'data.root')}"]
        mine = validate_cluster(c.cluster, c.cfg)
        if mine["backend"] == "slurm" and shutil.which("sbatch") and (no_conf := slurm_conf_missing()):
            raise ConfigError(no_conf)  # at once: every Slurm command would retry it for 60 s
        if mine["backend"] == "local" and c.cfg.trainer.compile and not compiler_found:
            _check_local_compiler(c.cfg)  # the job runs on this machine: its compiler is found (or not) here
            compiler_found = True
        dated = dated_dir_warning(c, "hydra.run.dir", c.run_dir) if sweep_dir is None else []
        for said in c.cfg.warnings() + unread_said(c, s) + dated:  # a swept key's said once for the sweep, not per value
            if said not in warned:  # once for a sweep
                warned.add(said)
                warn(said)
        mode = None
        try:
            mode = preflight_mode(c.cfg.wandb.mode)  # the jobs inherit this environment
            if mode != "disabled" and not env_checked:  # one environment for every point: checked once
                env_checked = True
                check_environment()
        except ConfigError as e:
            if not mine["setup"]:
                raise
            # a setup line may set it for the job (an export, a sourced file, a module): the job's train checks
            warn(f"{e} (unless cluster.setup sets it for the job, whose train then refuses to start)")
        if mode != "disabled":
            check_names(c.cfg.wandb)  # a project or tag W&B would refuse at wandb.init
        if cluster is not None and mine != cluster:
            keys_ = [k for k in sorted(CLUSTER_KEYS) if mine.get(k) != cluster.get(k)]
            diff = ", ".join(f"cluster.{k}" for k in keys_)
            listed = [k for k in keys_ if k in ("partition", "exclude", "constraint")]
            said = [o for o in overrides if _key(o) == f"cluster.{listed[0]}" and "(" not in o] if listed else []
            # Slurm's own comma lists (sbatch -p a,b: the first partition that can start it) are one value, quoted
            quoted = said[-1].replace("=", '="', 1) + '"' if said else ""
            one = f"; for Slurm's list, quote it as one value: {shlex.quote(quoted)}" if said else ""
            raise ConfigError(f"the sweep varies {diff}: one job array has one resource shape; submit one sweep "
                              f"per cluster setting instead{one}")
        if cluster is None and len(swept) > 1 and sweep_dir is not None:
            _check_array_size(len(swept), mine, sweep_dir)
        cluster = mine
        if sweep_dir is None:  # pinned absolute, in place of the one given
            ov = [o for o in ov if _key(o) != "hydra.run.dir"] + [f"hydra.run.dir={hydra_value(c.run_dir, 'hydra.run.dir')}"]
        check_run_dir(c.run_dir, "hydra.run.dir" if sweep_dir is None else "hydra.sweep.dir")
        skip = check_run_folder(c.run_dir, c.cfg, sweep=sweep_dir is not None, overrides=ov)
        if skip is None:
            warn_diverged(c.run_dir, c.cfg, sweep=sweep_dir is not None)
        points.append(Point(overrides=ov, run_dir=c.run_dir, skip=skip, cfg=c.cfg))
    if swept == [[]] and sweep_dir is not None:  # legal (a script's sweep of one), but often a comma list forgotten
        # said once the point composed: a list Hydra refuses to read as a sweep (model=[a,b]) is refused instead
        warn(f"-m but nothing is swept (no comma list, range, choice or glob): one run, in {sweep_dir}/run; "
             f"without -m it trains in hydra.run.dir")
    warn_starts_over(points)
    dirs = [p.run_dir for p in points]
    twice = next((d for i, d in enumerate(dirs) if d in dirs[:i]), None)
    if twice is not None:  # seed=0,0,1: Hydra keeps the value twice
        raise ConfigError(f"two sweep points map to the same run folder {twice.name}; give each swept value once")
    _check_distinct_configs(points)
    if sweep_dir is not None:
        _refuse_retraining(points, sweep_dir, {_key(o) for o in swept[0]})
        if "hydra.sweep.dir" not in keys:
            _refuse_retraining_elsewhere(points, sweep_dir)
    _warn_short_starts(cluster)
    over = sorted({p.cfg.trainer.threads for p in points if p.cfg is not None and p.cfg.trainer.threads
                   and p.cfg.trainer.threads > cluster["cpus_per_task"]})
    if over and cluster["backend"] == "slurm":  # legal (a site that binds no CPUs), but Slurm's binding shares them
        warn(f"trainer.threads={over[-1]} is more than cluster.cpus_per_task={cluster['cpus_per_task']}: each rank's "
             f"threads share its {cluster['cpus_per_task']} CPU(s), which slows it; give trainer.threads=null (the "
             f"task's CPUs) or raise cluster.cpus_per_task")
    if cluster["backend"] == "slurm" and not cluster["gpus_per_node"] and any(
            p.cfg.data.name != "synthetic" for p in points):  # the slurm profile's default: legal, but rarely meant
        warn(f"cluster.gpus_per_node=0: this job trains on CPUs only ({cluster['cpus_per_task']} per task); add "
             f"cluster.gpus_per_node={cluster['tasks_per_node']} for a GPU per task")
    missing = [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None]  # submitit needs both
    if cluster["backend"] == "slurm" and missing and dry_run:
        warn(f"{' and '.join(missing)} not on PATH: the points below are what a Slurm login node would submit "
              f"(the sbatch options, which submitit writes only where srun is, and sbatch --test-only are not shown)")
    elif cluster["backend"] == "slurm" and missing:
        raise ConfigError(f"cluster=slurm but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on "
                          f"PATH; submit from a Slurm login node, or use cluster=local to run here")
    todo = sum(p.skip is None for p in points)
    if cluster["backend"] == "local" and todo > cluster["array_parallelism"]:
        raise ConfigError(f"cluster=local starts every sweep point at once, and this sweep has {todo} > "
                          f"cluster.array_parallelism={cluster['array_parallelism']}; set "
                          f"cluster.array_parallelism={todo} if this machine can run them together")
    # last, once every check passed: a job's rank 0 would download on a compute node (often without network),
    # and a sweep's jobs all into one root at once, each truncating the archive the others write
    for data in fetch.values():
        if dry_run:
            print(f"allconv-hpc submit: {expected_files(data)[0]} is missing: submit without --dry-run downloads "
                  f"{data.name} here, once, before anything is queued (data.download=true)", file=sys.stderr)
        else:
            print(f"allconv-hpc submit: downloading {data.name} into {data.root} here, once, before anything is "
                  f"queued (data.download=true)", file=sys.stderr, flush=True)
            fetch_for_submit(data)
    if fetch and not dry_run:
        for p in points:
            check_files(p.cfg.data, _drop_last_batch(p.cfg))  # skipped above while the files were missing
    return points, sweep_dir, cluster


def _check_local_compiler(cfg) -> None:
    """trainer.compile=true of a cluster=local job: the compiler its first step builds with, checked here, where
    the job runs (train would refuse it there, after submit said it started)."""
    from .launch_checks import check_compiler, uses_cuda
    check_compiler(uses_cuda(cfg.trainer))


def _hold_asked(cluster: dict) -> bool:
    """The user's own cluster.additional_parameters.hold: submit leaves its jobs held."""
    return bool((cluster.get("additional_parameters") or {}).get("hold"))


def _drop_last_batch(cfg) -> Optional[int]:
    return cfg.trainer.batch_size if cfg.trainer.drop_last else None


def _refuse_hydra_launcher(overrides: list[str]) -> None:
    """hydra-submitit-launcher's settings: submit has its own (the cluster group), so Hydra would ignore
    +hydra.launcher.* silently, and hydra/launcher=submitit_slurm fails on a plugin that is not installed."""
    for o in overrides:
        key = _key(o)
        if key not in ("hydra/launcher", "hydra.launcher") and not key.startswith("hydra.launcher."):
            continue
        own = key.removeprefix("hydra.launcher.")
        own = {"signal_delay_s": "signal_lead_s"}.get(own, own)  # the plugin's name for it
        use = (f"here: cluster.{own}={o.split('=', 1)[1]}" if own in CLUSTER_KEYS and "=" in o
               else "e.g. cluster.timeout_min=600, cluster.gpus_per_node=1")
        raise ConfigError(f"{o}: submit does not use Hydra's launcher plugins; this tool's cluster settings are "
                          f"cluster=slurm and cluster.<key> ({use})")


def _check_distinct_configs(points: list[Point]) -> None:
    """Two sweep points that compose to one config (optim.lr=1 and optim.lr=1.0: distinct folder names, one float)
    would train the same run twice: refused, naming them."""
    import dataclasses
    seen: dict[str, Point] = {}
    for p in points:
        if p.cfg is None:
            continue
        key = config_key(dataclasses.asdict(p.cfg))
        if key in seen:
            raise ConfigError(f"sweep points {seen[key].run_dir.name} and {p.run_dir.name} give the same config (one "
                              f"run trained twice); give each value once")
        seen[key] = p


SLURM_SIGNAL_EARLY_S = 60  # sbatch --signal: "the signal may be sent up to 60 seconds earlier than specified"


def _warn_short_starts(cluster: dict) -> None:
    """A signal lead over half the time limit is legal, but each start trains little, and under Slurm every time
    limit uses up a requeue; Slurm's own slack counts too (seen: a 20 s lead of a 60 s limit came at 15-20 s)."""
    lead, limit = cluster["signal_lead_s"], cluster["timeout_min"] * 60
    slurm = cluster["backend"] == "slurm"
    early = SLURM_SIGNAL_EARLY_S if slurm else 0
    if 2 * (lead + early) <= limit:
        return
    head = f"cluster.signal_lead_s={lead} s"
    if slurm:
        head += f", plus the up to {early} s Slurm may send the signal early,"
    trains = f"{max(0, limit - lead - early)}-{limit - lead} s" if slurm else f"at most {limit - lead} s"
    then = ("and is requeued, and each time limit counts against checkpoint.max_requeues" if slurm
            else "and stops (cluster=local does not requeue)")
    warn(f"{head} is over half of cluster.timeout_min={cluster['timeout_min']} ({limit} s): each start trains "
          f"{trains} before it checkpoints {then}")


def _identity_key(cfg) -> str:
    """What a run may not change on resume (Config.identity), as one comparable key (1 and 1.0 alike)."""
    return config_key(cfg.identity())


def _refuse_retraining(points: list[Point], sweep_dir: Path, swept: set[str]) -> None:
    """A point whose config another point folder of the sweep holds under another name (a key newly swept:
    optim.lr=0.05,0.1 where seed alone was) would train that config again from scratch, a second W&B run of it
    in the group: refused, naming both (the configs as train records them, .hydra/config.yaml). Not where the
    two differ in a swept key a resume may change (a sweep over trainer.epochs: one identity, distinct runs)."""
    import dataclasses
    from .checkpoint import recorded_config
    new = {p.run_dir: p for p in points if p.skip is None and p.cfg is not None}
    try:
        others = [d for d in sweep_dir.iterdir() if d.is_dir() and d not in new]
    except (FileNotFoundError, NotADirectoryError):
        return
    held: dict[str, list] = {}
    for d in sorted(others):
        cfg = recorded_config(d, warn=False)
        if cfg is not None:
            held.setdefault(_identity_key(cfg), []).append((d, cfg))
    for p in new.values():
        mine = flatten(dataclasses.asdict(p.cfg))
        twin = next(((d, theirs) for d, theirs in ((d, flatten(dataclasses.asdict(c)))
                                                   for d, c in held.get(_identity_key(p.cfg), []))
                     if not any(mine.get(k) != v for k, v in theirs.items()
                                if k in swept or k.split(".")[0] in swept)), None)  # a key, or its group swept
        if twin is not None:
            d, theirs = twin
            # the keys that name its folder and are not swept now: choice(...) of one value keeps them swept
            named = [k for k in (seg.split("=", 1)[0] for seg in d.name.split(",") if "=" in seg) if k not in swept]
            values = [(k, theirs.get(k, theirs.get(f"{k}.name"))) for k in named]
            here = " ".join(shlex.quote(f"{k}={'choice(' + str(v) + ')'}") for k, v in values if v is not None)
            raise ConfigError(f"sweep point {p.run_dir.name} has the config of {d.name}, already in this sweep "
                              f"under another name: it would train it again from scratch. Leave that value out and "
                              f"sweep the new ones, with choice(...) for a key that keeps naming the folders"
                              f"{f' (here: {here})' if here else ''} (README, \"Submitting a sweep again\")")


def _refuse_retraining_elsewhere(points: list[Point], sweep_dir: Path) -> None:
    """A sweep grown without hydra.sweep.dir (optim.lr=0.01,0.05 then 0.01,0.05,0.1) gets a new default folder (the
    name hashes the values): its points that an earlier sweep over the same keys holds, config for config, would
    train again from scratch there, a second W&B group of them. Refused, naming the folder that adds to it."""
    from .checkpoint import recorded_config
    if (sweep_dir / "sweep.json").exists():  # this sweep's own folder: _refuse_retraining looks inside
        return
    prefix = sweep_dir.name.rpartition("-")[0] + "-"
    try:
        others = sorted(d for d in sweep_dir.parent.iterdir() if d.name.startswith(prefix) and d != sweep_dir
                        and (d / "sweep.json").exists())
    except OSError:
        return
    for other in others:
        held = [p for p in points if p.skip is None and p.cfg is not None and (other / p.run_dir.name).is_dir()
                and (cfg := recorded_config(other / p.run_dir.name, warn=False)) is not None
                and _identity_key(cfg) == _identity_key(p.cfg)]
        if held:
            names = ", ".join(p.run_dir.name for p in held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
            are = "is a run" if len(held) == 1 else "are runs"
            raise ConfigError(f"{len(held)} of this sweep's points ({names}) {are} of {other} already, an earlier "
                              f"sweep over the same keys; this sweep's own folder {sweep_dir} would train them again "
                              f"from scratch. To add to that sweep, give hydra.sweep.dir={shlex.quote(str(other))} "
                              f"(its points go on from where they are: a completed one gets no new job, a larger "
                              f"trainer.epochs trains it on); for a sweep of its own, another hydra.sweep.dir")


def _check_array_size(n: int, cluster: dict, sweep_dir: Path) -> None:
    """A new sweep of more points than Slurm's MaxArraySize, refused once its first point composed, not after the
    rest (a second or so each: minutes for a thousand). A sweep submitted again may skip some: checked once planned."""
    if cluster["backend"] != "slurm" or not shutil.which("sbatch") or (sweep_dir / "sweep.json").exists():
        return
    most = max_array_size()
    if most is not None and n > most:
        raise ConfigError(array_too_large(n, most))


def _grow_hint(points: list[Point]) -> str:
    return " (trainer.epochs=N grows a completed run)" if any(p.skip == "completed" for p in points) else ""


def _check_name_max(folder: Path, what: str, fix: str) -> None:
    """Each folder name still to be made fits the file system's NAME_MAX: refused here, with the fix, not later by
    a mkdir or a read of the records in it ("File name too long"), which a dry run never reaches."""
    said = name_too_long(folder)
    if said:
        raise ConfigError(f"{what}: {said}; {fix}")


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
        if controller_gone():  # cluster=local: stop as its controller's death signal asks, taken after all
            signal.raise_signal(DEATH_SIGNAL)
        os.environ[SIGNAL_LEAD_ENV] = str(self.signal_lead_s)
        if self.local_port:
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
        if self.local_port and code not in AGREED_EXITS:
            # a failure, or a Ctrl-C (130) before this rank's Trainer could tell its peers (the stops above are agreed
            # by all ranks, which leave together)
            from . import train
            end_local_peers(controller, interrupt=code == 130 and train.peers_untold)
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


def submit(points: list[Point], sweep_dir: Optional[Path], cluster: dict,
           attach: bool = False) -> tuple[list, bool]:
    """Submit the points not marked `skip` (one job, or one array); returns their submitit jobs, and whether a
    Ctrl-C came while they were queued (taken once they are recorded and released: KeyboardInterrupt where it
    stopped sbatch, nothing queued). Under the folder's lock every point is checked again first (another submit
    may have queued it since `plan`); a point now refused raises ConfigError, one now queued by a sweep's other
    submit is skipped. `attach` (submit --wait): a cluster=local job stays in this terminal's session
    (executor.make_executor)."""
    todo = [p for p in points if p.skip is None]
    base = sweep_dir if sweep_dir is not None else todo[0].run_dir
    check_can_start(points, sweep_dir, cluster)
    jobs, got = None, []
    try:
        with contextlib.ExitStack() as held:
            with submit_lock(base):
                for p in todo:
                    if p.cfg is not None:
                        p.skip = check_run_folder(p.run_dir, p.cfg, sweep=sweep_dir is not None, overrides=p.overrides)
                # from sbatch until the jobs are recorded and released: a Ctrl-C then left queued jobs unrecorded
                # (a second submit queued them again) or held
                got = held.enter_context(sigint_deferred(take=False))
                jobs = _submit_locked(points, sweep_dir, cluster, base, attach)
            if jobs and cluster["backend"] == "slurm" and not _hold_asked(cluster):
                release_held(jobs)  # after the lock: a failure must not remove the folders of queued jobs
    except ConfigError:
        if got and jobs is None:  # the terminal's Ctrl-C reached sbatch too, which queued nothing
            raise KeyboardInterrupt from None
        raise
    return jobs, bool(got)


def _submit_locked(points: list[Point], sweep_dir: Optional[Path], cluster: dict, base: Path,
                   attach: bool = False) -> list:
    import io
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    every, points = points, [p for p in points if p.skip is None]
    if not points:
        return []
    ports = free_ports(len(points)) if cluster["backend"] == "local" and cluster["tasks_per_node"] > 1 else None
    calls = [TrainJob(p.overrides, cluster["signal_lead_s"], str(cluster["signal"]), ports and ports[i])
             for i, p in enumerate(points)]
    if cluster["backend"] == "local":  # the controller and its tasks inherit it (Slurm: in the script)
        os.environ["SUBMITIT_PREEMPT_SIGNAL"] = signal_name(cluster)
    sbatch_err = io.StringIO()  # submitit prints sbatch's complaint itself; we say it once, below
    now = time.time()  # before sbatch: a status.json from any job of this submission is newer (status.py)
    scripts = base / ".submitit"  # where submitit writes a job's script and pickles before sbatch
    before = set(scripts.iterdir()) if scripts.is_dir() else set()
    try:
        with contextlib.redirect_stderr(sbatch_err):
            ex = make_executor(cluster, base / ".submitit" / "%j", attach=attach)
            if len(calls) == 1:
                jobs = [ex.submit(calls[0])]
            else:
                with ex.batch():
                    jobs = [ex.submit(c) for c in calls]
    except (FailedJobError, FailedSubmissionError) as e:
        for path in set(scripts.iterdir()) - before if scripts.is_dir() else ():  # of no job: the folder goes too
            if path.is_file() and (path.name.startswith(".submission_file_") or path.suffix == ".pkl"):
                path.unlink()
        raise sbatch_refused(sbatch_said(str(e))) from None
    finally:
        with contextlib.suppress(OSError):  # submitit makes the folder template itself, "%j" unreplaced, empty
            # (cluster=local: its controller makes it again, in the background)
            (base / ".submitit" / "%j").rmdir()
    records = []
    try:
        for p, j in zip(points, jobs):
            p.run_dir.mkdir(parents=True, exist_ok=True)
            rec = {"job_id": str(j.job_id), "backend": cluster["backend"], "run_dir": str(p.run_dir),
                   "overrides": p.overrides, "submitted": now, "submitit_folder": str(base / ".submitit"),
                   "epochs": p.cfg.trainer.epochs if p.cfg is not None else None}  # status: progress before it starts
            _write_json(p.run_dir / "submission.json", rec)
            records.append(rec)
        if sweep_dir is not None:
            _write_sweep(sweep_dir, every, records, cluster, now)
    except OSError as e:  # a full disk, a quota: a job no record names would be queued again by the next submit
        ids = " ".join(base_job_ids(jobs))
        if cluster["backend"] == "slurm":  # queued held (not released): nothing has started
            raise ConfigError(f"job(s) {ids} are queued held, but their record could not be written ({e}); nothing "
                              f"started: scancel {ids}, make room (quota, free space), and submit again") from None
        raise ConfigError(f"job(s) {ids} started, but their record could not be written ({e}): stop them (kill -INT "
                          f"{ids}), make room (quota, free space), and submit again") from None
    return jobs


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


def _terminal_sent_it() -> bool:
    """Whether a SIGINT may be the terminal's Ctrl-C: this process is in the terminal's foreground process group
    (and so is a cluster=local job's controller, which it started)."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:  # no controlling terminal
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def submit_main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="allconv-hpc submit", description="Validate, then submit training to Slurm "
                                 "(cluster=slurm) or start it on this machine (cluster=local).",
                                 epilog="exit status: 0 submitted (with --wait: every run completed), 2 refused before "
                                        "anything was queued; with --wait also 1 a job failed, 3 none failed but a run "
                                        "stopped unfinished (a signal, max_requeues, a scancel before it started: "
                                        "resumable), 130 stopped watching (Ctrl-C)")
    ap.add_argument("-m", "--multirun", action="store_true",
                    help="sweep (comma lists, range, choice, glob): one Slurm job array, or one local job per point")
    ap.add_argument("--wait", action="store_true", help="stream job states until the jobs it submitted end")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan; submit nothing")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. optim.lr=0.1 cluster=slurm")
    args, extra = ap.parse_known_intermixed_args(argv)  # flags anywhere among the overrides
    if extra:  # argparse's own error names every override after an unknown option too
        import difflib
        bad = next((a for a in extra if a.startswith("-")), extra[0])
        close = difflib.get_close_matches(bad.split("=")[0], ["--multirun", "--wait", "--dry-run", "--help"], n=1)
        ap.error(f"unrecognized argument {bad}{f' (did you mean {close[0]}?)' if close else ''}; submit takes "
                 f"-m/--multirun, --wait, --dry-run and Hydra overrides (key=value)")
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
            n = sum(p.skip is None for p in points)
            if n:  # the folders above could read as queued ones
                print(f"allconv-hpc submit: dry run: nothing was submitted ({n} run(s) would be, "
                      f"cluster={cluster['backend']})", file=sys.stderr)
            else:
                print(f"nothing to submit: every run is completed or queued{_grow_hint(points)}")
            return 0
        jobs, interrupted = (submit(points, sweep_dir, cluster, attach=args.wait)
                             if any(p.skip is None for p in points) else ([], False))
        _print_skipped(points)  # also what another submit queued meanwhile
        todo = [p for p in points if p.skip is None]
    except ConfigError as e:
        print(f"allconv-hpc submit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any sbatch, or one the same Ctrl-C stopped
        print("allconv-hpc submit: interrupted (Ctrl-C); nothing was queued", file=sys.stderr)
        return 130
    for p, j in zip(todo, jobs):
        print(f"job {j.job_id}  {p.run_dir}")
    if jobs and cluster["backend"] == "slurm" and _hold_asked(cluster):
        ids = " ".join(base_job_ids(jobs))  # an array: its job id releases all
        print(f"held, as cluster.additional_parameters.hold asks: nothing starts until scontrol release {ids}")
    where = sweep_dir if sweep_dir is not None else points[0].run_dir
    if not todo:
        print(f"nothing to submit: every run is completed or queued{_grow_hint(points)}")
    print(f"{'sweep' if sweep_dir is not None else 'run'} folder: {where}")
    print(f"watch it with: allconv-hpc status {shlex.quote(str(where))}")
    if interrupted:
        print("allconv-hpc submit: interrupted (Ctrl-C) while submitting: the jobs above were queued and recorded "
              "first" + (", not watched" if args.wait else ""), file=sys.stderr)
        return 130
    if args.wait:
        from .status import wait_for
        try:
            return wait_for(where, jobs={str(j.job_id) for j in jobs})
        except KeyboardInterrupt:  # the watcher stops; Slurm jobs go on, local ones got a terminal's Ctrl-C too
            if cluster["backend"] != "local":
                then = "the jobs go on"
            elif jobs and _terminal_sent_it():  # to the foreground group: submit and the controllers it started
                then = ("a Ctrl-C typed in this terminal reached the local job too: it checkpoints and stops; submit "
                        "again to resume")
            elif jobs:  # a SIGINT from elsewhere: to this process alone, or to its group, which holds the job too
                ids = " ".join(str(j.job_id) for j in jobs)
                then = (f"a SIGINT to this process alone leaves the local job going (stop it with kill -INT {ids}); "
                        f"one sent to its process group reached the job too, which then checkpoints and stops")
            else:  # nothing submitted now: the jobs an earlier submit started did not get it
                then = "the local job goes on; stop it with kill -INT <its job id> (status lists it)"
            print(f"stopped watching (Ctrl-C); {then}; allconv-hpc status {shlex.quote(str(where))}", file=sys.stderr)
            return 130
    return 0

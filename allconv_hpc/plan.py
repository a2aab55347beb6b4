"""What `submit` will queue: every point of a sweep composed and checked on the login node, before anything is
queued or any folder made (the config, the data, the cluster settings, the run folders and what they hold)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Optional

from .compose import override_key as _key
from .config import CLUSTER_KEYS, ConfigError, config_key, flatten
from .executor import array_too_large, max_array_size
from .folder_checks import check_run_folder, warn_diverged, warn_starts_over
from .fsio import name_too_long, read_json
from .jobs import asked_ahead, ended_states, recorded_jobs
from .resources import validate_cluster, warn
from .slurm import slurm_conf_missing
from .sweep import (Point, default_sweep_dir, earlier_sweep_dirs, expand_sweep, point_dirname, point_folder,
                    point_folders)


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


def sweep_group(sweep_dir: Path) -> str:
    """The W&B group of the sweep's points that name none: its folder's name when first submitted, as its sweep.json
    records it (a folder moved or renamed since keeps its group: each resumed point's W&B run went into a second
    group, unsaid), else the folder's name."""
    from .jobs import DamagedFile, read_record
    try:
        doc = read_record(sweep_dir / "sweep.json") or {}
    except DamagedFile:
        doc = {}
    group = doc.get("wandb_group")
    return group if isinstance(group, str) and group else sweep_dir.name


def plan(overrides: list[str], multirun: bool, dry_run: bool = False) -> tuple[list[Point], Optional[Path], dict]:
    """Compose and validate every point before anything is submitted or any folder is made. `dry_run`: only
    shown, so a Slurm plan may be looked at where Slurm's commands are not (a laptop)."""
    from .compose import (NameSwap, check_run_dir, compose, dated_dir_warning, pin_data_root, repeated_overrides,
                          unread_said, with_recorded_root)
    from .preempt import sigint_deferred
    with sigint_deferred():  # torch's import (seconds) dropped a Ctrl-C raised as it imports numpy (see train.run)
        from .data import check_files, check_present, expected_files, fetch_for_submit, to_download
    from .wandb_mode import check_environment, check_names, outranked_env, preflight_mode

    _refuse_inherited_ranks()
    _refuse_shadowing_modules(Path.cwd())
    common, swept = expand_sweep(overrides, multirun)
    for said in repeated_overrides(common):  # a swept key given twice is refused by expand_sweep
        warn(said)
    keys = {_key(o) for o in common + swept[0]}
    _refuse_hydra_launcher(common + swept[0])
    if "cluster.backend" in keys:  # a profile's own: slurm's keys run here, or local's (a week's --time) queued
        raise ConfigError("cluster.backend is the cluster profile's own: choose it with cluster=local or "
                          "cluster=slurm (or a site's profile), not cluster.backend=")
    if "hydra.sweep.dir" in {_key(o) for o in swept[0]}:
        raise ConfigError("hydra.sweep.dir is the one folder of a sweep and cannot be swept; submit a sweep per folder")
    if "hydra.sweep.dir" in keys and not multirun:  # Hydra reads it only for a multirun: ignored, silently
        raise ConfigError("hydra.sweep.dir is the folder of a sweep and read only with -m: add -m to submit a sweep, "
                          "or give hydra.run.dir=... for one run")
    sweep_dir = _sweep_folder(common, swept, keys) if multirun else None
    if sweep_dir is not None:
        _refuse_dropped_keys(sweep_dir, common, {_key(o) for o in swept[0]})
    group = sweep_group(sweep_dir) if sweep_dir is not None else None
    points, cluster, warned, compiler_found, env_checked = [], None, set(), False, False
    fetch = {}  # (dataset, root) -> its data config: what data.download=true would fetch in every job
    held_points = point_folders(sweep_dir) if sweep_dir is not None else {}
    # a sweep's points asked of squeue in one call (check_run_folder asks each point's job)
    dirs = [_point_dir(sweep_dir, s, held_points) for s in swept] if sweep_dir is not None else []
    with asked_ahead(recorded_jobs(dirs)):
        for s in swept:
            ov = common + s
            if sweep_dir is not None:
                run_dir = _point_dir(sweep_dir, s, held_points)
                ov = ov + [f"hydra.run.dir={hydra_value(run_dir, 'hydra.run.dir')}"]
                if "wandb.group" not in {_key(o) for o in common + s}:
                    ov.append(f"wandb.group={hydra_value(group, 'wandb.group')}")
            try:
                c = compose(ov)
            except NameSwap as e:  # the advice names this point's value: a swept name wants the group swept instead
                swept_name = [o for o in overrides
                              if _key(o) == f"{e.group}.name" and any(_key(x) == _key(o) for x in s)]
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
            try:
                check_present(c.cfg.data)
            except ConfigError as e:
                raise ConfigError(with_recorded_root(e, c, check_present)) from None
            # a file damaged inside, a subset (or a drop_last batch) larger than the files: now, not after the queue
            check_files(c.cfg.data, _drop_last_batch(c.cfg))
            if to_download(c.cfg.data):
                fetch.setdefault((c.cfg.data.name, c.cfg.data.root), c.cfg.data)
            if c.cfg.data.root != given_root and c.cfg.data.name != "synthetic":  # the jobs may start elsewhere
                ov = [o for o in ov if _key(o) != "data.root"] + [
                    f"data.root={hydra_value(c.cfg.data.root, 'data.root')}"]
            mine = validate_cluster(c.cluster, c.cfg)
            if mine["backend"] == "slurm" and shutil.which("sbatch") and (no_conf := slurm_conf_missing()):
                raise ConfigError(no_conf)  # at once: every Slurm command would retry it for 60 s
            if mine["backend"] == "local" and c.cfg.trainer.compile and not compiler_found:
                _check_local_compiler(c.cfg)  # the job runs on this machine: its compiler is found (or not) here
                compiler_found = True
            dated = dated_dir_warning(c, "hydra.run.dir", c.run_dir) if sweep_dir is None else []
            # a swept key's said once for the sweep, not per value
            for said in c.cfg.warnings() + unread_said(c, s) + dated + outranked_env(c.cfg.wandb):
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
                listed = [k for k in keys_ if k in ("partition", "exclude", "constraint", "additional_parameters")]
                said = [o for o in overrides if _key(o).split(".")[:2] == ["cluster", listed[0]] and "(" not in o
                        and "," in o] if listed else []  # additional_parameters' own key: mail-type=END,FAIL
                # Slurm's own comma lists (sbatch -p a,b: the first partition that can start it) are one value, quoted
                quoted = said[-1].replace("=", '="', 1) + '"' if said else ""
                one = f"; for Slurm's list, quote it as one value: {shlex.quote(quoted)}" if said else ""
                raise ConfigError(f"the sweep varies {diff}: one job array has one resource shape; submit one sweep "
                                  f"per cluster setting instead{one}")
            if cluster is None and len(swept) > 1 and sweep_dir is not None:
                _check_array_size(len(swept), mine, sweep_dir)
            cluster = mine
            if sweep_dir is None:  # pinned absolute, in place of the one given
                ov = [o for o in ov if _key(o) != "hydra.run.dir"] + [
                    f"hydra.run.dir={hydra_value(c.run_dir, 'hydra.run.dir')}"]
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
        a, b = [swept[i] for i, d in enumerate(dirs) if d == twice][:2]
        if sorted(a) == sorted(b):
            raise ConfigError(f"two sweep points map to the same run folder {twice.name}; give each swept value once")
        raise ConfigError(f"the sweep points {','.join(a)} and {','.join(b)} map to the same run folder {twice.name} "
                          f"(a folder name keeps letters, digits and _.,=+- of the values, the rest become _); give "
                          f"values that differ in those, or submit them as separate sweeps")
    _check_distinct_configs(points)
    if sweep_dir is not None:
        _refuse_retraining(points, sweep_dir, {_key(o) for o in swept[0]})
        if "hydra.sweep.dir" not in keys:
            _refuse_retraining_elsewhere(points, sweep_dir)
    _check_launch(points, cluster, dry_run, sweep_dir)
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


def _sweep_folder(common: list[str], swept: list[list[str]], keys: set[str]) -> Path:
    """The folder of a sweep (-m): hydra.sweep.dir as given, else the default named by the sweep (or an earlier
    version's name for it, where that folder exists and the new one does not); checked before any point."""
    from .compose import check_sweep_dir, compose, dated_dir_warning
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
    return sweep_dir


def _point_dir(sweep_dir: Path, swept: list[str], held: dict) -> Path:
    """The folder of the sweep point `swept`: an older sweep's named with its key's + or ++ where that one is held."""
    run_dir = sweep_dir / point_dirname(swept)
    return run_dir if run_dir.exists() else point_folder(held, run_dir.name) or run_dir


def _refuse_dropped_keys(sweep_dir: Path, common: list[str], swept: set[str]) -> None:
    """Points added to a sweep must sweep every key that names its point folders (README, "Submitting a sweep
    again"): a key given as one value (seed=2 for choice(2)), or not at all, named a folder without it beside the
    others (optim.lr=0.01 beside optim.lr=0.01,seed=0), and the next such point was refused as another config."""
    from .jobs import DamagedFile, read_record
    try:
        recs = (read_record(sweep_dir / "sweep.json") or {}).get("jobs") or []
    except DamagedFile:
        return
    names = [Path(r["run_dir"]).name for r in recs if isinstance(r, dict) and isinstance(r.get("run_dir"), str)]
    # a name cut to NAME_MAX (sweep.fit_name) may end in part of a key: left out
    named = [set(_folder_keys(n)) for n in names if len(n.encode()) < 200]
    dropped = sorted(set.intersection(*named) - swept) if named else []
    if dropped:
        given = {_key(o): o for o in common}
        said = [f"{k}=choice({given[k].split('=', 1)[1]})" if k in given else f"{k}=choice(<value>)" for k in dropped]
        raise ConfigError(f"{', '.join(dropped)} name{'s' if len(dropped) == 1 else ''} this sweep's point folders "
                          f"({names[0]}, ...) but {'is' if len(dropped) == 1 else 'are'} not swept now, so the new "
                          f"points would be named without {'it' if len(dropped) == 1 else 'them'}: give "
                          f"{' '.join(shlex.quote(x) for x in said)} to keep {'it' if len(dropped) == 1 else 'them'} "
                          f"swept (README, \"Submitting a sweep again\")")


def _check_launch(points: list[Point], cluster: dict, dry_run: bool, sweep_dir: Optional[Path]) -> None:
    """What the points ask of the launcher as a whole: the Slurm commands, the threads a task's CPUs hold, a
    local sweep's processes at once; warnings of what is legal but rarely meant."""
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
    if cluster["backend"] == "slurm" and not missing:
        _check_dependency((cluster.get("additional_parameters") or {}).get("dependency"))
    todo = sum(p.skip is None for p in points)
    busy = _running_here(sweep_dir, {p.run_dir for p in points if p.skip is None}) \
        if todo and cluster["backend"] == "local" and sweep_dir is not None else 0
    if cluster["backend"] == "local" and todo + busy > cluster["array_parallelism"]:
        also = f" ({todo} to start, {busy} still running)" if busy else ""
        raise ConfigError(f"cluster=local starts every sweep point at once, and this sweep has {todo + busy}{also} > "
                          f"cluster.array_parallelism={cluster['array_parallelism']}; set "
                          f"cluster.array_parallelism={todo + busy} if this machine can run them together"
                          + (", or submit again once they have ended" if busy else ""))


def _check_dependency(dependency) -> None:
    """cluster.additional_parameters.dependency naming a job that has ended otherwise than it asks (afterok on one
    that failed, afternotok on one that completed): Slurm queues the job anyway, pending for good
    (DependencyNeverSatisfied). Only where each listed dependency must hold (`,`): with `?` any one may. A job
    array's id asks for all its tasks: afterok for each to complete, afternotok for any one not to (sbatch(1))."""
    if not dependency or "?" in str(dependency):
        return
    for kind, ids in re.findall(r"\b(afterok|afternotok):([0-9_:+]+)", str(dependency)):
        for job in filter(None, ids.split(":")):
            job = job.split("+")[0]
            ends = ended_states(job)
            if not ends:  # queued or running (a task of it), or unknown to Slurm: left to Slurm
                continue
            done = [e == "COMPLETED" for e in ends]
            if all(done) if kind == "afternotok" else not all(done):
                how = next(e for e in ends if (e == "COMPLETED") == (kind == "afternotok"))
                raise ConfigError(f"cluster.additional_parameters.dependency={dependency}: job {job} ended {how}"
                                  f"{' (a task of it)' if len(ends) > 1 else ''}, so {kind}:{job} never holds and the "
                                  f"job would wait in the queue for good (DependencyNeverSatisfied); drop it, or name "
                                  f"a job that {'completes' if kind == 'afterok' else 'fails'} (afterany:{job} starts "
                                  f"after it, whatever its end)")


def _running_here(sweep_dir: Path, starting: set) -> int:
    """How many of the sweep's points, but for those `starting` now, have a cluster=local job running: they run
    beside the new ones. Read from each point's own record, whichever submit (of this sweep, or a point's own)
    made it."""
    from .jobs import DamagedFile, local_state, read_record
    n = 0
    for folder in point_folders(sweep_dir).values():
        try:
            rec = read_record(folder / "submission.json") if folder not in starting else None
        except DamagedFile:
            continue
        n += bool(rec and rec.get("backend") == "local" and rec.get("job_id") and local_state(rec) == "RUNNING")
    return n


def _check_local_compiler(cfg) -> None:
    """trainer.compile=true of a cluster=local job: the compiler its first step builds with, checked here, where
    the job runs (train would refuse it there, after submit said it started)."""
    from .launch_checks import check_compiler, uses_cuda
    check_compiler(uses_cuda(cfg.trainer))


def hold_asked(cluster: dict) -> bool:
    """The user's own cluster.additional_parameters.hold: submit leaves its jobs held."""
    return bool((cluster.get("additional_parameters") or {}).get("hold"))


def _drop_last_batch(cfg) -> Optional[int]:
    return cfg.trainer.batch_size if cfg.trainer.drop_last else None


def _refuse_inherited_ranks() -> None:
    """torchrun's RANK and WORLD_SIZE left in this shell: the jobs inherit the environment (sbatch's default
    --export=ALL; a local controller's tasks), where every rank reads them before Slurm's or the launcher's own
    (distributed.detect_env), all took rank 0 and waited for peers that never came, after the queue."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise ConfigError(f"RANK={os.environ['RANK']} and WORLD_SIZE={os.environ['WORLD_SIZE']} are set in this "
                          f"shell (left by torchrun, or set by hand?): the jobs would inherit them and every task "
                          f"take them for its rank over the launcher's, waiting for peers that never come; "
                          f"unset RANK WORLD_SIZE, then submit again")


# what a job imports that `submit` has not when it checks (measured with python -X importtime: a job with W&B offline,
# its entry point submitit.core._submit, torch.compile's inductor and Triton's; tests/test_launcher.py checks the
# first two against real ones)
LATE_IMPORTS = {"submitit", "cloudpickle", "setuptools", "resource", "pdb", "_elementtree", "_lsprof", "_statistics",
                "_strptime", "_zoneinfo", "annotated_types", "cProfile", "certifi", "charset_normalizer", "click",
                "colorsys", "filelock", "fractions", "functorch", "getpass", "google", "html", "idna", "jinja2",
                "markupsafe", "mimetypes", "mpmath", "networkx", "opentelemetry", "platformdirs", "profile", "pstats",
                "pty", "pydantic", "pydantic_core", "pyexpat", "requests", "statistics", "stringprep", "sympy",
                "termios", "triton", "tty", "typing_inspection", "urllib3", "xml", "xxhash", "zoneinfo", "wandb",
                "torchvision", "PIL"}


def job_modules() -> set:
    """The top-level modules a job imports: what this process imported (torch, Hydra and much of Python's own, as
    the job does), what the job imports later, and this package's dependencies and theirs. Not every module there
    is: a code.py or test.py beside Python's own shadows nothing the job reads."""
    return {m.partition(".")[0] for m in list(sys.modules)} | LATE_IMPORTS | _dependency_modules()


def _dependency_modules() -> set:
    """The top-level modules of the installed allconv-hpc's dependencies, and of theirs; none where it runs from a
    source folder, not installed."""
    import importlib.metadata as md
    seen, todo, names = set(), ["allconv-hpc"], set()
    while todo:
        key = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(key)
        except md.PackageNotFoundError:
            continue
        todo += [m.group(0) for r in dist.requires or () if "extra ==" not in r
                 and (m := re.match(r"[A-Za-z0-9_.-]+", r))]
        top = dist.read_text("top_level.txt")
        names |= ({n.strip().split("/")[0] for n in top.split()} if top else
                  {f.parts[0].removesuffix(".py") for f in dist.files or () if f.parts and f.parts[0] != ".."})
    return names


def _refuse_shadowing_modules(cwd: Path) -> None:
    """A module in this folder named as one the job imports (random.py, grp.py, a folder torch/ with an
    __init__.py): the job runs here, and its `python -m` (submitit's, the local controller's) puts this folder
    first on sys.path, so it imports that one in place of Python's or the package's, failing after the queue in
    words of that module. Not this package's own source (a checkout submitted from its root)."""
    import importlib.machinery as machinery
    ours = Path(__file__).resolve().parent
    imported = job_modules()
    elsewhere = [p for p in sys.path if p not in ("", ".") and Path(p).absolute() != cwd.absolute()]
    clash = []
    try:
        entries = sorted(os.scandir(cwd), key=lambda e: e.name)
    except OSError:  # unreadable: what is there cannot shadow anything the job could import either
        return
    for e in entries:
        name = (e.name[:-3] if e.name.endswith(".py") and e.is_file() else
                e.name if e.is_dir() and os.path.isfile(os.path.join(e.path, "__init__.py")) else None)
        if (name not in imported or name in sys.builtin_module_names or Path(e.path).resolve() == ours
                or machinery.FrozenImporter.find_spec(name) is not None):  # imported before sys.path is read
            continue
        if machinery.PathFinder.find_spec(name, elsewhere) is not None:
            clash.append(e.name)
    if clash:
        raise ConfigError(f"{cwd} holds {', '.join(clash)}, named as module(s) of Python or of an installed package: "
                          f"the job runs in this folder, and its `python -m` puts it first on sys.path, so the job "
                          f"would import these in their place (failing after the queue); submit from another folder, "
                          f"or rename them")


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


def _folder_keys(name: str) -> list[str]:
    """The keys a sweep point's folder name gives (sweep.point_dirname: `optim.lr=0.05,seed=0`)."""
    return [_key(seg) for seg in name.split(",") if "=" in seg]


def _held_config(folder: Path):
    """The config a point folder holds: what its run recorded (.hydra/config.yaml), else, for a point queued but not
    started yet (hours, on a busy cluster), what the overrides of its submission compose to; None if neither reads."""
    from .checkpoint import recorded_config
    from .compose import compose
    cfg = recorded_config(folder, warn=False)
    if cfg is not None:
        return cfg
    rec = read_json(folder / "submission.json")
    overrides = rec.get("overrides") if isinstance(rec, dict) else None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        return None
    try:
        return compose(overrides).cfg
    except (ConfigError, ValueError, TypeError):  # of another version of this code: nothing to compare with
        return None


def _refuse_retraining(points: list[Point], sweep_dir: Path, swept: set[str]) -> None:
    """A point whose config another point folder of the sweep holds under another name (a key newly swept:
    optim.lr=0.05,0.1 where seed alone was) would train that config again from scratch, a second W&B run of it
    in the group: refused, naming both (the configs as train records them, .hydra/config.yaml). Not where the
    two differ in a swept key a resume may change (a sweep over trainer.epochs: one identity, distinct runs)."""
    import dataclasses
    new = {p.run_dir: p for p in points if p.skip is None and p.cfg is not None}
    try:
        others = [d for d in sweep_dir.iterdir() if d.is_dir() and d not in new]
    except (FileNotFoundError, NotADirectoryError):
        return
    held: dict[str, list] = {}
    for d in sorted(others):
        cfg = _held_config(d)
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
            named = [k for k in _folder_keys(d.name) if k not in swept]
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
    if (sweep_dir / "sweep.json").exists():  # this sweep's own folder: _refuse_retraining looks inside
        return
    prefix = sweep_dir.name.rpartition("-")[0].replace("+", "") + "-"  # an older sweep's keys kept their + and ++
    try:
        others = sorted(d for d in sweep_dir.parent.iterdir() if d.name.replace("+", "").startswith(prefix)
                        and d != sweep_dir and (d / "sweep.json").exists())
    except OSError:
        return
    for other in others:
        theirs = point_folders(other)  # (an older sweep's are named with a key's + or ++)
        held = [p for p in points if p.skip is None and p.cfg is not None
                and (q := point_folder(theirs, p.run_dir.name)) is not None
                and (cfg := _held_config(q)) is not None and _identity_key(cfg) == _identity_key(p.cfg)]
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


def grow_hint(points: list[Point]) -> str:
    return " (trainer.epochs=N grows a completed run)" if any(p.skip == "completed" for p in points) else ""


def _check_name_max(folder: Path, what: str, fix: str) -> None:
    """Each folder name still to be made fits the file system's NAME_MAX: refused here, with the fix, not later by
    a mkdir or a read of the records in it ("File name too long"), which a dry run never reaches."""
    said = name_too_long(folder)
    if said:
        raise ConfigError(f"{what}: {said}; {fix}")

"""`allconv-hpc submit`: validate every point on the login node, then hand them to submitit and return.

A sweep (`-m`, Hydra's sweep syntax) becomes one Slurm job array; each point gets a deterministic
run folder named from its swept overrides (never a timestamp, so a requeued task finds its
checkpoint) and one W&B group for the sweep. Everything that could fail in the queue is checked
first (plan.py): the composed config, the dataset at `data.root`, the batch vs the job's world size,
and every value that goes into the sbatch script; this module queues what the plan holds.
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

from .config import ConfigError
from .executor import (base_job_ids, check_can_start, make_executor, release_held, sbatch_refused, sbatch_said,
                       sbatch_script)
from .folder_checks import check_run_folder
from .fsio import read_json, write_atomic
from .jobs import asked_ahead, recorded_jobs
from .localjob import DEATH_SIGNAL, LOCAL_PORT_ENV, controller_gone, end_local_peers, free_ports
from .plan import sweep_group, grow_hint, hold_asked, plan
from .preempt import AGREED_EXITS, EXIT_REQUEUED, SIGNAL_LEAD_ENV, ignore_late_signals, sigint_deferred
from .resources import signal_name
from .submit_lock import submit_lock
from .sweep import Point


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
            code = run(self.overrides, submitted=True, entry_point=True)
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


def submit(points: list[Point], sweep_dir: Optional[Path], cluster: dict, until: contextlib.ExitStack,
           attach: bool = False, command: Optional[list[str]] = None) -> tuple[list, list]:
    """Submit the points not marked `skip` (one job, or one array); returns their submitit jobs, and the Ctrl-Cs
    that came from sbatch on until `until` closes (the caller's: its lines naming the queued jobs are said first;
    KeyboardInterrupt where one stopped sbatch, nothing queued). Under the folder's lock every point is checked
    again first (another submit may have queued it since `plan`); a point now refused raises ConfigError, one now
    queued by a sweep's other submit is skipped. `attach` (submit --wait): a cluster=local job stays in this
    terminal's session (executor.make_executor). `command`: the submit command, recorded with each job (`status`
    names it as the one that goes on with a run it left stopped)."""
    todo = [p for p in points if p.skip is None]
    base = sweep_dir if sweep_dir is not None else todo[0].run_dir
    check_can_start(points, sweep_dir, cluster)
    jobs, got = None, []
    try:
        with submit_lock(base):
            with asked_ahead(recorded_jobs([p.run_dir for p in todo])):  # asked again, now, in one call
                for p in todo:
                    if p.cfg is not None:
                        p.skip = check_run_folder(p.run_dir, p.cfg, sweep=sweep_dir is not None, overrides=p.overrides)
            # from sbatch until the jobs are recorded, released and said: a Ctrl-C then left queued jobs
            # unrecorded (a second submit queued them again) or held, or said "nothing was queued"
            got = until.enter_context(sigint_deferred(take=False))
            jobs = _submit_locked(points, sweep_dir, cluster, base, attach, command)
        if jobs and cluster["backend"] == "slurm" and not hold_asked(cluster):
            release_held(jobs)  # after the lock: a failure must not remove the folders of queued jobs
    except ConfigError:
        if got and jobs is None:  # the terminal's Ctrl-C reached sbatch too, which queued nothing
            raise KeyboardInterrupt from None
        raise
    return jobs, got


def _submit_locked(points: list[Point], sweep_dir: Optional[Path], cluster: dict, base: Path,
                   attach: bool = False, command: Optional[list[str]] = None) -> list:
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
        raise sbatch_refused(sbatch_said(str(e)), cluster.get("partition")) from None
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
            if command:
                rec["command"], rec["cwd"] = command, os.getcwd()  # relative values in it are taken from there
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
    # a point is its folder's name: the sweep folder moved, copied or reached through a link since records its
    # points under another path, and keyed by the path each was tracked twice (`status` listed it twice)
    earlier = {Path(r["run_dir"]).name: r for r in old.get("jobs") or []
               if isinstance(r, dict) and isinstance(r.get("run_dir"), str)}  # (a name twice: its last record)
    new = {Path(r["run_dir"]).name: {**r, "cluster": cluster} for r in records}
    # a point in this sweep but not submitted now: the record of its last submission (or none)
    now_doc = {p.run_dir.name: new.get(p.run_dir.name) or _earlier_record(p.run_dir) for p in every}
    jobs_doc = [now_doc.pop(name, r) for name, r in earlier.items()] + list(now_doc.values())
    _write_sweep_doc(sweep_dir, cluster, now, jobs_doc)


def _write_sweep_doc(sweep_dir: Path, cluster: dict, now: float, jobs: list[dict]) -> None:
    _write_json(sweep_dir / "sweep.json", {"sweep_dir": str(sweep_dir), "submitted": now, "cluster": cluster,
                                           "wandb_group": sweep_group(sweep_dir), "jobs": jobs})


def _restore_sweep_record(points: list[Point], sweep_dir: Path, cluster: dict) -> None:
    """Nothing to submit, and sweep.json lost or damaged (as `status` reads it): written anew from the records of
    its points, this command's and any other point folder's (a later submit's added points), as the fix `status`
    gives for it says (a submit of a sweep whose every point is done left the folder without one)."""
    from .jobs import DamagedFile
    from .status import job_records
    with submit_lock(sweep_dir):  # read under it: another submit may be writing it now
        try:
            if (sweep_dir / "sweep.json").is_file() and job_records(sweep_dir):
                return
        except DamagedFile:
            pass
        docs = {p.run_dir.name: _earlier_record(p.run_dir) for p in points}
        for d in sorted(sweep_dir.iterdir()):
            rec = read_json(d / "submission.json") if d.is_dir() and d.name not in docs else None
            if rec and isinstance(rec.get("run_dir"), str):
                docs[d.name] = rec
        _write_sweep_doc(sweep_dir, cluster, time.time(), list(docs.values()))
    print(f"wrote {sweep_dir / 'sweep.json'} anew from its points' records")


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
                                        "anything was queued (or held jobs it could not release: it names them), 130 "
                                        "a Ctrl-C (it says whether anything was queued); with --wait also 1 a job "
                                        "failed, 3 none failed but a run stopped unfinished (a signal, max_requeues, a "
                                        "scancel before it started: resumable), 130 stopped watching")
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
    with contextlib.ExitStack() as until_said:  # a Ctrl-C once jobs are queued: taken after they are said
        return _submit_main(args, overrides, until_said)


def _submit_main(args, overrides: list[str], until_said: contextlib.ExitStack) -> int:
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
                print(f"nothing to submit: every run is completed or queued{grow_hint(points)}")
            return 0
        command = ["allconv-hpc", "submit", *(["-m"] if args.multirun else []), *overrides]
        jobs, interrupted = (submit(points, sweep_dir, cluster, until_said, attach=args.wait, command=command)
                             if any(p.skip is None for p in points) else ([], []))
        if sweep_dir is not None and not jobs and not interrupted:
            _restore_sweep_record(points, sweep_dir, cluster)
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
    if jobs and cluster["backend"] == "slurm" and hold_asked(cluster):
        ids = " ".join(base_job_ids(jobs))  # an array: its job id releases all
        print(f"held, as cluster.additional_parameters.hold asks: nothing starts until scontrol release {ids}")
    where = sweep_dir if sweep_dir is not None else points[0].run_dir
    if not todo:
        print(f"nothing to submit: every run is completed or queued{grow_hint(points)}")
    print(f"{'sweep' if sweep_dir is not None else 'run'} folder: {where}")
    print(f"watch it with: allconv-hpc status {shlex.quote(str(where))}")
    sys.stdout.flush()
    until_said.close()  # Ctrl-C as usual from here: the watching's own
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

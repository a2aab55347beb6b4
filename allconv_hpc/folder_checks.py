"""May a job train into this run folder now? What `submit` checks of each point's folder, again under the
submit lock: a job queued or running there, a run of another config, a run that completed, a run whose job still
ends; and what it warns of (a run started over, one that diverged)."""
from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Optional

from . import runlock
from .config import ConfigError
from .fsio import read_json
from .jobs import is_completed, is_diverged
from .resources import warn
from .sweep import Point


def check_run_folder(run_dir: Path, cfg, sweep: bool = False, overrides: Optional[list] = None) -> Optional[str]:
    """Refuse a run folder that a queued job still trains into, or whose checkpoint is of another config
    (what the trainer would refuse on resume, found here before anything is queued). Returns why the
    run needs no new job: "completed" (all trainer.epochs done), or, for a sweep point, its queued job
    (a resubmitted sweep fills in the rest); None when it does."""
    from .jobs import (ACTIVE_STATES, JOB_KEYS, NO_ANSWER, DamagedFile, check_keys, held_advice, is_held,
                       never_starts, queued, queued_state, read_record, squeue_silence, started_unrecorded, stop_command,
                       trains_elsewhere)

    sub = run_dir / "submission.json"
    try:  # status's reading: a damaged record is named with its fix
        rec = read_record(sub)
        if rec is not None:
            check_keys(rec, JOB_KEYS, sub)
    except DamagedFile as e:
        raise ConfigError(str(e)) from None
    if rec is not None and not trains_elsewhere(rec, run_dir):  # (a copy's job trains the original)
        state, reason = queued(rec)
        never = never_starts(reason, rec["job_id"]) if state == "PENDING" else None  # waiting would never end
        if state == NO_ANSWER:  # it may still run: a second job could train into the same folder
            raise ConfigError(f"squeue did not answer whether job {rec['job_id']}, the last one submitted into "
                              f"{run_dir}, is still queued or running ({squeue_silence(rec['job_id'])}); submit again "
                              f"when `squeue -j {rec['job_id']}` answers")
        if state == "COMPLETING" and sweep:  # a stopped point is resumed by the next submit, not this one
            return (f"job {rec['job_id']} is still ending (COMPLETING); if it did not complete the run, submit "
                    f"again in a few seconds")
        if state in ACTIVE_STATES and sweep:
            changes = _changes(rec.get("overrides") or [], overrides) if overrides is not None else ""
            if changes:  # key by key, the last of a key given twice (as Hydra reads them), in any order
                _check_resumable_later(run_dir, cfg, rec, state, "hydra.sweep.dir")
            if never:  # skipped, and said: this submit does not start it either
                return f"job {rec['job_id']} (PENDING, {never})"
            if is_held(state, reason):  # "submit again when it has ended" would wait for ever
                with_ = f"; it runs with the settings it was submitted with, not these ({changes})" if changes else ""
                return (f"job {rec['job_id']} (PENDING, {held_advice(rec, reason)}): it starts once released{with_}; "
                        f"or stop it ({stop_command(rec)}) and submit again")
            if changes:
                return (f"job {rec['job_id']} ({state}) runs it with the settings it was submitted with, not these "
                        f"({changes}); submit again when it has ended to apply them")
            return f"job {rec['job_id']} ({state})"
        if state == "COMPLETING":  # cancelled or done, its processes still ending: nothing to stop
            raise ConfigError(f"run folder {run_dir} has job {rec['job_id']} still ending (COMPLETING); a second job "
                              f"would train into the same folder: submit again in a few seconds")
        if state in ACTIVE_STATES:
            if never:
                raise ConfigError(f"run folder {run_dir} already has job {rec['job_id']} (PENDING, {never}); a second "
                                  f"job would train into the same folder: submit again once it has ended")
            if is_held(state, reason):  # waiting would never end
                raise ConfigError(f"run folder {run_dir} already has job {rec['job_id']} (PENDING, "
                                  f"{held_advice(rec, reason)}); a second job would train into the same folder: "
                                  f"release it, or stop it ({stop_command(rec)}) and submit again")
            if cfg is not None and "overrides" in rec:  # another config, refused once the job ended: said now
                _check_resumable_later(run_dir, cfg, rec, state, "hydra.run.dir")
            raise ConfigError(f"run folder {run_dir} already has job {rec['job_id']} ({state}); a second job would "
                              f"train into the same folder: wait for it (allconv-hpc status "
                              f"{shlex.quote(str(run_dir))}) or stop it ({stop_command(rec)}), then submit again")
    started = started_unrecorded(run_dir, rec)
    if started is not None and not started.get("copy_of"):
        job, state = started["job_id"], queued_state(started)
        if state == NO_ANSWER and shutil.which("squeue"):  # no Slurm here at all: a folder copied from a cluster
            raise ConfigError(f"squeue did not answer whether job {job}, which {run_dir / 'status.json'} says trains "
                              f"into {run_dir}, is still queued or running ({squeue_silence(job)}); submit again when "
                              f"`squeue -j {job}` answers")
        if state in ACTIVE_STATES and sweep:
            return f"job {job} ({state}), started without submit"
        if state in ACTIVE_STATES:
            raise ConfigError(f"run folder {run_dir} already has job {job} ({state}) training into it (started without "
                              f"submit, e.g. sbatch slurm/train.sbatch); a second job would train into the same "
                              f"folder: wait for it (allconv-hpc status {shlex.quote(str(run_dir))}) or stop it "
                              f"(scancel {job}), then submit again")
    held, who = runlock.holder(run_dir)  # a train started by hand, which no record names
    if held and sweep:
        return f"{who} trains it now"
    if held:
        raise runlock.RunBusy(run_dir, who)
    from .checkpoint import CheckpointError, check_resume
    try:
        ts = check_resume(run_dir, cfg, folder_key="hydra.sweep.dir" if sweep else "hydra.run.dir",
                          also=lambda ck, path: _check_same_images(ck, path, cfg))
    except (CheckpointError, ConfigError) as e:  # every checkpoint unusable or unreadable, another config...
        raise ConfigError(str(e)) from None  # ...: the job could only fail on it
    if ts is None:
        return None
    if overrides is not None:
        from .compose import check_growth
        check_growth(run_dir, cfg.trainer.epochs, overrides, "hydra.sweep.dir" if sweep else "hydra.run.dir")
    if is_completed(read_json(run_dir / "status.json"), ts.get("epoch"), cfg.trainer.epochs) \
            and not ts.get("step_in_epoch"):
        return "completed"  # a job would start only to find nothing to do
    return None


# what the submit reads, not the job: a sweep's whole (how many of its points run at once)
SUBMIT_ONLY = {"cluster.array_parallelism"}


def _changes(before: list[str], now: list[str]) -> str:
    """The overrides of `now` that differ from those `before` (a job's), key by key. hydra.* only says where (the
    folder here, whichever way it was named: status's sweep command names it), not what the job trains."""
    from .compose import override_key
    # a key's + or ++ says how Hydra applies it, not what it gives (++optim.lr=0.1 is optim.lr=0.1)
    was, now_ = ({override_key(o): o.lstrip("+") for o in ovs if not override_key(o).startswith("hydra.")
                  and override_key(o) not in SUBMIT_ONLY} for ovs in (before, now))
    said = [f"{now_[k]} given now, {f'the job has {was[k]}' if k in was else 'not in the job'}" if k in now_ else
            f"{was[k]} in the job, left out now" for k in sorted(set(was) | set(now_)) if was.get(k) != now_.get(k)]
    return "; ".join(said)


def _check_resumable_later(run_dir: Path, cfg, rec: dict, state: str, folder_key: str) -> None:
    """A run whose job runs, resubmitted with other overrides: a change its resume may take (more epochs,
    wandb.*) waits for the job to end; another config would be refused then, so it is refused now."""
    from .compose import compose
    if cfg.checkpoint.resume == "never":  # a start over, which takes any config once the job has ended
        return
    try:
        theirs = compose(list(rec.get("overrides") or [])).cfg
    except ConfigError:  # the job's overrides no longer compose (the config files changed): its resume tells
        return
    try:
        cfg.check_resumable(theirs.identity(), run_dir, folder_key=folder_key)
    except ConfigError as e:
        raise ConfigError(f"{e}; job {rec['job_id']} ({state}) trains it now, with the config it was submitted "
                          f"with") from None


def _check_same_images(ck: dict, path: Path, cfg) -> None:
    """The job's own check (resume.other_images_said), before the queue, where the run is resubmitted with another
    data.root than it trained on (a moved copy passes; a rebuilt or another dataset is refused). The same folder
    is left to the job: reading the data for every point would cost a second or so each."""
    from .resume import other_images_said, trained_root
    then = trained_root(ck)
    if (not isinstance(ck.get("data"), dict) or cfg.data.name == "synthetic" or not then
            or then == os.path.normpath(cfg.data.root)):
        return
    from .data import fingerprint, load, to_download
    if to_download(cfg.data):  # fetched once every check passed: the job compares
        return
    said = other_images_said(ck, fingerprint(load(cfg.data, cfg.seed)), path, cfg.data)
    if said:
        raise ConfigError(said)


def warn_starts_over(points: list[Point]) -> None:
    """checkpoint.resume=never on folders that hold a run: legal (the old files are kept), but a completed run
    started over, or a whole sweep started again for one point, costs its compute: said before it queues."""
    from .checkpoint import CheckpointDir
    held = [p.run_dir for p in points if p.skip is None and p.cfg.checkpoint.resume == "never"
            and (CheckpointDir(p.run_dir / "checkpoints", p.cfg.checkpoint.keep).exists()
                 or (p.run_dir / "history.csv").exists())]
    if not held:
        return
    done = sum(read_json(d / "status.json").get("state") == "completed" for d in held)
    names = ", ".join(str(d) for d in held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
    warn(f"checkpoint.resume=never starts {len(held)} run(s) over that hold training ({done} completed): {names}; "
         f"their files move to checkpoints.oldN/ in each folder. Without it, each resumes (a completed one is "
         f"skipped)")


def warn_diverged(run_dir: Path, cfg, sweep: bool = False) -> None:
    """A run that stopped on a non-finite loss resumes the checkpoint it diverged after: said before it queues. A
    sweep's point: resume=never or a new hydra.sweep.dir would train every point again, the completed ones too."""
    from .checkpoint import CheckpointDir
    st = read_json(run_dir / "status.json")
    if cfg.checkpoint.resume == "never" or not is_diverged(st):
        return
    ckpts = CheckpointDir(run_dir / "checkpoints", cfg.checkpoint.keep)
    if ckpts.exists():
        newest = ckpts.step_files()
        at = f" (step {int(newest[0].stem[5:])})" if newest else ""  # status.json's step is the checkpoint's
        what = f"its job resumes the newest checkpoint kept{at} and will likely diverge again"
    else:  # it diverged before its first checkpoint: the job starts over with the same config
        what = "it diverged before its first checkpoint, and its job starts over with the same config"
    fix = ("leave its value out of the sweep (choice(...) of the others) and sweep a lower optim.lr as new points; "
           "checkpoint.resume=never, or a new hydra.sweep.dir, would train every point again" if sweep else
           "lower optim.lr in a new hydra.run.dir, or add checkpoint.resume=never to start it over (the old run is "
           "kept)")
    said = str(st["error"]).split(";")[0]  # where it was found: "non-finite loss or weights found at global step 8
    warn(f"{run_dir} stopped on a {said}; {what}: {fix}")  # (epoch 1)", "non-finite loss in epoch 7 (...)"

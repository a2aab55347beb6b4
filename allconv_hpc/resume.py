"""What a resume carries over: the training state besides the weights, the random streams, the
optimizer and schedule as the checkpoint left them, and the checks on what the old run left behind
(best.pt, a schedule stretched to a new length), and the collective decisions of a start (resume or start over,
which file), taken with the trainer's process group (distributed.Dist)."""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .augment import DROPOUT_STREAM, mix_seed
from .checkpoint import CheckpointDir, CheckpointError, load_file
from .config import Config, DataConfig
from .data import other_images
from .fsio import read_json
from .slurm import SlurmJob
from .schedule import lr_factor

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything besides model/optimizer that a resume needs (all picklable under weights_only)."""
    epoch: int = 0                  # current epoch (0-based); == epochs when done
    step_in_epoch: int = 0          # optimizer steps done in this epoch; == steps_per_epoch: eval pending
    global_step: int = 0
    best_val_acc: float = -1.0
    history: list = field(default_factory=list)
    epoch_seconds: float = 0.0      # training+eval seconds spent in this epoch before the last stop
    timeouts: int = 0               # requeues after time limits so far, in the Slurm job `timeouts_job`
    timeouts_job: Optional[str] = None
    wandb_id: Optional[str] = None
    streams: int = 2                # random streams version: 1 = a run begun before order and augmentation were apart
    # the lr of the last step taken (history's lr column): kept, since a resume with another trainer.epochs (which
    # cosine and onecycle stretch to) would recompute another for a step already taken (a stop in an evaluation)
    lr_used: Optional[float] = None

    def count_timeout(self, job_id: str, max_requeues: int) -> bool:
        """Count a time-limit warning of Slurm job `job_id`; False once max_requeues are used up.
        Each submission has its own budget: resubmitting a run that gave up (a new job id) starts at 0."""
        if self.timeouts_job != job_id:
            self.timeouts, self.timeouts_job = 0, job_id
        if self.timeouts >= max_requeues:
            return False
        self.timeouts += 1
        return True


def applied_mode(mode: str, slurm: SlurmJob, dist, is_main: bool, marker: Path) -> tuple[str, Optional[str]]:
    """(checkpoint.resume as it applies to this start, the job starting: "slurm ID", "torchrun ID" or None);
    collective. `marker`: the file in which a fresh start names its job (runlock.FRESH_FILE)."""
    # a requeued job (or torchrun --max-restarts restarting its workers) runs the same command again:
    # starting over would throw away what the first start trained (and begin a new W&B run) each time.
    # Unless that start ended before it set the old run aside (in the data load, a lost node): the
    # marker names the job that did, so such a restart still starts over, not resumes the old run.
    elastic = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0) or 0)
    job = (f"slurm {slurm.job_id}" if slurm.in_slurm else
           f"torchrun {os.environ['TORCHELASTIC_RUN_ID']}" if os.environ.get("TORCHELASTIC_RUN_ID") else None)
    if mode == "never" and (slurm.restarts > 0 or elastic > 0):
        which = (f"restart {slurm.restarts} of job {slurm.job_id}"
                 if slurm.restarts else f"torchrun's restart {elastic} of its workers")
        if dist.any(is_main and (job is None or read_json(marker).get("job") == job)):
            if is_main:
                log.info("checkpoint.resume=never applies to a job's first start; this is %s: resuming", which)
            mode = "auto"
        elif is_main:
            log.info("checkpoint.resume=never: this is %s, whose first start ended before it set the old run "
                     "aside: starting over now", which)
    return mode, job


def pick_checkpoint(ckpt: CheckpointDir, dist, is_main: bool) -> tuple[Optional[dict], Optional[Path]]:
    """(checkpoint, its file) to resume, or (None, None); collective: rank 0 picks the newest good file (setting
    corrupt ones aside), and every rank loads that same file."""
    path = ck = error = None
    if is_main:
        try:
            found = ckpt.load_latest(quarantine=True)
        except CheckpointError as e:  # every rank must fail with it, not wait in the broadcast below
            found, error = None, str(e)
        if found:
            ck, path = found[0], str(found[1])
    path, error = dist.broadcast_object((path, error))
    if error:
        raise CheckpointError(error)
    if path is None:
        return None, None
    path = Path(path)
    if ck is None:  # the other ranks read the file rank 0 chose (rank 0 verified it already)
        ck = load_file(path)
    return ck, path


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)
    name, keys, *rest = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))


def restore_rngs(rngs: list, rank: int, world: int, device: torch.device, seed: int,
                 global_step: int) -> Optional[str]:
    """Restore this rank's random streams from a checkpoint's (one per rank). Where they cannot be (another world
    size; another device type, whose dropout draws from the other generator), seed streams of this resume point,
    not the run's first step's (which would draw its dropout masks again), and return why, for the warning."""
    if len(rngs) != world:
        why = f"checkpoint was written by {len(rngs)} rank(s), this job has {world}"
    elif (rngs[rank]["cuda"] is None) == (device.type == "cuda"):
        was, now = ("GPU", "CPU") if rngs[rank]["cuda"] is not None else ("CPU", "GPU")
        why = f"checkpoint was written on a {was}, this job trains on a {now}"
    else:
        set_rng_state(rngs[rank], device)
        return None
    torch.manual_seed(mix_seed(mix_seed(seed, DROPOUT_STREAM + rank), global_step))
    return why


def _match_layouts(opt: torch.optim.Optimizer) -> None:
    """Give each loaded momentum buffer its parameter's memory layout. A resume may switch
    trainer.channels_last; CUDA's fused SGD refuses a buffer whose strides differ from the param's."""
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None and buf.stride() != p.stride():
                opt.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)


def restore(ck: dict, model: torch.nn.Module, opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LambdaLR, scaler: torch.amp.GradScaler) -> TrainState:
    """Load a checkpoint's weights, optimizer, schedule and scaler into this run's objects, built for this
    device and config; returns its TrainState."""
    model.load_state_dict(ck["model"])
    kernels = [(g["fused"], g["foreach"]) for g in opt.param_groups]  # this device's, as built
    opt.load_state_dict(ck["optimizer"])  # replaces the groups, with the saving device's kernel flags:
    for g, (fused, foreach) in zip(opt.param_groups, kernels):  # a CPU checkpoint on a GPU would run
        g["fused"], g["foreach"] = fused, foreach  # foreach, and fp16's scaler (told fused) then fails
    _match_layouts(opt)
    sched.load_state_dict(ck["scheduler"])
    # the groups' lr is what the saved schedule set for the next step: a run grown since (trainer.epochs, which
    # cosine and onecycle stretch to) takes that step on this config's curve already (warn_reshaped_schedule)
    for g, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        g["lr"] = base * factor(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]  # get_last_lr(): what the step runs at, logged
    if ck["scaler"]:  # empty when the checkpoint's run had no fp16 scaler (precision may change on resume)
        scaler.load_state_dict(ck["scaler"])
    return TrainState(**{"streams": 1, **ck["train_state"]})  # no "streams": written before it


def trained_root(ck: dict) -> Optional[str]:
    """The data.root checkpoint ``ck`` trained on (normalised, as pin_data_root records roots), None if unrecorded."""
    root = ((ck.get("config") or {}).get("data") or {}).get("root")
    return os.path.normpath(root) if root else None


def other_images_said(ck: dict, now: dict, path: Path, cfg: DataConfig) -> Optional[str]:
    """Why checkpoint ``path`` may not be resumed here, if it trained on other images than this start reads
    (``now``: data.fingerprint of this start's): a data.root given anew, or a copy rebuilt or replaced since, would
    go on training (and scoring) the run on other data, with no sign of it in its curves. None where they are the
    same, or the checkpoint is of before the fingerprints."""
    said = other_images(ck.get("data"), now)
    if not said:
        return None
    anew = "or start a new run (a new hydra.run.dir, a sweep's point a new hydra.sweep.dir; or checkpoint.resume=never)"
    then_torch = ck.get("torch_version")
    torch_too = (f"; torch was {then_torch}, now {torch.__version__}, whose random draws may differ"
                 if then_torch and then_torch != str(torch.__version__) else "")
    if cfg.name == "synthetic":  # generated: no folder to give
        return (f"checkpoint {path} trained on other images than data=synthetic generates now ({'; '.join(said)}"
                f"{torch_too}): resume it with the version it trained with, {anew}")
    then = trained_root(ck)
    where = f"data.root={cfg.root} holds" + (f" (it trained on {then})" if then and then != cfg.root else "")
    return (f"checkpoint {path} trained on other images than {where} ({'; '.join(said)}{torch_too}): give data.root "
            f"the folder it trained on (or an exact copy), {anew}")


def warn_reshaped_schedule(cfg: Config, st: TrainState, steps_per_epoch: int, ck: dict) -> None:
    """A grown (or otherwise re-lengthened) run whose lr schedule depends on trainer.epochs: the lr curve
    from here on is not the one the run was on (cosine/onecycle climb back up). Legal; said out loud."""
    old = ((ck.get("config") or {}).get("trainer") or {}).get("epochs")
    if cfg.schedule.name not in ("cosine", "onecycle") or old in (None, cfg.trainer.epochs):
        return
    step = max(0, st.global_step - 1)
    was = cfg.lr * lr_factor(step, cfg.schedule, steps_per_epoch, int(old))
    now = cfg.lr * lr_factor(st.global_step, cfg.schedule, steps_per_epoch, cfg.trainer.epochs)
    moves = (f"the lr jumps from {was:.4g} (its last step) to {now:.4g} and follows the new curve"
             if f"{was:.4g}" != f"{now:.4g}" else f"the lr ({now:.4g} now) follows the new curve")
    log.warning("trainer.epochs=%d but the checkpoint's run was planned for %d: the %s schedule is stretched "
                "to the new length, so %s (not what a run planned for %d epochs "
                "from the start does: checkpoint.resume=never starts one)", cfg.trainer.epochs, int(old),
                cfg.schedule.name, moves, cfg.trainer.epochs)


def warn_copied_run(ck: dict, run_dir: Path, wandb_id: Optional[str]) -> None:
    """A checkpoint written in another folder that still holds the same run (its W&B id): this folder is a copy
    (cp -r), and training both would log two histories into one W&B run. A moved folder (the old one gone, or
    holding another run since) is the same run: nothing to say. Legal either way; said out loud."""
    from .tracking import ID_FILE
    was = ck.get("run_dir")
    if not was or not wandb_id:
        return
    try:  # the same folder by another path (a link, another node's mount) is no copy
        if os.path.samefile(was, run_dir):
            return
        same = (Path(was) / ID_FILE).read_text().strip() == wandb_id
    except OSError:  # gone (moved here), or not reachable from this node
        return
    if same:
        log.warning("this run folder is a copy of %s (its checkpoints were written there), which still holds the "
                    "run: both log to W&B run %s, and training both would mix two histories in it; train only one "
                    "of them, or the copy with wandb.mode=disabled (its history.csv still records every epoch)",
                    was, wandb_id)


def best_file_holds(st: TrainState, ckpt: CheckpointDir, ck: dict, cfg_dict: dict) -> float:
    """The val_acc best.pt holds on resume (rank 0), which the next epoch must beat to rewrite it.
    Normally the checkpoint's best_val_acc. But best.pt is written after the epoch's step file, in
    the background: a failed write (none after it is made) or a kill between the two leaves it
    missing or older; a run folder copied or restored by hand may hold one from epochs this resume
    trains again. Then it is written again from the
    checkpoint when that holds the best epoch's weights; else the next epoch better than what it
    does hold (-1: nothing) replaces it."""
    path = ckpt.folder / "best.pt"
    if st.best_val_acc < 0:
        return st.best_val_acc
    held = later = None
    if path.is_file():
        try:
            best = load_file(path)
            if int(best.get("epoch", 0)) <= st.epoch:  # not from epochs trained after this checkpoint
                held = float(best["val_acc"])
            else:
                later = int(best["epoch"])
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            log.warning("best.pt is unreadable (%s)", e)
    if held == st.best_val_acc:
        return held
    # the best epoch is the first to reach best_val_acc (a tie does not replace it); only if that is the
    # checkpoint's own last epoch does the checkpoint hold its weights
    first_best = next((i for i, r in enumerate(st.history) if r["val_acc"] == st.best_val_acc), None)
    if st.step_in_epoch == 0 and st.history and first_best == len(st.history) - 1:
        try:
            ckpt.save_best({"model": ck["model"], "epoch": st.epoch, "global_step": st.global_step,
                            "val_acc": st.best_val_acc, "config": cfg_dict, "precision": ck.get("precision"),
                            "data": ck.get("data")})
            log.warning("best.pt did not hold the best epoch (%d, val_acc %.4f): written again from the "
                        "checkpoint, which holds its weights", st.epoch, st.best_val_acc)
            return st.best_val_acc
        except OSError as e:
            log.warning("writing best.pt again failed (%s)", e)
    if later is not None:  # resumed from an older checkpoint (the newer ones were unusable): this run's past
        log.warning("best.pt is from epoch %d, after the checkpoint resumed here (epoch %d; the newer ones "
                    "were unusable), and those epochs are trained again: the next finished epoch replaces it "
                    "(the best so far, val_acc %.4f, has no weights left)", later, st.epoch, st.best_val_acc)
        return -1.0
    log.warning("best.pt does not hold the best epoch so far (val_acc %.4f; a best.pt write failed or was cut "
                "off, and those weights are gone): it holds %s; the next epoch better than that replaces it",
                st.best_val_acc, "nothing" if held is None else f"val_acc {held:.4f}")
    return -1.0 if held is None else held

"""The training loop: one rank of a (possibly 1-process) DDP job, resumable at any step boundary.

Exactness across world sizes: each step's global batch is fixed by (seed, epoch); each rank takes a
contiguous part of it and scales its summed loss by world/n_global, so DDP's gradient average is
the gradient of the global-batch mean whatever the split. Metrics are accumulated on the device
and synchronised only at log steps and epoch ends (no .item() per step).
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import data as data_mod, preprocess, runlock
from .augment import DROPOUT_STREAM, INIT_STREAM, LEGACY_ORDER_STREAM, mix_seed
from .checkpoint import (RESUMED_PARTS, CheckpointDir, CheckpointError, Writer, check_resumable_file, does_not_fit,
                         earlier_epochs, fitting, snapshot)
from .fsio import read_json, write_atomic
from .config import GRAPH_MODES, Config, ConfigError, empty_last_shard, flatten, rank_difference
from .distributed import Dist, DistEnv, DistributedError, launch_of, pick_device, rank_order_mean, set_threads
from .localjob import local_job_id
from .scoring import AMP_DTYPES, batch_sums, resolve_precision, set_math
from .launch_checks import check_launch
from .models import build_model, count_parameters, summary
from .resume import (TrainState, applied_mode, best_file_holds, other_images_said, pick_checkpoint, restore,
                     restore_rngs, rng_state, warn_copied_run, warn_reshaped_schedule)
from .poll import StepPoll, classify_stop
from .provenance import code_changed, code_version, describe
from .preempt import (AGREED_EXITS, EXIT_GAVE_UP, EXIT_INTERRUPTED, EXIT_REQUEUED, StartupStop, StopRequest,
                      exit_said, sigint_deferred, signal_lead_s, take_early_stop)
from .schedule import lr_factor
from .slurm import SlurmJob
from .history import HISTORY_FILE, rewrite_history
from .jobs import DIVERGED, is_completed
from .tracking import (ID_FILE, STEPS_FILE, NullTracker, lacks_logs, make_tracker, read_id, set_aside_empty,
                       wandb_where)
from .wandb_mode import resolve_mode

log = logging.getLogger(__name__)

LATE_SLURM_S = 5.0  # each Slurm command's timeout within KillWait (the time limit's SIGTERM came)
DOWNLOAD_POLL_S = 2.0  # how often ranks waiting for a download ask whether it is done (each ask a short collective)



# status.json's keys that tell the run's progress, not the job's (its id, restarts, time-limit count, signal)
_PROGRESS = {"epoch", "epochs", "global_step", "step_in_epoch", "last_val_acc", "best_val_acc", "wandb_id",
             "test_loss", "test_acc", "precision", "wandb_mode", "wandb_online_error"}
_LAUNCH = ("launch", "ranks", "nodes")  # how the run's progress was trained: status names the command that goes on


class NonFiniteError(RuntimeError):
    pass


def _compile_counts() -> Optional[tuple[int, int]]:
    """(graphs Dynamo compiled, graphs inductor left out of CUDA graphs) so far in this process; None where
    these private counters are missing (their absence must not stop a run)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"]), int(counters["inductor"]["cudagraph_skips"])
    except Exception:
        return None


def make_sgd(params, cfg: Config, device: torch.device, precision: str) -> torch.optim.SGD:
    """SGD with the fused kernel on CUDA (fp16 too: its GradScaler then skips an overflowed step on the device,
    where with foreach it reads the overflow flag back every step), foreach elsewhere. Momentum buffers start
    as zeros (`zero_momentum`)."""
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    with sigint_deferred():  # the optimizer's first call imports torch._dynamo: Triton's library ate a Ctrl-C
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov,
                              weight_decay=cfg.optim.weight_decay, **kernel)
    zero_momentum(opt)
    return opt


def zero_momentum(opt: torch.optim.SGD) -> None:
    """A zero momentum buffer for each parameter that has none. fp16's GradScaler skips a step whose gradients
    overflowed (often the first, at its initial scale), and fused SGD, given a first step to skip, allocates its
    buffers empty and returns without writing them: the next step added stale memory to the weights. With zeros
    there is no first step: a skipped one leaves them zero, and the first taken one (dampening 0) makes each
    buffer its gradient, as a first step does."""
    for group in opt.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                if opt.state[p].get("momentum_buffer") is None:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p)


class Trainer:
    entry_point = False  # the process's own run (the CLI's train, a submitit job): its last word ignores signals after

    @property
    def training_started(self) -> bool:
        """fit reached its steps: a Ctrl-C now stops with a checkpoint, not as one in start-up."""
        return self._phase is not None

    def __init__(self, cfg: Config, cfg_dict: dict, run_dir: Path, env: DistEnv, lock_fd: Optional[int] = None,
                 locked: bool = False):
        """`locked`: the caller took rank 0's run lock already, `lock_fd` (runlock.acquire: None where the file
        system has no flock); else setup() takes it. Released by close()."""
        self.cfg, self.cfg_dict, self.run_dir, self.env = cfg, cfg_dict, Path(run_dir), env
        self._lock_fd, self._locked = lock_fd, locked
        self.set_aside = False  # this start moved an earlier run's files aside (checkpoint.resume=never)
        self._phase: Optional[str] = None  # "training" or "evaluation" once fit began: None is start-up
        self._tracker_done = False
        self._finite_at: Optional[int] = None  # the global step of the last finiteness check passed (this start)
        # status.json: written here, or by the checkpoint writer once a save it describes is on disk; a later
        # write here (a stop, a failure) makes the writer's pending one stale (_status_seq), so it is dropped
        self._status_lock, self._status_seq = threading.Lock(), 0
        t = cfg.trainer
        check_launch(cfg, env)
        self.device = pick_device(t.device, env)
        self.threads = set_threads(t.threads, env) if self.device.type == "cpu" else None
        set_math(t.deterministic, self.device)
        # the last step of construction: a failure from here on must reach the peers (see train.run)
        self.dist = Dist(env, self.device, cfg.dist.backend, cfg.dist.timeout_s)

    def _stop_if_asked(self) -> None:
        """A safe point of start-up (collective): a SIGTERM or SIGHUP on any rank since catch_early ends the start
        here, on every rank alike."""
        said = take_early_stop()
        if self.dist.any(said is not None):
            raise StartupStop(said or "a peer's signal")

    def _download_agreed(self, mine: bool) -> None:
        """fetch_if_missing where `mine`, in a thread, while every rank asks every DOWNLOAD_POLL_S (a third of
        dist.timeout_s, if less) whether one is still at it: a download longer than dist.timeout_s is no lost peer
        (one collective waited for it, and failed a healthy run), and one that fails fails every rank with its error,
        not with a peer's lost connection. A SIGTERM or SIGHUP ends the wait at once (a preemption's grace time
        may be shorter than a download): the download's own folder stays, removed by a download a day later."""
        failed: list[BaseException] = []

        def fetch() -> None:
            try:
                data_mod.fetch_if_missing(self.cfg.data)
            except BaseException as e:  # said on every rank below
                failed.append(e)
        thread = threading.Thread(target=fetch, name="download", daemon=True) if mine else None
        if thread is not None:
            thread.start()
        every = min(DOWNLOAD_POLL_S, self.dist.timeout_s / 3)
        while True:
            if thread is not None:
                thread.join(every)
            self._stop_if_asked()
            if not self.dist.any(thread is not None and thread.is_alive()):
                break
        said = self.dist.gather_objects(str(failed[0]) if failed else None)
        if failed:
            raise failed[0]
        rank = next((r for r, e in enumerate(said) if e is not None), None)
        if rank is not None:
            raise data_mod.DataError(f"rank {rank}'s download failed: {said[rank]}")

    def _check_same_run(self) -> None:
        """Every rank composed the same run folder and config. Each composes its own, so a value resolved per
        process (${now:...} in hydra.run.dir, an ${oc.env:...} set otherwise on another node, a relative folder
        from another working directory) would have the ranks resume different checkpoints, or one of them none."""
        views = self.dist.gather_objects({"hydra.run.dir": str(self.run_dir), **flatten(self.cfg_dict)})
        said = rank_difference(views)
        if said:
            raise ConfigError(f"the ranks composed different runs: {said}. Each rank composes the overrides itself: "
                              f"give the value literally (not ${{now:...}}, nor an ${{oc.env:...}} or a relative folder "
                              f"that differs from rank to rank)")

    def setup(self) -> "Trainer":
        """Data, model, optimizer, resume, tracker: the work that needs the process group."""
        cfg, cfg_dict, env, t = self.cfg, self.cfg_dict, self.env, self.cfg.trainer
        if env.is_main:  # one writer per run folder, before anything in it is read or written
            if not self._locked:
                self._lock_fd = runlock.acquire(self.run_dir)  # RunBusy (a ConfigError) names the holder
            if self._lock_fd is None:
                log.warning("the file system of %s has no flock: nothing stops a second process from training "
                            "into this folder at the same time", self.run_dir)
        self._check_same_run()
        self._stop_if_asked()
        self.ckpt = CheckpointDir(self.run_dir / "checkpoints", cfg.checkpoint.keep)
        self.writer = Writer()  # rank 0 writes in the background; see wait_checkpoints()
        # a cluster=local job on a Slurm node (inherited SLURM_JOB_ID) must not requeue the user's allocation
        self.slurm = SlurmJob.of_rank(env.source)
        self.polls = StepPoll(self.dist, env.rank, cfg.checkpoint.every_minutes)
        self._check_compile = t.compile
        # the counters are process-wide: this Trainer reports its own part (None: nothing to report)
        self._compile_base = _compile_counts() if t.compile else None
        self._counts: dict[int, torch.Tensor] = {}  # see _count

        # data: on the device once (uint8, or whitened float32: data.preprocess); augmented there a chunk of steps at a time
        if cfg.data.download:  # one download per folder, not one per rank into the same one
            if env.is_main and env.distributed:
                log.info("rank 0 downloads %s; the other ranks wait", cfg.data.name)
            self._download_agreed(env.is_main)
            # a node reading its own disk: its first rank, once (nothing where the root is rank 0's, shared)
            self._download_agreed(env.local_rank == 0 and not env.is_main)
            self._stop_if_asked()
        ds = data_mod.load(cfg.data, cfg.seed)
        self.mean, self.std = ds.mean, ds.std
        self.data_fingerprint = data_mod.fingerprint(ds)  # recorded in the checkpoints; a resume compares
        if env.distributed:  # each node may read its own copy (data.root on a node's disk): one dataset for all
            prints = self.dist.gather_objects(self.data_fingerprint)
            other = [r for r, p in enumerate(prints) if p != prints[0]]
            if other:
                splits = [k for k in prints[0] if prints[0][k] != prints[other[0]][k]]  # train, val, test
                raise ConfigError(f"rank(s) {', '.join(map(str, other[:8]))} read other images than rank 0 (their "
                                  f"{', '.join(splits)} split differs; data.root={cfg.data.root} on each node): every "
                                  f"rank must read the same dataset; give each node an exact copy")
        started = time.perf_counter()
        put = preprocess.to_device(cfg.data.preprocess, ds.train.images, self.device)
        if cfg.data.preprocess != "channel" and env.is_main:
            log.info("data.preprocess=%s: fitted on the %d training images in %.1f s", cfg.data.preprocess,
                     len(ds.train), time.perf_counter() - started)
        # each epoch is scored on the held-out split when there is one (data.val_size), else on
        # test; with a held-out split, test is scored once, when training is over (see fit)
        scored = ds.val if ds.val is not None else ds.test
        self.val_split = (put(scored.images), scored.labels.to(self.device))
        self.test_split = None if ds.val is None else (put(ds.test.images), ds.test.labels.to(self.device))
        said = empty_last_shard(t, len(ds.train), env.world_size)  # a copy of fewer images than the config's
        if said:
            raise ConfigError(said)
        self.batches = data_mod.TrainBatches(
            put(ds.train.images), ds.train.labels.to(self.device), t.batch_size, env.rank,
            env.world_size, cfg.seed, cfg.data.augment, ds.mean, ds.std, t.drop_last, t.channels_last)
        self.steps_per_epoch = self.batches.steps_per_epoch  # >= 1: TrainBatches refuses a batch leaving none
        self._stop_if_asked()

        # model: identical init on every rank (DDP also broadcasts rank 0's weights)
        torch.manual_seed(mix_seed(cfg.seed, INIT_STREAM))
        model = build_model(cfg.model)
        if env.is_main:  # on the CPU copy, before it moves: no round trip of the weights
            log.info("model %s (width %g):\n%s", cfg.model.name, cfg.model.width, summary(model))
        self.model = model.to(self.device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.n_params = count_parameters(self.model)
        cuda = self.device.type == "cuda"
        self.precision = resolve_precision(t.precision, self.device)
        if t.precision == "auto" and self.dist.any(self.precision != "bf16"):
            self.precision = "fp32"  # mixed GPU generations: every rank runs the same math
        self.amp_dtype = AMP_DTYPES.get(self.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16" and cuda)
        self.opt = make_sgd(self.model.parameters(), cfg, self.device, self.precision)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.schedule, self.steps_per_epoch, t.epochs))
        self.state = TrainState()
        # per-rank dropout streams; restored exactly from the checkpoint on resume
        torch.manual_seed(mix_seed(cfg.seed, DROPOUT_STREAM + env.rank))
        self.resumed_from = self._maybe_resume()
        self._stop_if_asked()
        if self.state.lr_used is None:  # a new run, or a checkpoint from before the key: on this config's curve
            self.state.lr_used = cfg.lr * lr_factor(max(0, self.state.global_step - 1), cfg.schedule,
                                                    self.steps_per_epoch, t.epochs)

        # compile inside DDP: torch.compile(DDP(nn.Sequential)) captures no graph at all (Dynamo
        # skips Sequential.forward, a torch file, as a frame to start in), so it ran eagerly. Inside,
        # the compiled backward hands DDP all gradients at its end, so their all-reduce overlaps less
        # of the backward than eager DDP's (unmeasured on several GPUs; one GPU has no all-reduce).
        # dynamic=False: a last partial batch (drop_last=false) gets a static graph of its own, instead of
        # a dynamic-shape recompile that full batches would then run too
        # compile_mode: reduce-overhead (max-autotune too) replays each graph as one CUDA graph: a launch, not one
        # per kernel, where small batches leave the GPU waiting on the host (benchmarks/RESULTS.md, section 8)
        mode = None if t.compile_mode == "default" else t.compile_mode
        net = torch.compile(self.model, dynamic=False, mode=mode) if t.compile else self.model
        graphs = t.compile and t.compile_mode in GRAPH_MODES
        self._graphs = graphs and cuda
        if graphs and not cuda and env.is_main:
            log.warning("trainer.compile_mode=%s captures CUDA graphs on CUDA only: on %s it compiles as "
                        "trainer.compile_mode=default would", t.compile_mode, self.device)
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            net = DDP(net, device_ids=[self.device.index] if cuda else None)
            if t.deterministic and not cuda:  # exact resume with 3+ ranks (distributed.rank_order_mean)
                net.register_comm_hook(None, rank_order_mean)
        self.net = net
        # the same command run again on a finished run: nothing to train or score, and no W&B segment. Its
        # status.json says so; where that is gone, the last checkpoint of a run without a held-out split is the end
        # (with one, the test scores were only in status.json: scored again). A record of another state (a kill
        # after the last checkpoint) goes on to finish W&B's summary.
        record = read_json(self.run_dir / "status.json") if env.is_main else {}
        said = is_completed(record, self.state.epoch, t.epochs)
        self.finished = self.resumed_from is not None and self.state.epoch >= t.epochs and self.dist.any(
            said or (env.is_main and not record and self.test_split is None))
        self._said_completed = said
        if self.finished and env.is_main:  # no tracker to rewrite it: deleted or damaged since, the checkpoint
            if not (self.run_dir / HISTORY_FILE).exists():  # holds every row
                log.warning("%s was missing: written again from the checkpoint's %d epochs", HISTORY_FILE,
                            len(self.state.history))
            rewrite_history(self.run_dir / HISTORY_FILE, self.state.history)
        # a finished run opens W&B only for what its record lacks: a stretch trained with W&B disabled, logs lost
        # with W&B's service (wandb_steps.jsonl has them). A segment without a record would stop `wandb sync`
        wandb_id = self.state.wandb_id or read_id(self.run_dir)
        if self.finished and env.is_main:
            set_aside_empty(self.run_dir, wandb_id)
        if not self.finished:
            self.tracker = make_tracker(self.run_dir, cfg_dict, cfg.wandb, env.rank, self.state.wandb_id,
                                        self.state.history, self.state.global_step)
        elif env.is_main and resolve_mode(cfg.wandb.mode) != "disabled" and \
                lacks_logs(self.run_dir, wandb_id, wandb_where(cfg.wandb)):
            self.tracker = self._relog_tracker()
        else:
            self.tracker = NullTracker()
        self._relog_only = self.finished and not isinstance(self.tracker, NullTracker)  # W&B opened to re-log
        self.state.wandb_id = self.tracker.run_id or self.state.wandb_id
        if env.is_main and (self._relog_only or not self.finished):  # the mode auto chose is said in train.log
            mode = self.tracker.mode
            auto = getattr(self.tracker, "auto_why", None)
            why = f"{auto}; " if auto and not getattr(self.tracker, "online_error", None) else ""
            log.info("W&B %s%s", mode, {"offline": f" ({why}run {self.tracker.run_id}; from a machine with network: "
                                                   f"wandb sync {shlex.quote(str(self.run_dir))}/wandb/offline-run-*)",
                                        "online": f" (run {self.tracker.run_id})"}.get(
                mode, ": history.csv, and wandb_steps.jsonl for a later start with W&B"))
        # device-side metric sums: [loss_sum, correct, count] for the epoch and the log interval
        self.epoch_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.interval_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        if self._resume_sums is not None and env.is_main:
            self.epoch_sums.copy_(self._resume_sums[0])
            self.interval_sums.copy_(self._resume_sums[1])
        return self

    def _relog_tracker(self):
        """W&B opened on a completed run for the logs its record lacks: at best, as it trains nothing. A W&B that
        does not start (a timeout, its service) leaves the record as it was, said, not the run failed."""
        try:
            return make_tracker(self.run_dir, self.cfg_dict, self.cfg.wandb, self.env.rank, self.state.wandb_id,
                                self.state.history, self.state.global_step)
        except Exception as e:  # noqa: BLE001 - the run is complete whatever W&B does
            log.warning("W&B did not start (%s: %s): its record of this completed run stays short of %s; the same "
                        "command with W&B logs it later", type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                        STEPS_FILE)
            return NullTracker()

    # -- resume ----------------------------------------------------------------------------------
    def _maybe_resume(self) -> Optional[Path]:
        self._resume_sums, self._best_file_acc = None, -1.0  # best.pt: see resume.best_file_holds
        marker = self.run_dir / runlock.FRESH_FILE
        mode, job = applied_mode(self.cfg.checkpoint.resume, self.slurm, self.dist, self.env.is_main, marker)
        if mode != "never" and self.dist.any(self.env.is_main and self.ckpt.interrupted_aside()):
            # half the old run's files in checkpoints/: no resume of that folder as it stands. The start over it
            # began is finished, nothing lost; this start then trains anew (as that one would have)
            self._move_old_run_aside("a start with checkpoint.resume=never was stopped while it set the old run "
                                     "aside: finished now")
            if mode == "must":  # (submit and train refuse it before: check_resume)
                raise self.ckpt.nothing_to_resume()
            return None
        if mode == "never":
            self._move_old_run_aside("checkpoint.resume=never")
            if job and self.env.is_main:  # before this run's first checkpoint: its restarts resume from here on
                write_atomic(marker, json.dumps({"job": job, "time": time.time()}) + "\n")
            return None
        ck, path = pick_checkpoint(self.ckpt, self.dist, self.env.is_main)
        if path is None:
            if mode == "must":
                raise self.ckpt.nothing_to_resume()
            # no checkpoint, yet epochs of an earlier run (its checkpoints were removed): starting over
            # would overwrite its history and best.pt and continue its W&B run with other metrics. A W&B
            # id alone is this run's own start before its first checkpoint: that one continues.
            if self.dist.any(self.env.is_main and earlier_epochs(self.run_dir, self.ckpt)):
                self._move_old_run_aside("no checkpoint to resume, but an earlier run's epochs are here")
            return None
        check_resumable_file(self.cfg, ck, path, self.run_dir)
        said = other_images_said(ck, self.data_fingerprint, path, self.cfg.data)
        if self.dist.any(said is not None):  # every rank stops (a node's own copy may be the one that differs)
            raise ConfigError(said or f"checkpoint {path}: another rank reads other images than it trained on; "
                                      f"see rank 0's error")
        missing = [k for k in RESUMED_PARTS if k not in ck]
        if missing:
            raise does_not_fit(path, KeyError(f"no {', '.join(missing)}"))
        with fitting(path):
            self.state = restore(ck, self.model, self.opt, self.sched, self.scaler)
        zero_momentum(self.opt)  # a checkpoint of a run before its first step has none
        if self.state.streams < 2:  # its epochs' orders as they began; exact resume before independence
            self.batches.order_stream = LEGACY_ORDER_STREAM
        if self.env.is_main:
            self._best_file_acc = best_file_holds(self.state, self.ckpt, ck, self.cfg_dict)
            warn_copied_run(ck, self.run_dir, self.state.wandb_id)
            changed = code_changed(ck.get("code"), code_version())
            if changed:  # legal (a fix between requeues), but the run's curves then come from two versions
                log.warning("resuming with other code than the checkpoint's (%s): what follows is trained by the new "
                            "code", changed)
        self._resume_sums = (ck["epoch_sums"].to(self.device), ck["interval_sums"].to(self.device))
        why = restore_rngs(ck["rng"], self.env.rank, self.env.world_size, self.device, self.cfg.seed,
                           self.state.global_step)
        dropout = self.cfg.model.dropout and (self.cfg.model.input_dropout or self.cfg.model.hidden_dropout)
        if why and dropout and self.env.is_main:
            log.warning("%s: dropout draws from streams seeded anew at this step, so the result will not be bitwise "
                        "the uninterrupted one", why)
        if self.env.is_main:
            warn_reshaped_schedule(self.cfg, self.state, self.steps_per_epoch, ck)
            st = self.state
            if st.epoch >= self.cfg.trainer.epochs:  # fit() then says nothing to do
                log.info("resumed from %s: after epoch %d, global step %d", path, st.epoch, st.global_step)
            else:
                log.info("resumed from %s: epoch %d, step %d (global step %d)", path, st.epoch + 1,
                         st.step_in_epoch, st.global_step)
        return path

    def _move_old_run_aside(self, why: str) -> None:
        """Keep the old run whole in checkpoints.oldN/ (collective); the W&B id goes too: the fresh
        start is a new W&B run, not steps 1.. again. Its .hydra/ (its config, which this run's replaces once
        set up) goes along."""
        if self.env.is_main:
            # its segments stay in wandb/ (`wandb sync` gives both runs): one without a record would stop that sync
            set_aside_empty(self.run_dir, read_id(self.run_dir))
            also = [self.run_dir / name for name in (ID_FILE, HISTORY_FILE, STEPS_FILE)]
            also += sorted(self.run_dir.glob(f"{HISTORY_FILE}.edited*"))  # that run's own, kept by an earlier start
            kept = self.ckpt.folder.is_dir() and any(self.ckpt.folder.iterdir())
            if kept or any(p.exists() for p in also):  # only .hydra/ (a start that died before its first write): no oldN
                also.append(self.run_dir / ".hydra")
            moved = self.ckpt.move_aside(also=also)
            self.set_aside = bool(moved)
            if moved:  # a checkpoints/ linked to scratch: the old run stays there, linked from oldN
                where = f"{moved} (a link to {os.readlink(moved)})" if moved.is_symlink() else moved
                log.warning("%s: the old run's checkpoints, history.csv, .hydra/ and W&B id are kept in %s; this "
                            "run starts fresh", why, where)
        self.dist.barrier()

    # -- checkpoint --------------------------------------------------------------------------------
    def _kept(self) -> str:
        try:  # the writes still in flight land first: they hold the last good weights
            self.writer.wait()
        except CheckpointError as e:  # the divergence is the run's error: this one is said here, or nowhere
            log.error("%s", e)
        files = self.ckpt.step_files()  # highest step first; none is written with non-finite weights
        return (f"the newest checkpoint with finite weights ({files[0].name}) is kept, though the run may have "
                f"diverged before it (see history.csv)" if files else "no checkpoint was written yet")

    def _sweep_point(self) -> Optional[Path]:
        """The sweep folder, where submit -m's job runs this point: not a point trained by hand since, nor one
        submitted on its own (a run of its own, as status shows it), whose record names no -m command."""
        parent = self.run_dir.parent
        if not (parent / "sweep.json").is_file() or "SUBMITIT_EXECUTOR" not in os.environ:
            return None
        command = read_json(self.run_dir / "submission.json").get("command") or []
        return parent if "-m" in command or "--multirun" in command else None

    def _diverged(self, what: str) -> NonFiniteError:
        kept = self._kept()
        again = ("would resume from that checkpoint and repeat the steps that diverged" if self.ckpt.step_files() else
                 "would start it over as it was, to diverge again")
        warmup = f"schedule.warmup_epochs={self.cfg.schedule.warmup_epochs:g} now"
        if self._sweep_point():  # new values here would leave a point its name and its sweep do not describe
            return NonFiniteError(f"{what}; {kept}. Sweep a lower optim.lr or a longer warm-up ({warmup}) as new "
                                  f"points, leaving this point's value out of the sweep (choice(...) of the others), "
                                  f"or in a new hydra.sweep.dir; the sweep's submit command {again}")
        return NonFiniteError(f"{what}; {kept}. Lower optim.lr or lengthen the warm-up ({warmup}) and start over: in "
                              f"a new hydra.run.dir, or here with checkpoint.resume=never and the new values (this "
                              f"run's files move to checkpoints.oldN/); the same command {again}")

    def _check_finite(self) -> None:
        finite = torch.stack([torch.isfinite(self.epoch_sums[0]).all()]
                             + [torch.isfinite(p).all() for p in self.model.parameters()]).all()
        bad = self.dist.any(not bool(finite))  # one device sync, not one per parameter
        if not bad:
            self._finite_at = self.state.global_step
            return
        # checked every trainer.log_every_steps steps and at saves: where it went non-finite is in that stretch
        since = ("" if self._finite_at is None or self._finite_at >= self.state.global_step - 1 else
                 f", after step {self._finite_at}, the last check it passed (checked every trainer.log_every_steps="
                 f"{self.cfg.trainer.log_every_steps} steps and at saves)")
        raise self._diverged(f"{DIVERGED} loss or weights found at global step {self.state.global_step} (epoch "
                             f"{self.state.epoch + 1}){since}")

    def save(self, epoch_end: Optional[tuple] = None) -> None:
        """A consistent checkpoint at a step boundary; collective (every rank calls it). `epoch_end`: the
        finished epoch's history row and best.pt snapshot (or None), written once the checkpoint is."""
        st = self.state
        self._check_finite()
        self._check_lock()
        if st.step_in_epoch > 0:  # mid-epoch: carry the seconds spent so far into the resumed epoch
            st.epoch_seconds = self._epoch_base + time.perf_counter() - self._epoch_t0
        rngs = self.dist.gather_objects(rng_state(self.device))
        # Metric sums are reduced over ranks and kept by rank 0 alone (zero elsewhere): the totals
        # stay right, and a resume with another world size still gets them.
        sums = self.dist.all_reduce_sum(torch.stack([self.epoch_sums, self.interval_sums]))
        if not self.env.is_main:
            sums.zero_()
        self.epoch_sums.copy_(sums[0])
        self.interval_sums.copy_(sums[1])
        if self.env.is_main:
            sums = sums.cpu()
            state = snapshot({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                              "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                              "train_state": asdict(st), "rng": rngs, "epoch_sums": sums[0],
                              "interval_sums": sums[1], "identity": self.cfg.identity(), "config": self.cfg_dict,
                              "data": self.data_fingerprint,
                              "torch_version": str(torch.__version__), "code": code_version(),
                              "world_size": self.env.world_size,
                              "precision": self.precision,
                              "saved_at": time.time(), "run_dir": str(self.run_dir)})
            row, best = epoch_end or (None, None)
            self.writer.submit(f"checkpoint step {st.global_step}", self._write_checkpoint, state, st.global_step, row)
            self._epoch_end_unsaved = False  # handed over: it lands, also if this process fails now (close waits)
            self._saved_position = self._position_doc(vars(self.state))
            if best is not None:
                self.writer.submit("best.pt", self._write_best, best)
        self.dist.barrier()
        self.polls.restart_clock()

    def _check_lock(self) -> None:
        """Rank 0 still holds the run folder's lock (collective): its file deleted by hand and taken by a second
        process, this one stops before it writes again (runlock.keep)."""
        lost = None
        if self.env.is_main and self._lock_fd is not None:
            try:
                self._lock_fd = runlock.keep(self.run_dir, self._lock_fd)
            except runlock.LockLost as e:
                lost = e
        if self.dist.any(lost is not None):
            raise lost or runlock.LockLost("rank 0 lost the run folder's lock to another process (its log says which)")

    def _write_checkpoint(self, state: dict, step: int, history_row: Optional[dict]) -> None:  # in the writer's thread
        self.tracker.sync()  # the W&B logs up to this step are durable before the checkpoint is
        self.ckpt.save(state, step)
        self._landed_position = self._position_doc(state["train_state"])  # a later write's failure reports this
        if history_row is not None:  # not before: see _end_epoch
            try:
                self.tracker.append_history(history_row, state["train_state"]["history"])
            except OSError as e:  # the writer's error says "writing checkpoint step N failed": which part
                said = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else e.strerror or str(e)
                raise OSError(*([e.errno] if e.errno else []), f"step {step}'s checkpoint landed, but adding its row "
                              f"to history.csv failed ({said}); the next start writes the row from it") from e

    def _write_best(self, best: dict) -> None:  # in the writer's thread, queued right after its step's checkpoint:
        # run only once that write landed (the writer makes nothing after a failed write), so best.pt never holds an
        # epoch no checkpoint has (see _end_epoch); a file of that step on disk said nothing (a stop in evaluation)
        self.ckpt.save_best(best)

    def wait_checkpoints(self) -> None:
        """Everything saved so far is on disk; collective, so a failed write (rank 0's) fails every
        rank alike instead of only rank 0 while the others exit 0."""
        error = None
        try:
            self.writer.wait()
        except CheckpointError as e:
            error = e
        if self.dist.any(error is not None):  # rare: then rank 0's words, for the other ranks' lines
            said = self.dist.broadcast_object(str(error) if error else None)
            raise error or DistributedError(f"rank {self.env.rank}: peer rank 0 failed: {said}")

    # -- status for `allconv-hpc status` ---------------------------------------------------------
    def write_status(self, state: str, **extra) -> None:
        if not self.env.is_main:
            return
        doc = self._status_doc(state, **extra)
        with self._status_lock:
            self._status_seq += 1
            self._write_status_file(doc)
        self._summary_status(doc["state"])

    def _recount_restarts(self) -> None:
        """A job requeued once its run had completed (preempted in its last moments) finds nothing to do: its record
        takes the job's requeue count, which `status` shows (it showed the count of the start that completed)."""
        old = read_json(self.run_dir / "status.json")
        if self.slurm.in_slurm and old.get("slurm_job_id") == self.slurm.job_id and \
                old.get("restarts") != self.slurm.restarts:
            with self._status_lock:
                self._write_status_file({**old, "restarts": self.slurm.restarts})

    def _summary_status(self, state: str) -> None:
        """W&B's own state reads "finished" for a requeued segment (and "failed" for a stopped one) until a restart
        continues it, also when none ever does (a requeued job scancelled while pending): the summary's `status` is
        status.json's word for where the run stands, set at each change."""
        tracker = getattr(self, "tracker", None)
        if tracker is not None and state != getattr(self, "_summary_state", None):
            self._summary_state = state
            tracker.set_summary(status=state)

    def _write_status_file(self, doc: dict) -> None:  # under _status_lock
        write_atomic(self.run_dir / "status.json", json.dumps(doc, indent=1).encode())

    def _status_once_saved(self) -> None:
        """status.json "running" at the position just saved, written by the checkpoint writer after the save's
        files: a process killed while they were in flight (SIGKILL, the OOM killer, a node) left it naming an
        epoch whose checkpoint never landed. Rank 0 only; a no-op elsewhere."""
        if self.env.is_main:
            doc, seq = self._status_doc("running"), self._status_seq
            self.writer.submit("status.json", self._put_status, doc, seq)

    def drop_pending_status(self) -> None:
        """A status.json write the checkpoint writer still holds is dropped (the run folder is another's now)."""
        with self._status_lock:
            self._status_seq += 1

    def _put_status(self, doc: dict, seq: int) -> None:  # in the writer's thread, after its save (which landed:
        with self._status_lock:  # the writer makes nothing after a failed write)
            if seq == self._status_seq:  # else stale
                self._write_status_file(doc)

    @staticmethod
    def _position_doc(st: dict) -> dict:
        """status.json's progress fields, of training state `st` (a TrainState's fields)."""
        h = st["history"]
        return {"epoch": st["epoch"], "global_step": st["global_step"], "step_in_epoch": st["step_in_epoch"],
                "last_val_acc": h[-1]["val_acc"] if h else None, "best_val_acc": st["best_val_acc"] if h else None}

    def _status_doc(self, state: str, **extra) -> dict:
        st = getattr(self, "state", None) or TrainState()  # not yet there when setup stops early
        tracker = getattr(self, "tracker", None)
        slurm = getattr(self, "slurm", None) or SlurmJob.of_rank(self.env.source)
        doc = {"state": state, "epochs": self.cfg.trainer.epochs, **self._position_doc(vars(st)),
               # a stop inside wandb.init (a Ctrl-C) leaves no tracker: its id file already names the run
               "wandb_id": st.wandb_id or (read_id(self.run_dir) if tracker is None else None),
               # the id squeue/scancel take (an array task's "A_T"); none for a cluster=local job
               "slurm_job_id": slurm.job_id if slurm.in_slurm else None, "restarts": slurm.restarts,
               "local_job_id": local_job_id(self.env.source),
               # how it was launched: status names the command that goes on with a run started by hand (torchrun's)
               "launch": launch_of(self.env), "ranks": self.env.world_size,
               "nodes": self.env.world_size // max(1, self.env.local_world_size),
               "timeouts": st.timeouts, "precision": getattr(self, "precision", None), "code": code_version(),
               "wandb_mode": getattr(tracker, "mode", None),
               "wandb_online_error": getattr(tracker, "online_error", None),
               # where it trains: a copy of the folder (cp -r) is told from it by this (status: COPY)
               "run_dir": str(self.run_dir.absolute()), "updated": time.time(), **extra}
        writer = getattr(self, "writer", None)
        if writer is not None and writer.failed:  # what is on disk: the last write that landed, not those after
            doc.update(getattr(self, "_landed_position", {}))
        elif getattr(self, "_epoch_end_unsaved", False) and state != "running":
            doc.update(self._saved_position)
        if not hasattr(self, "resumed_from"):  # failed before resuming: the folder's progress stands (none in a
            # new folder: epoch 0 of this config's epochs, not "0/?"), not the earlier job's counts and signal
            old = read_json(self.run_dir / "status.json")  # a requeue of the same Slurm job keeps its count of time
            same_job = doc["slurm_job_id"] is not None and old.get("slurm_job_id") == doc["slurm_job_id"]  # limits
            doc = {"epoch": 0, "epochs": doc["epochs"],
                   # (and the launch that made it: this start's ranks trained none of it)
                   **{k: v for k, v in old.items() if k in (*_PROGRESS, *_LAUNCH) or (same_job and k == "timeouts")},
                   **{k: doc[k] for k in ("state", "slurm_job_id", "local_job_id", "restarts", "code", "run_dir", "updated",
                                          *extra)}}
        return doc

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> int:
        cfg, st = self.cfg, self.state
        if self.finished:
            if self._relog_only:  # W&B's record made whole: its summary as at the run's end
                self.tracker.set_summary(**self._final_summary(read_json(self.run_dir / "status.json")))
            if self.env.is_main and not self._said_completed:  # status.json deleted or damaged since
                self.write_status("completed")
            elif self.env.is_main:
                self._recount_restarts()
                self._summary_status("completed")
            if self.env.is_main:
                log.info("this run completed its %d epoch%s already: nothing to %s (a larger trainer.epochs trains "
                         "on; checkpoint.resume=never starts over)", st.epoch, "" if st.epoch == 1 else "s",
                         "train: its W&B record has what it lacked" if self._relog_only else "do")
            return 0
        self._stop_if_asked()  # the W&B start can take seconds: the last safe point before the steps
        # the checkpoint resumed (or nothing yet): what is on disk
        self._saved_position = self._landed_position = self._position_doc(vars(self.state))
        self.polls.restart_clock()
        self._phase = "training"
        self.write_status("running")
        if self.env.is_main:  # what trainer.precision=auto chose; the code this start trains with; the best so far
            self.tracker.set_summary(precision=self.precision, code=describe(code_version()),  # (a resumed W&B
                                     **({"best_val_acc": st.best_val_acc} if st.history else {}))  # record may lack it)
        if self.env.is_main:
            auto = " (auto)" if cfg.trainer.precision == "auto" else ""
            log.info("training %s on %s: %d rank(s), global batch %d, %d steps/epoch, %d epoch%s, lr %g, precision %s%s",
                     cfg.data.name, self.device, self.env.world_size, cfg.trainer.batch_size,
                     self.steps_per_epoch, cfg.trainer.epochs, "" if cfg.trainer.epochs == 1 else "s", cfg.lr,
                     self.precision, auto)
            if self.test_split is not None:
                log.info("each epoch is scored on %d held-out training images (data.val_size); the %d test "
                         "images are scored once, after the last epoch", len(self.val_split[1]),
                         len(self.test_split[1]))
        with StopRequest(cfg.checkpoint.signal, say=self.env.is_main) as stop:
            while st.epoch < cfg.trainer.epochs:
                self._epoch_t0, self._epoch_base = time.perf_counter(), st.epoch_seconds
                if st.step_in_epoch < self.steps_per_epoch and self._train_epoch(stop):
                    return self._stop(stop)
                scores = self._evaluate(stop, *self.val_split)
                if scores is None:
                    return self._stop(stop)
                self._end_epoch(self._epoch_base + time.perf_counter() - self._epoch_t0, scores)
            test = self._evaluate(stop, *self.test_split) if self.test_split is not None else ()
            if test is None:  # stopped inside it: the resumed run, past its last epoch, scores test again
                return self._stop(stop)
        self.polls.finish()  # the last step's flags: the run is over, but no collective is left in flight
        self.wait_checkpoints()
        scored = {"test_loss": test[0], "test_acc": test[1]} if test else {}
        self.tracker.set_summary(**self._final_summary(scored))
        self.write_status("completed", **scored)
        if self.env.is_main:
            log.info("done: best val_acc %.4f, final %.4f", st.best_val_acc, st.history[-1]["val_acc"])
            if test:
                log.info("test (the final weights, scored once): loss %.4f acc %.4f (%d images)", *test)
        return 0

    def _final_summary(self, scored: dict) -> dict:
        """W&B's summary of a completed run; ``scored``: the test scores, where a held-out split left some."""
        st = self.state
        return {"best_val_acc": st.best_val_acc, "final_val_acc": st.history[-1]["val_acc"],
                **{k: scored[k] for k in ("test_loss", "test_acc") if k in scored}}

    def _train_epoch(self, stop: StopRequest) -> bool:
        """Runs the rest of the epoch; True when a stop was requested (checkpoint already written)."""
        cfg, st, world = self.cfg, self.state, self.env.world_size
        self.net.train()
        every = cfg.checkpoint.every_steps
        log_every = cfg.trainer.log_every_steps
        t_log, n_log = time.perf_counter(), 0
        bar = self._progress(st.step_in_epoch)
        for x, y, n_global in self.batches.epoch(st.epoch, st.step_in_epoch):
            if self._graphs:  # a new step: the graphs' previous outputs may be overwritten (all are used by now)
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.net(x)
            loss_sum = F.cross_entropy(out.float(), y, reduction="sum")
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss_sum * (world / n_global)).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            st.lr_used = self.sched.get_last_lr()[0]  # what this step ran at (logged), before advancing
            self.sched.step()
            with torch.no_grad():  # few ops: on a GPU every launch is host time, the pace at small batches
                # stack promotes the count of correct answers to float32 (exact: < 2**24 per step)
                step_sums = torch.stack([loss_sum, (out.argmax(1) == y).sum(), self._count(len(y))]).double()
                torch._foreach_add_([self.epoch_sums, self.interval_sums], [step_sums, step_sums])
            st.step_in_epoch += 1
            st.global_step += 1
            n_log += n_global
            if self._check_compile:  # after the first step, which compiled
                self._check_compile = False
                self._report_compile()
            if bar is not None:
                bar.update(1)
            if st.global_step % log_every == 0:
                self._log_train(n_log, t_log, bar)
                t_log, n_log = time.perf_counter(), 0
            agreed = self.polls.poll(stop, self.env.is_main and self.writer.failing())
            if agreed.write_failed:  # every rank raises rank 0's error (CheckpointError) at this same step
                self.wait_checkpoints()
            # the epoch's last step is saved after its evaluation (the same step: written twice before)
            periodic = (every and st.global_step % every == 0) or agreed.due
            if agreed.stop or (periodic and st.step_in_epoch < self.steps_per_epoch):
                self.save()
                if not agreed.stop:  # `status` shows the progress of a long epoch (a stop writes its own)
                    self._status_once_saved()
            if agreed.stop:
                if bar is not None:
                    bar.close()
                return True
        if bar is not None:
            bar.close()
        return False

    def _count(self, n: int) -> torch.Tensor:
        """A device scalar n of the loss's dtype, made once per batch size by a fill kernel: a host->device
        copy each step would sync."""
        t = self._counts.get(n)
        if t is None:
            t = self._counts[n] = torch.full((), float(n), device=self.device)
        return t

    def _report_compile(self) -> None:
        """trainer.compile=true must have captured the model: say how many graphs, warn if none, and warn
        if CUDA graphs were asked for (trainer.compile_mode) and inductor left some out."""
        now = _compile_counts()
        if now is None or self._compile_base is None:
            return
        n, skips = (a - b for a, b in zip(now, self._compile_base))
        mode = self.cfg.trainer.compile_mode
        if n == 0:
            log.warning("trainer.compile=true but torch.compile captured no graph: the model runs eagerly")
        elif self.env.is_main:
            log.info("torch.compile: %d graph(s) compiled (mode %s)", n, mode)
        if self._graphs and skips:
            log.warning("trainer.compile_mode=%s: inductor did not capture %d graph(s) as CUDA graphs; they run "
                        "kernel by kernel (TORCH_LOGS=perf_hints says why)", mode, skips)

    def _progress(self, start: int):
        mode = self.cfg.trainer.progress
        if not self.env.is_main or mode == "log" or (mode == "auto" and not sys.stderr.isatty()):
            return None
        from tqdm import tqdm
        return tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {self.state.epoch + 1}",
                    leave=False, dynamic_ncols=True)

    def _log_train(self, images: int, since: float, bar) -> None:
        s = self.dist.all_reduce_sum(self.interval_sums.clone()).tolist()
        # the rate once .tolist() has waited for the device: on a GPU the clock before it counts the steps
        # queued, not run (the last log's wait emptied the queue, so the interval holds exactly these steps)
        images_per_second = images / (time.perf_counter() - since)
        self.interval_sums.zero_()
        if not math.isfinite(s[0]):
            self._check_finite()
        loss, acc, lr = s[0] / max(s[2], 1), s[1] / max(s[2], 1), self.state.lr_used
        metrics = {"loss": loss, "acc": acc, "lr": lr, "images_per_second": images_per_second,
                   "epoch": self.state.global_step / self.steps_per_epoch}
        self.tracker.log_train(self.state.global_step, metrics)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", lr=f"{lr:.3g}")
        elif self.env.is_main:
            log.info("epoch %d step %d/%d (global %d): loss %.4f acc %.4f lr %.4g %.0f img/s",
                     self.state.epoch + 1, self.state.step_in_epoch, self.steps_per_epoch,
                     self.state.global_step, loss, acc, lr, images_per_second)

    @torch.no_grad()
    def _evaluate(self, stop: StopRequest, images: torch.Tensor, labels: torch.Tensor) -> Optional[tuple]:
        """(loss, accuracy, images) over a whole split, each image exactly once across ranks; None
        when a stop was requested (the checkpoint is written)."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for x, y in data_mod.eval_batches(images, labels, self.env.rank, self.env.world_size,
                                          self.cfg.trainer.eval_batch_size, self.mean, self.std,
                                          channels_last=self.cfg.trainer.channels_last):
            if self.polls.poll(stop).stop:  # the same number of batches on every rank: polls pair up
                self._phase = "evaluation"
                self.save()  # step_in_epoch == steps_per_epoch: the resumed run redoes this eval
                return None
            if len(y):
                sums += batch_sums(self.model, x, y, self.amp_dtype)
        s = self.dist.all_reduce_sum(sums).tolist()
        return s[0] / s[2], s[1] / s[2], int(s[2])

    def _end_epoch(self, seconds: float, scores: tuple) -> None:
        st = self.state
        tr = self.dist.all_reduce_sum(self.epoch_sums.clone()).tolist()
        val_loss, val_acc, n_val = scores
        row = {"epoch": st.epoch + 1, "step": st.global_step, "lr": st.lr_used,
               "train_loss": tr[0] / tr[2], "train_acc": tr[1] / tr[2], "val_loss": val_loss, "val_acc": val_acc,
               "epoch_seconds": seconds, "images_per_second": tr[2] / seconds}
        best = None
        # until this epoch's checkpoint is handed to the writer, a failure (a peer lost in the save's collectives)
        # reports where the run stands on disk, not an epoch whose row and checkpoint never land
        self._epoch_end_unsaved = True
        if not math.isfinite(row["train_loss"]) or not math.isfinite(val_loss):
            self._check_finite()
            raise self._diverged(f"{DIVERGED} loss in epoch {st.epoch + 1} (train loss {row['train_loss']:.4g}, "
                                 f"val loss {val_loss:.4g})")
        st.history.append(row)
        # At the step after the epoch's last one: a step never logged before this point, even when
        # this eval was redone after a stop inside it (W&B drops steps that go backwards).
        self.tracker.log_eval(st.global_step + 1, row)  # as tracking.EVAL_KEYS names them
        if val_acc > st.best_val_acc:
            st.best_val_acc = val_acc
            self.tracker.set_summary(best_val_acc=val_acc)
        if self.env.is_main:
            log.info("epoch %d/%d: train loss %.4f acc %.4f (%d images) | val loss %.4f acc %.4f (%d images) | "
                     "%.1f s, %.0f img/s", st.epoch + 1, self.cfg.trainer.epochs, row["train_loss"], row["train_acc"],
                     int(tr[2]), val_loss, val_acc, n_val, seconds, row["images_per_second"])
            if val_acc > self._best_file_acc:  # = best_val_acc unless a best.pt write was lost
                self._best_file_acc = val_acc
                best = snapshot({"model": self.model.state_dict(), "epoch": st.epoch + 1,
                                 "global_step": st.global_step, "val_acc": val_acc,
                                 "config": self.cfg_dict, "precision": self.precision,
                                 "data": self.data_fingerprint})
        st.epoch += 1
        st.step_in_epoch = 0
        st.epoch_seconds = 0.0
        self.epoch_sums.zero_()
        # history.csv's row and best.pt land after the epoch's step file, and only with it: either without it
        # would read, at the next start, as an earlier run's epochs (checkpoint.earlier_epochs): it would start over
        self.save(epoch_end=(row, best))
        self._status_once_saved()

    # -- stopping ----------------------------------------------------------------------------------
    def _position(self) -> str:
        """Where training stands, for the stop's log line: epochs done as `status` counts them."""
        st, epochs = self.state, self.cfg.trainer.epochs
        done = f"{min(st.epoch, epochs)}/{epochs} epochs done"
        if st.epoch >= epochs:
            return f"{done}, in the test evaluation"
        if st.step_in_epoch == 0:
            return done if st.epoch else "before the first step"
        if st.step_in_epoch >= self.steps_per_epoch:
            return f"epoch {st.epoch + 1} trained, not yet scored; {done}"
        return f"epoch {st.epoch + 1}, step {st.step_in_epoch}/{self.steps_per_epoch}; {done}"

    def _own_signal_decides(self, stop: StopRequest) -> bool:
        """Rank 0's own signal is the stop's, unless it was a warning and another rank's SIGTERM (or INT, HUP) made
        the stop an exit: that one is named, or `status` would say USR2 of a run nothing requeued."""
        return stop.received is not None and not (stop.is_warning and self.polls.agreed.terminate)

    def _stop(self, stop: StopRequest) -> int:
        """The checkpoint is written; decide requeue vs exit (rank 0 asks Slurm), then every rank leaves."""
        st = self.state
        self.polls.finish()  # in flight since the stop step; its flags change nothing now
        self.wait_checkpoints()  # durable before Slurm requeues (kills) the job or the process exits
        own = self._own_signal_decides(stop)
        got = stop.received if own else self.polls.agreed.signum  # the signal status.json names
        if self.env.is_main:
            said = signal.Signals(stop.received).name if own else self.polls.agreed.said()
            # one received in start-up is honoured at the first steps: said as such, not as "during start-up at step 2"
            when = "received during start-up, taken" if own and stop.in_start_up else f"during {self._phase}"
            log.warning("stop requested (%s) %s at global step %d: checkpoint saved", said, when, st.global_step)
        lead = signal_lead_s()  # checked in check_launch
        kind = self.dist.broadcast_object(classify_stop(self.polls.agreed, self.slurm, lead) if self.env.is_main else None)
        decision = "interrupted"
        if kind == "timeout" and not st.count_timeout(self.slurm.job_id, self.cfg.checkpoint.max_requeues):
            decision = "gave_up"
            if self.env.is_main:
                log.error("time limit reached %d times (checkpoint.max_requeues=%d): not requeueing; resubmit "
                          "the same run to continue from its checkpoint", st.timeouts + 1,
                          self.cfg.checkpoint.max_requeues)
        elif kind in ("timeout", "preempted"):
            # After the time limit's own SIGTERM (`late`) KillWait runs (30 s by default): the requeue first, each
            # Slurm command given LATE_SLURM_S; a SIGKILL before it left the job TIMEOUT, the run not requeued
            late = self.polls.agreed.terminate
            if kind == "timeout" and not late:
                self.save()  # the count must survive the requeue
                self.wait_checkpoints()
            # W&B first: a requeue sends SIGTERM to every process of the step, W&B's service included. Its summary
            # says requeued now, as status.json will (a requeue Slurm then refuses cannot be said to W&B any more).
            # After the time limit's SIGTERM, which reached W&B's service already, it is said after the requeue
            if not late:
                self._tell_tracker_requeued()
            ok = self.dist.broadcast_object(self.slurm.requeue(LATE_SLURM_S if late else 30) if self.env.is_main
                                            else None)
            if late and ok:
                if kind == "timeout":  # the count, for the requeued start (lost to a SIGKILL now: counted one short)
                    self.save()
                    self.wait_checkpoints()
                self.write_status("requeued", signal=signal.Signals(got).name if got else None)
                self._tell_tracker_requeued()  # after status.json: W&B's finish is the first that KillWait cuts short
            decision = "requeued" if ok else "interrupted"
            if not ok and self.env.is_main and self.slurm.cancelled:
                log.warning("job %s was cancelled (scancel) while it stopped: not requeued, as the cancel asks",
                            self.slurm.job_id)
            elif not ok and self.env.is_main and self.slurm.unanswered:
                log.warning("Slurm did not answer the requeue of job %s (its controller busy or down; the lines "
                            "above say what it said): it may still requeue the job, which then resumes the run, or "
                            "not (`allconv-hpc status` tells which)", self.slurm.job_id)
            elif not ok and self.env.is_main:
                log.warning("Slurm did not requeue job %s (cluster.requeue=false submits with --no-requeue, and a "
                            "site may forbid requeues)", self.slurm.job_id)
        if self.env.is_main:
            sweep = self._sweep_point()  # a point trained by hand resumes by the same train command
            command = f"the sweep's submit command (`allconv-hpc status {sweep}` prints it)" if sweep else None
            if self.cfg.checkpoint.resume != "never":
                again = f"{command or 'the same command'} resumes it from this checkpoint"
            elif sweep:
                again = f"checkpoint.resume=auto in {command} resumes it from this checkpoint"
            else:
                again = ("checkpoint.resume=auto resumes it from this checkpoint (the same command, with "
                         "checkpoint.resume=never, starts it over)")
            if decision == "interrupted" and self.slurm.in_slurm and got == signal.SIGTERM:  # scancel, or Slurm's
                again += " (or Slurm itself, if it preempted the job without a warning signal)"  # PreemptMode=REQUEUE
            log.warning("%s at global step %d (%s)%s", decision, st.global_step, self._position(),
                        f": the run stops with its checkpoint; {again}" if decision == "interrupted" else "")
            if self.env.source == "local" and stop.is_warning:
                log.warning("a cluster=local job gets %s signal_lead_s before cluster.timeout_min (or when sent "
                            "by hand), and nothing requeues it: submit the same command again to resume (a larger "
                            "cluster.timeout_min runs longer)", signal.Signals(stop.received).name)
        self.write_status(decision, signal=signal.Signals(got).name if got else None)
        # a refused requeue after a warning finished W&B with 0 above (it reads "finished", status.json
        # "interrupted"): W&B's service had to end before the requeue's SIGTERM, and whether Slurm requeues is known
        # only after
        self._finish_tracker(0 if decision == "requeued" else 1)
        if self.entry_point:
            exit_said(self.cfg.checkpoint.signal)
        return {"requeued": EXIT_REQUEUED, "gave_up": EXIT_GAVE_UP}.get(decision, EXIT_INTERRUPTED)

    def _tell_tracker_requeued(self) -> None:
        if self.env.is_main:
            self._summary_status("requeued")
        self._finish_tracker(0)

    def _finish_tracker(self, exit_code: int) -> None:
        if not self._tracker_done:
            self._tracker_done = True
            # as README says: a stop (exit 3, 4) closes the segment failed (1), a requeue finished (0); 130 a Ctrl-C
            wandb_code = {EXIT_INTERRUPTED: 1, EXIT_GAVE_UP: 1, EXIT_REQUEUED: 0}.get(exit_code, exit_code)
            self.tracker.finish(exit_code=wandb_code)
            seg = self.tracker.segment_dir
            if self.tracker.mode == "offline" and seg is not None and seg.exists():  # rank 0's, below wandb's own
                # (one set aside as empty just now, in finish, is said there)
                log.info("W&B offline: `wandb sync %s/wandb/offline-run-*` uploads every start of this run, in order "
                         "(wandb's own sync line names this start's alone)", shlex.quote(str(self.run_dir)))

    def close(self, exit_code: int = 0) -> None:
        """Every exit path, also after a failed setup: W&B finished, then the process group destroyed."""
        try:
            if hasattr(self, "writer"):  # a failure path: what was saved before it still lands on disk
                try:
                    self.writer.close()
                except CheckpointError as e:
                    log.error("%s", e)
            if hasattr(self, "tracker"):
                try:
                    self._finish_tracker(exit_code)
                    if self.entry_point and exit_code in AGREED_EXITS:  # a completed run's last word: W&B closed
                        exit_said(self.cfg.checkpoint.signal)
                except KeyboardInterrupt:  # a completed run's status.json and checkpoints are written: only W&B was cut
                    seg = getattr(self.tracker, "segment_dir", None)
                    if exit_code == 0 and seg is not None:
                        log.warning("Ctrl-C while W&B finished: the run had completed (its checkpoints and "
                                    "status.json are written); W&B's record may lack its last logs and summary: "
                                    "`wandb sync %s` uploads what this start wrote", seg)
                    raise
        finally:
            # DDP's reducer must die before the process group: left to interpreter exit, it aborted a rank
            # ("terminate called without an active exception") in 4 of 70 two-rank runs; freed here, 0 of 80
            self.net = None
            gc.collect()
            if exit_code in AGREED_EXITS:
                try:  # ranks leave together: a rank tearing down gloo under a peer's feet can abort it
                    self.dist.barrier()
                except Exception:
                    pass
            try:
                self.dist.close()
            finally:
                if self._lock_fd is not None:  # after the last write (writer closed above)
                    os.close(self._lock_fd)
                    self._lock_fd = None

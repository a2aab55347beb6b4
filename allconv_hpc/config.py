"""Typed configuration: the composed Hydra config becomes these dataclasses, which refuse bad values.

Every check here is cheap and runs before any data is read, any process group is formed or any
job is queued. `ConfigError` carries a one-line message naming the key and how to fix it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

# The seed's Keras net, then the paper's 4 variants x 3 base models (models.py builds them from the name).
MODEL_NAMES = ("allcnn_c", "allcnn_seed", "model_c", "strided_cnn_c", "convpool_cnn_c",
               "allcnn_a", "model_a", "strided_cnn_a", "convpool_cnn_a",
               "allcnn_b", "model_b", "strided_cnn_b", "convpool_cnn_b")
DATASETS = {"cifar10": 10, "cifar100": 100, "synthetic": 10}
OFFICIAL_SIZES = (50_000, 10_000)  # CIFAR-10/100 train, test images; a rebuilt copy may hold fewer
SYNTHETIC_SIZES = (2048, 512)  # data=synthetic: train, test images when data.train_size/test_size are null
SYNTHETIC_MAX = 200_000  # ~25 KB an image while generated (float32 image + noise): 5 GB; a smoke-test source
AUGMENTS = ("paper", "seed", "none")
PREPROCESSES = ("channel", "gcn_zca")  # see preprocess.py
SCHEDULES = ("paper", "cosine", "onecycle", "constant", "inverse_time")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
CPU_PRECISIONS = ("fp32", "auto")  # what runs without CUDA (auto is fp32 there)
MAX_THREADS = 1024  # trainer.threads: more than any node's cores
DEVICES = ("auto", "cpu", "cuda")
# torch.compile's modes; GRAPH_MODES capture CUDA graphs (one launch per graph replay) on CUDA
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")
WANDB_MODES = ("online", "offline", "disabled")
RESUME_MODES = ("auto", "never", "must")
# the cluster group's keys (conf/cluster/*.yaml): the launcher reads them, the trainer never does
CLUSTER_KEYS = {"backend", "nodes", "gpus_per_node", "gpu_type", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min",
                "partition", "account", "qos", "constraint", "exclude", "additional_parameters", "setup",
                "signal", "signal_lead_s", "requeue", "array_parallelism"}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


class OtherConfig(ConfigError):
    """A run folder's run (or one checkpoint of it) is of another config; ``diff`` names each key."""

    def __init__(self, message: str, diff: list[str]) -> None:
        super().__init__(message)
        self.diff = diff


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


MAX_WIDTH = 64
FLOAT32_MAX = 3.4028234663852886e38  # the optimizer's kernels take lr and weight decay as float32
FLOAT32_TINY = 1.1754943508222875e-38  # its smallest normal number: below, 0 or a subnormal


# the keys of a fixed set of values, checked by _choice
CHOICES = {"model.name": MODEL_NAMES, "data.name": tuple(DATASETS), "data.augment": AUGMENTS,
           "data.preprocess": PREPROCESSES, "schedule.name": SCHEDULES, "trainer.device": DEVICES,
           "trainer.precision": PRECISIONS, "trainer.compile_mode": COMPILE_MODES,
           "trainer.progress": ("auto", "bar", "log"), "checkpoint.resume": RESUME_MODES,
           "dist.backend": ("auto", "gloo", "nccl")}
# every key taking one of a fixed set (those checked elsewhere: signal names, null for auto, the cluster backend):
# compose.comma_fix says so of a comma list, where quoting would only make a string no choice matches
CHOICE_KEYS = frozenset(CHOICES) | {"wandb.mode", "checkpoint.signal", "cluster.backend", "cluster.signal"}


def _choice(key: str, value: Any) -> None:
    allowed = CHOICES[key]
    _check(value in allowed, f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def _smallest_width(base: int) -> float:
    """The smallest width of 4 significant digits whose `base` channels round to one (round(0.5) is 0)."""
    step = 10.0 ** (math.floor(math.log10(0.5 / base)) - 3)
    width = math.ceil(0.5 / base / step) * step
    return round(width + step if round(base * width) < 1 else width, 12)


@dataclass
class ModelConfig:
    name: str = "allcnn_c"          # one of MODEL_NAMES
    width: float = 1.0              # multiplies every hidden width (96, 192); 1.0 = the paper
    dropout: bool = True            # false turns every dropout layer off
    input_dropout: float = 0.2      # probability, on the input image (paper: 0.2)
    hidden_dropout: float = 0.5     # probability, after each strided conv / pooling (paper: 0.5)
    final_relu: bool = False        # ReLU on the class scores (the paper's table lists one)
    num_classes: int = 10           # set from the dataset by the config

    def __post_init__(self) -> None:
        _choice("model.name", self.name)
        _check(self.width > 0, f"model.width={self.width} must be > 0")
        _check(self.width <= MAX_WIDTH, f"model.width={self.width} is wider than {MAX_WIDTH} ({MAX_WIDTH} already makes "
                                        f"{round(192 * MAX_WIDTH)}-channel layers and ~5.6 G parameters); use a smaller width")
        for base in (96, 192):
            _check(round(base * self.width) >= 1,
                   f"model.width={self.width} makes a {base}-channel layer empty (round({base} * width) "
                   f"channels); use width >= {_smallest_width(base):g}")
        for key in ("input_dropout", "hidden_dropout"):
            p = getattr(self, key)
            _check(0.0 <= p < 1.0, f"model.{key}={p} must be in [0, 1)")
        _check(self.num_classes >= 2, f"model.num_classes={self.num_classes} must be >= 2")

    def unused(self) -> set[str]:
        """The keys (model.<key>) models.build_model does not read with this config: changing one changes nothing."""
        return set() if self.dropout else {"model.input_dropout", "model.hidden_dropout"}


@dataclass
class DataConfig:
    name: str = "cifar10"           # cifar10 | cifar100 | synthetic
    root: str = "data"              # folder holding cifar-10-batches-py / cifar-100-python
    download: bool = False          # fetch through torchvision when missing (needs network)
    train_size: Optional[int] = None  # null = all; an int = a subset fixed by the run's seed
    test_size: Optional[int] = None   # null = all; an int = a subset, the same for every seed
    val_size: int = 0               # training images held out for the per-epoch eval (and best.pt); 0 = eval on test
    augment: str = "paper"          # paper: translate <=5 px + h-flip; seed: Keras shift U(-10%, 10%) rounded; none
    preprocess: str = "channel"     # channel: per-channel mean/std; gcn_zca: the paper's contrast norm + ZCA whitening
    num_classes: int = 10           # derived from name; kept here so interpolation can read it

    def __post_init__(self) -> None:
        _choice("data.name", self.name)
        _check(self.name == "synthetic" or str(self.root).strip() != "",  # would read the current folder
               "data.root is empty (an ALLCONV_DATA set to nothing, or an unset shell variable?); give the folder "
               "holding the dataset, or unset ALLCONV_DATA for the default ./data")
        _choice("data.augment", self.augment)
        _choice("data.preprocess", self.preprocess)
        for key in ("train_size", "test_size"):
            v = getattr(self, key)
            _check(v is None or v >= 1, f"data.{key}={v} must be null (all) or >= 1")
        _check(self.val_size >= 0, f"data.val_size={self.val_size} must be >= 0 (0 = no held-out split)")
        if self.name == "synthetic":  # generated in memory at once; no fixed size
            for key in ("train_size", "test_size", "val_size"):
                v = getattr(self, key) or 0
                _check(v <= SYNTHETIC_MAX, f"data.{key}={v} is more synthetic images than generating "
                                           f"them in memory allows (~25 KB each); use <= {SYNTHETIC_MAX:,}")
        else:  # the official counts; data.load checks a smaller rebuilt copy
            left, held = OFFICIAL_SIZES[0] - self.val_size, f" left after data.val_size={self.val_size}"
            _check(left >= 1, f"data.val_size={self.val_size} leaves no {self.name} training image; lower it")
            for key, v, n in (("train_size", self.train_size, left), ("test_size", self.test_size, OFFICIAL_SIZES[1])):
                _check(v is None or v <= n, f"data.{key}={v} is larger than the {n} {self.name} images"
                                            f"{held if key == 'train_size' and self.val_size else ''}; use <= {n} or null")
        _check(self.num_classes == DATASETS[self.name],
               f"data.num_classes={self.num_classes} does not match {self.name} ({DATASETS[self.name]}); the config group "
               f"sets both: {' or '.join('data=' + n for n in DATASETS)} (not data.name)")

    @property
    def train_images(self) -> int:
        """The training images a run gets (a rebuilt CIFAR copy may hold fewer: data.load knows)."""
        default = SYNTHETIC_SIZES[0] if self.name == "synthetic" else OFFICIAL_SIZES[0] - self.val_size
        return self.train_size or default


@dataclass
class OptimConfig:
    lr: float = 0.05                # peak learning rate (after any linear scaling)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.001     # L2 on all weights (paper: 0.001)
    scale_lr: bool = False          # linear scaling: lr * batch_size / base_batch_size
    base_batch_size: int = 128      # reference global batch for scale_lr

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _check(0.0 <= self.momentum < 1.0, f"optim.momentum={self.momentum} must be in [0, 1)")
        _check(not self.nesterov or self.momentum > 0, f"optim.nesterov=true (the default) needs optim.momentum > 0; "
                                                       f"for plain SGD (optim.momentum={self.momentum:g}) add "
                                                       f"optim.nesterov=false")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        for key in ("lr", "weight_decay"):
            v = getattr(self, key)
            _check(v < FLOAT32_MAX, f"optim.{key}={v:g} is beyond float32's range (3.4e38), which the optimizer "
                                    f"computes in; give a smaller value")
            _check(v == 0 or v >= FLOAT32_TINY, f"optim.{key}={v:g} is below float32's smallest normal number "
                                                f"(1.2e-38): the optimizer, computing in float32, would take it as 0 "
                                                f"or nearly; give a larger value{' (or 0)' if key != 'lr' else ''}")
        _check(self.base_batch_size >= 1, f"optim.base_batch_size={self.base_batch_size} must be >= 1")

    def unused(self) -> set[str]:
        """The keys (optim.<key>) the optimizer does not read with this config: changing one changes nothing."""
        return set() if self.scale_lr else {"optim.base_batch_size"}


@dataclass
class ScheduleConfig:
    name: str = "paper"             # paper (steps) | cosine | onecycle | constant | inverse_time
    milestones: list = field(default_factory=lambda: [200, 250, 300])  # epochs, for paper
    gamma: float = 0.1              # factor at each milestone
    warmup_epochs: float = 1.0      # linear warmup from ~0, in epochs (fractions allowed; the paper: none)
    final_lr_ratio: float = 0.0     # cosine/onecycle end lr as a fraction of optim.lr
    pct_start: float = 0.25         # onecycle: fraction of training spent rising
    decay: float = 0.0              # inverse_time: lr / (1 + decay * step), Keras SGD's `decay`

    def unused(self) -> set[str]:
        """The keys (schedule.<key>) this schedule does not read (schedule.lr_factor): changing one changes nothing."""
        used = {"paper": {"milestones", "gamma", "warmup_epochs"}, "constant": {"warmup_epochs"},
                "inverse_time": {"warmup_epochs", "decay"}, "cosine": {"warmup_epochs", "final_lr_ratio"},
                "onecycle": {"pct_start", "final_lr_ratio"}}[self.name]
        return {f"schedule.{f.name}" for f in dataclasses.fields(self) if f.name != "name" and f.name not in used}

    def __post_init__(self) -> None:
        _choice("schedule.name", self.name)
        _check(all(isinstance(m, int) and not isinstance(m, bool) for m in self.milestones),
               f"schedule.milestones={list(self.milestones)} must be whole epochs, e.g. [200,250,300]")
        _check(all(m > 0 for m in self.milestones),
               f"schedule.milestones={list(self.milestones)} must be positive epochs (epoch 1 is the first)")
        _check(all(a < b for a, b in zip(self.milestones, self.milestones[1:])),
               f"schedule.milestones={list(self.milestones)} must be strictly increasing (a repeated epoch multiplies "
               f"the lr by gamma there twice: give it once, with gamma squared in mind)")
        _check(self.warmup_epochs >= 0, f"schedule.warmup_epochs={self.warmup_epochs} must be >= 0")
        _check(0 < self.pct_start < 1, f"schedule.pct_start={self.pct_start} must be in (0, 1)")
        _check(0 <= self.final_lr_ratio <= 1, f"schedule.final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")
        _check(self.decay >= 0, f"schedule.decay={self.decay} must be >= 0")
        _check(self.gamma > 0, f"schedule.gamma={self.gamma} must be > 0 (the lr factor at each milestone)")


@dataclass
class TrainerConfig:
    epochs: int = 350
    batch_size: int = 128           # GLOBAL batch: per-rank batch = batch_size / world size
    eval_batch_size: int = 1000     # global, evaluation only
    device: str = "auto"            # auto (cuda if present) | cpu | cuda
    precision: str = "fp32"         # fp32 | bf16 | fp16 (autocast, CUDA only) | auto (bf16 on Ampere+, else fp32)
    channels_last: bool = False     # NHWC memory format (faster convs on CUDA and CPU)
    compile: bool = False           # torch.compile the model
    compile_mode: str = "default"   # with compile: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    deterministic: bool = False     # bitwise-reproducible on CPU; deterministic kernels on CUDA
    log_every_steps: int = 50       # train metrics to log/W&B every N optimizer steps
    drop_last: bool = False         # drop the last partial batch (fixed shapes for CUDA graphs)
    threads: Optional[int] = None   # torch CPU threads per rank; null = srun task's CPUs, else cores / local ranks
    progress: str = "auto"          # auto (bar on a terminal, log lines otherwise) | bar | log

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"trainer.epochs={self.epochs} must be >= 1")
        _check(self.batch_size >= 1, f"trainer.batch_size={self.batch_size} must be >= 1")
        _check(self.eval_batch_size >= 1, f"trainer.eval_batch_size={self.eval_batch_size} must be >= 1")
        _choice("trainer.device", self.device)
        _choice("trainer.precision", self.precision)
        _choice("trainer.compile_mode", self.compile_mode)
        _check(self.compile or self.compile_mode == "default",
               f"trainer.compile_mode={self.compile_mode} needs trainer.compile=true; add it, or drop compile_mode")
        _check(self.log_every_steps >= 1, f"trainer.log_every_steps={self.log_every_steps} must be >= 1")
        _check(self.threads is None or self.threads >= 1, f"trainer.threads={self.threads} must be >= 1")
        # OpenMP makes them all at the first op: 100,000 crashed a rank (SIGSEGV) with no word
        _check(self.threads is None or self.threads <= MAX_THREADS,
               f"trainer.threads={self.threads} is more than any node has cores for (at most {MAX_THREADS}); give "
               f"the cores a rank may use, or leave it null (the task's CPUs)")
        _choice("trainer.progress", self.progress)


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = 500      # periodic checkpoint every N optimizer steps; null = off
    every_minutes: Optional[float] = None  # and/or every N minutes of wall time; null = off
    keep: int = 2                   # most recent step checkpoints kept (plus best.pt and last.pt)
    resume: str = "auto"            # auto: resume if the run folder has a checkpoint | never | must
    max_requeues: int = 10          # requeues after time limits before giving up (preemptions: always)
    signal: str = "USR2"            # the "about to be stopped" signal Slurm sends (--signal)

    def __post_init__(self) -> None:
        _check(self.every_steps is None or self.every_steps >= 1,
               f"checkpoint.every_steps={self.every_steps} must be null or >= 1")
        _check(self.every_minutes is None or self.every_minutes > 0,
               f"checkpoint.every_minutes={self.every_minutes} must be null or > 0")
        _check(self.keep >= 1, f"checkpoint.keep={self.keep} must be >= 1")
        _choice("checkpoint.resume", self.resume)
        _check(self.max_requeues >= 0, f"checkpoint.max_requeues={self.max_requeues} must be >= 0")
        import signal as _signal
        name = "SIG" + self.signal.upper().removeprefix("SIG")
        _check(hasattr(_signal, name), f"checkpoint.signal={self.signal!r} is not a signal name (e.g. USR2)")
        _check(name not in ("SIGKILL", "SIGSTOP"),
               f"checkpoint.signal={self.signal} cannot be caught, so no checkpoint could follow it; use USR1 or USR2")
        # others mean something else to a process (SIGCHLD: a child ended, so every run stopped at its first step;
        # TERM and INT already checkpoint and stop; faults, terminal and timer signals)
        _check(name in WARNING_SIGNALS, f"checkpoint.signal={self.signal} has a meaning of its own to a process and "
                                        f"would stop runs unasked; use USR1 or USR2 (also HUP, XCPU)")


WARNING_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGXCPU")  # what checkpoint.signal may be


@dataclass
class WandbConfig:
    mode: Optional[str] = None      # online | offline | disabled; null = online with an API key, else offline
    project: str = "allconv-hpc"
    entity: Optional[str] = None
    group: Optional[str] = None     # sweeps set this to the sweep name
    tags: list = field(default_factory=list)
    name: Optional[str] = None      # display name; null = the run folder's name

    def __post_init__(self) -> None:
        _check(self.mode is None or self.mode in WANDB_MODES,
               f"wandb.mode={self.mode!r} is not one of online, offline, disabled (or null for auto)")
        for key in ("project", "entity", "group", "name"):
            v = getattr(self, key)
            _check(not (isinstance(v, str) and not v.strip()),
                   f"wandb.{key}={v!r} is empty (an unset shell variable?); give a name"
                   + ("" if key == "project" else ", or null for the default"))
        # Hydra reads wandb.tags=[1,b] as [1, 'b']: refused here, not only where W&B is used (submit, train online)
        _check(all(isinstance(t, str) for t in self.tags),
               f"wandb.tags={list(self.tags)} must be strings; quote the others, e.g. wandb.tags=['1','b']")


MAX_DIST_TIMEOUT_S = 7 * 86400  # ms must fit torch's C int (24.8 days); 1e10 s failed at once, 1e30 raised OverflowError


@dataclass
class DistConfig:
    timeout_s: Optional[float] = None  # collective timeout; null = 300 on CPU, 1800 on CUDA
    backend: str = "auto"           # auto (nccl on CUDA, gloo on CPU) | gloo | nccl

    def __post_init__(self) -> None:
        t = self.timeout_s
        # at least 1 s: the rendezvous and every collective wait this long; under a millisecond gloo gives up at 0 ms
        _check(t is None or 1 <= t <= MAX_DIST_TIMEOUT_S,
               f"dist.timeout_s={t if t is None else format(t, 'g')} must be >= 1 and at most {MAX_DIST_TIMEOUT_S} (7 "
               f"days): gloo and NCCL take the timeout in int milliseconds, and a collective waiting longer has hung")
        _choice("dist.backend", self.backend)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        # numpy's seeds stop at 2**32, and the streams' seeds (augment.mix_seed: seed * 1_000_003 + offset) must fit torch's
        _check(0 <= self.seed < 2**32, f"seed={self.seed} must be in [0, 2**32)")
        _check(self.model.num_classes == self.data.num_classes,
               f"model.num_classes={self.model.num_classes} != data.num_classes={self.data.num_classes}: the data "
               f"group sets both (data=cifar100 for 100 classes); leave model.num_classes out")
        if self.trainer.device == "cpu":
            _check(self.trainer.precision in CPU_PRECISIONS,
                   f"trainer.precision={self.trainer.precision} needs CUDA; on CPU use trainer.precision=fp32 "
                   f"(or auto)")
            _check(self.dist.backend != "nccl", "dist.backend=nccl needs CUDA, which trainer.device=cpu never uses; "
                                                "on CPU use dist.backend=gloo (or auto)")
        # trainer.drop_last with a global batch larger than the training images leaves no step: known
        # from the sizes alone (data.load checks a smaller rebuilt copy), so refused before any queue
        t, n = self.trainer, self.data.train_images
        _check(self.lr < FLOAT32_MAX, f"optim.lr={self.optim.lr:g} scaled by optim.scale_lr to {self.lr:g} is beyond "
                                      f"float32's range (3.4e38), which the optimizer computes in")
        _check(not t.drop_last or t.batch_size <= n,
               f"trainer.batch_size={t.batch_size} with trainer.drop_last=true leaves no step in an epoch of {n} "
               f"training images; lower the batch size or set trainer.drop_last=false")

    def warnings(self) -> list[str]:
        """What is legal but likely a mistake, said by train and submit (not refused: a run begun so resumes)."""
        s, t = self.schedule, self.trainer
        said = []
        if s.name != "onecycle" and s.warmup_epochs > t.epochs:
            said.append(f"schedule.warmup_epochs={s.warmup_epochs:g} is longer than trainer.epochs={t.epochs}: the "
                        f"learning rate never reaches optim.lr (schedule.warmup_epochs=0 for no warm-up)")
        # a milestone at epoch m applies from the first step of epoch m, so m = trainer.epochs is never reached;
        # generated data is a plumbing check (the smoke run, the tests), a few epochs at one lr by design
        if s.name == "paper" and s.milestones and s.milestones[0] >= t.epochs and self.data.name != "synthetic":
            scaled = sorted({m for m in (round(t.epochs * k / 350) for k in (200, 250, 300)) if 1 <= m < t.epochs})
            fix = (f"schedule.milestones=[{','.join(map(str, scaled))}] (the paper's 200/250/300 of 350 epochs, "
                   f"scaled) or " if scaled else "")
            said.append(f"schedule.milestones=[{','.join(map(str, s.milestones))}]: the run (trainer.epochs="
                        f"{t.epochs}) ends before the first, epoch {s.milestones[0]}, so the learning rate never "
                        f"decays; give milestones within the run, e.g. {fix}schedule=cosine")
        if s.name == "paper" and s.milestones and s.gamma > 1:
            said.append(f"schedule.gamma={s.gamma:g} is over 1: the learning rate grows at each milestone (the paper's "
                        f"steps divide it by 10: gamma=0.1)")
        return said

    @property
    def lr(self) -> float:
        """The peak learning rate actually used (linear scaling applied when asked for)."""
        o = self.optim
        return o.lr * self.trainer.batch_size / o.base_batch_size if o.scale_lr else o.lr

    def identity(self) -> dict:
        """What a resumed run may not change: every key except the operational ones below."""
        flat = flatten(dataclasses.asdict(self))
        return {k: v for k, v in flat.items() if not resumable_change(k)}

    def check_resumable(self, theirs: dict, run_dir, train_state: Optional[dict] = None,
                        folder_key: str = "hydra.run.dir") -> None:
        """Refuse to resume a checkpoint whose identity (see `identity`) differs, naming each key, or
        whose progress (``train_state``) is past ``trainer.epochs``: a run may grow, not shrink.
        ``folder_key``: the option the fix names (hydra.sweep.dir for a sweep's point)."""
        mine = self.identity()
        if theirs:  # a key added since the checkpoint was written: at the value that version behaved as
            theirs = {**{k: v for k, v in ADDED_KEYS.items() if k not in theirs}, **theirs}
        unused = set()  # keys nothing reads, in the checkpoint's config and in this one, may change
        if theirs.get("schedule.name") == self.schedule.name:
            unused |= self.schedule.unused()
        if theirs.get("model.dropout") == self.model.dropout:
            unused |= self.model.unused()
        if theirs.get("optim.scale_lr") == self.optim.scale_lr:
            unused |= self.optim.unused()
        mine = {k: v for k, v in mine.items() if k not in unused}
        theirs = {k: v for k, v in theirs.items() if k not in unused}
        if mine != theirs:
            differ = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
            diff = [f"{k}: {as_given(theirs.get(k))} -> {as_given(mine.get(k))}" for k in differ]
            back = " ".join(f"{k}={shell_word(theirs[k])}" for k in differ if k in theirs)
            raise OtherConfig(f"run folder {run_dir} holds a run of a different config ({'; '.join(diff)}); use "
                              f"another {folder_key}, or checkpoint.resume=never to start over (the old run's "
                              f"files move to checkpoints.oldN/); an override left out of this command, or one "
                              f"given by mistake? {back} resumes that run", diff)
        if train_state:
            mid = bool(train_state.get("step_in_epoch", 0))
            begun = int(train_state.get("epoch", 0)) + (1 if mid else 0)
            if self.trainer.epochs < begun:
                raise ConfigError(f"trainer.epochs={self.trainer.epochs} but the run in {run_dir} has "
                                  f"{'begun' if mid else 'finished'} epoch {begun}; a run can grow, not shrink: use "
                                  f"trainer.epochs >= {begun}, or another {folder_key}")


def empty_last_shard(t: TrainerConfig, n: int, world: int) -> Optional[str]:
    """Why trainer.compile cannot train `n` images on `world` ranks, or None. An epoch's last step, of fewer images
    than ranks, leaves a rank none: eager DDP takes an empty batch, the compiled backward fails on it."""
    left = n % t.batch_size
    if not t.compile or t.drop_last or world == 1 or not 0 < left < world:
        return None
    return (f"trainer.compile=true: the last step of each epoch holds {left} of the {n} training images, fewer than "
            f"the {world} ranks, and the compiled backward fails on a rank that gets none; set trainer.drop_last=true, "
            f"or a trainer.batch_size (or data.train_size) that leaves none or at least {world} images over")


def as_given(v: Any) -> str:
    """A value as an override gives it (true, null), not as Python prints it (True, None)."""
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else repr(v)


def shell_word(v: Any) -> str:
    """A value as an override gives it, as one word of a shell command (a list without spaces)."""
    return f"[{','.join(as_given(x) for x in v)}]" if isinstance(v, (list, tuple)) else as_given(v)


# Keys a resume may change: where things run and how they are logged, not what is learned.
# trainer.epochs may grow to extend a run (schedules that depend on it then change shape).
RESUMABLE_CHANGES = ("data.root", "data.download", "trainer.epochs", "trainer.eval_batch_size", "trainer.device",
                     "trainer.precision", "trainer.channels_last", "trainer.compile", "trainer.compile_mode",
                     "trainer.deterministic",
                     "trainer.log_every_steps", "trainer.threads", "trainer.progress", "checkpoint.", "wandb.",
                     "dist.")


# Identity keys added after checkpoints of older versions exist, with the value those versions acted
# as if they had (so their runs still resume). A new identity key goes here.
ADDED_KEYS = {"schedule.decay": 0.0, "data.val_size": 0, "data.preprocess": "channel"}


def resumable_change(key: str, also: tuple = ()) -> bool:
    """Whether a resume may change ``key`` ('trainer.epochs', or a whole group such as 'wandb'), with
    ``also`` as more such prefixes: one reading of RESUMABLE_CHANGES for the trainer and the launcher."""
    return any(key == p.rstrip(".") or key.startswith(p.rstrip(".") + ".") for p in (*also, *RESUMABLE_CHANGES))


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_key(d: dict) -> str:
    """A config (dict) as a key under which 1 and 1.0 are one value: the config keeps an int given for a float key
    as given, so optim.lr=1 and optim.lr=1.0 compose to one run under two folder names."""
    def same(v):
        if isinstance(v, dict):
            return {k: same(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [same(x) for x in v]
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v
    return json.dumps(same(d), sort_keys=True, default=str)


# What ranks may see differently: a node's own copy of the data (a job's local disk), its CPU threads (nodes of
# other sizes), how it shows progress; W&B, which rank 0 alone reads. Exact keys, and groups ending in ".".
PER_RANK_KEYS = ("data.root", "trainer.threads", "trainer.progress", "wandb.")


def _per_rank(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in PER_RANK_KEYS)


def rank_difference(views: list[dict]) -> Optional[str]:
    """The first key whose value differs between rank 0's view and another rank's (`views`: each rank's
    {key: value}, flat), said as "rank R has K=V where rank 0 has V0"; None where all agree."""
    for rank, view in enumerate(views[1:], 1):
        for key in sorted(set(view) | set(views[0])):
            if not _per_rank(key) and view.get(key) != views[0].get(key):
                return f"rank {rank} has {key}={view.get(key)!r} where rank 0 has {views[0].get(key)!r}"
    return None


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
            "trainer": TrainerConfig, "checkpoint": CheckpointConfig, "wandb": WandbConfig, "dist": DistConfig}


# what each annotation accepts (annotations are strings here: `from __future__ import annotations`)
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list": (list, tuple)}


def _reads_as(text: str, base: str) -> bool:
    """Whether a string is a value of the type `base` names written out (an env variable's "10", "0.1", "true")."""
    if base == "bool":
        return text.strip().lower() in ("true", "false")
    if base not in ("int", "float"):
        return False
    try:
        {"int": int, "float": float}[base](text.strip())
        return True
    except ValueError:
        return False


def _check_type(key: str, value: Any, annotation: str) -> None:
    """Dataclasses do not enforce their annotations: without this, trainer.epochs=2.5 or
    model.dropout=maybe (a truthy string) would pass and misbehave later."""
    optional = annotation.startswith("Optional[")
    base = annotation[len("Optional["):-1] if optional else annotation
    if base not in _TYPES:  # a config section: built and checked on its own
        return
    if value is None:
        _check(optional, f"{key}=null is not allowed; give {'an' if base == 'int' else 'a'} {base}")
        return
    ok = isinstance(value, _TYPES[base]) and not (base in ("int", "float") and isinstance(value, bool))
    hint = {"bool": " (true or false)", "int": " (a whole number)"}.get(base, "")
    if base == "int" and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:  # 1e2 is a float
        hint = f" (a whole number: {key}={int(value)})"
    if isinstance(value, str) and _reads_as(value, base):  # quoted, or ${oc.env:VAR}'s: a string, even "10"
        hint = (f"{hint.rstrip(')')}; here a string: give it unquoted, {key}={value.strip()}; one from ${{oc.env:VAR}} "
                f"is decoded by '{key}=\"${{oc.decode:${{oc.env:VAR}}}}\"', or given by the shell, {key}=$VAR"
                f"{')' if hint else ''}")
    if base == "list" and isinstance(value, (str, int, float)):  # wandb.tags=foo: the brackets are easy to miss
        hint = f", e.g. {key}=[{as_given(value).strip(chr(39))}]"
    _check(ok, f"{key}={value!r} must be {'an' if base == 'int' else 'a'} {base}{hint}"
               f"{', or null' if optional else ''}")
    # inf and nan pass every range check below (inf > 0) and fail late: lr=inf after an epoch
    _check(base != "float" or math.isfinite(value), f"{key}={value!r} must be a finite number")


def _build(cls, values: dict, prefix: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    _check(not unknown, f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                        f"known under {prefix or 'top level'}: {', '.join(sorted(known))}")
    for f in fields(cls):
        if f.name in values:
            _check_type(prefix + f.name, values[f.name], str(f.type))
    try:
        return cls(**values)
    except TypeError as e:  # a value of the wrong shape
        raise ConfigError(f"bad value under {prefix or 'top level'}: {e}") from None


def from_dict(d: dict) -> Config:
    """Build a validated Config from a plain dict (the resolved Hydra config, minus hydra/cluster keys)."""
    d = {k: v for k, v in d.items() if k not in ("hydra", "cluster", "experiment")}
    sections = {}
    for name, cls in SECTIONS.items():
        sub = d.pop(name, {}) or {}
        _check(isinstance(sub, dict), f"config group {name!r} must be a mapping, got {sub!r}")
        sections[name] = _build(cls, sub, name + ".")
    return _build(Config, {**d, **sections}, "")

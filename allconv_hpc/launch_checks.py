"""Checks of a start that need the launch context (world size, CUDA, this node's compilers): cheap, before the
run folder is written. `submit` checks the compiler of a cluster=local job, which runs on its own machine."""
from __future__ import annotations

import functools
import os
import shutil

import torch

from .config import CPU_PRECISIONS, Config, ConfigError, empty_last_shard
from .distributed import DistEnv
from .preempt import sigint_deferred, signal_lead_s


def check_launch(cfg: Config, env: DistEnv) -> None:
    """The checks that need the launch context (world size, CUDA): cheap, before any file is written."""
    t = cfg.trainer
    if t.batch_size % env.world_size:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is not divisible by the world size "
                          f"{env.world_size}; use a multiple of {env.world_size}")
    said = empty_last_shard(t, cfg.data.train_images, env.world_size)
    if said:
        raise ConfigError(said)
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible here; use trainer.device=cpu or auto")
    cuda = uses_cuda(t)
    if not cuda and cfg.dist.backend == "nccl":  # one process too: submit refuses it for one CPU task alike
        raise ConfigError(f"dist.backend=nccl needs CUDA and none is used here (trainer.device={t.device}); "
                          f"use dist.backend=gloo (or auto) on CPU")
    if cuda and env.distributed and cfg.dist.backend != "gloo" and env.source == "torchrun":
        # torchrun's workers share one view of the node's GPUs (Slurm may give each task its own, one in view)
        gpus = torch.cuda.device_count()
        if env.local_world_size > gpus:  # NCCL refuses two ranks on one GPU, in words of a rendezvous failure
            raise ConfigError(f"{env.local_world_size} ranks on this node but {gpus} GPU(s) visible: NCCL takes one "
                              f"rank per GPU; start at most {gpus} (torchrun --nproc_per_node={gpus}), or share them "
                              f"with dist.backend=gloo")
    if not cuda and t.precision not in CPU_PRECISIONS:
        raise ConfigError(f"trainer.precision={t.precision} needs CUDA and none is used here "
                          f"(trainer.device={t.device}); use trainer.precision=fp32 (or auto) on CPU")
    try:
        signal_lead_s()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if t.compile:
        check_compiler(cuda)


def uses_cuda(t) -> bool:
    """Whether trainer config `t` trains on a GPU here (device cuda, or auto with one visible)."""
    return t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())


def check_compiler(cuda: bool) -> None:
    """torch.compile builds its kernels at the first step, with a C compiler (Triton's launcher, on CUDA) or a C++
    one (inductor's CPU kernels): one missing on this node fails there, with a traceback, after the data load."""
    with sigint_deferred():  # inductor imports torch._dynamo, and with it Triton (see make_sgd)
        _find_compiler(cuda)


@functools.cache  # a node's compilers stay put: train checks before its lock, the Trainer again (used alone too)
def _find_compiler(cuda: bool) -> None:
    if cuda:  # Triton's own search: $CC, else gcc, else clang
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
        if cc and shutil.which(cc):
            return
        what = "a C compiler (Triton builds with $CC, gcc or clang)"
    else:
        try:
            from torch._inductor import config as inductor
            from torch._inductor.cpp_builder import get_cpp_compiler
        except ImportError:  # another torch's layout: left to its own error at the first step
            return
        try:
            get_cpp_compiler()  # runs `$CXX --version` (g++; clang++ on macOS), as inductor will
            return
        except Exception:
            tried = " or ".join(repr(c) for c in inductor.cpp.cxx if c)
            what = f"a C++ compiler (inductor builds CPU kernels with $CXX, here {tried})"
    raise ConfigError(f"trainer.compile=true needs {what} and finds none on this node; load one (e.g. `module load "
                      f"gcc`, in cluster.setup for a job) or set trainer.compile=false")

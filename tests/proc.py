"""Run `allconv-hpc train` as real processes for the tests: one, under torchrun, or as hand-made ranks."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from allconv_hpc.checkpoint import load_file
from allconv_hpc.history import read_history

PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# tiny, fast, deterministic defaults; tests add what they vary
TINY = ["data=synthetic", "data.train_size=300", "data.test_size=101", "model.width=0.125",
        "trainer.batch_size=60", "trainer.epochs=2", "trainer.threads=1", "trainer.progress=log",
        "trainer.log_every_steps=1", "wandb.mode=disabled", "dist.timeout_s=30"]


def clean_env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "WANDB_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC",
                                "ALLCONV_"))}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", HOME=str(tmp / "home"), TMPDIR=str(tmp / "tmpdir"),
               PYTHONUNBUFFERED="1")
    (tmp / "home").mkdir(exist_ok=True)
    (tmp / "tmpdir").mkdir(exist_ok=True)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_cmd(run_dir: Path, overrides: list[str], nproc: int = 1) -> list[str]:
    args = ["-m", "allconv_hpc", "train", *overrides, f"hydra.run.dir={run_dir}"]
    if nproc == 1:
        return [PY, *args]
    return [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args]


def run_train(tmp: Path, run_dir: Path, overrides: list[str], nproc: int = 1, timeout: float = 300,
              check: bool = True, **env) -> subprocess.CompletedProcess:
    r = subprocess.run(train_cmd(run_dir, overrides, nproc), env=clean_env(tmp, **env), capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"train exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(tmp: Path, run_dir: Path, overrides: list[str], world: int,
                entry: tuple[str, ...] = ("-m", "allconv_hpc", "train"), rank_overrides: list[list[str]] | None = None,
                local_ranks: list[int] | None = None, **extra_env) -> list[subprocess.Popen]:
    """Ranks started by hand with torchrun's variables (no agent that would kill the survivors).
    rank_overrides: each rank's own overrides, given last; local_ranks: each rank's LOCAL_RANK (as on several
    nodes: [0, 0, 1] is rank 0 on one node, ranks 1 and 2 on another), else its rank."""
    port = free_port()
    procs = []
    for r in range(world):
        local = local_ranks[r] if local_ranks else r
        env = clean_env(tmp, RANK=r, WORLD_SIZE=world, LOCAL_RANK=local, LOCAL_WORLD_SIZE=world,
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra_env)
        own = rank_overrides[r] if rank_overrides else []
        procs.append(subprocess.Popen([PY, *entry, *overrides, f"hydra.run.dir={run_dir}", *own],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_for_line(path: Path, needle: str, timeout: float = 120, proc: subprocess.Popen | None = None,
                  offset: int = 0) -> str:
    """Poll a log file until a line containing `needle` appears; returns that line. offset: where in the
    file to start looking (train.log is appended to by every start of a run)."""
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            for line in text.splitlines():
                if needle in line:
                    return line
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {needle!r} appeared in {path}")
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} did not appear in {path} within {timeout} s")


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 90) -> None:
    """Until rank 0 (`proc`) is in its rendezvous: its store listens on `port` (a signal sent before would
    wait out the timeout, or meet handlers not yet set)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "rank 0 never reached the rendezvous"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)


def final_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "checkpoints" / "last.pt")["model"]


def history(run_dir: Path) -> list[dict]:
    return read_history(run_dir / "history.csv")


# DDP vs one process differ by float summation order only: ~1e-4 in a weight after a few steps on some CPUs (seen
# 1.4e-4 on an AMD EPYC without AVX-512). A real fault (a shard seen twice, a gradient not averaged) is 1e-2 and up.
def assert_same_weights(a: dict, b: dict, exact: bool = True, atol: float = 1e-3) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{k} differs (max {float((a[k] - b[k]).abs().max()):.3g})"
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


TIMING = ("epoch_seconds", "images_per_second")


def assert_same_history(a: list[dict], b: list[dict], exact: bool = True) -> None:
    assert len(a) == len(b) and len(a) > 0
    for ra, rb in zip(a, b):
        for k in ra:
            if k in TIMING:
                continue
            if exact:
                assert ra[k] == rb[k], f"epoch {ra['epoch']} {k}: {ra[k]!r} != {rb[k]!r}"
            else:  # an accuracy is a count: a logit within float noise of a tie flips one image (1/300, 1/101)
                tol = 0.01 + 1e-9 if k.endswith("_acc") else 1e-5 + 1e-4 * abs(rb[k])
                assert abs(ra[k] - rb[k]) <= tol, f"epoch {ra['epoch']} {k}: {ra[k]} vs {rb[k]}"


def hold_lock(run_dir: Path, job_id: str, hold_s: float, group: str = "") -> subprocess.Popen:
    """A real second process that takes the run lock as Slurm job `job_id` (rank 0 of rendezvous `group`)
    and holds it for hold_s."""
    code = ("import sys, time; from pathlib import Path; from allconv_hpc import runlock; "
            "runlock.acquire(Path(sys.argv[1]), group=sys.argv[3] or None); print('held', flush=True); "
            "time.sleep(float(sys.argv[2]))")
    p = subprocess.Popen([PY, "-c", code, str(run_dir), str(hold_s), group], stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "SLURM_JOB_ID": job_id})
    assert p.stdout.readline() == "held\n"
    return p

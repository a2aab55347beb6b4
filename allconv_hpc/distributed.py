"""Launch-context detection and the process group. Nothing else in the package calls init_process_group.

Order of detection: torchrun variables (RANK/WORLD_SIZE/...), then a task of submitit's LocalExecutor
(cluster=local: SUBMITIT_LOCAL_*), then a Slurm job step (srun or submitit: SLURM_PROCID/
SLURM_STEP_NUM_TASKS/...), else a single process. Under Slurm the master is the first
host of the step and the port is derived from the job id and the restart count, so a requeued job
never meets the rendezvous of its previous life; cluster=local derives it from its controller's pid.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from .localjob import LOCAL_PORT_ENV  # set by launcher.TrainJob, which must not import torch (this module)

log = logging.getLogger(__name__)


def clipped(message: str, limit: int = 2000) -> str:
    """A one-line error as a record keeps it: whole (train.log's line), a traceback-sized one cut and marked."""
    return message if len(message) <= limit else message[:limit - 4] + " ..."


class DistributedError(RuntimeError):
    """A peer rank failed or vanished; the message names it when it can be known."""


class PeerInterrupted(DistributedError):
    """A peer rank was interrupted (a Ctrl-C it reported): a stop the user asked for, not a failure."""


class PeerLost(DistributedError):
    """A peer rank vanished without a word (killed: the OOM killer, a node failure): nothing of this run failed,
    and its checkpoints stand, so the same command resumes it."""


class PortInUse(DistributedError):
    """Rank 0 could not listen on the rendezvous port: another job or program on its node holds it."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"          # single | torchrun | slurm | local (submitit's LocalExecutor)
    # this world's own (the job and its restart, torchrun's attempt): the prefix of its rendezvous keys, so ranks of
    # another job that reach its store (two job ids map to one port) wait for their own peers, not join this world
    world_key: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list, e.g. 'gpu[01-03,07],n1' -> gpu01 gpu02 gpu03 gpu07 n1.

    Bracket groups may be followed by a suffix or another group ('a[1-2]-ib', 'r[1-2]n[1-2]').
    Anything else raises ValueError: a wrong master address would only show up as a rendezvous hang.
    """
    tokens = re.findall(r"(?:[^,\[\]]|\[[^\]]*\])+", nodelist)
    if not tokens or ",".join(tokens) != nodelist:
        raise ValueError(f"cannot parse the Slurm host list {nodelist!r}")
    return [host for token in tokens for host in _expand_token(token, nodelist)]


def _expand_token(token: str, nodelist: str) -> list[str]:
    m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", token)
    if not m:
        if "[" in token or "]" in token:
            raise ValueError(f"cannot parse the Slurm host list {nodelist!r}")
        return [token]
    prefix, ranges, rest = m.groups()
    tails = _expand_token(rest, nodelist) if rest else [""]
    hosts = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or not (hi.isdigit() or not hi):
            raise ValueError(f"cannot parse the range {part!r} in the Slurm host list {nodelist!r}")
        hosts += [f"{prefix}{i:0{len(lo)}d}{tail}" for i in range(int(lo), int(hi or lo) + 1) for tail in tails]
    return hosts


# Below Linux's ephemeral range (32768-60999), where a port could already be held by an outgoing connection.
PORT_BASE, PORT_SPAN = 10000, 22768


def slurm_port(job_id: str, restart_count: int, step: int = 0) -> int:
    """A port in [10000, 32768) from the job id, restart count (fresh on every requeue) and job step (two sruns of
    one job at once, on one node); also for cluster=local, whose job id is its controller's pid."""
    return PORT_BASE + (int(re.sub(r"\D", "", job_id) or 0) * 97 + restart_count * 7919 + step * 4583) % PORT_SPAN


def _tasks_on_this_node(e: Mapping[str, str], hosts: list[str]) -> int:
    """This node's entry of SLURM_STEP_TASKS_PER_NODE ("4(x2),2" = 4, 4, 2 for the step's nodes in
    order): nodes may differ (srun --ntasks=N, mixed node sizes), so the first entry is not ours."""
    spec = e.get("SLURM_STEP_TASKS_PER_NODE", e.get("SLURM_NTASKS_PER_NODE", "1"))
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:  # a format we do not know: its first number, as before
            first = re.search(r"\d+", spec)
            return int(first.group(0)) if first else 1
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = e.get("SLURMD_NODENAME")
    index = hosts.index(node) if node in hosts else _number(e, "SLURM_NODEID")
    return counts[index] if 0 <= index < len(counts) else counts[0]


def _number(e: Mapping[str, str], key: str, default: int = 0) -> int:
    """An int from the launcher's variable `key`, or a DistributedError naming it (not a ValueError traceback)."""
    value = e.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{key}={value!r} is not a number (the launcher sets it: left in this shell by "
                               f"another job or by hand?); unset it, or start through the launcher") from None


def _checked(env: DistEnv, keys: str, local_key: str) -> DistEnv:
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        said = f"rank {env.rank} of a world of {env.world_size} ({keys}) is no rank"
    elif env.local_rank < 0:
        said = f"{local_key}={env.local_rank} is no local rank (a GPU index, from 0)"
    else:
        return env
    raise DistributedError(f"{said}: set by hand, or left in this shell by another job? unset them, or start "
                           f"through the launcher")


# a rendezvous that never fills, of a process torchrun did not start (no TORCHELASTIC_RUN_ID) though RANK and
# WORLD_SIZE are set: a hand start in a shell that holds them
_BY_HAND = ("; the world size came from WORLD_SIZE, and torchrun did not start this process: started by hand in a "
            "shell that holds it? unset RANK and WORLD_SIZE, or start with torchrun")


def launch_of(env: DistEnv) -> str:
    """What started the ranks: `source`, but "by_hand" for RANK and WORLD_SIZE set without torchrun (tests, an mpirun
    wrapper, a shell that kept another launch's), which `detect_env` reads as torchrun's."""
    return "by_hand" if env.source == "torchrun" and "TORCHELASTIC_RUN_ID" not in os.environ else env.source


def detect_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    e = os.environ if environ is None else environ
    for key in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):  # read later (resume, the lock): checked now
        _number(e, key)
    if "RANK" in e and "WORLD_SIZE" in e:
        world = _number(e, "WORLD_SIZE", 1)
        return _checked(DistEnv(rank=_number(e, "RANK"), world_size=world, local_rank=_number(e, "LOCAL_RANK"),
                                local_world_size=_number(e, "LOCAL_WORLD_SIZE", world),
                                master_addr=e.get("MASTER_ADDR", "127.0.0.1"),
                                master_port=_number(e, "MASTER_PORT", 29500), source="torchrun",
                                world_key=f"attempt{_number(e, 'TORCHELASTIC_RESTART_COUNT')}"),
                        "RANK, WORLD_SIZE", "LOCAL_RANK")
    # cluster=local: submitit's LocalExecutor starts tasks_per_node processes on this machine and says
    # only which one each is; its controller's pid is the job id (fresh on every resubmission)
    # (set by the process that started this one: it wins over Slurm variables inherited from a shell;
    # a Slurm job submitted from inside a local task inherits them too, but submitit says "slurm" there)
    if "SUBMITIT_LOCAL_GLOBALID" in e and e.get("SUBMITIT_EXECUTOR", "local") == "local":
        world, rank = _number(e, "SUBMITIT_LOCAL_NTASKS", 1), _number(e, "SUBMITIT_LOCAL_GLOBALID")
        # a port `submit` found free on this machine (launcher.TrainJob); else from the pid
        port = _number(e, LOCAL_PORT_ENV) or slurm_port(e.get("SUBMITIT_LOCAL_JOB_ID", "0"), 0)
        return _checked(DistEnv(rank=rank, world_size=world, local_rank=_number(e, "SUBMITIT_LOCAL_LOCALID", rank),
                                local_world_size=world, master_addr="127.0.0.1", master_port=port, source="local",
                                world_key=f"local/{e.get('SUBMITIT_LOCAL_JOB_ID', '0')}"),
                        "SUBMITIT_LOCAL_GLOBALID, SUBMITIT_LOCAL_NTASKS", "SUBMITIT_LOCAL_LOCALID")
    # SLURM_STEP_NUM_TASKS exists only inside an srun step: a batch script alone is one process.
    if "SLURM_PROCID" in e and "SLURM_STEP_NUM_TASKS" in e:
        nodelist = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST", "localhost")
        try:
            hosts = expand_hostlist(nodelist)
        except ValueError as err:
            raise DistributedError(f"{err}; set MASTER_ADDR and MASTER_PORT and start with torchrun") from None
        job, restart, step = e.get("SLURM_JOB_ID", "0"), _number(e, "SLURM_RESTART_COUNT"), _number(e, "SLURM_STEP_ID")
        return _checked(DistEnv(rank=_number(e, "SLURM_PROCID"), world_size=_number(e, "SLURM_STEP_NUM_TASKS", 1),
                                local_rank=_number(e, "SLURM_LOCALID"), local_world_size=_tasks_on_this_node(e, hosts),
                                master_addr=hosts[0], master_port=slurm_port(job, restart, step), source="slurm",
                                world_key=f"slurm/{job}/{restart}/{step}"),
                        "SLURM_PROCID, SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
    half = [k for k in ("RANK", "WORLD_SIZE") if k in e]
    if half:  # half of torchrun's pair: each process would run alone, all of them on the one run folder
        raise DistributedError(f"{half[0]}={e[half[0]]} is set but {'WORLD_SIZE' if half[0] == 'RANK' else 'RANK'} "
                               f"is not: set both (and MASTER_ADDR, MASTER_PORT) for a world started by hand, or "
                               f"unset {half[0]} to run as one process")
    return DistEnv()


def pick_device(requested: str, env: DistEnv) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    # one rank per GPU: each rank sees all node GPUs and takes its local rank, or sees only its own
    count = torch.cuda.device_count()
    if count > 1 and env.local_world_size > count:
        raise DistributedError(f"{env.local_world_size} ranks on this node but {count} GPUs visible: one rank per "
                               f"GPU (set tasks_per_node = gpus_per_node, or nproc_per_node <= {count})")
    index = env.local_rank % count
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def set_threads(requested: Optional[int], env: DistEnv) -> int:
    """Ranks sharing a node split its cores: more threads than cores makes the ranks contend for them."""
    try:
        cores = len(os.sched_getaffinity(0))  # already this task's own CPUs where Slurm pins tasks
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit():  # Slurm's allocation for this task (pinned or not)
        cores = min(cores, int(per_task))
    # an srun task has its cores to itself; processes that share one task (torchrun) or a machine split them
    share = 1 if env.source == "slurm" and per_task.isdigit() else max(1, env.local_world_size)
    n = requested or max(1, cores // share)
    if requested and requested * share > cores:  # oversubscribed: measured 16x slower at 16 threads on 2 cores
        fix = (f"use trainer.threads<={cores // share} or null" if share <= cores else
               f"more ranks than CPUs: start at most {cores} here")  # (1 thread a rank is the least there is)
        log.warning("trainer.threads=%d x %d rank(s) here is more than the %d CPU(s) this process may use: "
                    "steps will be slow; %s", requested, share, cores, fix)
    torch.set_num_threads(n)
    return n


def rank_order_mean(group, bucket):  # no annotation: DDP checks one as an object, not a string
    """A DDP comm hook: each rank's share (its gradients / world, as DDP's own hook) gathered, then summed in rank
    order on every rank: the same bits wherever a gradient sits in its bucket. DDP lays the buckets out by parameter
    order for its first step and by the order gradients arrived from its second; gloo's all-reduce sums an element
    in an order that depends on its place in the bucket, so with 3+ ranks a resumed process (the first layout again
    at its first step) drifted ~1e-6 from the uninterrupted run. All-gather moves world/2 times the bytes of an
    all-reduce: for `trainer.deterministic=true` on CPU, where exactness is promised."""
    share = bucket.buffer().div_(dist.get_world_size(group))
    parts = [torch.empty_like(share) for _ in range(dist.get_world_size(group))]

    def total(_) -> torch.Tensor:
        out = parts[0].clone()
        for p in parts[1:]:
            out.add_(p)
        return out
    return dist.all_gather(parts, share, group=group, async_op=True).get_future().then(total)


class Dist:
    """The process group plus a gloo control group for cheap host-side agreement (stop flags)."""

    def __init__(self, env: DistEnv, device: torch.device, backend: str = "auto", timeout_s: Optional[float] = None):
        self.env, self.device = env, device
        self.timeout_s = timeout_s or (1800.0 if device.type == "cuda" else 300.0)
        self.control = None
        if not env.distributed:
            return
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise DistributedError("dist.backend=nccl needs trainer.device=cuda; use gloo on CPU")
        if env.source in ("slurm", "local"):  # the derived address wins over an inherited (stale) one
            for key, value in (("MASTER_ADDR", env.master_addr), ("MASTER_PORT", str(env.master_port))):
                if os.environ.get(key, value) != value:
                    log.warning("ignoring the inherited %s=%s (%s): using %s", key, os.environ[key], env.source,
                                value)
                os.environ[key] = value
        else:
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
        # NCCL's watchdog aborts the communicator and ends the process when a collective fails or outlives the
        # timeout (1; torch's default 3 skips the abort): no hang, but no Python error to name the peer either,
        # only the watchdog's line in the .err file, which `status` shows
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        timeout = datetime.timedelta(seconds=self.timeout_s)
        kw = {"device_id": device} if backend == "nccl" else {}
        by_hand = launch_of(env) == "by_hand"
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        if env.is_main:
            log.info("waiting up to %g s (dist.timeout_s) for %d ranks at %s (%s)", self.timeout_s, env.world_size,
                     where, "RANK and WORLD_SIZE, not torchrun" if by_hand else env.source)
        # RANK and WORLD_SIZE without torchrun: ranks started by hand (tests, mpirun wrappers), or a shell that kept
        # another launch's; the hint comes once the wait is long, not after dist.timeout_s of silence
        hint = threading.Timer(min(10.0, self.timeout_s / 3), log.warning, (
            "rank %d: still waiting for %d ranks at %s (up to dist.timeout_s=%g s)%s", env.rank, env.world_size,
            where, self.timeout_s, _BY_HAND)) if by_hand else None
        if hint is not None:
            hint.daemon = True
            hint.start()
        started = time.monotonic()
        try:
            with _stops_at_once():
                # keys of this world's own: torchrun --max-restarts keeps one store for every attempt (gloo's full
                # mesh read the failed attempt's addresses: connect refused), and a job whose ranks reached another
                # job's store on a shared port made one world of both (each failed, the innocent one too)
                store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
                kw["store"] = dist.PrefixStore(f"allconv/{env.world_key}", store)
                dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout, **kw)
        except (RuntimeError, ValueError) as e:  # DistStoreError/DistNetworkError are RuntimeErrors
            if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
                fix = {"torchrun": "give torchrun another --master_port (or --rdzv-endpoint)",
                       "slurm": "rank 0 requeues the job, whose restart gets another port (submit again if it did "
                                "not)",
                       "local": "submit again: it picks a free port"}.get(env.source, "use another MASTER_PORT")
                raise PortInUse(f"rank {env.rank}: port {where} is already in use on this node (another job or "
                                f"program holds it); {fix}") from e
            # what it took, not the timeout: under torchrun the agent's store and then the group each wait up to it
            raise DistributedError(
                f"rank {env.rank}: rendezvous with {env.world_size} ranks at {where} failed after "
                f"{time.monotonic() - started:.0f} s (dist.timeout_s={self.timeout_s:g}; {_first_line(e)}); a "
                f"rank that failed before joining logged why (under srun, --kill-on-bad-exit=1 ends the others at "
                f"once)"
                f"{_BY_HAND if by_hand else ''}") from e
        finally:
            if hint is not None:
                hint.cancel()
        self.control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
        log.info("rank %d/%d joined (%s, %s, master %s:%s)", env.rank, env.world_size, backend, env.source,
                 os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])

    # -- collectives -------------------------------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.env.distributed:
            self._guard(dist.all_reduce, t)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (host-side, over gloo: no GPU sync)."""
        if not self.env.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        self._guard(dist.all_reduce, t, group=self.control)
        return bool(t.item())

    def max_ints_start(self, values: list[int]) -> tuple:
        """Start an element-wise max over ranks (host-side, over gloo: no GPU sync) without waiting
        for it; `max_ints_finish` gives the result. Every rank must start the same sequence."""
        if not self.env.distributed:  # no tensor: a step pays for every op it dispatches
            return values, None
        t = torch.tensor(values, dtype=torch.int64)
        return t, self._guard(dist.all_reduce, t, op=dist.ReduceOp.MAX, group=self.control, async_op=True)

    def max_ints_finish(self, pending: tuple) -> list[int]:
        t, work = pending
        if work is None:
            return list(t)
        self._guard(work.wait)
        return t.tolist()

    def gather_objects(self, obj) -> list:
        """Every rank's object, on every rank (used for per-rank RNG states in checkpoints)."""
        if not self.env.distributed:
            return [obj]
        out = [None] * self.env.world_size
        self._guard(dist.all_gather_object, out, obj, group=self.control)
        return out

    def broadcast_object(self, obj):
        if not self.env.distributed:
            return obj
        box = [obj]
        self._guard(dist.broadcast_object_list, box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        if self.env.distributed:
            self._guard(dist.barrier, group=self.control)

    def _guard(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (RuntimeError, ValueError) as e:  # gloo/nccl peer loss or timeout
            raise self._diagnose(e) from e

    def as_peer_failure(self, e: BaseException) -> Optional[DistributedError]:
        """A communication error raised outside our wrappers (e.g. DDP's gradient all-reduce in
        backward) as a DistributedError naming the failed rank; None for other errors."""
        if isinstance(e, DistributedError):
            return e
        if not self.env.distributed or not isinstance(e, RuntimeError):
            return None
        if isinstance(e, dist.DistError) or is_comm_error(f"{type(e).__name__} {e}"):
            return self._diagnose(e)
        return None

    # -- failure reporting ---------------------------------------------------------------------
    def report_failure(self, message: str, interrupted: bool = False) -> None:
        """Tell the peers why this rank is going down, so their error can name it. `interrupted`: a stop the user
        asked for (Ctrl-C), which the peers record as an interruption, not as a failure."""
        if not self.env.distributed or not dist.is_initialized():
            return
        try:
            store = _store()
            if interrupted:  # before the message: a peer that reads the message finds the mark
                store.set(f"allconv/interrupted/{self.env.rank}", "1")
            store.set(f"allconv/failed/{self.env.rank}", clipped(message))
        except Exception:  # the store may be gone with rank 0
            pass

    def _diagnose(self, err: Exception) -> DistributedError:
        """Name the failed rank: one that reported, else the ones that did not answer a roll call."""
        me = self.env.rank
        try:
            store = _store()
            store.set(f"allconv/alive/{me}", "1")
            failed = [r for r in range(self.env.world_size) if store.check([f"allconv/failed/{r}"])]
            if failed:
                return self._reported(store, failed)
            time.sleep(3.0)  # let the other survivors answer the roll call
            silent = [r for r in range(self.env.world_size)
                      if not store.check([f"allconv/alive/{r}"]) and not store.check([f"allconv/failed/{r}"])]
            if not silent:  # none lost: "peer rank(s) unknown did not answer" misled
                return PeerLost(f"rank {me}: a collective failed, though every rank answered the roll call after it "
                                f"(a peer slower than dist.timeout_s, or a fault of the link; collective failed: "
                                f"{_first_line(err)})")
            return PeerLost(f"rank {me}: peer rank(s) {', '.join(map(str, silent))} did not answer: died, hung or "
                            f"stopped (collective failed: {_first_line(err)})")
        except Exception:
            return PeerLost(f"rank {me}: rank 0 (host of the rendezvous store) is unreachable, it probably "
                                    f"died; its error, if it had time to write one, is in the run folder's train.log "
                                    f"(collective failed: {_first_line(err)})")

    def _reported(self, store, failed: list[int]) -> DistributedError:
        """The error for peers that reported: a real failure is named before an interruption."""
        stopped = {r for r in failed if store.check([f"allconv/interrupted/{r}"])}
        r = min(set(failed) - stopped, default=min(failed))
        said, me = store.get(f"allconv/failed/{r}").decode(), self.env.rank
        if r in stopped:
            return PeerInterrupted(f"rank {me}: stopped with peer rank {r}, which was {said}")
        return DistributedError(f"rank {me}: peer rank {r} failed: {said}")

    def close(self) -> None:
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # teardown after a peer failure may itself fail; never mask the cause
                log.debug("destroy_process_group: %s", e)


# lower case; e.g. gloo's "Application timeout caused pair closure" when a peer hangs during backward
_COMM_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout", "pair closure",
                 "processgroup")


@contextlib.contextmanager
def _stops_at_once():
    """SIGTERM, SIGINT and SIGHUP end the process at once while it waits for its peers: the wait is in C++, where
    Python's handlers (preempt.catch_early's flag, Ctrl-C's KeyboardInterrupt) would only run after the timeout,
    and nothing has been trained since this start, so nothing is lost. A signal ignored (nohup) stays ignored;
    Slurm's warning signal stays recorded for the first step (a requeue). A SIGTERM or SIGHUP that came before
    (in the imports, the lock, the model) ends the start here, StartupStop, rather than wait for peers that
    may never come (torchrun's SIGTERM after another rank failed, seen: 30 s, then its SIGKILL)."""
    from .preempt import StartupStop, take_early_stop
    stops = [s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s is not None]
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set from the main thread
        yield
        return
    saved = {s: signal.getsignal(s) for s in stops}
    for s, h in saved.items():
        if h is not signal.SIG_IGN:
            signal.signal(s, signal.SIG_DFL)
    try:
        said = take_early_stop()  # after SIG_DFL: one arriving from now on ends the process itself
        if said is not None:
            raise StartupStop(said)
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def is_comm_error(text: str) -> bool:
    """Whether an error's text is a collective's failure (a peer lost or silent), not a local bug."""
    return any(m in text.lower() for m in _COMM_MARKERS)


def _store():
    from torch.distributed import distributed_c10d
    return distributed_c10d._get_default_store()


def _first_line(e: Exception, limit: int = 200) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."  # not cut mid-word

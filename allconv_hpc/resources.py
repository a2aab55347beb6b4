"""The cluster profile (conf/cluster, `cluster.*` overrides) checked against what each value becomes in the
sbatch script or the local job, with one-line errors that name the key and the fix, before anything queues.
"""
from __future__ import annotations

import os
import re
import sys

from .config import CLUSTER_KEYS, WARNING_SIGNALS, ConfigError, empty_last_shard

# Values written into "#SBATCH --key=value" lines (shlex-quoted by submitit, and sbatch strips the
# quotes): letters, digits and the punctuation Slurm's own syntax uses, nothing a shell would act on.
_SAFE = re.compile(r"[A-Za-z0-9_.,:@%+=/\[\]\-]+")  # used with fullmatch: "$" would let "x\n" through
_SAFE_DEPENDENCY = re.compile(r"[A-Za-z0-9_.,:@%+=/\[\]\-?]+")


_GPU_TYPE = re.compile(r"[A-Za-z0-9_.\-]+")  # --gpus-per-node=<type>:<count>, e.g. a100, h100_80gb


_CONSTRAINT = re.compile(r"[A-Za-z0-9_.,:@%+=/\[\]\-|&*!()]+")  # features: a100|h100, [a&b], (x*2)


# sbatch options that come from cluster.* keys or that submit sets itself: additional_parameters may not
# override them (the job would get another shape than the one validated, or lose its signal or logs)
_OWN_OPTIONS = {"nodes": "cluster.nodes", "ntasks-per-node": "cluster.tasks_per_node",
                "cpus-per-task": "cluster.cpus_per_task", "gpus-per-node": "cluster.gpus_per_node",
                "mem": "cluster.mem_gb", "time": "cluster.timeout_min", "partition": "cluster.partition",
                "account": "cluster.account", "qos": "cluster.qos", "constraint": "cluster.constraint",
                "exclude": "cluster.exclude", "signal": "cluster.signal and cluster.signal_lead_s",
                "requeue": "cluster.requeue", "no-requeue": "cluster.requeue", "array": "cluster.array_parallelism",
                "output": None, "error": None,
                "open-mode": None, "job-name": None,
                # the same shape by other names (sbatch refuses some pairs, e.g. --mem with --mem-per-cpu)
                "ntasks": "cluster.nodes and cluster.tasks_per_node", "ntasks-per-gpu": "cluster.tasks_per_node",
                "gpus": "cluster.gpus_per_node", "gpus-per-task": "cluster.gpus_per_node",
                "cpus-per-gpu": "cluster.cpus_per_task", "mem-per-cpu": "cluster.mem_gb",
                "mem-per-gpu": "cluster.mem_gb", "gpus-per-socket": "cluster.gpus_per_node",
                "tres-per-task": "cluster.gpus_per_node and cluster.cpus_per_task",
                "ntasks-per-core": "cluster.tasks_per_node", "mincpus": "cluster.cpus_per_task",
                "sockets-per-node": None, "cores-per-socket": None,
                "distribution": None}  # rank 0 must run on the first node: it hosts the rendezvous


SIGNAL_LEAD_MAX = 65535  # sbatch --signal=SIG@TIME takes at most this many seconds


def _one_line(value, key: str) -> None:
    """Nothing that lands in the sbatch script may hold a newline (a new shell line) or NUL."""
    if isinstance(value, dict):
        for k, v in value.items():
            _one_line(str(k), f"{key} key")
            _one_line(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _one_line(v, f"{key}[{i}]")
    elif isinstance(value, str) and any(ch in value for ch in "\n\r\0"):
        raise ConfigError(f"{key}={value!r} holds a newline or NUL, which would start a new line in the sbatch "
                          f"script; give it on one line (setup: one list item per line)")


def _need_int(c: dict, key: str, low: int, null_ok: bool = False) -> None:
    v = c.get(key)
    if v is None and null_ok:
        return
    if type(v) is not int or v < low:  # not isinstance: True is an int
        raise ConfigError(f"cluster.{key}={v!r} must be {'null or ' if null_ok else ''}an integer >= {low}")


def _need_word(c: dict, key: str, allowed: re.Pattern, chars: str) -> None:
    v = c.get(key)
    if v is None:
        return
    if (key in ("exclude", "partition") and isinstance(v, (list, tuple)) and v  # sbatch takes "a,b" for these
            and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v)):
        joined = ",".join(map(str, v))  # 'cluster.exclude=[n1,n2]': Hydra's list, where sbatch takes one string
        raise ConfigError(f"cluster.{key}={v!r} is a list; Slurm takes one comma-separated string: "
                          f"'cluster.{key}=\"{joined}\"'")
    if isinstance(v, bool) or not isinstance(v, (str, int)) or not allowed.fullmatch(str(v)):
        raise ConfigError(f"cluster.{key}={v!r} is not allowed in an sbatch option: use only letters, digits "
                          f"and {chars}")


def check_additional_parameters(extra) -> None:
    """cluster.additional_parameters: sbatch options by name, none that submit sets itself (by any name or
    abbreviation), values that cannot inject shell."""
    if not isinstance(extra, dict):
        raise ConfigError(f"cluster.additional_parameters={extra!r} must be a mapping, e.g. {{mail-type: END}}")
    for k, v in extra.items():
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", str(k)):
            raise ConfigError(f"cluster.additional_parameters.{k}: not an sbatch option name (e.g. mail-type)")
        name = str(k).replace("_", "-")
        # sbatch takes an unambiguous abbreviation of an option (--tim=5 is --time=5)
        owned = [name] if name in _OWN_OPTIONS else [o for o in sorted(_OWN_OPTIONS) if o.startswith(name)]
        if owned:
            use = " or ".join(dict.fromkeys(_OWN_OPTIONS[o] for o in owned if _OWN_OPTIONS[o]))
            what = "" if owned == [name] else f" (sbatch reads it as --{' or --'.join(owned)})"
            raise ConfigError(f"cluster.additional_parameters.{k} would override what submit sets itself{what}"
                              + (f"; use {use}" if use else "; remove it"))
        if str(k) == "gres" and any(g.split(":")[0] == "gpu" for g in str(v).split(",")):
            # GPUs requested twice, or beside the validated shape; other gres (tmpdisk, ...) are fine
            raise ConfigError(f"cluster.additional_parameters.gres={v} asks for GPUs: use cluster.gpus_per_node=N "
                              f"(and cluster.gpu_type=TYPE for a typed request such as gpu:a100:N)")
        # a dependency's "?" (any one of them): an #SBATCH line is read by sbatch, not by a shell that would glob it
        safe, chars = (_SAFE_DEPENDENCY, "_.,:@%+=/[]-?") if name == "dependency" else (_SAFE, "_.,:@%+=/[]-")
        if v is not True and (isinstance(v, bool) or not isinstance(v, (str, int)) or not safe.fullmatch(str(v))):
            raise ConfigError(f"cluster.additional_parameters.{k}={v!r} is not a safe sbatch value: use true (a flag) "
                              f"or only letters, digits and {chars}")


def validate_cluster(cluster: dict, cfg) -> dict:
    """Every cluster value checked against what it becomes in the sbatch script; one-line errors."""
    unknown = sorted(set(cluster) - CLUSTER_KEYS)
    if unknown:
        raise ConfigError(f"unknown cluster key(s) {', '.join('cluster.' + k for k in unknown)}; "
                          f"known: {', '.join(sorted(CLUSTER_KEYS))}")
    c = dict(cluster)
    for k in sorted(c):
        _one_line(c[k], f"cluster.{k}")
    if c.get("backend") not in ("local", "slurm"):
        raise ConfigError(f"cluster.backend={c.get('backend')!r} must be local or slurm")
    for k in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min", "array_parallelism"):
        _need_int(c, k, 1)
    _need_int(c, "gpus_per_node", 0)
    _need_int(c, "mem_gb", 1, null_ok=True)
    if c["gpus_per_node"] and c["tasks_per_node"] != c["gpus_per_node"]:
        raise ConfigError(f"cluster.tasks_per_node={c['tasks_per_node']} must equal cluster.gpus_per_node="
                          f"{c['gpus_per_node']} (one rank per GPU)")
    for k in ("partition", "account", "qos", "exclude", "signal"):
        _need_word(c, k, _SAFE, "_.,:@%+=/[]-")
    _need_word(c, "constraint", _CONSTRAINT, "_.,:@%+=/[]-|&*!()")
    if c.get("gpu_type") is not None and c.get("backend") == "slurm":  # cluster=local ignores it
        _need_word(c, "gpu_type", _GPU_TYPE, "_.-")
        if not c["gpus_per_node"]:
            raise ConfigError(f"cluster.gpu_type={c['gpu_type']} needs cluster.gpus_per_node >= 1 (it types that "
                              f"request: --gpus-per-node={c['gpu_type']}:N)")
    check_additional_parameters(c.get("additional_parameters") or {})
    setup = c.get("setup")
    if setup is None:
        c["setup"] = []
    elif isinstance(setup, list) and any(not isinstance(line, str) for line in setup):  # Hydra typed the item
        bad = next(line for line in setup if not isinstance(line, str))
        raise ConfigError(f"cluster.setup item {bad!r} was read as a {type(bad).__name__}, not a shell line; quote "
                          f"it: 'cluster.setup=[\"{str(bad).lower() if isinstance(bad, bool) else bad}\"]'")
    elif not isinstance(setup, list):
        raise ConfigError(f"cluster.setup={setup!r} must be a list of shell lines, e.g. "
                          f"cluster.setup='[module load cuda/12.4]'")
    if not isinstance(c.get("requeue"), bool):
        raise ConfigError(f"cluster.requeue={c.get('requeue')!r} must be true or false")
    _need_int(c, "signal_lead_s", 10)
    if c["signal_lead_s"] > SIGNAL_LEAD_MAX:
        raise ConfigError(f"cluster.signal_lead_s={c['signal_lead_s']} is more than sbatch --signal takes "
                          f"({SIGNAL_LEAD_MAX} s); use a shorter lead")
    if c["signal_lead_s"] >= c["timeout_min"] * 60:
        raise ConfigError(f"cluster.signal_lead_s={c['signal_lead_s']} s must be shorter than cluster.timeout_min="
                          f"{c['timeout_min']} ({c['timeout_min'] * 60} s): lower cluster.signal_lead_s (at least 10) "
                          f"or raise cluster.timeout_min above {c['signal_lead_s'] // 60}")  # whole minutes
    given = str(c.get("signal"))
    if re.match(r"(?i)^(b|r|rb|br):", given):  # sbatch's flags: B sends to the batch shell only, not to the tasks
        name, _, lead = given.split(":", 1)[1].partition("@")
        raise ConfigError(f"cluster.signal={given}: sbatch's {given.split(':')[0]}: flags are not taken (B: would "
                          f"signal the batch shell alone, not the training tasks); give the name alone: "
                          f"cluster.signal={name}" + (f" (the lead: cluster.signal_lead_s={lead})" if lead else ""))
    sent, caught = signal_name(c), signal_name({"signal": cfg.checkpoint.signal})
    if sent in ("KILL", "STOP"):  # no process can catch these: no checkpoint.signal could equal it
        raise ConfigError(f"cluster.signal={c.get('signal')} cannot be caught, so no checkpoint could follow it; "
                          f"send the signal checkpoint.signal catches (one of "
                          f"{', '.join(s.removeprefix('SIG') for s in WARNING_SIGNALS)}; now {caught}): "
                          f"cluster.signal={caught}")
    if sent != caught and not {sent, caught} <= {"USR1", "USR2"}:  # USR1 and USR2 are warnings whichever is set
        raise ConfigError(f"cluster.signal={c.get('signal')} differs from checkpoint.signal={cfg.checkpoint.signal}: "
                          f"the job would not catch the signal "
                          f"{'Slurm' if c['backend'] == 'slurm' else 'its controller'} sends; make them equal")
    world = c["nodes"] * c["tasks_per_node"]
    if cfg.trainer.batch_size % world:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is not divisible by the job's "
                          f"{world} ranks (cluster.nodes x cluster.tasks_per_node); use a multiple of {world}, or "
                          f"a number of ranks that divides it")
    said = empty_last_shard(cfg.trainer, cfg.data.train_images, world)
    if said:
        raise ConfigError(said)
    if c["gpus_per_node"] == 0:  # what the job would refuse at start, after its wait in the queue
        for key, value, fix in (("trainer.precision", cfg.trainer.precision, "fp32 or auto"),
                                ("trainer.device", cfg.trainer.device, "cpu or auto"),
                                ("dist.backend", cfg.dist.backend, "gloo or auto")):
            if value in ("bf16", "fp16", "cuda", "nccl"):
                raise ConfigError(f"{key}={value} needs GPUs but cluster.gpus_per_node=0; set cluster.gpus_per_node "
                                  f"or {key}={fix}")
    if c["backend"] == "local" and c["nodes"] > 1:
        raise ConfigError("cluster=local runs on this machine: cluster.nodes must be 1")
    if c["backend"] == "local":
        local_gpus(c["gpus_per_node"])
    return c


def local_gpus(n: int) -> tuple:
    """The GPUs a cluster=local job may use: the first n of this shell's CUDA_VISIBLE_DEVICES (submitit
    would otherwise make it 0..n-1, whatever this shell was given, e.g. GPUs 2,3 of an allocation)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not n:
        return ()
    import torch
    have = torch.cuda.device_count()  # of the visible ones: there must be n (or the job trains on the CPU unasked)
    if n > have:
        use = "cluster.gpus_per_node=0 to train on the CPU" if not have else \
            f"cluster.gpus_per_node<={have} (0: train on the CPU)"
        seen = f" of CUDA_VISIBLE_DEVICES={visible}" if visible is not None else " on this machine"
        raise ConfigError(f"cluster.gpus_per_node={n} but CUDA sees {have} GPU(s){seen}; use {use}")
    if visible is None:
        return ()
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(i.isdigit() for i in ids):
        raise ConfigError(f"cluster=local passes GPUs to its tasks by index, and CUDA_VISIBLE_DEVICES={visible} "
                          f"holds other ids (UUIDs, MIG); set it to indices, e.g. CUDA_VISIBLE_DEVICES=0,1")
    if n > len(ids):
        raise ConfigError(f"cluster.gpus_per_node={n} but CUDA_VISIBLE_DEVICES={visible} gives this shell "
                          f"{len(ids)} GPU(s); use cluster.gpus_per_node<={len(ids)} (and as many tasks)")
    return tuple(int(i) for i in ids[:n])


def signal_name(cluster: dict) -> str:
    return str(cluster.get("signal", "")).upper().removeprefix("SIG")


def warn(msg: str) -> None:
    """A warning of `submit` (it goes on): one line on stderr."""
    print(f"allconv-hpc submit: warning: {msg}", file=sys.stderr)

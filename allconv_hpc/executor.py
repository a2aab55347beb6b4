"""submitit's executor for a validated cluster profile, the batch script it writes, and what Slurm says of
it: `sbatch --test-only` (and sinfo) on that very script before the job queues, sbatch's refusals as
one-line errors, and the release of the jobs submit queues held.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .config import ConfigError
from .jobs import LOCAL_SETUP_STOP, SETUP_STOP
from .resources import local_gpus, signal_name, warn
from .sweep import Point


def _setup_group(line) -> str:
    """One cluster.setup line as a { ... } group of its own, run as written: ":" keeps a blank or comment-only
    line a valid group, and the blank line ends one that ends in a backslash."""
    return "{ :\n" + str(line) + "\n\n}"


def _local_setup(lines: list, folder: Path) -> list:
    """cluster.setup for a local job: its output into .submitit/setup-<job id>.log (with --wait the controller
    runs it in the submitting terminal, without in a session of its own: this log is the trace either way), and a failure named
    on stderr. The job id is the pid of submitit's shell, `$$` in it. Each line is a { ... } group of its own, not
    a subshell, so what it exports reaches the job, and a trailing comment, `;` or `&` of a line stays its own."""
    if not lines:
        return []
    import shlex
    log = shlex.quote(str(Path(folder).parent / "setup-")) + "$$.log"
    body = " && ".join(_setup_group(line) for line in lines)
    # a Ctrl-C (with --wait the setup runs in the terminal's process group, its line's command too): said in the log
    # as a stop, which status tells from a failure (the shell ends on it before the failure line could say so). Not
    # SIGTERM: a trapped signal waits for the line's command to end, and `kill <job id>` must end a long line at once
    return [f"ALLCONV_SETUP_LOG={log}",
            f"trap 'echo \"{LOCAL_SETUP_STOP} SIGINT\" >> \"$ALLCONV_SETUP_LOG\"; exit 130' INT",
            f"{{ {body}\n}} >> {log} 2>&1 || {{ rc=$?; echo \"cluster.setup failed (exit $rc)\" >> {log}; "
            f"echo \"allconv-hpc: cluster.setup failed (exit $rc); its output is in \"{log} >&2; exit 1; }}",
            "trap - INT"]


def _slurm_setup(lines: list) -> list:
    """cluster.setup in the batch script, each line a { ... } group (as for a local job) that ends the job when
    it fails: a module that did not load or a venv that is not there is named at once, in the job's .err file,
    not found later as an import error or a run on the wrong software. `|| true` lets a line fail. A line that
    ends the shell itself (`exit 7`) is named by an EXIT trap, set for the setup alone."""
    import shlex
    if not lines:
        return []
    said = "echo \"allconv-hpc: cluster.setup line failed (exit $rc): $ALLCONV_SETUP_LINE\" >&2"
    # Slurm's SIGTERM (a preemption past its grace time, scancel, the time limit) ends the shell here: said as such,
    # not as the line's doing (it read "ended the job before training (exit 0)"); Slurm requeues a preempted job
    stopped = (f'[ -n "${{ALLCONV_TERM:-}}" ] && echo "allconv-hpc: {SETUP_STOP} (a preemption, scancel '
               f'or the time limit), in: $ALLCONV_SETUP_LINE; nothing was trained" >&2')
    ended = (f"{stopped} || echo \"allconv-hpc: cluster.setup line ended the job before training (exit $rc): "
             f"$ALLCONV_SETUP_LINE\" >&2; exit $((rc ? rc : 1))")  # `exit 0` too: a job that trained nothing did not complete
    out = [f"trap 'rc=$?; {ended}' EXIT", "trap 'ALLCONV_TERM=1; exit 143' TERM"]
    for line in lines:
        out += [f"ALLCONV_SETUP_LINE={shlex.quote(str(line))}",
                _setup_group(line) + f" || {{ rc=$?; trap - EXIT; {said}; exit 1; }}"]
    return out + ["trap - EXIT TERM; unset ALLCONV_SETUP_LINE"]


WARNED = "ALLCONV_WARNED"  # set by the batch shell's trap: a warning came before the tasks started


def _requeue_if_warned(after_setup: bool) -> list:
    """Before srun: a start that was warned or preempted before its tasks existed requeues itself (nothing was
    trained). A warning sent to the batch shell (`scancel -b`, `--signal=B:`) is trapped (WARNED); a preemption's
    own signal goes to the job's steps, of which there is none yet, so after cluster.setup (minutes of modules, a
    venv) the job asks scontrol whether this start was preempted (PreemptTime, cleared by a requeue): once the
    grace time was over, srun failed ("Job/step already completing") and the job ended FAILED, not requeued.
    An array task is named as A_T (its raw id may be the array's)."""
    job = "${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"
    out = [f'ALLCONV_JOB="{job}"; ALLCONV_JOB="${{ALLCONV_JOB:-$SLURM_JOB_ID}}"']
    if after_setup:  # preempted since this start (as SlurmJob.is_timeout reads it): ISO times compare as strings
        out += ['ALLCONV_SHOW=$(SLURM_TIME_FORMAT=standard scontrol show job "$ALLCONV_JOB" 2>/dev/null)',
                """ALLCONV_PT=$(printf '%s\\n' "$ALLCONV_SHOW" | sed -n 's/.* PreemptTime=\\([0-9][^ ]*\\).*/\\1/p')""",
                """ALLCONV_ST=$(printf '%s\\n' "$ALLCONV_SHOW" | sed -n 's/.* StartTime=\\([0-9][^ ]*\\).*/\\1/p')""",
                'if [ -n "$ALLCONV_PT" ] && [ -n "$ALLCONV_ST" ] && ! [[ "$ALLCONV_PT" < "$ALLCONV_ST" ]]; then '
                f'{WARNED}="${{{WARNED}:-preempted}}"; fi']
    return out + [f'if [ -n "${{{WARNED}:-}}" ]; then',
                  '  echo "allconv-hpc: a warning signal or preemption came before training (in cluster.setup): '
                  'requeueing job $ALLCONV_JOB" >&2',
                  '  scontrol requeue "$ALLCONV_JOB" && exit 0',
                  '  echo "allconv-hpc: scontrol requeue $ALLCONV_JOB failed: training starts" >&2',
                  'fi']


def make_executor(cluster: dict, folder: Path, attach: bool = False):
    """submitit's executor for the validated cluster. SUBMITIT_PREEMPT_SIGNAL (read when the job imports
    submitit) makes submitit's own handler, in place until TrainJob installs ours, take our signal. `attach`: a
    local job's controller stays in this terminal's session and output (submit --wait), else it gets its own."""
    import submitit

    if cluster["backend"] == "local":
        # what submitit's LocalExecutor supports; the rest of the profile does not apply here. Its controller
        # passes on the signals a user sends the job id (localcontrol)
        from .localcontrol import LocalExecutor
        ex = LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=cluster["timeout_min"], nodes=1, tasks_per_node=cluster["tasks_per_node"],
                             cpus_per_task=cluster["cpus_per_task"], gpus_per_node=cluster["gpus_per_node"],
                             signal_delay_s=cluster["signal_lead_s"], setup=_local_setup(cluster["setup"], folder),
                             visible_gpus=local_gpus(cluster["gpus_per_node"]))
        ex.attach = attach
        return ex
    # the task's python starts with the warnings ignored (SIG_IGN survives exec): a warning in the ~0.3 s
    # before submitit's handler is in place killed the task, and the job ended FAILED, not requeued. Both USR
    # signals and the configured one: each is a warning once training runs (preempt.USR_SIGNALS)
    import shlex
    warnings = " ".join(dict.fromkeys((signal_name(cluster), "USR1", "USR2")))
    ignoring = f'trap "" {warnings}; exec "$0" "$@"'
    ex = submitit.SlurmExecutor(folder=str(folder),
                                python=f"/bin/sh -c {shlex.quote(ignoring)} {shlex.quote(sys.executable)}")
    extra = dict(cluster.get("additional_parameters") or {})
    # queued held, released once submitit has made the job's folder (see release_held)
    extra.setdefault("hold", True)
    # explicit both ways: without --no-requeue the site's default (JobRequeue) decides
    extra["requeue" if cluster["requeue"] else "no_requeue"] = True
    # our signal, sent to the srun tasks (no "B:"): the trainer checkpoints at a step boundary
    extra["signal"] = f"{signal_name(cluster)}@{cluster['signal_lead_s']}"
    # srun no longer inherits the job's --cpus-per-task (Slurm 22.05): give it explicitly
    srun_args = ["--kill-on-bad-exit=1", f"--cpus-per-task={cluster['cpus_per_task']}"]
    params = dict(nodes=cluster["nodes"], ntasks_per_node=cluster["tasks_per_node"],
                  cpus_per_task=cluster["cpus_per_task"], time=cluster["timeout_min"],
                  signal_delay_s=cluster["signal_lead_s"], array_parallelism=cluster["array_parallelism"],
                  # a warning sent to the batch shell alone (scancel -b, --signal=B:...) would end it, and so the job,
                  # not requeued: a handler (not "", which srun would inherit) keeps it, and one before the tasks
                  # start requeues the job (_requeue_if_warned). It cannot pass the signal on while srun runs in the
                  # foreground (train.sbatch can): scancel without -b does
                  setup=[f"trap '{WARNED}=1' {warnings}", f"export SUBMITIT_PREEMPT_SIGNAL={signal_name(cluster)}",
                         *_slurm_setup(cluster["setup"]), *_requeue_if_warned(bool(cluster["setup"]))],
                  additional_parameters=extra,
                  srun_args=srun_args, stderr_to_stdout=False, job_name="allconv")
    if cluster["gpus_per_node"]:
        gpus = cluster["gpus_per_node"]
        params["gpus_per_node"] = f"{cluster['gpu_type']}:{gpus}" if cluster.get("gpu_type") else gpus
    if cluster.get("mem_gb") is not None:
        params["mem"] = f"{cluster['mem_gb']}GB"
    for k in ("partition", "account", "qos", "constraint", "exclude"):
        if cluster.get(k) is not None:
            params[k] = str(cluster[k])
    ex.update_parameters(**params)
    return ex


TEST_ONLY_TIMEOUT_S = 30


# what sbatch --test-only (or sbatch under EnforcePartLimits) says of a job no node or partition limit allows
# (not its "allocation failure: " prefix, which it puts before any reason, e.g. an invalid partition)
_NEVER = ("requested node configuration is not available", "invalid feature specification",
          "requested time limit", "node count specification invalid", "more processors requested than permitted",
          "memory required by task is not available", "requested partition configuration not available")


def sbatch_said(text: str) -> str:
    return "; ".join(ln.strip().removeprefix("sbatch: error: ") for ln in str(text).splitlines() if ln.strip())


def sbatch_refused(text: str, partition: Optional[str] = None) -> ConfigError:
    """sbatch's complaint (already on one line) with the fix. `partition`: cluster.partition, where given: one that
    does not exist is the fix to name first (sbatch complains of the GPUs asked for before it)."""
    text = text or "no reason given"
    unreachable = any(m in text.lower() for m in ("configuration source", "unable to contact",
                                                 "connection refused", "slurm.conf",
                                                 "s_p_parse_file"))  # SLURM_CONF naming a file not there
    if unreachable:  # not a verdict on the job: no controller answered
        return ConfigError(f"Slurm does not answer here, sbatch said: {text} (check SLURM_CONF and that slurmctld "
                           f"runs, or use cluster=local)")
    low = text.lower()
    gres = "gres" in low or "generic resource" in low
    parts = _partitions() if "invalid partition" in low or (gres and partition) else []
    known = [p.removesuffix(" (the default)") for p in parts]
    unknown = [p for p in str(partition or "").split(",") if p and p not in known]  # Slurm takes a list: a,b
    if gres and parts and unknown:  # (sinfo -a: hidden partitions are listed too)
        which = f"cluster.partition={partition}" + (f": {', '.join(unknown)}" if "," in str(partition) else "")
        return ConfigError(f"sbatch refused the job: {text} ({which} is no partition here: give cluster.partition one "
                           f"of: {', '.join(parts)})")
    fix = ("check cluster.gpus_per_node and cluster.gpu_type against the partition's GPUs (sinfo -o '%P %G'), "
           "and cluster.partition" if gres else
           f"give cluster.partition one of: {', '.join(parts)}" if parts else
           "check cluster.partition, cluster.account, cluster.qos and the other cluster.* values")
    return ConfigError(f"sbatch refused the job: {text} ({fix})")


def _partitions() -> list[str]:
    """The partitions sinfo lists, the default one marked; [] when it does not answer."""
    from .slurm import slurm_out
    names = dict.fromkeys(ln.strip() for ln in (slurm_out(["sinfo", "-a", "-h", "-o", "%P"]) or "").splitlines())
    return [f"{n.rstrip('*')} (the default)" if n.endswith("*") else n for n in names if n]


def array_too_large(n: int, most: int) -> str:
    return (f"the sweep submits {n} points as one job array, but Slurm's MaxArraySize here is {most} (scontrol show "
            f"config): submit it in parts of at most {most} points, e.g. a range(...) or choice(...) of fewer values in "
            f"each submit into the same hydra.sweep.dir")


def max_array_size() -> Optional[int]:
    """Slurm's MaxArraySize (array indices run below it), None when scontrol does not tell."""
    from .slurm import slurm_out
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", slurm_out(["scontrol", "show", "config"]) or "", re.M)
    return int(m.group(1)) if m else None


def sbatch_script(points: list[Point], sweep_dir: Optional[Path], cluster: dict) -> Optional[str]:
    """The batch script submitit would queue for the points to submit (None: nothing for Slurm)."""
    todo = [p for p in points if p.skip is None]
    if cluster["backend"] != "slurm" or not todo:
        return None
    base = sweep_dir if sweep_dir is not None else todo[0].run_dir
    ex = make_executor(cluster, base / ".submitit" / "%j")
    if len(todo) > 1:
        ex.parameters["map_count"] = len(todo)  # the job array, as SlurmExecutor renders it for a batch
    return ex._make_submission_file_text(ex._submitit_command_str, "test-only")


def check_can_start(points: list[Point], sweep_dir: Optional[Path], cluster: dict) -> None:
    """`sbatch --test-only` on the very script submit would queue. Under EnforcePartLimits=NO (Slurm's default)
    sbatch queues a job that asks for more than its partition ever has (nodes, CPUs, memory, time, features),
    and it pends forever (PartitionConfig, PartitionNodeLimit, ...); the test says so at once. When the test
    cannot be run (no answer, an sbatch without --test-only), submission goes on with a warning."""
    script = sbatch_script(points, sweep_dir, cluster)
    if script is None:
        return
    todo = sum(p.skip is None for p in points)
    most = max_array_size() if todo > 1 else None
    if most is not None and todo > most:  # sbatch says only "Invalid job array specification"
        raise ConfigError(array_too_large(todo, most))
    try:
        r = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True,
                           timeout=TEST_ONLY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return warn(f"sbatch --test-only did not answer in {TEST_ONLY_TIMEOUT_S} s; submitting without knowing "
                     f"whether the cluster can ever start the job")
    except OSError as e:
        return warn(f"sbatch --test-only could not run ({e}); submitting without that check")
    if r.returncode == 0:
        # --test-only passes a --time over the partition's limit (the job would pend: PartitionTimeLimit)
        over = _over_partition(cluster, _where(cluster), features=False)
        if over:
            raise ConfigError(_never_message(cluster, "sinfo: the partition's time limit", over))
        state = _partition_state(cluster)
        if state in ("down", "inact"):  # Slurm queues into it and starts nothing there: not a refusal
            warn(f"{_where(cluster)} is {'inactive' if state == 'inact' else state} (sinfo): the job waits in the "
                 f"queue until an admin brings it up; scancel it and submit with another cluster.partition to start "
                 f"sooner")
        return
    said = sbatch_said(r.stderr + "\n" + r.stdout)
    if not said or "unrecognized option" in said or "invalid option" in said:
        return warn(f"sbatch --test-only failed without a reason ({said or f'exit {r.returncode}'}); submitting "
                     f"without knowing whether the cluster can ever start the job")
    if any(m in said.lower() for m in _NEVER):
        raise ConfigError(_never_message(cluster, f"sbatch --test-only: {said}",
                                         _over_partition(cluster, _where(cluster), "feature" in said.lower())))
    raise sbatch_refused(said, cluster.get("partition"))


def _partition_state(cluster: dict) -> Optional[str]:
    """The job's partition's availability from sinfo (up, down, drain, inact), None when sinfo does not tell."""
    from .slurm import slurm_out
    part = cluster.get("partition")
    for line in (slurm_out(["sinfo", "-h", "-o", "%P|%a"]) or "").splitlines():
        name, _, state = line.partition("|")
        if (name.rstrip("*") == str(part)) if part is not None else name.endswith("*"):
            return state.strip() or None
    return None


def _where(cluster: dict) -> str:
    part = cluster.get("partition")
    return f"partition {part}" if part is not None else "the default partition"


def _never_message(cluster: dict, why: str, over: list[str]) -> str:
    part, where = cluster.get("partition"), _where(cluster)
    asked = [f"{cluster['nodes']} node(s) of {cluster['tasks_per_node']} task(s) x {cluster['cpus_per_task']} CPU(s)"]
    if cluster["gpus_per_node"]:
        asked.append(f"{cluster['gpus_per_node']} GPU(s) per node")
    if cluster.get("mem_gb") is not None:
        asked.append(f"{cluster['mem_gb']} GB per node")
    asked.append(f"{cluster['timeout_min']} min")
    if cluster.get("constraint") is not None:
        asked.append(f"features {cluster['constraint']}")
    if cluster.get("exclude") is not None:
        asked.append(f"not on {cluster['exclude']}")
    fix = "; ".join(over) if over else (
        f"lower cluster.nodes, cluster.tasks_per_node, cluster.cpus_per_task, cluster.gpus_per_node, cluster.mem_gb or "
        f"cluster.timeout_min, or fix cluster.constraint{' or cluster.exclude' if cluster.get('exclude') else ''}, "
        f"to what {where} has (sinfo -N -l{f' -p {part}' if part is not None else ''})")
    return (f"Slurm can never start this job on {where}: it asks for {', '.join(asked)} ({why}); {fix}, or choose "
            f"another cluster.partition")


def _over_partition(cluster: dict, where: str, features: bool) -> list[str]:
    """What the job asks beyond its partition's nodes and limits, with the value to use, from sinfo; [] when
    sinfo does not tell (the caller then names every key)."""
    from .slurm import parse_slurm_time, slurm_out

    out = slurm_out(["sinfo", "-h", "-o", "%P|%D|%c|%m|%l|%f|%N"])
    part = cluster.get("partition")
    rows = [ln.split("|") for ln in (out or "").splitlines() if ln.count("|") == 6]
    rows = [r for r in rows if (r[0].rstrip("*") == str(part) if part is not None else r[0].endswith("*"))]
    if not rows:
        return []
    num = lambda v: int(re.match(r"\d*", v).group() or 0)  # noqa: E731  "2+": at least 2 (mixed nodes)
    nodes, cpus, mem = sum(num(r[1]) for r in rows), max(num(r[2]) for r in rows), max(num(r[3]) for r in rows)
    over = []
    if cluster["nodes"] > nodes:
        over.append(f"cluster.nodes={cluster['nodes']} but {where} has {nodes} node(s): use cluster.nodes<={nodes}")
    elif cluster.get("exclude") is not None:
        from .distributed import expand_hostlist
        try:
            names = {n for r in rows for n in expand_hostlist(r[6])}
            left = names - set(expand_hostlist(str(cluster["exclude"])))
        except ValueError:  # a host list we cannot read: sinfo's word stands
            left = names = set()
        if names and len(left) < cluster["nodes"]:
            kept = f"{len(left)} ({', '.join(sorted(left))})" if left else "none"
            over.append(f"cluster.exclude={cluster['exclude']} leaves {kept} of the {len(names)} node(s) of {where} "
                        f"for cluster.nodes={cluster['nodes']}: exclude fewer")
    tasks, per_task = cluster["tasks_per_node"], cluster["cpus_per_task"]
    if tasks * per_task > cpus:
        # the key that can change: cpus_per_task while each task gets a CPU; else fewer tasks on each node
        fix = (f"cluster.cpus_per_task<={cpus // tasks}" if cpus >= tasks else
               f"cluster.tasks_per_node<={cpus // per_task} (more cluster.nodes for more ranks)" if cpus >= per_task else
               f"cluster.tasks_per_node=1 and cluster.cpus_per_task<={cpus}")
        over.append(f"cluster.tasks_per_node x cluster.cpus_per_task = {tasks * per_task} CPUs per node but the nodes "
                    f"of {where} have {cpus}: use {fix}")
    if cluster.get("mem_gb") is not None and mem and cluster["mem_gb"] * 1024 > mem:
        over.append(f"cluster.mem_gb={cluster['mem_gb']} but the nodes of {where} have {mem / 1024:g} GB: use "
                    f"cluster.mem_gb<={mem // 1024} (or null)")
    try:
        limit = parse_slurm_time(rows[0][4].upper().replace("INFINITE", "UNLIMITED"))
    except ValueError:
        limit = None
    if limit is not None and cluster["timeout_min"] * 60 > limit:
        over.append(f"cluster.timeout_min={cluster['timeout_min']} but {where} allows {limit / 60:g} min: use "
                    f"cluster.timeout_min<={int(limit // 60)}")
    if features and cluster.get("constraint") is not None:
        have = sorted({f for r in rows for f in r[5].split(",") if f and f != "(null)"})
        over.append(f"cluster.constraint={cluster['constraint']} names features the nodes of {where} lack (they have: "
                    f"{', '.join(have) or 'none'}): use {'one of those, or ' if have else ''}cluster.constraint=null")
    return over


def base_job_ids(jobs: list) -> list[str]:
    """The ids that scontrol and scancel take for all of `jobs`, in order: an array's tasks ("77_0") its own id."""
    return list(dict.fromkeys(str(j.job_id).split("_")[0] for j in jobs))


def release_held(jobs: list) -> None:
    """Start the jobs submit queued held. Slurm opens a task's log in .submitit/<job id>/ as the task
    starts, and submitit makes that folder only after sbatch has answered: an idle cluster started a job
    first (seen: FAILED in 0.04 s, no log, "Could not open stdout file")."""
    ids = sorted(base_job_ids(jobs))
    try:
        r = subprocess.run(["scontrol", "release", *ids], capture_output=True, text=True, timeout=60)
        said = ((r.stderr or r.stdout).strip() or f"exit status {r.returncode}") if r.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        said = str(e)
    if said:
        raise ConfigError(f"job(s) {' '.join(ids)} are queued held and `scontrol release` failed ({said}); "
                          f"start them with: scontrol release {' '.join(ids)}")

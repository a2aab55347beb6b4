"""The run's outputs: W&B and ``history.csv``, written by rank 0 only.

As in torchtitan, ranks other than 0 get a `NullTracker` with the same methods that does nothing,
so the training loop calls ``tracker.log_train(...)`` unconditionally instead of checking the rank
everywhere. ``wandb`` is imported lazily (it takes ~0.7 s and starts a service process), so this
module imports cheaply and a ``wandb.mode=disabled`` run never imports it at all.

Resuming (a preempted Slurm job requeued into the same run folder):

* the W&B run id lives in ``run_dir/wandb_id.txt`` (never the API key), so the restarted process
  calls ``wandb.init(id=<same id>, resume="allow")``. Offline, each process writes a new
  ``wandb/offline-run-*-<id>/`` folder ("segment"); ``wandb sync`` uploads them in order of start
  time. wandb does not restore the step counter offline, so every log here passes ``step=``.
* ``history.csv`` is rewritten from the rows stored in the checkpoint, so epochs logged after the
  last checkpoint by the killed process disappear instead of appearing twice.
* A job's SIGTERM (``scancel``, preemption without a warning signal) reaches W&B's service process
  too, and it dies with its last records unwritten, while training still checkpoints at the next
  step boundary. So every W&B log is also appended to ``run_dir/wandb_steps.jsonl``, and a resumed
  process first re-logs the steps up to its checkpoint that the W&B record lacks (the earlier
  offline segments' last step; online, the server's resume step): no step is missing, none twice.
* After a SIGKILL the steps between the checkpoint and the kill are trained again. The earlier
  segment holds them already, so they are not logged again (online, W&B itself drops them): each
  step is in the record once, from the first process that logged it.
* wandb_steps.jsonl is written with W&B disabled too: a later start with W&B logs that stretch.
* An earlier offline segment with no record (its process killed as it started) is renamed
  ``empty-offline-run-*`` by the run's next start, whatever its mode (with W&B disabled, the id is
  wandb_id.txt's): `wandb sync` given it with others uploads none of them (and exits 0).
* An online start (say a requeue onto a node with network after an offline one) asks the server only;
  once it has re-logged what the server lacks, the run's earlier offline segments hold nothing the
  server does not (re-logged, synced before, or trained again after the checkpoint), so they are renamed
  ``relogged-offline-run-*`` with a warning: `wandb sync` of them would log their steps twice.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .config import WandbConfig
from .fsio import naming, write_atomic
from .history import HISTORY_FILE, rewrite_history, row_line, write_history
from .wandb_mode import resolve_mode, server_url

log = logging.getLogger(__name__)

__all__ = ["EVAL_KEYS", "Tracker", "NullTracker", "make_tracker", "generate_id", "ID_FILE", "STEPS_FILE"]

PROBE_S = 10.0  # an online start first asks whether the W&B server can be reached at all, for this long


def unreachable(url: str, timeout: float = PROBE_S) -> Optional[str]:
    """Why the W&B server at `url` cannot be reached from here, or None: it took a TCP connection (whatever it then
    says is wandb.init's to judge), or the way there cannot be told (wandb_mode.proxy_route). Straight: its name
    does not resolve, a refusal, no route, no answer within `timeout` s in all. Through a proxy: that proxy cannot
    be reached so, or for an https server it answers CONNECT with other than 200 (403 for a host it does not let
    through, 407, 502...) or not at all. Asked before an online wandb.init, which on a node without a way out
    says nothing for about 90 s before it gives up."""
    import threading
    import time
    from urllib.parse import urlsplit

    from .wandb_mode import proxy_route
    known, proxy = proxy_route(url)
    if not known:
        return None
    try:
        parts, via = urlsplit(url), urlsplit(proxy) if proxy else None
        server = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        hop = server if via is None else (via.hostname, via.port or 80)
    except ValueError:  # a bad port: wandb.init says what it makes of the URL
        return None
    if not server[0] or not hop[0]:
        return None
    said: list[Optional[str]] = []
    end = time.monotonic() + timeout

    def probe() -> None:
        s, why = _connect(hop, end)
        if s is None:
            said.append(why)
            return
        with s:  # a plain http server behind a proxy: the proxy took the connection, the rest is wandb's
            said.append(_tunnel(s, server, via, end) if via and parts.scheme == "https" else None)
    t = threading.Thread(target=probe, name="allconv-wandb-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)  # (its own deadline is `end`: a moment more for it to say why)
    why = said[0] if said else "no answer"
    return why if why is None or proxy is None else f"through the proxy {hop[0]}:{hop[1]}: {why}"


def _connect(where: tuple, end: float):
    """(a socket connected to `where`, None), or (None, why not). The name lookup has no timeout of its own: one
    deadline (`end`, time.monotonic) for it and every address."""
    import socket
    import time
    try:
        addresses = socket.getaddrinfo(*where, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return None, f"its name does not resolve: {e.strerror or e}"
    why = []
    for i, (family, kind, proto, _, address) in enumerate(addresses):
        left = end - time.monotonic()
        if left <= 0:
            break
        # each address its share of what is left: a silent first one (IPv6 with no route) leaves the next time
        s = socket.socket(family, kind, proto)
        s.settimeout(max(left / (len(addresses) - i), min(left, 3.0)))
        try:
            s.connect(address)
            return s, None
        except TimeoutError:
            why.append("no answer")
        except OSError as e:
            why.append(e.strerror or str(e) if isinstance(e, ConnectionRefusedError) or e.errno in (
                errno.ENETUNREACH, errno.EHOSTUNREACH) else None)
        s.close()
    return None, None if None in why or not why else why[-1]  # one it cannot read: wandb.init judges


def _tunnel(s, server: tuple, proxy, end: float) -> Optional[str]:
    """Why the proxy on socket `s` will not open a tunnel to `server` (host, port), or None: it did (200), or
    answered something that is no HTTP status line (wandb.init judges)."""
    import base64
    import time
    from urllib.parse import unquote
    host = f"[{server[0]}]" if ":" in server[0] else server[0]
    lines = [f"CONNECT {host}:{server[1]} HTTP/1.1", f"Host: {host}:{server[1]}"]
    if proxy.username is not None:  # as in the proxy's URL, which is all wandb has too
        creds = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}".encode()
        lines.append(f"Proxy-Authorization: Basic {base64.b64encode(creds).decode()}")
    try:
        s.settimeout(max(0.1, end - time.monotonic()))
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status = s.makefile("rb").readline(512).decode("latin-1").split(None, 2)
    except TimeoutError:
        return f"no answer to CONNECT {host}:{server[1]}"
    except OSError as e:
        return f"it closed the connection ({e.strerror or e})"
    if len(status) < 2 or not status[0].startswith("HTTP/") or not status[1].isdigit():
        return None if status else "it closed the connection without an answer"
    if status[1] == "200":  # Go's client takes no other answer to CONNECT
        return None
    return f"CONNECT {host}:{server[1]} answered {status[1]} {status[2].strip() if len(status) > 2 else ''}".rstrip()


ID_FILE = "wandb_id.txt"
STEPS_FILE = "wandb_steps.jsonl"  # every W&B log of this run, to re-log what a killed W&B service lost

# history row key -> W&B key logged by `log_eval` ("step" is the W&B step itself, not a metric)
EVAL_KEYS = {"epoch": "epoch", "lr": "epoch/lr", "train_loss": "train/epoch_loss",
             "train_acc": "train/epoch_acc", "val_loss": "val/loss", "val_acc": "val/acc",
             "epoch_seconds": "perf/epoch_seconds", "images_per_second": "perf/images_per_second"}

def _span(epochs: list[int]) -> str:
    return f"{epochs[0]}" if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"



def generate_id(length: int = 8) -> str:
    """A new W&B run id: base-36 lowercase, 8 characters, as wandb's own ids. (``wandb.util.
    generate_id`` is gone in wandb 0.31; ``secrets`` is immune to training code seeding ``random``.)"""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(length))


def read_id(run_dir: Path) -> Optional[str]:
    """The run id in wandb_id.txt; None when there is none, or when the file is damaged (not an id: bytes
    of another file, a torn write), which is said once: the checkpoint's id, else a new one, is used."""
    try:
        text = (run_dir / ID_FILE).read_text(errors="replace").strip("\0 \n\t")
    except (FileNotFoundError, NotADirectoryError):
        return None
    if text and (len(text) > 128 or any(c not in _ID_CHARS for c in text)):
        log.warning("%s is damaged (%r is no W&B run id): ignored", run_dir / ID_FILE, text[:40])
        return None
    return text or None


_ID_CHARS = frozenset(string.ascii_letters + string.digits + "_-.")


# ---------------------------------------------------------------------------------------------
# trackers


def _scalar(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        return v.item()
    return v


class NullTracker:
    """What ranks other than 0 get (and rank 0 for a run already completed): every method of `Tracker`, doing
    nothing and writing nothing."""

    mode = "disabled"
    run_id: Optional[str] = None
    segment_dir: Optional[Path] = None
    history_path: Optional[Path] = None

    def log_train(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def log_eval(self, step: int, row: Mapping[str, Any]) -> None:
        pass

    def append_history(self, row: Mapping[str, Any], rows: Optional[list] = None) -> None:
        pass

    def set_summary(self, **kv: Any) -> None:
        pass

    def sync(self) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return False


def _settings(wandb):
    """HPC settings. reinit="finish_previous": never silently get back an unfinished run of this
    process ("default" returns it outside notebooks). save_code=False: the job runs the installed
    package; git state is still recorded."""
    return wandb.Settings(save_code=False, reinit="finish_previous")


class Tracker:
    """Rank 0's tracker: ``run_dir/history.csv`` always; W&B unless the mode is "disabled".

    Use `make_tracker` rather than this class directly. Every W&B log passes an explicit
    ``step=`` (the global optimizer step) because offline resumes restart wandb's counter.
    W&B drops logs whose step goes backwards; `log_eval` must use the step of the last
    `log_train` or a later one (the same step merges into that step's row).
    """

    def __init__(self, run_dir: Path, cfg_dict: dict, wandb_cfg: WandbConfig,
                 resume_run_id: Optional[str] = None, history_rows: Optional[list] = None,
                 mode: Optional[str] = None, global_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history_path = self.run_dir / HISTORY_FILE
        # the checkpoint is the truth: epochs the killed process logged after it are dropped
        history_rows = list(history_rows or [])
        rewrite_history(self.history_path, history_rows)
        self.mode = mode or resolve_mode(wandb_cfg.mode)
        env_mode = (os.environ.get("WANDB_MODE") or "").strip()
        # why auto chose offline, for train.log (else it reads as a fault): said before _start_wandb drops WANDB_MODE
        self.auto_why: Optional[str] = (
            None if mode or wandb_cfg.mode is not None or self.mode != "offline" else
            f"WANDB_MODE={env_mode}" if env_mode else "no W&B API key here: wandb login, or WANDB_API_KEY, makes it "
                                                      "online")
        self._where = wandb_where(wandb_cfg)
        self.online_error: Optional[str] = None  # why an online init fell back to offline
        self._run = None
        self._run_id: Optional[str] = None
        self._finished = False
        self._torn_down = False
        self._last_step: Optional[int] = None
        self._floor = 0  # steps the W&B record holds from earlier processes: never logged again
        self._floor_said = False
        self.steps_path = self.run_dir / STEPS_FILE
        # likewise for the W&B log: train logs up to the checkpoint's step, evals of its epochs. Kept with W&B
        # disabled too: a later start with W&B logs what a disabled stretch trained, leaving no gap in the run
        gone = global_step > 0 and not self.steps_path.exists()  # a resume without it: deleted by hand?
        kept = [e for e in _read_steps(self.steps_path)
                if (e["step"] <= global_step if e["kind"] == "train" else e["data"].get("epoch", 0)
                    <= len(history_rows))]
        if kept or self.steps_path.exists():
            write_atomic(self.steps_path, "".join(json.dumps(e) + "\n" for e in kept))
        self._steps_file = None  # kept open: should the file be deleted while the run trains, what it held is read
        if self.mode != "disabled":
            self._start_wandb(cfg_dict, wandb_cfg, resume_run_id)
            have = self._logged_until()
            if kept and have is not None:
                self._relog_lost(kept, have)
            # epochs the checkpoint holds whose evaluation W&B lacks: logged (and recorded) for sure, now lost
            lost = ([r["epoch"] for r in history_rows if (r.get("step") or 0) > have] if gone and have is not None
                    else [])
            if lost:
                log.warning("%s is missing (deleted?), and this run's W&B record ends at step %d, before the "
                            "checkpoint's step %d: what earlier processes logged after step %d (the evaluations "
                            "of epochs %s, and train logs) cannot be re-logged, and W&B will lack it (history.csv "
                            "keeps every epoch)%s", self.steps_path, have, global_step, have,
                            _span(lost), "; earlier offline segments are left as they are" if self.mode == "online"
                            else "")
            if self.mode == "online":
                self._set_aside_offline(relogged=not gone)  # without the file nothing was re-logged from them
            # After a SIGKILL the steps between the checkpoint and the kill are trained again; the
            # earlier segment already holds them (online, W&B drops them itself), so they are not
            # logged twice. A train log at the floor step that the killed process never sent is lost
            # with them (wandb_steps.jsonl still has it).
            self._floor = have or 0
        else:  # no W&B run, but the folder's empty segments of this run would still stop `wandb sync`
            set_aside_empty(self.run_dir, resume_run_id or read_id(self.run_dir))

    # -- W&B -----------------------------------------------------------------------------------
    def _start_wandb(self, cfg_dict: dict, wandb_cfg: WandbConfig, resume_run_id: Optional[str]) -> None:
        import wandb

        # resolve_mode read WANDB_MODE (blank = unset, any case); wandb would validate it again, strictly
        os.environ.pop("WANDB_MODE", None)
        run_id = resume_run_id or read_id(self.run_dir) or generate_id()
        if read_id(self.run_dir) != run_id:
            write_atomic(self.run_dir / ID_FILE, run_id + "\n")
        self._run_id = run_id
        kwargs = dict(
            id=run_id, resume="allow", project=wandb_cfg.project, entity=wandb_cfg.entity,
            group=wandb_cfg.group, tags=list(wandb_cfg.tags or []) or None,
            name=wandb_cfg.name or self.run_dir.name, dir=str(self.run_dir), config=dict(cfg_dict),
            settings=_settings(wandb),
        )
        if self.mode == "online" and (why := unreachable(url := server_url())):
            # no wandb.init online: it would wait about 90 s at every start (each requeue, each sweep point)
            self.online_error = f"{url} unreachable: {why}"
            log.warning("W&B online: the server %s cannot be reached from this node (%s; tried for up to %g s); "
                        "logging offline to %s instead: `wandb sync` it from a login node (wandb.mode=offline skips "
                        "the check)", url, why, PROBE_S, self.run_dir / "wandb")
            self.mode = "offline"
        if self.mode == "online":  # the server took a connection, or a proxy stands between: init may still fail
            log.info("W&B online: connecting (should the init fail, as through a proxy that refuses W&B, it logs "
                     "offline after W&B's init timeout, about 90 s; wandb.mode=offline skips it)")
        try:
            self._run = wandb.init(mode=self.mode, **kwargs)
        except KeyboardInterrupt:  # a Ctrl-C inside init: a run it began would be closed at exit as finished (0)
            with contextlib.suppress(Exception):
                wandb.finish(exit_code=130)
            with contextlib.suppress(Exception):  # its service flushes the segment now, as finish() below does
                wandb.teardown()
            raise
        except wandb.errors.Error as e:
            if self.mode != "online":
                raise
            # compute nodes often have no route out: keep the record offline, `wandb sync` it later.
            # Said in the log and in status.json ("wandb_mode"), not only on stderr.
            self.online_error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            log.warning("W&B online init failed (%s); logging offline to %s instead: `wandb sync` it from a "
                        "login node (wandb.mode=offline skips the wait on nodes without network)",
                        self.online_error, self.run_dir / "wandb")
            wandb.teardown()  # the service still holds the failed run's id and would refuse it ("in use")
            self.mode = "offline"
            self._run = wandb.init(mode="offline", **kwargs)

    def _logged_until(self) -> Optional[int]:
        """The last step the W&B record of this run already holds from earlier processes (0: none);
        None when an earlier segment cannot be read."""
        if self.mode == "online":
            return max(0, int(self._run.starting_step) - 1)  # the server's resume point
        return logged_until(self.run_dir, self._run_id, self._where, self.segment_dir)

    def _set_aside_offline(self, relogged: bool = True) -> None:
        """Online: rename this run's earlier offline segments out of the ``offline-run-*`` glob that `wandb sync`
        is given: those without records always (`_set_aside_if_empty`); once the re-log is done, the others too
        (``relogged-``). The server then holds their steps: re-logged from wandb_steps.jsonl, synced before this
        start, or (after the checkpoint) logged again as the run trains on; `wandb sync` of them would add those
        steps to the run a second time. ``relogged`` False (wandb_steps.jsonl was gone, nothing re-logged): the
        empty ones only."""
        from .wandb_offline import RELOGGED_PREFIX, read_run, segments
        mine = self.segment_dir.resolve() if self.segment_dir else None
        for seg in segments(self.run_dir / "wandb", self._run_id, ordered=False):
            if seg.resolve() == mine or _set_aside_if_empty(seg) or not relogged:
                continue
            try:
                other = elsewhere(read_run(seg), self._where)
            except Exception:  # unreadable: taken for this project's, as every segment was
                other = None
            if other:  # another project's run of this id: the server's record here holds none of it; sync it there
                continue
            aside = _rename_aside(seg, RELOGGED_PREFIX)
            if aside is not None:
                log.warning("W&B segment %s (offline) holds steps this online run's server record now has (re-"
                            "logged from %s, or synced before): renamed %s, out of `wandb sync runs/.../offline-"
                            "run-*`; it must not be synced, which would log its steps a second time",
                            seg.name, STEPS_FILE, aside.name)

    def _relog_lost(self, entries: list[dict], have: int) -> None:
        """Re-log, in their original order, the logs up to the checkpoint that W&B lacks (after ``have``)."""
        lost = [e for e in entries if e["step"] > have]
        if lost:
            log.warning("re-logging %d W&B log(s), steps %d..%d, that the previous process's W&B record lacks",
                        len(lost), lost[0]["step"], lost[-1]["step"])
        for e in lost:
            self._log(e["data"], e["step"])

    def _record(self, kind: str, step: int, data: dict) -> None:
        # flushed on close; SIGTERM lets the process get here
        line = json.dumps({"kind": kind, "step": int(step), "data": {k: _scalar(v) for k, v in data.items()}}) + "\n"
        with naming(self.steps_path):
            f = self._steps_file
            if f is not None and not self.steps_path.exists():  # deleted since: a kill would lose W&B steps
                f.seek(0)  # back from the open file, then written whole again
                held = f.read()
                f.close()
                self._steps_file = None
                write_atomic(self.steps_path, held + line)
                log.warning("%s was missing (deleted?): written again with this run's %d W&B logs", self.steps_path,
                            held.count("\n") + 1)
                return
            if f is None:
                self._steps_file = f = open(self.steps_path, "a+")
            f.write(line)
            f.flush()

    @property
    def run_id(self) -> Optional[str]:
        """The W&B run id (also in ``run_dir/wandb_id.txt``); None when W&B is disabled."""
        return self._run_id

    @property
    def segment_dir(self) -> Optional[Path]:
        """This process's ``wandb/(offline-)run-*-<id>/`` folder; None when W&B is disabled."""
        if self._run is None:
            return None
        return Path(self._run.settings.sync_dir)

    def _log(self, data: dict, step: int) -> None:
        if self._run is None or self._finished:
            return
        step = int(step)
        if step <= self._floor:
            if not self._floor_said:
                self._floor_said = True
                log.warning("steps up to %d are in this run's W&B record from an earlier process, which logged "
                            "them or an epoch's evaluation at the last (a kill since the last checkpoint, or a grown "
                            "run): W&B adds nothing to those steps, so logs at them are kept in %s only",
                            self._floor, STEPS_FILE)
            return
        if self._last_step is not None and step < self._last_step:
            log.warning("dropping W&B log at step %d < last logged step %d: %s", step, self._last_step, sorted(data))
            return
        self._last_step = step
        try:
            self._run.log({k: _scalar(v) for k, v in data.items()}, step=step)
        except Exception as e:
            self._lost(e)

    def log_train(self, step: int, metrics: Mapping[str, Any]) -> None:
        """``train/<key>`` for each metric, at the global optimizer step ``step``."""
        data = {"train/" + k: v for k, v in metrics.items()}
        self._record("train", step, data)
        self._log(data, step)

    def log_eval(self, step: int, row: Mapping[str, Any]) -> None:
        """One epoch's row (keys of `HISTORY_FIELDS`) at ``step``, the global step at the end of the
        epoch: val_loss -> val/loss, val_acc -> val/acc, epoch, train_loss -> train/epoch_loss ...
        (see `EVAL_KEYS`); ``step`` itself is the W&B step; other keys are logged as they are."""
        data = {}
        for k, v in row.items():
            if k == "step" or v is None:
                continue
            data[EVAL_KEYS.get(k, k)] = v
        self._record("eval", step, data)
        self._log(data, step)

    def set_summary(self, **kv: Any) -> None:
        """Set run summary values (e.g. ``best_val_acc=...``); they override the last logged value."""
        if self._run is not None and not self._finished:
            try:
                self._run.summary.update({k: _scalar(v) for k, v in kv.items()})
            except Exception as e:
                self._lost(e)

    def _lost(self, e: Exception) -> None:
        """W&B's service process is gone (a job's SIGTERM reaches every process of the step, W&B's
        too): stop logging to W&B instead of failing the training; history.csv stays complete."""
        log.warning("W&B stopped working (%s: %s); not logging to W&B for the rest of this process",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        self._finished = True

    def sync(self) -> None:
        """Make ``wandb_steps.jsonl`` durable up to now. The checkpoint writer calls it before each
        checkpoint lands: after a node crash the checkpoint never runs ahead of the logs to re-log (with W&B
        disabled too: a later start with W&B logs that stretch from it)."""
        try:
            fd = os.open(self.steps_path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- history.csv -----------------------------------------------------------------------------
    def append_history(self, row: Mapping[str, Any], rows: Optional[list] = None) -> None:
        """Append one epoch's row to ``history.csv`` (flushed and fsynced). `rows`: every epoch's up to this one,
        written whole where the file is gone (deleted while the run trains: an append would make it headless)."""
        if not self.history_path.exists():
            write_history(self.history_path, rows if rows is not None else [row])
            log.warning("%s was missing (deleted?): written again with %s", self.history_path,
                        f"the {len(rows)} epoch(s) the checkpoint holds" if rows is not None else "this epoch's row")
            return
        with naming(self.history_path), open(self.history_path, "a", newline="") as f:
            f.write(row_line(row))
            f.flush()
            os.fsync(f.fileno())

    # -- end -------------------------------------------------------------------------------------
    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run (idempotent). A non-zero exit code marks it failed/crashed."""
        if self._steps_file is not None:
            self._steps_file.close()
            self._steps_file = None
        if self._run is not None and not self._finished:
            try:
                self._run.finish(exit_code=exit_code)
            except Exception as e:
                log.warning("W&B finish failed (%s: %s)", type(e).__name__, e)
        self._finished = True
        if self._run is not None and not self._torn_down:
            # Stop W&B's service now, not in wandb's atexit hook: a requeue's SIGTERM (or scancel's) would
            # kill it first, and the hook would then print a ConnectionResetError traceback into the job log.
            self._torn_down = True
            import wandb
            try:
                wandb.teardown()
            except Exception:  # the service is already gone (the SIGTERM came first): nothing left to stop
                pass
            if self.mode == "offline" and self.segment_dir is not None:  # the service has ended: its file is whole
                self._set_aside_if_never_written()

    def _set_aside_if_never_written(self) -> None:
        """This start's segment, where W&B's service ended before writing a record (it buffers a block: a scancel or
        kill some seconds into a start ends it with the job), is renamed now, not at the run's next start: `wandb
        sync` of a sweep's folders stops at it, and a run stopped for good would never have it renamed."""
        from .wandb_offline import holds_no_record
        for _ in range(20):  # the last write may still be reaching the file system
            if not holds_no_record(self.segment_dir):
                return
            time.sleep(0.1)
        _set_aside_if_empty(self.segment_dir, this_start=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish(0)
        elif issubclass(exc_type, SystemExit) and isinstance(exc.code, int):
            self.finish(exc.code)
        elif issubclass(exc_type, SystemExit) and exc.code is None:
            self.finish(0)
        else:
            self.finish(1)
        return False


def _rename_aside(seg: Path, prefix: str) -> Optional[Path]:
    """``seg`` renamed ``prefix + seg.name``; None, said in the log, when the file system refuses."""
    aside = seg.with_name(prefix + seg.name)
    try:
        os.replace(seg, aside)
    except OSError as e:
        log.warning("cannot rename W&B segment %s to %s (%s); do not `wandb sync` it", seg, aside.name, e)
        return None
    return aside


def _set_aside_if_empty(seg: Path, this_start: bool = False) -> bool:
    """Rename an offline segment that holds no record ``empty-offline-run-*``; whether it held none."""
    from .wandb_offline import EMPTY_PREFIX, holds_no_record
    if not holds_no_record(seg):
        return False
    aside = _rename_aside(seg, EMPTY_PREFIX)
    if aside is not None and this_start:
        log.warning("W&B segment %s of this start holds no record (W&B's service ended before writing one: killed "
                    "with the job, a scancel or kill early in the start): renamed %s, out of `wandb sync "
                    "runs/.../offline-run-*`, which stops at such a folder; its logs are in history.csv and %s, and "
                    "the run's next start logs them to W&B", seg.name, aside.name, STEPS_FILE)
    elif aside is not None:
        log.warning("W&B segment %s holds no record (its process was killed before W&B wrote one: as it started, "
                    "or by a SIGKILL before W&B flushed): renamed %s, out of `wandb sync runs/.../offline-run-*`, "
                    "which stops at such a folder", seg.name, aside.name)
    return True


def wandb_where(wandb_cfg: WandbConfig) -> tuple:
    """(entity, project) the run logs to: W&B keeps a run per entity/project. wandb takes WANDB_ENTITY where
    wandb.entity is null (its default), so a resume with another one went into another run unsaid, the steps before
    it left in the first."""
    return wandb_cfg.entity or os.environ.get("WANDB_ENTITY", "").strip() or None, wandb_cfg.project


def elsewhere(record: dict, where: tuple) -> Optional[str]:
    """The entity/project of a segment's ``record`` where it is not ``where`` (this start's (entity, project)): W&B
    keeps a run per project, so that segment is another run of the same id. Unknown parts (an offline record
    often has no entity) are no difference."""
    theirs = (record.get("entity"), record.get("project"))
    if any(a and b and a != b for a, b in zip(theirs, where)):
        return "/".join(str(x) for x in theirs if x)
    return None


def logged_until(run_dir: Path, run_id: str, where: tuple, mine: Optional[Path] = None,
                 quiet: bool = False) -> Optional[int]:
    """The last step this folder's W&B segments of ``run_id`` in ``where`` ((entity, project)) hold (0: none;
    ``mine``, the segment being written, left out); None when one cannot be read. Segments without a record are
    renamed out of the sync glob on the way. Those of another project (wandb.project or entity changed on resume)
    are another W&B run: online, the server's record in the new project starts empty too, so either way the whole
    run is re-logged there (said, unless ``quiet``: the tracker that does it says it)."""
    from .wandb_offline import read_run, segments
    last, others, here = 0, set(), False
    mine = mine.resolve() if mine else None
    for seg in segments(run_dir / "wandb", run_id, include_online=True):
        if seg.resolve() == mine:
            continue
        if seg.name.startswith("offline-run-") and _set_aside_if_empty(seg):
            continue
        try:
            record = read_run(seg)
        except Exception as e:  # unknown: neither re-log nor drop anything rather than guess
            log.warning("cannot read W&B segment %s (%s: %s); not re-logging lost steps, nor skipping steps "
                        "it may hold", seg, type(e).__name__, e)
            return None
        other = elsewhere(record, where)
        if other:
            others.add(other)
            continue
        here = True
        last = max([last, *(r["_step"] for r in record["history"] if "_step" in r)])
    if others and not here and not quiet:  # the first start in this project
        now = "/".join(str(x) for x in where if x)
        log.warning("wandb.entity/project is %s now; earlier W&B segments of run %s are in %s: W&B keeps a run per "
                    "project, so %s gets this run's logs from %s again (the others keep what they have)",
                    now, run_id, ", ".join(sorted(others)), now, STEPS_FILE)
    return last


def lacks_logs(run_dir: Path, run_id: Optional[str], where: tuple) -> bool:
    """Whether wandb_steps.jsonl holds logs past what this folder's W&B segments of the run hold (a stretch
    trained with W&B disabled, or logs lost with W&B's service): what a start on a completed run opens W&B for,
    else it opens none. A folder without any segment of the run (`wandb clean`, or wandb/ deleted after a sync)
    cannot tell: left as it is rather than log the whole run a second time."""
    from .wandb_offline import EMPTY_PREFIX, segments
    wandb_dir = run_dir / "wandb"
    if run_id is None or not (segments(wandb_dir, run_id, include_online=True, ordered=False)
                              or any(wandb_dir.glob(f"{EMPTY_PREFIX}offline-run-*-{run_id}"))):
        return False
    steps = [e["step"] for e in _read_steps(run_dir / STEPS_FILE)]
    have = logged_until(run_dir, run_id, where, quiet=True) if steps else None
    return have is not None and max(steps) > have


def set_aside_empty(run_dir: Path, run_id: Optional[str]) -> None:
    """This run's offline segments without a record, renamed out of the `wandb sync` glob (no ``import
    wandb``): with W&B disabled, on a completed run, or for the old run that checkpoint.resume=never sets aside."""
    from .wandb_offline import segments
    for seg in segments(run_dir / "wandb", run_id, ordered=False) if run_id else ():
        _set_aside_if_empty(seg)


def _read_steps(path: Path) -> list[dict]:
    """The entries of ``wandb_steps.jsonl``; a torn last line (a killed writer) is dropped."""
    try:
        lines = path.read_text(errors="replace").splitlines()  # damaged bytes end it like a torn line
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break
        if not (isinstance(entry, dict) and isinstance(entry.get("step"), int) and isinstance(entry.get("data"), dict)
                and entry.get("kind") in ("train", "eval")):
            break
        out.append(entry)
    return out


def make_tracker(run_dir: Path, cfg_dict: dict, wandb_cfg: WandbConfig, rank: int,
                 resume_run_id: Optional[str], history_rows: list[dict],
                 global_step: int = 0) -> Union[Tracker, NullTracker]:
    """`Tracker` on rank 0, `NullTracker` elsewhere.

    ``cfg_dict`` becomes the W&B config; ``resume_run_id`` (e.g. from a checkpoint) wins over
    ``run_dir/wandb_id.txt``, which wins over a fresh id; ``history_rows`` (from the checkpoint;
    ``[]`` for a fresh run) replace the contents of ``run_dir/history.csv``.
    """
    if rank != 0:
        return NullTracker()
    return Tracker(Path(run_dir), cfg_dict, wandb_cfg, resume_run_id=resume_run_id,
                   history_rows=history_rows, global_step=global_step)

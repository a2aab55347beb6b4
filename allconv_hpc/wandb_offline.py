"""Read back W&B offline runs without network, a key or a W&B server.

An offline run (`wandb.init(mode="offline")`) leaves one folder per process under `wandb/`:
``offline-run-YYYYmmdd_HHMMSS-<id>[-N]/run-<id>.wandb``. A preempted and resumed run therefore
has several folders ("segments") with the same id; ``wandb sync`` uploads them one after another
in order of start time. wandb 0.31 writes no ``wandb-summary.json``/``config.yaml`` offline and
has no Python reader for the ``.wandb`` file, so this module reads it directly:

* a 7-byte file header: ``b":W&B"``, a u16 magic ``0xBEE1`` (little-endian) and a version byte;
* then 32 KiB blocks (the file header counts as part of the first block) of records, each with a
  7-byte header ``crc32 u32 | length u16 | type u8`` (1 full, 2 first, 3 middle, 4 last), all
  little-endian. A block tail shorter than 7 bytes is zero padding.
* The checksum is plain (unmasked) IEEE CRC-32 -- ``zlib.crc32`` -- of the type byte followed by
  the fragment's data (checked against files written by wandb-core 0.31.0; it is what the old
  Python ``wandb.sdk.internal.datastore`` wrote, and the Go writer kept the format).
* A reassembled payload is a ``wandb.proto.wandb_internal_pb2.Record``.

Only ``wandb.proto`` (protobuf classes) is imported, and only when records are decoded; ``import
wandb`` is not needed for `holds_no_record` and `segments` with ``ordered=False`` (what a
``wandb.mode=disabled`` start calls).
"""
from __future__ import annotations

import itertools
import json
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional

__all__ = ["WandbLogError", "read_records", "read_run", "segments", "merged_history", "segment_id",
           "FILE_HEADER_LEN", "BLOCK_LEN", "holds_no_record", "EMPTY_PREFIX", "RELOGGED_PREFIX"]

FILE_MAGIC = b":W&B"
FILE_HEADER_LEN = 7
BLOCK_LEN = 32 * 1024
RECORD_HEADER_LEN = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4

# offline-run-20261128_101953-abc123xy, and -1, -2 ... when two processes start in the same second
EMPTY_PREFIX = "empty-"  # a segment without records, renamed out of `offline-run-*` globs (see holds_no_record)
# an offline segment whose steps an online start of the run has put on the server (re-logged, or synced before):
# renamed out of `offline-run-*` globs too, since `wandb sync` would upload its steps a second time
RELOGGED_PREFIX = "relogged-"
_SEGMENT_RE = re.compile(r"^(?P<mode>offline-run|run)-(?P<ts>\d{8}_\d{6})-(?P<rest>.+)$")


class WandbLogError(ValueError):
    """The file is not a W&B transaction log, or it is corrupt (with strict=True)."""


def _record_class():
    from wandb.proto import wandb_internal_pb2  # protobuf classes only; no wandb.init machinery
    return wandb_internal_pb2.Record


def _payloads(data: bytes, path: Path, strict: bool, verify_crc: bool) -> Iterator[bytes]:
    if len(data) < FILE_HEADER_LEN and not strict and FILE_MAGIC.startswith(data[:4]):
        return  # empty or half-written header: the process died as it started
    if len(data) < FILE_HEADER_LEN or data[:4] != FILE_MAGIC:
        raise WandbLogError(f"{path}: not a W&B transaction log (no ':W&B' header)")
    off = FILE_HEADER_LEN
    parts: Optional[list] = None  # fragments of a FIRST..LAST record being reassembled
    n = len(data)
    while off < n:
        left = BLOCK_LEN - off % BLOCK_LEN
        if left < RECORD_HEADER_LEN:  # zero padding at a block's tail
            off += left
            continue
        if off + RECORD_HEADER_LEN > n:
            break  # truncated header at the end: a writer that was killed
        crc, length, rtype = struct.unpack_from("<IHB", data, off)
        if rtype == 0 and length == 0 and crc == 0:  # zeroed (preallocated) space: skip the block
            off += left
            continue
        start = off + RECORD_HEADER_LEN
        end = start + length
        if length > left - RECORD_HEADER_LEN or end > n:
            if end > n and not strict:
                break  # the last record was only half written (killed mid-write)
            raise WandbLogError(f"{path}: record at byte {off} overruns its block or the file")
        frag = data[start:end]
        if verify_crc and zlib.crc32(bytes((rtype,)) + frag) != crc:
            if strict:
                raise WandbLogError(f"{path}: checksum mismatch at byte {off}")
            # skip the damaged (possibly partial) record and resync at the next block
            parts = None
            off += left
            continue
        off = end
        if rtype == FULL:
            parts = None
            yield frag
        elif rtype == FIRST:
            parts = [frag]
        elif rtype == MIDDLE:
            if parts is not None:
                parts.append(frag)
        elif rtype == LAST:
            if parts is not None:
                parts.append(frag)
                yield b"".join(parts)
            parts = None
        elif strict:
            raise WandbLogError(f"{path}: unknown record type {rtype} at byte {off}")


def read_records(path: str | Path, *, strict: bool = False, verify_crc: bool = True,
                 max_bytes: Optional[int] = None) -> Iterator[Any]:
    """Yield every `wandb_internal_pb2.Record` in a ``run-<id>.wandb`` file, in file order.

    With ``strict=False`` (default) a run that was killed mid-write still reads: a truncated last
    record is dropped and a record with a bad checksum is skipped (reading resumes at the next
    32 KiB block). ``strict=True`` raises `WandbLogError` instead. ``max_bytes`` reads only the
    file's first bytes (the header and run records sit in the first block).
    """
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes)
    strict = strict and max_bytes is None  # a prefix may end inside a record
    Record = _record_class()
    for payload in _payloads(data, path, strict, verify_crc):
        rec = Record()
        try:
            rec.ParseFromString(payload)
        except Exception as e:  # google.protobuf.message.DecodeError
            if strict:
                raise WandbLogError(f"{path}: undecodable record: {e}") from None
            continue
        yield rec


def _item_key(item) -> str:
    if item.key:
        return item.key
    return ".".join(item.nested_key)


def _item_value(item) -> Any:
    """A HistoryItem/SummaryItem/ConfigItem value. wandb 0.31 writes value_json; newer typed fields
    (none/boolean/integer/number/text/json) are read when present."""
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which is not None:
        v = getattr(item, which)
        if which == "none":
            return None
        if which == "json":
            return json.loads(v)
        return v
    if item.value_json == "":
        return None
    return json.loads(item.value_json)


def _set_nested(d: dict, item, value: Any) -> None:
    keys = [item.key] if item.key else list(item.nested_key)
    if not keys:
        return
    for k in keys[:-1]:
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = d[k] = {}
        d = nxt
    d[keys[-1]] = value


def _del_nested(d: dict, item) -> None:
    keys = [item.key] if item.key else list(item.nested_key)
    for k in keys[:-1]:
        d = d.get(k)
        if not isinstance(d, dict):
            return
    if keys:
        d.pop(keys[-1], None)


def _apply(target: dict, rec_part) -> None:
    for item in rec_part.update:
        _set_nested(target, item, _item_value(item))
    for item in rec_part.remove:
        _del_nested(target, item)


def segment_id(segment_dir: str | Path) -> Optional[str]:
    """The run id of one segment folder: from its ``run-<id>.wandb`` file, else from the name."""
    segment_dir = Path(segment_dir)
    files = sorted(segment_dir.glob("run-*.wandb"))
    if files:
        return files[0].name[len("run-"):-len(".wandb")]
    m = _SEGMENT_RE.match(segment_dir.name)
    if not m:
        return None
    return re.sub(r"-\d+$", "", m.group("rest"))


def read_run(segment_dir: str | Path, *, strict: bool = False) -> dict:
    """Read one ``wandb/offline-run-*-<id>/`` folder (one process's segment of a run).

    Returns ``{"id", "project", "entity", "history", "summary", "config", "start_time", "exit_code", "path"}``:
    history is a list of ``{"_step": int, key: value, ...}`` rows in logged order (values
    json-decoded; nested dict keys flattened with "."; wandb's own ``_timestamp``/``_runtime``
    columns kept); summary is the final summary (nested dicts kept, ``_wandb`` dropped); config is
    what was passed to ``wandb.init`` plus later ``config.update``s (``_wandb`` dropped);
    start_time is a Unix time (float) or None; exit_code is None when the process never finished.
    A segment whose process died before writing anything reads as empty unless ``strict``.
    """
    segment_dir = Path(segment_dir)
    rid = segment_id(segment_dir)
    log = segment_dir / f"run-{rid}.wandb"
    if not log.exists() and (strict or not segment_dir.is_dir()):
        raise FileNotFoundError(f"{segment_dir}: no run-<id>.wandb file")
    history: list[dict] = []
    summary: dict = {}
    config: dict = {}
    start_time = None
    exit_code = None
    project = entity = None
    for rec in (read_records(log, strict=strict) if log.exists() else ()):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row: dict = {}
            for item in rec.history.item:
                row[_item_key(item)] = _item_value(item)
            if rec.history.HasField("step"):
                row["_step"] = int(rec.history.step.num)
            elif "_step" in row:
                row["_step"] = int(row["_step"])
            history.append(row)
        elif kind == "summary":
            _apply(summary, rec.summary)
        elif kind == "config":
            _apply(config, rec.config)
        elif kind == "run":
            run = rec.run
            if run.run_id:
                rid = run.run_id
            project, entity = run.project or project, run.entity or entity
            _apply(config, run.config)
            _apply(summary, run.summary)
            if run.HasField("start_time"):
                start_time = run.start_time.seconds + run.start_time.nanos / 1e9
        elif kind == "exit":
            exit_code = int(rec.exit.exit_code)
    config.pop("_wandb", None)
    summary.pop("_wandb", None)
    return {"id": rid, "project": project, "entity": entity, "history": history, "summary": summary, "config": config,
            "start_time": start_time, "exit_code": exit_code, "path": str(segment_dir)}


def holds_no_record(segment_dir: str | Path) -> bool:
    """A segment whose process died before its run record (no file, the file header only, or the header record
    alone): `wandb sync` (0.31) given such a folder stops before uploading any run of its command line ("error
    getting next record: EOF"), and exits 0. Decided from the record framing alone (no protobuf, so no
    ``import wandb``): a checksummed record after the first (wandb's header record) counts, decodable or not."""
    files = sorted(Path(segment_dir).glob("run-*.wandb"))
    if not files:
        return True
    try:
        with open(files[0], "rb") as f:
            data = f.read(4 * BLOCK_LEN + 1)  # a run record of a large config may span blocks; more is no empty log
        return (len(data) <= 4 * BLOCK_LEN
                and len(list(itertools.islice(_payloads(data, files[0], strict=False, verify_crc=True), 2))) < 2)
    except (OSError, WandbLogError):
        return False  # unreadable is not known empty: left where it is


def _start_time_of(segment_dir: Path) -> Optional[float]:
    """The run record's start time (it is the second record); None when unreadable."""
    files = sorted(segment_dir.glob("run-*.wandb"))
    if not files:
        return None
    try:
        for i, rec in enumerate(read_records(files[0], max_bytes=2 * BLOCK_LEN)):
            if rec.WhichOneof("record_type") == "run" and rec.run.HasField("start_time"):
                return rec.run.start_time.seconds + rec.run.start_time.nanos / 1e9
            if i > 8:
                break
    except (OSError, WandbLogError):
        return None
    return None


def _sort_key(segment_dir: Path) -> tuple:
    m = _SEGMENT_RE.match(segment_dir.name)
    ts = m.group("ts") if m else ""
    suffix = re.search(r"-(\d+)$", m.group("rest")) if m else None
    n = int(suffix.group(1)) if suffix and segment_id(segment_dir) != m.group("rest") else 0
    name_time = time.mktime(time.strptime(ts, "%Y%m%d_%H%M%S")) if ts else 0.0  # local time, as wandb
    t = _start_time_of(segment_dir)
    return (t if t is not None else name_time, ts, n, segment_dir.name)


def _resolve_wandb_dir(wandb_dir: Path) -> Path:
    if not any(_SEGMENT_RE.match(p.name) for p in wandb_dir.glob("*run-*")):
        for sub in ("wandb", ".wandb"):  # a run folder holding wandb/ is accepted too
            if (wandb_dir / sub).is_dir():
                return wandb_dir / sub
    return wandb_dir


def segments(wandb_dir: str | Path, run_id: Optional[str] = None, *, include_online: bool = False,
             ordered: bool = True) -> list[Path]:
    """All ``offline-run-*`` folders under ``wandb_dir``, oldest first, each counted once.

    ``wandb_dir`` is the ``wandb/`` folder (a folder containing ``wandb/`` is accepted too).
    Symlinks (``latest-run``) are skipped. Order: the start time recorded in each segment's run
    record, falling back to the timestamp in the folder name, then wandb's ``-N`` collision
    suffix. ``run_id`` keeps only segments of that run. ``include_online`` adds online ``run-*``
    folders (they hold the same kind of transaction log). ``ordered=False`` sorts by name only, reading no
    start time (so decoding no record).
    """
    wandb_dir = _resolve_wandb_dir(Path(wandb_dir))
    if not wandb_dir.is_dir():
        return []
    found = []
    for p in wandb_dir.iterdir():
        if p.is_symlink() or not p.is_dir():
            continue
        m = _SEGMENT_RE.match(p.name)
        if not m or (m.group("mode") == "run" and not include_online):
            continue
        if run_id is not None and segment_id(p) != run_id:
            continue
        found.append(p)
    return sorted(found, key=_sort_key if ordered else None)


def merged_history(wandb_dir: str | Path, run_id: str) -> list[dict]:
    """The history rows of every segment of ``run_id``, concatenated in segment order.

    Rows are not deduplicated: a segment that re-logs steps an earlier one already logged shows
    up twice (that is what ``wandb sync`` would upload, and what the tests check never happens).
    """
    rows: list[dict] = []
    for seg in segments(wandb_dir, run_id):
        rows.extend(read_run(seg)["history"])
    return rows

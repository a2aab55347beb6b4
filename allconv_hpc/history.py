"""``history.csv``: one row per epoch, written whole and atomically (each start rewrites it from its
checkpoint's rows, keeping a copy edited by hand beside), floats as ``repr`` so they read back bit-identical."""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Mapping, Union

from .fsio import write_atomic

__all__ = ["HISTORY_FIELDS", "HISTORY_FILE", "write_history", "rewrite_history", "row_line", "history_text", "edited",
           "read_history"]

log = logging.getLogger(__name__)

HISTORY_FILE = "history.csv"
HISTORY_FIELDS = ["epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                  "epoch_seconds", "images_per_second"]
_INT_FIELDS = {"epoch", "step"}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if hasattr(value, "item") and callable(value.item):  # a 0-d tensor / numpy scalar
        value = value.item()
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest string that round-trips exactly
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


def _csv_line(values: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def row_line(row: Mapping[str, Any]) -> str:
    return _csv_line([_cell(row.get(k)) for k in HISTORY_FIELDS])


def write_history(path: Union[str, Path], rows: list[Mapping[str, Any]]) -> None:
    """Atomically (temp + fsync + rename) replace ``path`` with a header and ``rows``.

    Columns are exactly `HISTORY_FIELDS`; other keys are ignored, missing ones left empty;
    floats are written with ``repr`` so they read back bit-identical."""
    write_atomic(Path(path), history_text(rows))


def rewrite_history(path: Path, rows: list[Mapping[str, Any]]) -> None:
    """A start's rewrite from the checkpoint's rows: the rows a killed process wrote after it go. A file that
    differs otherwise was changed by hand (a note, a column): kept beside as history.csv.editedN, and said."""
    new = history_text(rows)
    try:
        old = path.read_bytes().decode(errors="surrogateescape")  # another encoding: kept too
    except FileNotFoundError:
        old = None
    if old is not None and edited(old, new):
        n = 1
        while (path.parent / f"{HISTORY_FILE}.edited{n}").exists():
            n += 1
        kept = path.rename(path.parent / f"{HISTORY_FILE}.edited{n}")
        log.warning("%s differed from the checkpoint's record of the epochs it holds (edited by hand?): it is "
                    "rewritten from the checkpoint, and the old file is kept as %s", path, kept.name)
    if old != new:
        write_atomic(path, new)


def history_text(rows: list[Mapping[str, Any]]) -> str:
    return _csv_line(HISTORY_FIELDS) + "".join(row_line(r) for r in rows)


def edited(old: str, new: str) -> bool:
    """Whether a history.csv on disk was changed by other than this tool, against the checkpoint's rows ``new``.
    Not: rows the killed process wrote after its checkpoint (whole rows, or a torn last line), nor the last row
    missing (a kill between the checkpoint and its row's append)."""
    olds, news = old.splitlines(keepends=True), new.splitlines(keepends=True)
    if olds and not olds[-1].endswith("\n"):
        olds = olds[:-1]
    if any(a != b for a, b in zip(olds, news)):
        return True
    later = list(csv.reader(io.StringIO("".join(olds[len(news):]))))  # a note below the rows is not a row
    return any(len(row) != len(HISTORY_FIELDS) or not row[0].isdigit() for row in later)


def _parse_cell(key: str, text: str) -> Any:
    if text == "":
        return None
    if key in _INT_FIELDS:
        try:
            return int(text)
        except ValueError:
            pass
    try:
        return float(text)
    except ValueError:
        return text


def read_history(path: Union[str, Path]) -> list[dict]:
    """Rows of a ``history.csv``: epoch/step as int, other numbers as float, empty cells as None; cells past the
    header's columns (a note added by hand: DictReader's None key) are left out."""
    with open(path, newline="") as f:
        return [{k: _parse_cell(k, v if v is not None else "") for k, v in row.items() if k is not None}
                for row in csv.DictReader(f)]

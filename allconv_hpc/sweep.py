"""A sweep's points and folders: Hydra's sweep syntax (comma lists, range, choice, glob) expanded with Hydra's
own parser into one list of overrides per point, each point's run folder named from its swept values, and
the sweep's folder named from its definition (the same sweep, the same folder: a resubmission resumes it).
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .compose import CONFIG_MODULE, comma_fix, override_error, override_key as _key
from .config import ConfigError, resumable_change


@dataclass
class Point:
    """One run of a submission (a single run, or a sweep's point) as `plan` checked it."""
    overrides: list          # the user's overrides for this point (sweep values expanded)
    run_dir: Path
    skip: Optional[str] = None  # why it is not submitted again: "completed", or its queued job
    cfg: object = field(default=None, repr=False)  # its composed config: the run folder is checked again under the lock


def expand_sweep(overrides: list[str], multirun: bool) -> tuple[list[str], list[list[str]]]:
    """(common overrides, one list of swept overrides per point) using Hydra's own parser."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    common, axes = [], []
    GlobalHydra.instance().clear()
    try:  # glob(...) lists a config group's options through the config loader
        with initialize_config_module(CONFIG_MODULE, version_base=None):
            loader = GlobalHydra.instance().config_loader()
            try:
                parsed = OverridesParser.create(config_loader=loader).parse_overrides(overrides)
            except HydraException as e:
                raise ConfigError(override_error(overrides, e)) from None
            seen: dict[str, tuple[str, bool]] = {}  # key -> (its override, a sweep); Hydra keeps the last value
            for o in parsed:
                key, first = o.key_or_group, seen.get(o.key_or_group)
                if first and multirun and (first[1] or o.is_sweep_override()):  # points named after both, twice
                    raise ConfigError(f"{key} is given twice in a sweep ({first[0]} and {o.input_line}); give it "
                                      f"once, with every value in one list ({key}=a,b,c)")
                seen[key] = (o.input_line, o.is_sweep_override())
                if not o.is_sweep_override():
                    common.append(o.input_line)
                    continue
                if not multirun:
                    raise ConfigError(comma_fix(o.input_line))
                if o.is_interval_sweep():  # for optimizing sweepers (Optuna, Nevergrad): nothing to enumerate
                    raise ConfigError(f"{o.input_line!r}: interval(...) is for optimizing sweepers, which submit does "
                                      f"not run; give the values: a comma list, range(start,stop,step) or choice(...)")
                try:
                    values = _range_values(o) if o.is_range_sweep() else list(o.sweep_string_iterator())
                except HydraException:
                    values = []
                if not values:
                    raise ConfigError(f"{o.input_line!r} gives no values to submit: use a comma list, range(...), "
                                      f"choice(...) or glob(...) of a config group's options (e.g. "
                                      f"model=glob(allcnn_*))")
                axes.append([f"{o.get_key_element()}={v}" for v in values])
    finally:
        GlobalHydra.instance().clear()
    points = [list(p) for p in itertools.product(*axes)] if axes else [[]]
    return common, points


MAX_RANGE_POINTS = 100_000  # a range(0,1,1e-30) would build its list forever


def _range_values(o) -> list[str]:
    """range(start, stop[, step]) as Python's range, also for floats: Hydra steps floats in the binary
    values' Decimals, so range(0.1,0.4,0.1) gave 0.30000000000000004 and a fourth point, 0.4. Here the
    numbers as written are stepped exactly, the stop left out."""
    import decimal
    import math
    import random

    r = o.value()
    if "sort(" in o.input_line.split("=", 1)[1]:  # Hydra's sort() rewrites the bounds, wrongly when descending
        raise ConfigError(f"{o.input_line!r}: sort() of a range is not supported; write the range in the order "
                          f"wanted (a negative step counts down)")
    bounds = (r.start, r.stop, r.step)
    if any(isinstance(v, bool) or not math.isfinite(v) for v in bounds):
        raise ConfigError(f"{o.input_line!r}: a range's start, stop and step must be finite numbers")
    start, stop, step = (decimal.Decimal(repr(v)) for v in bounds)
    if step == 0:
        raise ConfigError(f"{o.input_line!r}: a range's step must not be 0")
    n = max(0, int(((stop - start) / step).to_integral_value(rounding=decimal.ROUND_CEILING)))
    if n > MAX_RANGE_POINTS:
        raise ConfigError(f"{o.input_line!r} gives {n} points (at most {MAX_RANGE_POINTS}); use a larger step")
    as_int = all(isinstance(v, int) for v in bounds)
    values = [str(int(v)) if as_int else repr(float(v)) for v in (start + i * step for i in range(n))]
    written = re.search(r"range\(([^)]*)\)", o.input_line)
    stepped = written is None or written.group(1).count(",") >= 2 or "step" in written.group(1)  # 3rd or step=
    if n == 1 and not as_int and not stepped:  # range(0.01,0.03): Hydra's step 1, one point
        raise ConfigError(f"{o.input_line!r} gives one value ({values[0]}): a range's step is 1 unless given; give "
                          f"it as the third number, range(start,stop,step)")
    if r.shuffle:
        random.shuffle(values)
    return values


NAME_MAX = 255  # bytes in one folder name on ext4, xfs, Lustre, GPFS, NFS: a longer name gets shortened


def fit_name(name: str) -> str:
    """name, or where it is longer than NAME_MAX its start and a hash of the whole: deterministic, so the same
    sweep always maps to the same folder (a resubmission resumes it), and distinct names stay distinct."""
    import hashlib
    raw = name.encode()
    if len(raw) <= NAME_MAX:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:16]
    return raw[:NAME_MAX - len(digest) - 1].decode(errors="ignore") + "-" + digest


def _unplussed(overrides: list[str]) -> list[str]:
    """`++optim.lr=0.1` as `optim.lr=0.1`: Hydra's + and ++ say how to apply a key, and name no other point or sweep
    (a sweep spelled with ++ had folders of its own, and the same sweep spelled plainly trained again)."""
    return [o.lstrip("+") for o in overrides]


def point_dirname(swept: list[str]) -> str:
    """Deterministic folder name from the swept overrides, e.g. 'model=allcnn_c,optim.lr=0.05'."""
    name = ",".join(sorted(_unplussed(swept))) or "run"
    return fit_name(re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name))


def point_folders(folder: Path) -> dict:
    """The point folders in a sweep's `folder`, by their names without a key's + or ++ (before 2026-12-07 a point's
    folder kept them: `++optim.lr=0.1`, the point `optim.lr=0.1` however spelled now); {} where it cannot be read."""
    try:
        return {spelling_free(d.name): d for d in sorted(folder.iterdir()) if d.is_dir()}
    except OSError:
        return {}


def spelling_free(name: str) -> str:
    return ",".join(sorted(part.lstrip("+") for part in name.split(",")))


def point_folder(folders: dict, name: str) -> Optional[Path]:
    """The folder of `folders` (point_folders) of the point named `name` (point_dirname), however spelled."""
    return folders.get(spelling_free(name))


def _launch_only(key: str) -> bool:
    """Keys that do not change what a run learns: the launch settings, and what a resume may change."""
    return resumable_change(key, also=("cluster", "hydra"))


def _sweep_name(swept: list[list[str]], definition: list) -> str:
    """sweeps/<swept keys>-<hash of the definition>."""
    import hashlib
    keys = sorted({o.split("=", 1)[0] for o in swept[0]})
    digest = hashlib.sha1(json.dumps(definition).encode()).hexdigest()[:8]
    return "sweeps/" + fit_name(f"{'+'.join(keys) or 'sweep'}-{digest}")


def _as_values(common: list[str]) -> list[str]:
    """The overrides as the values they give, not as spelled: `model.width=0.250` is `model.width=0.25`, and a
    key given twice is its last value (which Hydra keeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    given = {}
    for o in OverridesParser.create().parse_overrides(common):
        given[o.get_key_element()] = f"{o.get_key_element()}={json.dumps(o.value(), sort_keys=True, default=str)}"
    return list(given.values())


def default_sweep_dir(common: list[str], swept: list[list[str]]) -> str:
    """The sweep's folder: the same sweep maps to the same folder (so a resubmission resumes, also with
    launch-only keys changed, values reordered or spelled otherwise, keys with or without + and ++), a different
    sweep to another one."""
    plain = [_unplussed(p) for p in swept]
    defining = sorted(o for o in _as_values(_unplussed(common)) if not _launch_only(_key(o)))  # one key, spelled
    # with + or not, counts once
    return _sweep_name(plain, [defining, sorted(sorted(p) for p in plain)])


def earlier_sweep_dirs(common: list[str], swept: list[list[str]]) -> list[str]:
    """The names this sweep got from earlier versions, newest first: an existing folder of one is still
    resumed. Until 2026-12-07 a key's + and ++ counted; until 2026-12-04 the fixed overrides counted as spelled;
    before that, launch-only keys and the order of values counted too."""
    typed = sorted(o for o in _as_values(common) if not _launch_only(_key(o)))
    spelled = sorted(o for o in common if not _launch_only(_key(o)))
    legacy = sorted(o for o in common if not o.split("=", 1)[0].startswith(("cluster", "hydra", "wandb.mode")))
    return [_sweep_name(swept, [typed, sorted(sorted(p) for p in swept)]),
            _sweep_name(swept, [spelled, sorted(sorted(p) for p in swept)]), _sweep_name(swept, [legacy, swept])]

"""Hydra composition for the CLI: overrides -> (typed Config, plain dict, run folder).

We use Hydra's compose API rather than @hydra.main so that only global rank 0 writes the run
folder's `.hydra/` files and the same composition serves `train`, `submit` and the tests.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import CHOICE_KEYS, CLUSTER_KEYS, SECTIONS, Config, ConfigError, as_given, from_dict, shell_word
from .fsio import name_too_long, renamed_aside, write_atomic
from .preempt import sigint_deferred
from .runlock import LOCK_FILE, OWN_FILES, SUBMIT_LOCK, holds_run

CONFIG_MODULE = "allconv_hpc.conf"


@dataclass
class Composed:
    cfg: Config
    cfg_dict: dict          # the resolved task config (no hydra/cluster keys): W&B, checkpoints, .hydra
    cluster: dict           # the resolved cluster group (launch settings, read by `submit`)
    run_dir: Path
    overrides: list
    hydra: dict
    given_dirs: dict = dataclasses.field(default_factory=dict)  # hydra.run.dir / hydra.sweep.dir as given, unresolved


def _unread(cfg: Config) -> dict[str, tuple[str, str]]:
    """Each key the config never reads (ScheduleConfig.unused, ModelConfig.unused, OptimConfig.unused) with why, as said of one value
    and of a sweep over it."""
    name = cfg.schedule.name
    return {**{k: (f"schedule={name} does not read it", f"schedule={name} does not read") for k in cfg.schedule.unused()},
            **{k: ("model.dropout=false turns it off", "model.dropout=false turns off") for k in cfg.model.unused()},
            **{k: ("optim.scale_lr=false does not read it", "optim.scale_lr=false does not read") for k in cfg.optim.unused()}}


def unread_overrides(c: Composed) -> dict[str, str]:
    """The overrides of keys the composed config never reads (a schedule's unused keys; the dropout rates with
    model.dropout=false), each with the warning to give: legal, since a resume may change them, but they change
    nothing, which a user giving one does not expect."""
    idle = _unread(c.cfg)
    return {o: f"{o}: {idle[override_key(o)][0]}, so it changes nothing" for o in c.overrides if override_key(o) in idle}


def repeated_overrides(overrides: list[str]) -> list[str]:
    """A key given twice outside a sweep: Hydra keeps the last value without a word (a script's defaults and the
    user's own appended, or a typo's leftover), so the run is not what the first says."""
    given: dict[str, list[str]] = {}
    for o in overrides:
        if "=" in o and not o.startswith("~"):
            given.setdefault(override_key(o), []).append(o)
    return [f"{key} is given {'twice' if len(said) == 2 else f'{len(said)} times'} ({' then '.join(said)}): the "
            f"last, {said[-1]}, is the one used" for key, said in given.items()
            if len({o.partition("=")[2] for o in said}) > 1]  # the same value again says nothing new


def train_warnings(c: Composed, overrides: list[str], ranks: str) -> list[str]:
    """What `train` warns of in its config (and `train --print-config` shows): legal but likely a mistake, the
    overrides nothing reads, and cluster.* settings, which `train` never reads (`ranks`: how it runs instead)."""
    ignored = [o for o in overrides if o.lstrip("+~").startswith(("cluster.", "cluster="))]
    cluster = [f"{' '.join(ignored)}: cluster settings are read by allconv-hpc submit only; train runs as it was "
               f"launched ({ranks})"] if ignored else []
    sweep = [f"{o}: train reads no sweep folder (allconv-hpc submit -m does); it trains in hydra.run.dir={c.run_dir}"
             for o in overrides if override_key(o) == "hydra.sweep.dir"][-1:]
    from .wandb_mode import outranked_env
    return (repeated_overrides(overrides) + c.cfg.warnings() + list(unread_overrides(c).values()) + cluster + sweep
            + dated_dir_warning(c, "hydra.run.dir", c.run_dir) + outranked_env(c.cfg.wandb))


def unread_said(c: Composed, swept: list[str]) -> list[str]:
    """unread_overrides as a sweep's point says them: the ones it varies (in ``swept``) in one line per reason, alike
    at every point so that submit says it once, the others each as for a single run."""
    idle, varied = _unread(c.cfg), {}
    for o in c.overrides:
        if o in swept and override_key(o) in idle:
            varied.setdefault(idle[override_key(o)][1], set()).add(override_key(o))
    return [f"the sweep varies {', '.join(sorted(keys))}, which {why}: such points train alike"
            for why, keys in varied.items()] + [said for o, said in unread_overrides(c).items() if o not in swept]


def _group_keys(group: str):
    """The keys a config group takes (the cluster group's are config.CLUSTER_KEYS), or None where we keep no list."""
    if group in SECTIONS:
        return [f.name for f in dataclasses.fields(SECTIONS[group])]
    if group == "cluster":
        return list(CLUSTER_KEYS)
    return None


_CLUSTER_LISTS = {"setup"}
_CLUSTER_SCALARS = {"nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min", "signal_lead_s",
                    "array_parallelism", "requeue"}


def comma_fix(line: str) -> str:
    """What to say of `key=a,b` outside a sweep (Hydra reads it as one): a list key is bracketed, a string's value
    with commas quoted (quoting a list or a number would only be refused next as a string), a number takes one."""
    key, _, value = line.partition("=")
    bare = key.lstrip("+~")
    section, _, name = bare.partition(".")
    hint = None
    if section in SECTIONS:
        hint = typing.get_type_hints(SECTIONS[section]).get(name)
    elif section == "seed" and not name:
        hint = int
    kinds = set(typing.get_args(hint) or (hint,)) - {type(None)}
    sweep = f"{line!r} is a sweep (`allconv-hpc submit -m` submits one job per value)"
    if not name and section in (*SECTIONS, "cluster", "experiment"):  # a group: one option, no quoting helps
        return f"{sweep}; {section} takes one option"
    if re.match(r"\w+\(", value):  # choice(...), range(...), glob(...): quoting or brackets would make it a value
        return f"{sweep}; give {bare} one value"
    if kinds & {list} or typing.get_origin(hint) is list or (section == "cluster" and name in _CLUSTER_LISTS):
        return f"{sweep}; one list is given in brackets: '{key}=[{value}]'"
    if (kinds and kinds <= {int, float, bool} or (section == "cluster" and name in _CLUSTER_SCALARS)
            or bare in CHOICE_KEYS):
        return f"{sweep}; {key} takes one value"
    return f"{sweep}; one value holding commas is quoted: '{key}=\"{value}\"'"


def _listed_options(lines: list[str]) -> list[str]:
    """The options under Hydra's "Available options in 'group':" line (tab-indented, one a line)."""
    for i, line in enumerate(lines):
        if line.startswith("Available options in "):
            rest = lines[i + 1:]
            return [o.strip() for o in itertools.takewhile(lambda o: o.startswith(("\t", " ")), rest)]
    return []


def _top_level_hint(name: str, key: str = "") -> str:
    """What a top-level name that is no key or group may have meant; `key`: what followed it (name.key=...)."""
    import difflib
    groups = [*SECTIONS, "cluster", "experiment"]
    homes = lambda k: [f"{g}.{k}" for g in [*SECTIONS, "cluster"] if k in (_group_keys(g) or [])]  # noqa: E731
    if homes(name) and not key:
        return f"Keys live in groups: did you mean {' or '.join(homes(name))}?"
    close = difflib.get_close_matches(name, groups, n=1)
    if key and close and key.split(".")[0] not in (_group_keys(close[0]) or []):  # modle.lr: lr is optim's
        close = homes(key.split(".")[0])[:1]
    hint = f"Did you mean {close[0]}{f'.{key}' if key and '.' not in close[0] else ''}? " if close else ""
    return f"{hint}The top level takes the groups {', '.join(groups)} (group=option, group.key=value) and seed."


_PLAIN = r"[\w.,:/@+\-\[\]'\"${} ()]*"  # what an override's value holds unquoted (no ~, no non-ASCII...)


def override_error(overrides: list[str], e: Exception) -> str:
    """One line for a failed composition, naming the override Hydra could not parse where one is to
    blame; the folders of sweep points (``.../model=allcnn_c,seed=0``) need quotes, easy to miss."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    lines = str(e).strip().splitlines()
    msg = (lines or [type(e).__name__])[0]
    several = re.match(r"Multiple values for ([\w/]+)\.", msg)
    if several:  # +group=x where the group already has an option (a default or a recipe's): Hydra's fix is yaml's
        group = several.group(1)
        given = [o for o in overrides if override_key(o) == group and o.startswith("+")]
        if given:
            return (f"{given[-1]}: {group} already has an option (a default, or a recipe's); give "
                    f"{given[-1].lstrip('+')} without the +")
    there = re.match(r"Could not append to config\. An item is already at '(.*)'", msg)
    if there:  # +key=value: Hydra's + adds a key that is not there yet; every key of ours is
        given = [o for o in overrides if o.startswith("+") and not o.startswith("++") and override_key(o) == there.group(1)]
        if given:
            return f"{given[-1]}: {there.group(1)} is already in the config (+ adds a new key); give {given[-1][1:]}"
    ambiguous = re.match(r"Ambiguous value for argument '(.*)'", msg) or \
        re.match(r"Sweep parameters '(.*)' requires --multirun", msg)
    if ambiguous:  # key=a,b (or choice, range, glob) outside a sweep
        return comma_fix(ambiguous.group(1))
    if re.match(r"In '[\w/]+': Could not find '", msg):  # a misspelt group option: Hydra lists the others
        options = getattr(e, "options", None) or _listed_options(lines)
        if options:
            msg += f" (available: {', '.join(options)})"
    unknown = re.match(r"Could not override '(\w+)\.([\w.-]+)'", msg)
    if unknown:  # a misspelt key: say which ones there are
        group, key = unknown.groups()
        known = _group_keys(group)
        if known is not None and key.split(".")[0] in known:  # a new key inside a dict, e.g. additional_parameters
            if group == "cluster" and key.startswith("additional_parameters."):  # not an option Hydra's + would
                from .resources import check_additional_parameters  # only lead to the next refusal
                try:
                    given = [o.partition("=")[2] for o in overrides if override_key(o) == f"cluster.{key}"]
                    check_additional_parameters({key.split(".", 1)[1]: given[-1] if given else True})
                except ConfigError as refused:
                    return str(refused)
            msg += "".join(f" {line.strip()}" for line in lines[1:2] if line.startswith("To append"))
        elif known is not None:
            msg += f" {group} has no key {key!r}; its keys: {', '.join(sorted(known))}"
        elif group not in ("hydra", "experiment"):  # no such group: a misspelt one (modle.width, optimizer.lr)
            msg += f" There is no group {group!r}. {_top_level_hint(group, key)}"
    top = re.match(r"Could not override '([\w-]+)'\.?$", msg)
    if top:  # a key with no group: say where it lives, or what the top level takes
        msg += f" {_top_level_hint(top.group(1))}"
    full_key = getattr(e, "full_key", None)
    if isinstance(full_key, str) and full_key and "interpolation" in f"{type(e).__name__} {msg}".lower():
        return _interpolation_error(overrides, full_key, msg)
    parser = OverridesParser.create()
    for i, o in enumerate(overrides):
        try:
            parser.parse_overrides([o])
        except HydraException:
            after = overrides[i + 1] if i + 1 < len(overrides) else ""  # `a=1, 2`: the shell's two words
            value = o.split("=", 1)[1] if "=" in o else ""
            key, hint = o.split("=", 1)[0], ""
            if "=" in value and value.startswith("[") and value.endswith("]"):  # each item quoted; the shell's quotes
                items = ",".join(f"'{v.strip()}'" for v in value[1:-1].split(","))
                hint = f"; list items holding '=' need quotes each: \"{key}=[{items}]\""
            elif "'" in value and '"' not in value and not value.startswith("["):  # my sweep's dir: ' opens a string
                hint = f"; a value holding ' needs double quotes around it: \"{key}=\\\"{value}\\\"\""
            elif "=" in value:
                hint = f"; a value holding '=' needs quotes: \"{key}='{value}'\""
            elif re.search(r"\$\{[^}]*\$\{", value) and value[:1] not in "'\"":  # ${a:${b}}: Hydra's lexer
                hint = f"; an interpolation inside another needs quotes: '{key}=\"{value}\"'"
            elif key.startswith("-") or "=" not in o or key != key.strip():  # `optim.lr = 0.1`: three words
                hint = "; give key=value without spaces around '=' or leading dashes, e.g. optim.lr=0.1"
            elif key[:1] in "'\"" and key.strip("'\"") and not any(q in key.strip("'\"") for q in "'\""):
                hint = f"; a key takes no quotes: {key.strip(chr(39) + chr(34))}={value}"
            elif "[" in value and not value.startswith(("[", "'", '"')):  # a Slurm node range, n[1-3]: '[' opens a list
                hint = f"; quote a value holding '[': {key}='\"{value}\"' (Hydra then reads it as one string)"
            elif value and not re.fullmatch(_PLAIN, value, re.ASCII):  # ~, non-ASCII...
                flat = value.startswith("[") and value.endswith("]") and "[" not in value[1:-1]
                if flat:  # a quoted list is one string: quote its items
                    items = ", ".join(v.strip() if re.fullmatch(_PLAIN, v.strip(), re.ASCII) else f"'{v.strip()}'"
                                      for v in value[1:-1].split(","))
                    hint = f"; quote each list item with such characters: \"{key}=[{items}]\""
                elif value.startswith("["):  # nested: which commas part items is the parser's to say
                    hint = "; quote each list item with such characters (a quoted list is one string)"
                else:
                    hint = f"; quote a value with such characters: \"{key}='{value}'\""
            elif value.endswith(",") and after and "=" not in after:  # a space after the comma split the list
                hint = (f"; a space after a comma made two words of the list: give {key}={value}{after} (no spaces), "
                        f"or quote it whole")
            elif re.search(r"^,|,$|,,|\[,|,\]", value):  # an empty item (Hydra: "mismatched input...")
                bracketed = value.startswith("[") and value.endswith("]")
                items = ",".join(v for v in (value[1:-1] if bracketed else value).split(",") if v.strip())
                hint = f"; a comma with no item beside it: did you mean {key}={f'[{items}]' if bracketed else items}?"
            msg = re.sub(r" expecting \{[^}]*\}", "", msg)  # the parser's token names say nothing to a user
            msg = re.sub(r"^LexerNoViableAltException: .*", "Hydra cannot parse it", msg)  # it only repeats o
            return f"bad override {o!r}: {msg}{hint}"
    return f"bad overrides: {msg}"


def _interpolation_error(overrides: list[str], full_key: str, msg: str) -> str:
    """An ${...} that did not resolve, said of the override that gave it (OmegaConf names only the key), with
    what such a value takes."""
    env = re.search(r"Environment variable '([^']+)' not found", msg)
    if env:
        msg = f"environment variable {env.group(1)} is not set"
        hint = f"; set it, or give a default: ${{oc.env:{env.group(1)},DEFAULT}}"
    elif msg.startswith("Recursive interpolation"):
        hint = " (a key cannot name itself)"
    else:
        hint = " (${...} names another key of the config, e.g. ${model.name}, or a resolver: ${oc.env:VAR}, ${now:%H-%M})"
    given = [o for o in overrides if override_key(o) == full_key]
    return f"bad override {given[-1]!r}: {msg}{hint}" if given else f"bad value of {full_key}: {msg}{hint}"


def override_key(override: str) -> str:
    """'++a.b=1' -> 'a.b' (Hydra's +, ++ and ~ say how to apply a key, not which key)."""
    return override.split("=", 1)[0].lstrip("+~")


def _check_override_keys(overrides: list[str]) -> None:
    """`~key` deletes a key that the typed config then fills with its dataclass default, behind the printed
    config's back (and .hydra/config.yaml's): refused. So is a Hydra setting nothing reads (HYDRA_KEYS)."""
    for o in overrides:
        key, value = override_key(o), o.partition("=")[2].strip()
        if key.startswith("experiment.") or key == "experiment" and value.startswith("{"):  # dropped: no such section
            raise ConfigError(f"{o}: experiment is a group of recipes, picked with experiment=<recipe>; a recipe's key "
                              f"is set as itself, e.g. optim.lr=0.1")
        if key in (*SECTIONS, "cluster") and value.startswith("{"):  # merged past every check of a dotted key
            raise ConfigError(f"{o}: {key} is a config group; pick an option with {key}=<option> and set its keys one "
                              f"at a time, {key}.<key>=value")
        if o.startswith("~") and key.split(".")[0] in (*SECTIONS, "seed"):
            raise ConfigError(f"{o} deletes {key}, which every run has; set it instead ({key}=...)")
        if key in HYDRA_KEYS and (o.startswith("~") or o.partition("=")[2].strip().lower() in ("null", "~")):
            raise ConfigError(f"{o}: {key} is a folder; give one, e.g. {key}=runs/x, or leave it out for the default")
        if (key == "hydra" or key.startswith(("hydra.", "hydra/"))) and key not in HYDRA_KEYS:
            dotted = key.replace("/", ".")  # a group (hydra/launcher=x) or its keys (hydra.launcher.x=y)
            instead = next((why for k, why in _HYDRA_INSTEAD.items() if dotted == k or dotted.startswith(f"{k}.")),
                           "drop it: it would be ignored")
            if dotted in ("hydra.run", "hydra.sweep"):  # hydra.run={dir:x}: the folder, as a dict
                instead = f"give the folder as {dotted}.dir=..."
            elif dotted == "hydra":  # hydra={...}: all of them at once, as a dict
                instead = "give the folder as hydra.run.dir=... (a sweep's as hydra.sweep.dir=...)"
            raise ConfigError(f"{o}: of Hydra's own settings only {' and '.join(HYDRA_KEYS)} are read (configs are "
                              f"composed without @hydra.main); {instead}")


# the Hydra settings compose reads; Hydra's app settings (job.chdir, mode, output_subdir, logging) have no app here
HYDRA_KEYS = ("hydra.run.dir", "hydra.sweep.dir")
_HYDRA_INSTEAD = {
    "hydra.mode": "for a sweep use allconv-hpc submit -m key=a,b",
    "hydra.job.chdir": "train runs in the folder it is started in, and relative paths are taken from there",
    "hydra.output_subdir": "every run folder gets .hydra/, which a resume compares its config with",
    "hydra.sweep.subdir": "a sweep point's folder is named by its overrides",
    "hydra.launcher": "cluster settings are cluster=slurm and cluster.<key>, read by allconv-hpc submit",
}


def _check_group_lists(overrides: list[str]) -> None:
    """`model=[a,b]` is Hydra's way to merge several options of a group into one config, the last one's values
    over the others' under the last one's name: never one of our nets, datasets or schedules, and never what a
    user who meant a sweep (`-m model=a,b`) wanted. Refused (recipes, `experiment=[...]`, may stack)."""
    for o in overrides:
        key, value = override_key(o), o.partition("=")[2]
        if key in (*SECTIONS, "cluster") and value.startswith("[") and value.endswith("]"):
            items = [v.strip() for v in value[1:-1].split(",") if v.strip()]
            if not items:
                raise ConfigError(f"{o} picks no {key} option; give one, e.g. {key}=<option> (allconv-hpc train --help lists them)")
            if len(items) > 1:
                raise ConfigError(f"{o} picks {len(items)} {key} options at once, which Hydra merges into one "
                                  f"config ({items[-1]}'s values over the others'); give one, {key}={items[-1]}, "
                                  f"or sweep them: allconv-hpc submit -m {key}={','.join(items)}")


def check_train_args(overrides: list[str]) -> None:
    """`train` (and its --print-config) takes one config's overrides: no sweep, no Hydra options."""
    if {"-m", "--multirun"} & set(overrides):
        raise ConfigError("train runs one config; a sweep is `allconv-hpc submit -m ...` (with cluster=local "
                          "it runs on this machine)")
    options = [o for o in overrides if o.startswith("-")]
    if options:  # e.g. Hydra's --cfg job, which this entry point does not take
        raise ConfigError(f"train takes Hydra overrides (key=value), not {' '.join(options)}; "
                          f"--print-config prints the composed config, --help lists the config groups")


# Hydra's config composed from the overrides that pick config files, by those overrides: a sweep's points share
# them, and composing each point from the YAML files again took ~0.15 s a point (300 points: a minute of planning)
_BASES: dict[tuple, object] = {}


def _hydra_config(overrides: list[str], hydra_compose):
    """What Hydra's compose returns for the overrides (inside initialize_config_module), built as Hydra builds it:
    the config of the overrides that pick files (groups), then the others applied to it by Hydra's own code, in
    their order. The first part is kept for the next call. Values are interpolated later (to_container), so a copy
    reads the environment and the clock of its own call. Any failure composes the whole again, so that the error is
    Hydra's own. tests/test_config.py checks that this equals Hydra's compose."""
    import copy
    from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import open_dict
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=overrides)
        # Hydra's settings other than the folders (searchpath, job.env_copy, hydra={...}) are read, or rewritten, as
        # it composes, and a sweep it refuses: composed whole
        if any(o.is_sweep_override() or o.key_or_group == "hydra"
               or o.key_or_group.startswith("hydra.") and o.key_or_group not in HYDRA_KEYS for o in parsed):
            return hydra_compose("config", overrides=overrides, return_hydra_config=True)
        repo = GlobalHydra.instance().hydra.config_loader.repository
        # Hydra's own split (defaults_list.Overrides): a value is any override of a key that is no group, or a dict
        values = [o for o in parsed if isinstance(o.value(), dict) or not repo.group_exists(o.key_or_group)]
        files = tuple(o.input_line for o in parsed if o not in values)
        if files not in _BASES:
            if len(_BASES) >= 64:  # a sweep over groups: each point has its own
                _BASES.clear()
            _BASES[files] = hydra_compose("config", overrides=list(files), return_hydra_config=True)
        raw = copy.deepcopy(_BASES[files])
        ConfigLoaderImpl._apply_overrides_to_config(values, raw)
        with open_dict(raw.hydra):  # as Hydra records them: every override, in the order given
            raw.hydra.overrides.task = [o.input_line for o in parsed if not o.is_hydra_override()]
            raw.hydra.overrides.hydra = [o.input_line for o in parsed if o.is_hydra_override()]
            raw.hydra.runtime.cwd = os.getcwd()
            named = raw.hydra.job.config.override_dirname
            raw.hydra.job.override_dirname = get_overrides_dirname(
                overrides=[o for o in parsed if not o.is_hydra_override()], kv_sep=named.kv_sep,
                item_sep=named.item_sep, exclude_keys=named.exclude_keys)
        return raw
    except Exception:  # noqa: BLE001 - Hydra's compose of the whole raises the error to show, or succeeds
        return hydra_compose("config", overrides=overrides, return_hydra_config=True)


def compose(overrides: list[str]) -> Composed:
    """Compose, resolve and validate; raises ConfigError with a one-line message."""
    _check_override_keys(overrides)
    _check_group_lists(overrides)
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        # a Ctrl-C is taken at the compose's end: OmegaConf dropped a KeyboardInterrupt raised in it (seen: 1 in 150
        # Ctrl-Cs at random moments of 5 composes), and a submit went on to queue the jobs
        with sigint_deferred(), initialize_config_module(CONFIG_MODULE, version_base=None):
            raw = _hydra_config(list(overrides), hydra_compose)
        HydraConfig.instance().set_config(raw)
        run_dir = str(OmegaConf.select(raw, "hydra.run.dir"))
        sweep_dir = str(OmegaConf.select(raw, "hydra.sweep.dir"))
        hydra = OmegaConf.to_container(raw.hydra, resolve=False)  # runtime fields exist only under @hydra.main
        with open_dict(raw):
            del raw["hydra"]
        plain = OmegaConf.to_container(raw, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(override_error(overrides, e)) from None
    except ValueError as e:  # OmegaConf applying key.x=... to a list node: int('x')
        nulled = [o for o in overrides if "=" in o and override_key(o) in (*SECTIONS, "cluster", "experiment")
                  and o.partition("=")[2].strip().lower() in ("null", "~", "none", "")]
        if nulled and "Config group override" in str(e):  # Hydra: "...must be a string or a list. Got NoneType"
            group = override_key(nulled[0])
            if group == "experiment":  # the default, but Hydra takes no null for a group given on the command line
                raise ConfigError(f"{nulled[0]}: no recipe is the default; leave experiment out") from None
            raise ConfigError(f"{nulled[0]}: a config group takes one of its options, not null; give one, e.g. "
                              f"{group}=<option> (allconv-hpc train --help lists them)") from None
        hint = (" (a list such as schedule.milestones takes an index, key.0=value, or a whole list, key=[200,250])"
                if "invalid literal for int()" in str(e) else "")
        given = " ".join(o for o in overrides if not o.startswith("hydra."))
        raise ConfigError(f"could not apply the overrides {given}: {e}{hint}") from None
    finally:
        GlobalHydra.instance().clear()
    for key, value in (("hydra.run.dir", run_dir), ("hydra.sweep.dir", sweep_dir)):
        if not value.strip():  # e.g. hydra.run.dir=$RUN with RUN unset: would train into the current folder
            raise ConfigError(f"{key} is empty (an unset shell variable?); give a folder, e.g. {key}=runs/x")
    given = {"hydra.run.dir": hydra["run"]["dir"], "hydra.sweep.dir": hydra["sweep"]["dir"]}
    hydra["run"]["dir"], hydra["sweep"]["dir"] = run_dir, sweep_dir
    cluster = plain.pop("cluster", {}) or {}
    cfg = from_dict(plain)  # each value's own check first: a name that is no option is named with the choices
    idle = set(_unread(cfg))  # keys the chosen option never reads differ harmlessly
    for group in _NAMED_GROUPS:
        _check_group_name(overrides, group, plain[group], idle)
    return Composed(cfg=cfg, cfg_dict=plain, cluster=cluster, run_dir=Path(run_dir).expanduser().absolute(),
                    overrides=list(overrides), hydra=hydra, given_dirs=given)


def dated_dir_warning(c: Composed, key: str, resolved: Path) -> list[str]:
    """A folder named by the clock (Hydra's ${now:...}) is another one at each start: the same command run again,
    or requeued by a plain sbatch script, starts over instead of resuming. Legal (a new run each time may be
    wanted), so a warning that names the folder to give instead."""
    given = str(c.given_dirs.get(key, ""))
    if "${now:" not in given:
        return []
    return [f"{key}={given} names a new folder at each start ({resolved} this time): the same command run again "
            f"starts over instead of resuming; give {shlex.quote(f'{key}={resolved}')} to resume this one"]


# groups whose options set a `name` and other values together, and what the name picks
_NAMED_GROUPS = {"model": ("architecture", "net"), "schedule": ("schedule", "schedule"),
                 "data": ("dataset", "dataset")}
_NAME_KEYS = {f"{g}.name" for g in _NAMED_GROUPS}


class NameSwap(ConfigError):
    """`group.name=X` refused (see _check_group_name); `group` says which, for a sweep's own advice."""
    def __init__(self, message: str, group: str):
        super().__init__(message)
        self.group = group


def _check_group_name(overrides: list[str], group: str, values: dict, idle: set[str]) -> None:
    """`model.name=X` (or schedule.name, data.name) swaps what the name picks but keeps the group's other settings:
    where the option X sets them otherwise (allcnn_seed has no input dropout, inverse_time a decay, synthetic data
    2,048 images and no augmentation), the run would be neither under X's name."""
    key = f"{group}.name"
    names = [o.split("=", 1)[1] for o in overrides if override_key(o) == key and "=" in o]
    if not names:
        return
    given = {override_key(o).removeprefix(f"{group}.") for o in overrides if override_key(o).startswith(f"{group}.")}
    # without this group's overrides, and without every group's name (none left to check: no nested checks, which
    # would each refuse the other's swap and be taken for "no such option")
    others = [o for o in overrides if override_key(o) != group and not override_key(o).startswith(f"{group}.")
              and override_key(o) not in _NAME_KEYS]
    try:
        own = compose(others + [f"{group}={names[-1]}"]).cfg_dict[group]
    except ConfigError:
        return  # no such group option, or another error the composition names itself
    differ = [k for k, v in sorted(own.items())
              if k not in given and values.get(k) != v and f"{group}.{k}" not in idle]
    if differ:
        what, noun = _NAMED_GROUPS[group]
        said = "; ".join(f"{k}: {as_given(values.get(k))}, {group}={names[-1]} has {as_given(own[k])}" for k in differ)
        keep = " ".join(f"{group}.{k}={shell_word(values.get(k))}" for k in differ)
        raise NameSwap(f"{key}={names[-1]} swaps the {what} but keeps the {group} group's other settings "
                       f"({said}); use {group}={names[-1]} for the {noun} as defined, or {group}={names[-1]} "
                       f"{keep} for these values (what a run started so resumes with)", group)


def pin_data_root(composed: Composed) -> Optional[tuple[bool, str]]:
    """data.root made absolute in place, as seen from here: the run's records (checkpoints, .hydra) then name
    the data wherever `evaluate` or a resume starts from (`submit` pins it through an override instead).

    The default root (./data) is relative to where the command starts, so in a run folder that recorded a root,
    that root is kept unless the command line or ALLCONV_DATA names one: a rerun from another folder would
    otherwise miss the data, or silently read another dataset. Returns (a warning?, the line to log) or None."""
    # one spelling per folder (a/x/../cifar is a/cifar), links kept as given; a link to the recorded folder is
    # that folder, not another
    root = os.path.normpath(Path(composed.cfg.data.root).expanduser().absolute())
    recorded = recorded_data_root(composed.run_dir) if composed.cfg.data.name != "synthetic" else None
    recorded = os.path.normpath(recorded) if recorded is not None else None
    said = None
    if recorded is not None and recorded != root and not _same_folder(recorded, root):
        typed = any(override_key(o) == "data.root" for o in composed.overrides)
        env = os.environ.get("ALLCONV_DATA")
        if typed or env:
            given = f"data.root={root}" if typed else f"ALLCONV_DATA={env}"  # the environment's, not typed
            if composed.cfg.checkpoint.resume != "never":  # a run started over may read other data
                said = True, (f"{given} is not the {recorded} this run read before: reading {root} "
                              f"(a resume may move its data: it checks the images are the ones it trained on)")
        else:
            said = False, (f"data.root {recorded}: this run's, recorded in {composed.run_dir / '.hydra'}/config.yaml "
                           f"(the default resolves to {root} here); data.root=DIR reads another folder")
            root = recorded
    composed.cfg.data.root = composed.cfg_dict["data"]["root"] = root
    return said


def with_recorded_root(e: Exception, composed: Composed, present: typing.Callable) -> str:
    """A data error's text, naming the root this run read before where another was given (a relative data.root
    typed in another folder, ALLCONV_DATA set since) and `present` (data.check_present) finds the data there."""
    recorded = recorded_data_root(composed.run_dir) if composed.cfg.data.name != "synthetic" else None
    root = composed.cfg.data.root
    if recorded is None or os.path.normpath(recorded) == root or _same_folder(recorded, root):
        return str(e)
    try:
        present(dataclasses.replace(composed.cfg.data, root=recorded))
    except ConfigError:  # not there either: nothing to point at
        return str(e)
    if any(override_key(o) == "data.root" for o in composed.overrides):
        how = (f"data.root={shell_word(recorded)} reads them there (a relative data.root is read from the current "
               f"folder, here {os.getcwd()})")
    else:  # the default gave way to ALLCONV_DATA (pin_data_root)
        how = (f"unset ALLCONV_DATA (it names {os.environ.get('ALLCONV_DATA', '')}), or give "
               f"data.root={shell_word(recorded)}, to read them there")
    return f"{str(e).rstrip('.')}; this run read its images from {recorded} before: {how}"


def _same_folder(a: str, b: str) -> bool:
    """One folder by two paths (a link to it): not another root. False where either is not there."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def recorded(run_dir: Path, group: str, key: str):
    """`group.key` of the config a run in run_dir last started with (its .hydra/config.yaml), or None: no run
    there, or not a config of ours."""
    import yaml
    try:
        cfg = yaml.safe_load((Path(run_dir) / ".hydra" / "config.yaml").read_text()) or {}
        return (cfg.get(group) or {}).get(key)
    except (OSError, ValueError, yaml.YAMLError, AttributeError):  # ValueError: not UTF-8 (a damaged file)
        return None


def check_growth(run_dir: Path, epochs: int, overrides: list[str], folder_key: str = "hydra.run.dir") -> None:
    """A run in run_dir (one with a checkpoint) grows only where trainer.epochs is given: a command that left it out
    took the config's (the default's 350, an experiment's) and grew a 3-epoch run to 350 unsaid, its last
    checkpoints rotated away as it trained on (found by a laptop journey audit)."""
    before = recorded(run_dir, "trainer", "epochs")
    if not isinstance(before, int) or epochs <= before or "trainer.epochs" in map(override_key, overrides):
        return
    raise ConfigError(f"run folder {run_dir} holds a run of trainer.epochs={before}, and this command gives no "
                      f"trainer.epochs: it would grow that run to the config's {epochs} epochs (its checkpoints "
                      f"rotating on); add trainer.epochs={before} to resume it as it was, or trainer.epochs={epochs} "
                      f"to grow it (or another {folder_key})")


def recorded_data_root(run_dir: Path) -> Optional[str]:
    """The absolute data.root a run in run_dir last started with, or None."""
    root = recorded(run_dir, "data", "root")
    return root if isinstance(root, str) and Path(root).is_absolute() else None


# what train and submit put into a run folder: one holding any of them is a run's (or is becoming one)
RUN_FILES = OWN_FILES | {".hydra", "train.log", "history.csv", ".submitit", "wandb"}


# what a desktop or notebook leaves in any folder it opens (Finder, Explorer, Jupyter): no one's files
CLUTTER = {".DS_Store", ".localized", "Thumbs.db", "desktop.ini", ".directory", ".ipynb_checkpoints"}


def is_clutter(name: str) -> bool:
    """One of CLUTTER, or macOS's AppleDouble twin of any file (`._name`) on a volume not its own."""
    return name in CLUTTER or name.startswith("._")


def _run_file(name: str) -> bool:
    """A name train/submit writes, a temp file of one, or a job's log (sbatch --output into a folder made for
    the run, slurm-%j.out): such a folder is a run's or is meant to become one. A desktop's clutter passes too."""
    return (name in RUN_FILES or is_clutter(name) or name.startswith("checkpoints.old")
            or name.endswith((".out", ".err", ".log"))
            or (name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES)))


def check_run_dir(run_dir: Path, key: str = "hydra.run.dir") -> None:
    """The run folder (and its checkpoints/) can be made and written: refused before any work or queue,
    not at the first checkpoint. Nothing is created; each rank can ask (a shared file system answers alike).
    `key`: what sets the folder (a sweep point's: hydra.sweep.dir), named in the fix."""
    said = name_too_long(run_dir)
    if said:
        raise ConfigError(f"run folder: {said}; give a shorter {key}")
    for path in (run_dir, run_dir / "checkpoints", run_dir / ".hydra"):
        existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
        if existing.is_symlink() and not existing.exists():  # mkdir would fail "File exists"
            if existing == run_dir / "checkpoints" and renamed_aside(existing):
                continue  # a set-aside stopped after renaming its target: the start makes it again (move_aside)
            raise ConfigError(f"run folder {run_dir}: {existing} is a link to {os.readlink(existing)}, which does not "
                              f"exist (or loops); make that folder, or give another {key}")
        if not existing.is_dir():
            raise ConfigError(f"run folder {run_dir}: {existing} is a file, not a folder; give another {key}")
        if not os.access(existing, os.W_OK | os.X_OK):  # EROFS too, also for root
            raise ConfigError(f"run folder {run_dir}: {existing} is not writable here; give a writable {key}")
        if existing != path:
            break  # the rest does not exist yet: made inside this writable folder
    for name in (*_WRITTEN_IN_PLACE, *_REPLACED, LOCK_FILE, SUBMIT_LOCK):
        path = run_dir / name  # a folder where the run writes a file: found at that write (checkpoints/last.pt:
        # after an epoch's work); a dangling link too where the run reads first, not where a rename replaces it
        if path.is_dir() or name in _READ_FIRST and os.path.lexists(path) and not path.is_file():
            raise ConfigError(f"run folder {run_dir}: {path} is {'a folder' if path.is_dir() else 'no file'}, where "
                              f"the run writes its file; move it away, or give another {key}")
        # one the run cannot rewrite was found at its first write, after an epoch's work
        if path.is_file() and not _rewritable(path, in_place=name in _WRITTEN_IN_PLACE):
            raise ConfigError(f"run folder {run_dir}: {path} cannot be rewritten here (its owner, mode or an "
                              f"immutable flag), and the run rewrites it; make it writable, or give another {key}")
    if (run_dir / "sweep.json").is_file():  # status and evaluate would read it as the sweep, hiding this run
        raise ConfigError(f"run folder {run_dir} is a sweep's folder (sweep.json): give one of its point folders "
                          f"to resume that point, or a new hydra.run.dir")
    if re.fullmatch(r"checkpoints\.old\d+", run_dir.name) and run_dir.is_dir():  # its files are not laid out as a run's
        raise ConfigError(f"run folder {run_dir} is a run that checkpoint.resume=never set aside, not a run folder "
                          f"(training here would start over and nest it once more): copy it into a new run folder "
                          f"as README's \"Starting over\" shows, and give that as {key}")
    above = _run_above(run_dir) if not holds_run(run_dir) else None  # (one made before this check resumes)
    if above is not None:  # its own files (checkpoints.oldN, wandb/, .submitit/) would be mixed with this run's
        raise ConfigError(f"run folder {run_dir} is inside the run folder {above}, whose `status`, `evaluate` and "
                          f"resume would read it as that run's files; give a {key} outside it")
    if run_dir.is_dir():  # a folder of other things (a dataset, a project's root) is not one to train into
        other = sorted(p.name for p in run_dir.iterdir() if not _run_file(p.name))  # nohup.out alone is no run
        if other and not holds_run(run_dir):  # notes added to a run: fine
            more = f", ... ({len(other)} in all)" if len(other) > 5 else ""
            raise ConfigError(f"run folder {run_dir} holds other files ({', '.join(other[:5])}{more}) and no run: "
                              f"training would mix its files with them; give a new or empty hydra.run.dir")


# a run folder's files: appended or saved in place (write access to the file itself needed) and replaced by a
# rename (fsio.write_atomic: the folder's write access is enough, unless the file is immutable or another user's
# in a sticky folder), so that a weights file made read-only (chmod a-w) still lets its run grow
_WRITTEN_IN_PLACE = ("train.log", "wandb_steps.jsonl", "history.csv")
_REPLACED = ("status.json", "submission.json", "wandb_id.txt", "checkpoints/last.pt", "checkpoints/best.pt",
             ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml")
# the records `status` and a resume read first
_READ_FIRST = ("status.json", "history.csv", "train.log", "submission.json", "wandb_id.txt", "wandb_steps.jsonl")
_FS_IOC_GETFLAGS, _IMMUTABLE_OR_APPEND = 0x80086601, 0x10 | 0x20  # linux/fs.h: FS_IMMUTABLE_FL, FS_APPEND_FL


def _rewritable(path: Path, in_place: bool) -> bool:
    if in_place:
        return os.access(path, os.W_OK)  # root too is refused an immutable file
    st, folder = path.stat(), path.parent.stat()
    if folder.st_mode & 0o1000 and os.geteuid() not in (0, st.st_uid, folder.st_uid):
        return False  # a sticky folder (/tmp-like): another user's file is not ours to replace
    try:
        import array
        import fcntl
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (ImportError, OSError):
        return True  # unreadable, or not Linux: left to the write
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        return not flags[0] & _IMMUTABLE_OR_APPEND
    except OSError:  # a file system without these flags (NFS, Lustre): none to refuse
        return True
    finally:
        os.close(fd)


def _run_above(run_dir: Path) -> Optional[Path]:
    """The nearest folder above run_dir that holds a run: its record (status.json or submission.json) with its
    train.log or checkpoints/ (a sweep's folder holds sweep.json instead; a project's checkpoints/ alone is no run)."""
    for p in Path(os.path.abspath(run_dir)).parents:
        if (((p / "status.json").is_file() or (p / "submission.json").is_file())
                and ((p / "train.log").is_file() or (p / "checkpoints").is_dir())):
            return p
    return None


SWEEP_FILES = {"sweep.json", SUBMIT_LOCK, ".submitit"}  # what submit -m writes into a sweep's folder itself


def check_sweep_dir(sweep_dir: Path) -> None:
    """A sweep's folder is new, empty or a sweep's (sweep.json; or, that lost, point folders only). A run folder
    is refused (its status, evaluate and resume would read the points as its own, or miss them), and so is a
    folder of other things (a dataset): as check_run_dir does for a run. Nothing is created."""
    if not sweep_dir.is_dir() or (sweep_dir / "sweep.json").is_file():
        return
    names = sorted(os.listdir(sweep_dir))
    run = [n for n in names if n not in SWEEP_FILES and (n in RUN_FILES or n.startswith("checkpoints.old"))]
    if run:
        raise ConfigError(f"hydra.sweep.dir {sweep_dir} is a run folder ({', '.join(run[:3])}): the sweep's points "
                          f"would be mixed into that run; give a new or empty hydra.sweep.dir")
    other = [n for n in names if n not in SWEEP_FILES and not is_clutter(n)
             and not ((sweep_dir / n).is_dir() and (holds_run(sweep_dir / n) or not os.listdir(sweep_dir / n)))]
    if other:
        more = f", ... ({len(other)} in all)" if len(other) > 5 else ""
        raise ConfigError(f"hydra.sweep.dir {sweep_dir} holds other files ({', '.join(other[:5])}{more}) and no "
                          f"sweep: the points would be mixed with them; give a new or empty hydra.sweep.dir")


def write_hydra_files(c: Composed) -> None:
    """`.hydra/{config,overrides,hydra}.yaml` in the run folder, as @hydra.main would write them. Each is
    replaced whole: one cut short (a full disk) left an empty config.yaml, read as the defaults' config by the next
    start, which refused the run as "a run of a different config". config.yaml, the record that start-up is
    through, goes last."""
    from omegaconf import OmegaConf
    d = c.run_dir / ".hydra"
    d.mkdir(parents=True, exist_ok=True)
    write_atomic(d / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(c.overrides)))
    write_atomic(d / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": c.hydra, "cluster": c.cluster})))
    write_atomic(d / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(c.cfg_dict)))

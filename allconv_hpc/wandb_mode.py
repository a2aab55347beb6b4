"""Which W&B mode a run gets (online, offline, disabled), and whether W&B would refuse its names: decided
before any work, on the login node as in the job, the way wandb 0.31 decides, without ``import wandb`` (but
`check_names`, which asks wandb's own validator) and without the network. The key itself is never read out."""
from __future__ import annotations

import configparser
import netrc
import os
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import urlsplit

from .config import WANDB_MODES, ConfigError, WandbConfig

__all__ = ["api_key_configured", "preflight_mode", "check_names", "check_environment", "outranked_env",
           "proxy_route", "resolve_mode", "server_url"]

# as wandb 0.31's wandb.sdk.lib.urls: its default server, and the W&B host behind each CoreWeave Forge host
# (a netrc entry for that one counts too: `wandb login` of older versions wrote it)
_DEFAULT_BASE_URL = "https://api.forge.coreweave.com"
_FORGE_HOSTS = {"forge.coreweave.com": "api.wandb.ai", "qa.forge.coreweave.com": "api.qa.wandb.ai"}
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # older spellings wandb still accepts


def _wandb_settings_file(environ: Mapping[str, str]) -> configparser.ConfigParser | None:
    cfg_dir = environ.get("WANDB_CONFIG_DIR") or os.path.join(_home(environ), ".config", "wandb")
    parser = configparser.ConfigParser()
    try:
        parser.read(os.path.join(cfg_dir, "settings"))
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None
    return parser


def _settings_section(environ: Mapping[str, str]) -> Mapping[str, str]:
    """The [default] section of wandb's settings file ({} where there is none, or it cannot be read)."""
    settings = _wandb_settings_file(environ)
    return settings["default"] if settings is not None and settings.has_section("default") else {}


def _home(environ: Mapping[str, str]) -> str:
    return environ.get("HOME") or os.path.expanduser("~")


def _netrc_path(environ: Mapping[str, str]) -> Path:
    # as wandb.sdk.lib.wbauth.wbnetrc._get_netrc_file_path: $NETRC, else ~/.netrc, else ~/_netrc
    if environ.get("NETRC"):
        return Path(environ["NETRC"]).expanduser()
    unix = Path(_home(environ), ".netrc")
    win = Path(_home(environ), "_netrc")
    return win if (not unix.exists() and win.exists()) else unix


def api_key_configured(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether wandb would find credentials, checked the way wandb 0.31 looks (no network, no
    ``import wandb``): ``WANDB_API_KEY`` or ``WANDB_IDENTITY_TOKEN_FILE`` in the environment, a
    netrc entry (``$NETRC`` or ``~/.netrc``) with a password for the host of ``WANDB_BASE_URL``
    (default api.forge.coreweave.com, whose entry may also be api.wandb.ai's), or ``api_key`` in
    wandb's settings file (``$WANDB_CONFIG_DIR/settings`` or ``~/.config/wandb/settings``). The key is
    never kept."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    section = _settings_section(environ)
    url = urlsplit(server_url(environ, section))
    hosts = [url.netloc] + [api for forge, api in _FORGE_HOSTS.items()  # wbnetrc.read_netrc_auth_with_source
                            if url.hostname in (forge, f"api.{forge}", api) and api != url.netloc]
    try:
        found = netrc.netrc(str(_netrc_path(environ)))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        found = None
    for host in hosts if found is not None and url.netloc else []:
        creds = found.authenticators(host)
        if creds:  # the first entry decides, as in wandb: one with no password is no key
            return bool(creds[2])
    return bool(section.get("api_key"))


def server_url(environ: Optional[Mapping[str, str]] = None, section: Optional[Mapping[str, str]] = None) -> str:
    """The W&B server wandb would talk to: ``WANDB_BASE_URL``, else the settings file's ``base_url``, else its
    default; a Forge proxy's URL as its API host. `section`: the settings file's [default], where already read."""
    environ = os.environ if environ is None else environ
    if section is None:
        section = _settings_section(environ)
    base_url = environ.get("WANDB_BASE_URL") or section.get("base_url") or _DEFAULT_BASE_URL
    url = urlsplit(base_url)
    if url.hostname in _FORGE_HOSTS and url.scheme == "https" and url.port is None \
            and url.path.rstrip("/") == "/api/wandb":  # urls.normalize_forge_base_url: the proxy's API host
        return f"https://api.{url.hostname}"
    return base_url



def proxy_route(url: str, environ: Optional[Mapping[str, str]] = None) -> tuple[bool, Optional[str]]:
    """How wandb reaches the server at `url`, where that can be told here: (True, None) straight, (True, proxy)
    through that one http:// proxy, (False, None) where it cannot (proxy settings of several values, or of another
    kind; all_proxy alone; wandb's own proxy settings beside a NO_PROXY naming the host). The proxies: a proxy variable of either
    case, wandb's own (WANDB_HTTP(S)_PROXY), http(s)_proxy in wandb's settings file. A cluster's usual set-up, one
    proxy for all, can be told; NO_PROXY (or a loopback host) takes the variables' proxy away."""
    from urllib.request import proxy_bypass_environment
    environ = os.environ if environ is None else environ
    section = _settings_section(environ)
    own = [v.strip() for v in (section.get("http_proxy"), section.get("https_proxy"), environ.get("WANDB_HTTP_PROXY"),
                               environ.get("WANDB_HTTPS_PROXY")) if v and v.strip()]
    by_scheme = {v.strip() for n in ("http_proxy", "https_proxy") for v in (environ.get(n), environ.get(n.upper()))
                 if v and v.strip()}
    found = {*own, *by_scheme, *(v.strip() for v in (environ.get("all_proxy"), environ.get("ALL_PROXY"))
                                 if v and v.strip())}
    if not found:
        return True, None
    if not own and not by_scheme:  # all_proxy alone: wandb-core's client (Go's) goes straight, its Python side not
        return False, None
    host = urlsplit(url).hostname or ""
    no_proxy = (environ.get("no_proxy") or environ.get("NO_PROXY") or "").strip()
    loopback = host == "localhost" or host.startswith("127.") or host == "::1"
    if loopback or no_proxy and proxy_bypass_environment(host, {"no": no_proxy}):
        return (False, None) if own else (True, None)  # (whether wandb's own settings heed NO_PROXY is not known)
    proxy = found.pop() if len(found) == 1 else ""
    proxy = proxy if "://" in proxy or not proxy else f"http://{proxy}"
    return (True, proxy) if urlsplit(proxy).scheme == "http" else (False, None)


def preflight_mode(cfg_mode: Optional[str], environ: Optional[Mapping[str, str]] = None) -> str:
    """`resolve_mode`, and a ConfigError for online asked for with no API key anywhere: said before any work,
    rather than found at wandb.init and logged offline instead (left for a key that cannot reach the server)."""
    environ = os.environ if environ is None else environ
    mode = resolve_mode(cfg_mode, environ)
    legacy = (environ.get("WANDB_DISABLED") or "").strip().lower()
    # older wandb's switch (Hugging Face's Trainer reads it still, so it may be exported for all): a mode given in
    # the config says what is meant; one found otherwise would log where the user asked for nothing
    if legacy in ("true", "1", "yes") and cfg_mode is None and mode != "disabled":
        from importlib.metadata import version
        raise ConfigError(f"WANDB_DISABLED={environ['WANDB_DISABLED']} is not read by wandb {version('wandb')} (nor here) "
                          f"and this run would log {mode}: set wandb.mode=disabled (or WANDB_MODE=disabled) to turn "
                          f"W&B off, or unset WANDB_DISABLED")
    if mode == "online" and not api_key_configured(environ):
        asked = f"wandb.mode={cfg_mode}" if cfg_mode else f"WANDB_MODE={environ.get('WANDB_MODE')}"
        raise ConfigError(f"{asked} but no W&B API key is configured here (WANDB_API_KEY, the ~/.netrc that "
                          f"`wandb login` writes, or wandb's settings file): run `wandb login`, or log offline "
                          f"(wandb.mode=offline) and `wandb sync` the run later")
    return mode


_SETTING_KEYS = {"project": "wandb.project", "entity": "wandb.entity", "run_group": "wandb.group",
                 "run_tags": "wandb.tags", "run_name": "wandb.name"}


def check_names(w: WandbConfig) -> None:
    """A project, tag, group or name that wandb.init would refuse, found before any work by wandb's own
    validator (its rules, e.g. no '/' in a project, tags of 1-64 characters, are its to change)."""
    import wandb
    values = {"project": w.project, "entity": w.entity, "run_group": w.group,
              "run_tags": tuple(w.tags) or None, "run_name": w.name}
    try:
        wandb.Settings(**{k: v for k, v in values.items() if v is not None})
    except Exception as e:  # pydantic's ValidationError, or wandb's UsageError (a project name)
        field, said = _refusal(e)
        field = field or next((f for f in _SETTING_KEYS if f.split("_")[-1] in said.lower()), "project")
        key = _SETTING_KEYS.get(field, "wandb." + field)
        raise ConfigError(f"{key}: W&B refuses it ({said}); change {key}") from None


def _refusal(e: Exception) -> tuple[Optional[str], str]:
    """What wandb's validator said, and of which setting: pydantic's first error (its field), or wandb's
    UsageError's first line (no field)."""
    errors = getattr(e, "errors", None)
    first = errors()[0] if callable(errors) else None
    if first:
        return str(first["loc"][0]), str(first["msg"]).removeprefix("Value error, ")
    return None, (str(e).splitlines() or [""])[0]


def check_environment(environ: Optional[Mapping[str, str]] = None) -> None:
    """A WANDB_* variable wandb.init would refuse (WANDB_CONSOLE=bogus, WANDB_INIT_TIMEOUT=abc): found here, by
    wandb's own validator, one variable at a time so that the error names it, instead of a traceback at the job's
    wandb.init after its data load. A credential's value is never shown."""
    import wandb
    environ = os.environ if environ is None else environ
    for var, value in sorted(environ.items()):
        if not var.startswith("WANDB_"):
            continue
        try:
            wandb.Settings().update_from_env_vars({var: value})
        except Exception as e:  # pydantic's ValidationError, or wandb's UsageError
            shown = var if any(w in var for w in ("KEY", "TOKEN", "PASSWORD", "SECRET")) else f"{var}={value!r}"
            raise ConfigError(f"environment {shown}: W&B refuses it ({_refusal(e)[1]}); correct or unset it") from None


def outranked_env(wandb_cfg: WandbConfig, environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """Warnings for the WANDB_* variables a run's own settings outrank (wandb.init is given each): wandb alone read
    them, so an `export WANDB_PROJECT=x` was ignored without a word. None where W&B is disabled."""
    import shlex
    environ = os.environ if environ is None else environ
    try:
        if resolve_mode(wandb_cfg.mode, environ) == "disabled":
            return []
    except ConfigError:  # refused where the mode is checked
        return []
    why = {"WANDB_PROJECT": f"wandb.project ({wandb_cfg.project}) names the project: give "
                            f"wandb.project={shlex.quote(environ.get('WANDB_PROJECT', '').strip())} instead",
           "WANDB_NAME": "wandb.name (default: the run folder's name) names the run: give wandb.name=... instead",
           "WANDB_RUN_ID": "each run folder keeps its own W&B id (wandb_id.txt), which its resumes continue",
           "WANDB_RESUME": "a run folder resumes its own W&B run by itself",
           "WANDB_DIR": "W&B's files are written in the run folder"}
    if wandb_cfg.group:  # a sweep's points get their folder's name; WANDB_RUN_GROUP counts only where none is set
        why["WANDB_RUN_GROUP"] = (f"wandb.group ({wandb_cfg.group}; a sweep's is its folder's name) names the group: "
                                  f"give wandb.group=... instead")
    same = {"WANDB_PROJECT": wandb_cfg.project, "WANDB_NAME": wandb_cfg.name,  # given alike in the config: no news
            "WANDB_RUN_GROUP": wandb_cfg.group}
    return [f"environment {var}={environ[var]!r} is not read: {said}" for var, said in why.items()
            if environ.get(var, "").strip() and environ[var].strip() != same.get(var)]


def resolve_mode(cfg_mode: Optional[str], environ: Optional[Mapping[str, str]] = None) -> str:
    """The W&B mode to run in: "online", "offline" or "disabled".

    Precedence, highest first:

    1. ``cfg_mode`` -- an explicit ``wandb.mode`` in the config (online | offline | disabled);
    2. the ``WANDB_MODE`` environment variable, when set and non-empty (``dryrun`` counts as
       offline and ``run`` as online, as in wandb);
    3. auto: "online" when an API key is configured (see `api_key_configured`: env
       ``WANDB_API_KEY``/``WANDB_IDENTITY_TOKEN_FILE``, a netrc entry for the W&B host, or wandb's
       settings file), else "offline" -- so a node with no key never fails at ``wandb.init``.

    The result is always passed to ``wandb.init(mode=...)``, which in wandb 0.31 outranks
    ``WANDB_MODE`` too, so wandb cannot disagree with this function.
    """
    environ = os.environ if environ is None else environ
    if cfg_mode is not None:
        if cfg_mode not in WANDB_MODES:
            raise ConfigError(f"wandb.mode={cfg_mode!r} is not one of online, offline, disabled (or null for auto)")
        return cfg_mode
    env_mode = (environ.get("WANDB_MODE") or "").strip().lower()
    if env_mode:
        env_mode = _MODE_ALIASES.get(env_mode, env_mode)
        if env_mode not in WANDB_MODES:
            raise ConfigError(f"environment WANDB_MODE={environ['WANDB_MODE']!r} is not one of "
                              "online, offline, disabled; unset it or set wandb.mode explicitly")
        return env_mode
    return "online" if api_key_configured(environ) else "offline"

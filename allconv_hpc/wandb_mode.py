"""Which W&B mode a run gets (online, offline, disabled), and whether W&B would refuse its names: decided
before any work, on the login node as in the job, the way wandb 0.31 decides, without ``import wandb`` (but
`check_names`, which asks wandb's own validator) and without the network. The key itself is never read out."""
from __future__ import annotations

import configparser
import netrc
import os
import re
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
    """How wandb 0.31 reaches the server at `url`, as its wandb-core (Go) client chooses, where that can be told here:
    (True, None) straight, (True, proxy) through that http:// proxy, (False, None) where it cannot. wandb's own
    proxy setting for the URL's scheme (WANDB_HTTP(S)_PROXY, else http(s)_proxy in its settings file), else Go's
    ProxyFromEnvironment: HTTPS_PROXY (else https_proxy) for an https server, HTTP_PROXY (else http_proxy) for an
    http one, never ALL_PROXY, no proxy for a loopback host or one NO_PROXY (else no_proxy) names (`_no_proxy`).
    Cannot tell: a proxy not http:// (socks5, https), wandb's own setting where NO_PROXY names the host (whether it
    heeds NO_PROXY is not known here), HTTP_PROXY under CGI's REQUEST_METHOD (Go refuses it)."""
    environ = os.environ if environ is None else environ
    parts = urlsplit(url)
    scheme = (parts.scheme or "").lower()
    if scheme not in ("http", "https"):
        return False, None
    try:
        port = str(parts.port or (443 if scheme == "https" else 80))
    except ValueError:
        return False, None
    host = _url_host(parts.netloc)
    no_proxy = _first(environ, "NO_PROXY", "no_proxy")
    if not (host + no_proxy).isascii():  # Go compares IDNA (xn--) forms
        return False, None
    bypass = _no_proxy(host, port, no_proxy)
    own = (environ.get(f"WANDB_{scheme.upper()}_PROXY") or "").strip() or \
        (_settings_section(environ).get(f"{scheme}_proxy") or "").strip()
    if own:
        proxy = own
        if bypass:
            return False, None
    else:
        proxy = _first(environ, f"{scheme.upper()}_PROXY", f"{scheme}_proxy")
        if proxy and scheme == "http" and environ.get("REQUEST_METHOD"):  # Go refuses it, NO_PROXY or not
            return False, None
        if proxy != proxy.strip():  # Go reads it untrimmed: no proxy, or a broken one
            return False, None
        proxy = "" if bypass else proxy
    if not proxy:
        return True, None
    proxy = proxy if "://" in proxy else f"http://{proxy}"  # Go's reading of a proxy without a scheme
    return (True, proxy) if urlsplit(proxy).scheme.lower() == "http" else (False, None)


def _url_host(netloc: str) -> str:
    """The host of a URL's netloc as given (Go tells "localhost" before it lowercases; urlsplit's hostname is
    lowercased), without credentials, port or an IPv6 literal's brackets."""
    host = netloc.rpartition("@")[2]
    if host.startswith("[") and "]" in host:
        return host[1:host.index("]")]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def _first(environ: Mapping[str, str], *names: str) -> str:
    """The first of `names` set non-empty (Go's getEnvAny: upper case first)."""
    return next((environ[n] for n in names if environ.get(n)), "")


def _ip(text: str):
    """The IP address `text` names, an IPv4-mapped IPv6 one as IPv4 (Go compares ::ffff:a.b.c.d as a.b.c.d); None
    for a name."""
    import ipaddress
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped is not None else ip


def _no_proxy(host: str, port: str, no_proxy: str) -> bool:
    """Go's rule (golang.org/x/net/http/httpproxy) for going straight to host:port: localhost or a loopback IP,
    or a NO_PROXY entry: `*`; an IP, or a CIDR holding it; a domain (and its subdomains), `.domain` or `*.domain`
    (its subdomains only); each IP or domain with an optional `:port`."""
    import ipaddress
    ip = _ip(host)
    if host == "localhost" or (ip is not None and ip.is_loopback):
        return True
    host = host.lower()
    for entry in no_proxy.split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if re.fullmatch(r"[^/]+/\d+", entry):  # a CIDR (Go takes no netmask form)
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                net = None
            if net is not None:
                if net.version == 6 and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
                    net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
                if ip is not None and ip.version == net.version and ip in net:
                    return True
                continue
        m = re.fullmatch(r"\[([^\]]*)\]:(.*)", entry) or (re.fullmatch(r"([^:]*):([^:]*)", entry))
        name, want = (m.group(1), m.group(2)) if m else (entry, "")
        if m and not name:
            continue
        their = _ip(name)
        if their is not None:
            if ip is not None and ip == their and want in ("", port):
                return True
            continue
        name = name[1:] if name.startswith("*.") else name
        whole = not name.startswith(".")  # "foo.com": itself and its subdomains; ".foo.com": subdomains only
        name = f".{name}" if whole else name
        if ip is None and (host.endswith(name) or whole and host == name[1:]) and want in ("", port):
            return True
    return False


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

"""Which code trains a run: the package's version and, from a git checkout (`pip install -e`), its commit and
whether tracked files differ from it. Recorded in each checkpoint, status.json and W&B's summary, and compared at
a resume: a job requeued after its code was edited resumes with the edited code (each start runs what is on disk).
Asked by rank 0 only, once per process."""
from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Optional

_ROOT = Path(__file__).resolve().parent.parent  # the checkout, for an editable install
GIT_TIMEOUT_S = 10  # `git status` on a slow shared file system: the run does not wait longer for its record


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """{"version", "git_sha", "git_dirty"}; None where it cannot be told (no git, not a checkout, too slow)."""
    try:
        version = metadata.version("allconv-hpc")
    except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        version = None
    sha = dirty = None
    if (_ROOT / ".git").exists() and (_ROOT / "pyproject.toml").is_file():  # this package's own checkout
        sha = _git("rev-parse", "HEAD")
        if sha is not None:
            changes = _git("status", "--porcelain", "--untracked-files=no")
            dirty = None if changes is None else bool(changes)
    return {"version": version, "git_sha": sha, "git_dirty": dirty}


def _git(*args: str) -> Optional[str]:
    try:
        # no optional locks: `git status` would rewrite the checkout's index (and hold index.lock) at every start,
        # racing the user's own commits; a job killed then would leave the lock behind
        r = subprocess.run(["git", "--no-optional-locks", "-C", str(_ROOT), *args], capture_output=True, text=True,
                           timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):  # no git on the node, or it hung
        return None
    return r.stdout.strip() if r.returncode == 0 else None  # e.g. another user's checkout (safe.directory)


def describe(code: Optional[dict]) -> str:
    """'allconv-hpc 0.1.0, git 1a2b3c4d5e6f (uncommitted changes)'; 'unrecorded' for a checkpoint of before."""
    if not code:
        return "unrecorded"
    said = f"allconv-hpc {code.get('version') or '(version unknown)'}"
    if code.get("git_sha"):
        said += f", git {code['git_sha'][:12]}"
        said += {True: " (uncommitted changes)", False: "", None: " (changes unknown)"}[code.get("git_dirty")]
    return said


def code_changed(then: Optional[dict], now: dict) -> Optional[str]:
    """Why a resume trains on with other code than the checkpoint's (the commit, else the version, differs), or
    None: the same, or not to be told (a checkpoint of before, no commit on either side but the same version).
    Uncommitted changes on both sides of one commit are not compared: the start line records them."""
    if not then:
        return None
    if then.get("git_sha") and now.get("git_sha"):
        differ = then["git_sha"] != now["git_sha"]
    else:
        differ = then.get("version") != now.get("version")
    return f"the code was {describe(then)}, now {describe(now)}" if differ else None

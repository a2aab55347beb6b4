import dataclasses
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

# ---------------------------------------------------------------------------------------
# Real Slurm dev cluster (slurm/dev-cluster.sh): fixture `slurm_cluster`, marker `slurm`.
# The cluster is started once per session and left up afterwards (tests and later runs
# share it); all jobs are cancelled at session start and end. If it cannot come up, the tests using
# it are skipped -- except in CI (CI set, see in_ci), where they are required and fail instead.
# ---------------------------------------------------------------------------------------

_REPO_ROOT = Path(__file__).resolve().parents[1]
_DEV_CLUSTER = _REPO_ROOT / "slurm" / "dev-cluster.sh"


@dataclasses.dataclass
class SlurmCluster:
    conf: Path  # slurm.conf (SLURM_CONF)
    dir: Path  # DEV_CLUSTER_DIR: configs, state, logs ($dir/log)

    def env(self, **extra: str) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, cmd, *, check: bool = False, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run a command (a shell string or an argv list) with SLURM_CONF set; text output captured."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("env", self.env())
        return subprocess.run(cmd, shell=isinstance(cmd, str), check=check, timeout=timeout, **kwargs)

    def queue(self) -> list:
        """Ids of all jobs still in the queue (any state)."""
        out = self.run(["squeue", "-h", "-o", "%A"], check=True).stdout
        return out.split()

    def wait_queue_empty(self, timeout: float = 90) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.queue():
                return True
            time.sleep(0.5)
        return False

    def cancel_all(self, timeout: float = 90) -> bool:
        """Cancel every job and wait for the queue to empty."""
        jobs = self.queue()
        if jobs:
            self.run(["scancel", *jobs])
        return self.wait_queue_empty(timeout)


def in_ci() -> bool:
    """CI=true as .ci/run sets it, or whatever a CI system set CI to (1, yes, its own name): not only `true`."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _cluster_unavailable(reason: str):
    if in_ci():
        pytest.fail(f"real Slurm cluster required in CI but unavailable: {reason}", pytrace=False)
    pytest.skip(f"no Slurm dev cluster: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster():
    try:
        proc = subprocess.run(
            ["bash", str(_DEV_CLUSTER), "up"], capture_output=True, text=True, timeout=900
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _cluster_unavailable(f"{_DEV_CLUSTER} up: {exc!r}")
    lines = proc.stdout.strip().splitlines()
    last = lines[-1] if lines else ""
    if proc.returncode != 0 or not last.startswith("export SLURM_CONF="):
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-30:])
        _cluster_unavailable(f"`{_DEV_CLUSTER} up` exited {proc.returncode}:\n{tail}")
    conf = Path(shlex.split(last.split("=", 1)[1])[0])
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(conf=conf, dir=conf.parent.parent)
    try:
        # jobs of a session killed before its end come back with the cluster's saved state: a fresh start
        try:
            emptied = cluster.cancel_all(timeout=90)
        except (subprocess.SubprocessError, OSError) as exc:
            emptied = exc
        if emptied is not True:
            _cluster_unavailable(f"jobs left from an earlier session did not leave the queue ({emptied})")
        yield cluster
    finally:
        try:  # leave the cluster up, but leave no jobs behind
            cluster.run(["scancel", "--user=root"])
            cluster.cancel_all(timeout=90)
        except (subprocess.SubprocessError, OSError):
            pass  # a cluster that stopped answering: its jobs go with it
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


# --------------------------------------------------------------- end of the Slurm section


# In CI a skipped test (or file) fails the session: every test's needs (Slurm, g++, ACLs, /dev/full) are there, and
# no GPU is (the tests that skip where one is visible), so a skip would be a check that silently did not run,
# under a green exit code.
_SKIPPED: list = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report):  # a whole file skipped (a module-level importorskip or skip)
    pytest_runtest_logreport(report)


def pytest_sessionfinish(session, exitstatus):
    if in_ci() and _SKIPPED and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if in_ci() and _SKIPPED:
        terminalreporter.section("skipped in CI (a failure here: CI has what every test needs)", red=True)
        for line in _SKIPPED:
            terminalreporter.line(line)


_DISPOSED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@pytest.fixture(autouse=True)
def _signal_dispositions_stay_the_tests():
    """A test that runs `train` in this process leaves warnings ignored (preempt.ignore_late_signals): every job a
    later test starts would inherit SIG_IGN, and a cluster=local controller then passes no USR2 on. Put back."""
    saved = {s: signal.getsignal(s) for s in _DISPOSED}
    yield
    for s, h in saved.items():
        if h is not None and signal.getsignal(s) is not h:
            signal.signal(s, h)

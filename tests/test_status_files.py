"""`status` on what a run folder really holds: a cluster=local controller that ended as a zombie child of
the process watching it (`submit --wait` started it), and damaged records (sweep.json, submission.json,
status.json), each told in one line naming the file, exit status 2, no traceback."""
from __future__ import annotations

import contextlib
import json
import shlex
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from allconv_hpc import jobs, status


def write_run(run: Path, run_state, job: str = "42", backend: str = "slurm", **rec) -> Path:
    """A run folder as `submit` leaves it (tests/test_launcher.py's write_run), with the run's status.json."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "submission.json").write_text(json.dumps({"job_id": job, "backend": backend, "run_dir": str(run), **rec}))
    if run_state:
        (run / "status.json").write_text(json.dumps({"state": run_state, "epoch": 1, "epochs": 3}))
    return run


def zombie_child(code: int = 3) -> subprocess.Popen:
    """A child of this process that has exited and is not reaped, as submitit's local controller is once
    its job ended under `submit --wait`."""
    p = subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({code})"])
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # until it has exited, leaving it unreaped
    assert Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return p


def within(seconds: float, fn, *args, **kwargs):
    """fn's result; the test fails instead of hanging when fn does not return in time."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args, **kwargs)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive() and out, f"{fn.__name__} did not return within {seconds} s"
    return out[0]


# ---------------------------------------------------------------- a local controller that ended

@pytest.mark.parametrize("run_state,state,failed", [("failed", "FAILED", True), ("gave_up", "GAVE UP", False),
                                                     ("running", "LOST", True)])
def test_a_local_job_whose_controller_is_a_zombie_has_ended(tmp_path, capsys, run_state, state, failed):
    p = zombie_child()
    try:
        run = write_run(tmp_path / "run", run_state, job=str(p.pid), backend="local",
                        submitit_folder=str(tmp_path / "sub"))
        row = status.run_rows(run)[0]
        assert (row["state"], row["active"], row["failed"]) == (state, False, failed), row
        rec = json.loads((run / "submission.json").read_text())
        assert jobs.queued_state(rec) is None  # a new submit into the folder is not refused as RUNNING
        # ends at once (no endless RUNNING): 1 a failure, 3 a stop that left a checkpoint
        assert within(20, status.wait_for, run, poll_s=0.01) == (1 if failed else 3)
        assert re.search(rf"^{p.pid}\s+{state}\s", capsys.readouterr().out, re.M)
        assert status.status_main([str(run)]) == int(failed)
    finally:
        assert p.wait(timeout=10) == 3  # not reaped by status: submitit's Popen still reads the exit status


def test_a_local_job_whose_controller_runs_is_running_and_another_process_of_its_pid_is_not(tmp_path):
    """The job id of a cluster=local job is its controller's pid: another process given that pid since (a reboot,
    pids wrapped round after a SIGKILL) read RUNNING for good, and submit and train refused the folder, telling to
    kill that process (a status audit: `kill 1`)."""
    nap = [sys.executable, "-c", "import time; time.sleep(60)"]
    controller = subprocess.Popen([*nap, "-m", "allconv_hpc.localcontrol", str(tmp_path / "sub")])  # as it is named
    other = subprocess.Popen(nap)
    try:
        for p, state in ((controller, "RUNNING"), (other, "LOST")):
            run = write_run(tmp_path / state, "running", job=str(p.pid), backend="local",
                            submitit_folder=str(tmp_path / "sub"))
            row = status.run_rows(run)[0]
            assert (row["state"], row["active"], row["failed"]) == (state, state == "RUNNING", state == "LOST"), row
            rec = json.loads((run / "submission.json").read_text())
            assert (jobs.queued_state(rec) is None) is (state == "LOST")  # a new submit into it is refused or not
    finally:
        for p in (controller, other):
            p.kill()
            p.wait()


# ---------------------------------------------------------------- damaged records

def one_line_error(capsys, rc: int, path: Path) -> str:
    """The error `status` printed: exit 2, one line naming path, with a fix after the `;`; no traceback."""
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert out == "" and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith(f"allconv-hpc status: error: {path}: "), err
    assert "; " in err.split(f"{path}: ", 1)[1], err  # what is wrong; how to fix it
    return err


def sweep(tmp: Path, n: int = 2) -> tuple[Path, list[Path]]:
    """A sweep folder of n runs, each with its job and status.json."""
    root = tmp / "sweep"
    runs = [write_run(root / f"p{i}", "completed", job=str(40 + i)) for i in range(n)]
    jobs = [json.loads((r / "submission.json").read_text()) for r in runs]
    (root / "sweep.json").write_text(json.dumps({"sweep_dir": str(root), "jobs": jobs}))
    return root, runs


SQUEUE_FORGOT = "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1"


@pytest.fixture
def no_slurm(tmp_path, monkeypatch):
    """squeue/sacct/scontrol that no longer know any job: the run folder decides."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name in ("squeue", "sacct", "scontrol"):
        (bin_ / name).write_text(f"#!/bin/sh\n{SQUEUE_FORGOT}\n")
        (bin_ / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")


def ended_job(tmp_path: Path, monkeypatch, state: str, jobs: tuple = ("9",)) -> None:
    """squeue/sacct/scontrol of a Slurm that says its `jobs` have ended in `state` (squeue no longer lists them):
    sacct's line for each id asked, scontrol's for the one asked or, asked for every job, for each of `jobs`."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    table = "; ".join(f"echo JobId={j} JobState={state} Restarts=0" for j in jobs)
    for name, out in (("squeue", ""), ("sacct", f'IFS=,; for j in $5; do echo "$j|$j|{state}"; done'),
                      ("scontrol", f'if [ -n "$4" ]; then echo "JobId=$4 JobState={state} Restarts=0"; else {table}; fi')):
        (bin_ / name).write_text(f"#!/bin/sh\n{out}\n")
        (bin_ / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")


def test_a_good_sweep_shows(tmp_path, no_slurm, capsys):
    root, _ = sweep(tmp_path)
    assert status.status_main([str(root)]) == 0
    assert capsys.readouterr().out.count("COMPLETED") == 2


def test_a_moved_run_or_sweep_is_read_where_it_is_now(tmp_path, no_slurm, capsys):
    """Folders copied or moved since submit (off scratch) are read at the path given, not the recorded one."""
    root, _ = sweep(tmp_path)
    run = write_run(tmp_path / "run", "completed")
    moved_sweep, moved_run = tmp_path / "archive" / "sweep", tmp_path / "archive" / "run"
    moved_sweep.parent.mkdir()
    root.rename(moved_sweep)
    run.rename(moved_run)
    for folder in (moved_sweep, moved_run):
        assert status.status_main([str(folder), "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        # read at the old path these would be LOST (no status.json there) and UNKNOWN
        assert [(r["state"], r["epoch"], r["epochs"]) for r in rows] == [("COMPLETED", 1, 3)] * len(rows), rows
        # --json gives where each run is now, whole: a script need not join it with the folder it asked about
        assert [r["run_dir"] for r in rows] == ([str(moved_run.resolve())] if folder == moved_run else
                                                [str(moved_sweep.resolve() / r["folder"]) for r in rows]), rows


def test_a_point_removed_from_a_copied_sweep_is_gone_not_the_originals(tmp_path, no_slurm, capsys):
    """A copy of a sweep whose point folder was removed: that row is the copy's, gone, not the original's point
    (which may have trained on since): before, the copy's status showed the original's progress."""
    root, runs = sweep(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / runs[1].name)
    assert status.status_main([str(copy), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["state"], r["epoch"], r["epochs"]) for r in rows] == [("COMPLETED", 1, 3), ("GONE (no run folder)", 0, None)], rows
    assert status.wait_for(copy, poll_s=0) == status.EXIT_STOPPED  # not "every run completed"
    capsys.readouterr()
    assert status.status_main([str(copy)]) == 0
    assert (f"{runs[1].name}: its run folder is gone (moved or removed?): the same `submit -m` command (the whole "
            f"sweep) starts it anew") in capsys.readouterr().out
    assert status.status_main([str(root), "--json"]) == 0  # the original as it was
    assert [r["state"] for r in json.loads(capsys.readouterr().out)] == ["COMPLETED", "COMPLETED"]


def test_slurm_not_answering_is_asked_once_and_said(tmp_path, monkeypatch, capsys):
    """squeue failing (controller down): the runs' own state, a warning naming the jobs, and no second try
    per point (each would wait up to 30 s)."""
    bin_, calls = tmp_path / "bin", tmp_path / "calls"
    bin_.mkdir()
    for name in ("squeue", "sacct", "scontrol"):
        (bin_ / name).write_text(f"#!/bin/sh\necho {name} >> {calls}\n"
                                 "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1\n")
        (bin_ / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    root, _ = sweep(tmp_path, n=3)
    assert status.status_main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert out.count("COMPLETED") == 3, out
    assert ("warning: Slurm did not answer for job(s) 40, 41, 42 (squeue: slurm_load_jobs error: Unable to contact "
            "slurm controller): their state is the run's own status.json") in err, err  # squeue's words, not a guess
    assert calls.read_text().split().count("squeue") == 1


def test_a_run_started_by_hand_shows_its_slurm_job_after_it_ended(tmp_path, no_slurm, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "completed", "epoch": 3, "epochs": 3,
                                                 "slurm_job_id": "558"}))
    assert status.status_main([str(run), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["job"], row["state"]) == ("558", "COMPLETED"), row


def test_json_gives_null_where_the_table_shows_a_dash(tmp_path, no_slurm, capsys):
    """A run trained by hand outside Slurm, W&B disabled: no job, no W&B id (the table's "-"), null in --json, as
    every other key that nothing says; and a job's state before its run wrote a record."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "completed", "epoch": 3, "epochs": 3}))
    assert status.status_main([str(run)]) == 0
    line = capsys.readouterr().out.splitlines()[-1].split()
    assert line[0] == "-" and "-" in line[3:], line
    assert status.status_main([str(run), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["job"], row["wandb_id"], row["run"], row["state"]) == (None, None, "completed", "COMPLETED"), row


@pytest.mark.parametrize("content,what", [
    ("[1, 2]", "holds a JSON array, not an object"),
    ("", "is empty"),
    ("  \n", "is empty"),
    ('{"state": "running"', "not valid JSON (Expecting ',' delimiter"),
    (b"\xff\xfe{}", "cannot be read"),
    ('{"state": 3}', "'state' is 3, of the wrong type"),
    ('{"state": "completed", "updated": "yesterday"}', "'updated' is 'yesterday', of the wrong type"),
])
def test_a_damaged_status_json_is_named(tmp_path, no_slurm, capsys, content, what):
    root, runs = sweep(tmp_path)
    bad = runs[1] / "status.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    for folder in (root, runs[1]):  # the sweep and the run alone
        err = one_line_error(capsys, status.status_main([str(folder)]), bad)
        assert what in err and "delete it: the run's next start (its job, or train) writes a new one" in err, err
    bare = tmp_path / "bare"  # a run started without submit: status.json is what makes it a run folder
    bare.mkdir()
    shutil.copy(bad, bare / "status.json")
    assert what in one_line_error(capsys, status.status_main([str(bare)]), bare / "status.json")


def test_a_status_json_that_is_a_folder_is_named(tmp_path, no_slurm, capsys):
    root, runs = sweep(tmp_path)
    bad = runs[0] / "status.json"
    bad.unlink()
    bad.mkdir()
    err = one_line_error(capsys, status.status_main([str(root)]), bad)
    assert "is a folder, not a file" in err


@contextlib.contextmanager
def unreadable(path: Path):
    """path unreadable to this process: mode 000, and as root (who reads it anyway) the effective user
    nobody, in a folder nobody can reach (pytest's tmp_path is root's alone)."""
    path.chmod(0)
    root = os.geteuid() == 0
    if root:
        os.seteuid(65534)
    try:
        yield
    finally:
        if root:
            os.seteuid(0)
        path.chmod(0o644)


@pytest.mark.parametrize("name", ["status.json", "submission.json", "sweep.json"])
def test_an_unreadable_file_is_named(name, capsys, no_slurm):
    tmp = Path(tempfile.mkdtemp())
    try:
        tmp.chmod(0o755)
        root, runs = sweep(tmp)
        for d in (root, *runs):
            d.chmod(0o755)
        bad = (runs[0] if name != "sweep.json" else root) / name
        with unreadable(bad):
            rc = status.status_main([str(root if name != "submission.json" else runs[0])])
        err = one_line_error(capsys, rc, bad)
        assert "permission denied; make it readable" in err, err
    finally:
        shutil.rmtree(tmp)


@pytest.mark.parametrize("doc,what", [
    ({}, "no 'jobs' list, or an empty one"),
    ({"jobs": []}, "no 'jobs' list, or an empty one"),
    ({"jobs": {"run_dir": "x"}}, "no 'jobs' list, or an empty one"),
    ([], "holds a JSON array, not an object"),
])
def test_a_sweep_json_without_jobs_is_named(tmp_path, capsys, doc, what):
    root, _ = sweep(tmp_path)
    (root / "sweep.json").write_text(json.dumps(doc))
    err = one_line_error(capsys, status.status_main([str(root)]), root / "sweep.json")
    assert what in err and "submit the sweep again" in err, err


@pytest.mark.parametrize("change,what", [
    (lambda rec: rec.pop("run_dir"), "job 2: has no 'run_dir'"),
    (lambda rec: rec.update(run_dir=None), "job 2: 'run_dir' is None, of the wrong type"),
    (lambda rec: rec.update(submitted="now"), "job 2: 'submitted' is 'now', of the wrong type"),
    (lambda rec: rec.clear() or rec.update(job=[1]), "job 2: has no 'run_dir'"),
])
def test_a_sweep_job_entry_that_is_damaged_is_named(tmp_path, no_slurm, capsys, change, what):
    root, _ = sweep(tmp_path)
    doc = json.loads((root / "sweep.json").read_text())
    change(doc["jobs"][1])
    (root / "sweep.json").write_text(json.dumps(doc))
    err = one_line_error(capsys, status.status_main([str(root)]), root / "sweep.json")
    assert what in err, err


def test_a_sweep_job_entry_that_is_no_object_is_named(tmp_path, capsys):
    root, _ = sweep(tmp_path)
    doc = json.loads((root / "sweep.json").read_text())
    doc["jobs"][0] = "42"
    (root / "sweep.json").write_text(json.dumps(doc))
    err = one_line_error(capsys, status.status_main([str(root)]), root / "sweep.json")
    assert "job 1: holds a JSON string, not an object" in err, err


@pytest.mark.parametrize("content,what", [("", "is empty"), ("[]", "holds a JSON array"), ("{}", "has no 'run_dir'"),
                                          ("{nope", "not valid JSON")])
def test_a_damaged_submission_json_is_named(tmp_path, capsys, content, what):
    run = write_run(tmp_path / "run", "running")
    (run / "submission.json").write_text(content)
    err = one_line_error(capsys, status.status_main([str(run)]), run / "submission.json")
    assert what in err and "delete it and submit the run again" in err, err


def test_submit_wait_stops_on_a_damaged_record(tmp_path, no_slurm, capsys):
    """It stays damaged (records are written atomically): waiting on would never end."""
    root, runs = sweep(tmp_path)
    (runs[0] / "status.json").write_text("[1, 2]")
    assert within(20, status.wait_for, root, poll_s=0.01) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and err.count("\n") == 1 and f"{runs[0] / 'status.json'}: " in err, err


def test_not_a_run_folder_is_still_exit_2(tmp_path, capsys):
    rc = status.status_main([str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "is neither a run folder" in err and "it holds" not in err, err
    assert status.status_main(["--json", str(tmp_path)]) == 2  # --json: still a list to read, empty (it printed
    assert json.loads(capsys.readouterr().out) == []  # nothing: laptop journey audit)
    runs = [write_run(tmp_path / "runs" / name, "completed") for name in ("b", "a", "c", "d")]
    (tmp_path / "runs" / "notes").mkdir()
    assert status.status_main([str(tmp_path / "runs")]) == 2  # a folder of runs: a few are named
    assert capsys.readouterr().err.strip().endswith(
        f"it holds runs or sweeps: give one of them, e.g. {runs[1]}, {runs[0]}, {runs[2]} ... (4 in all), or all: "
        f"allconv-hpc status {tmp_path / 'runs'}/*")
    f = tmp_path / "file"
    f.write_text("x")
    assert status.status_main([str(f)]) == 2
    capsys.readouterr()
    assert status.status_main([str(tmp_path / "nope")]) == 2  # a typo: said as it is
    assert f"{tmp_path / 'nope'} does not exist; give a run folder" in capsys.readouterr().err
    for inside in (runs[0] / "checkpoints", runs[0] / "wandb"):  # a folder of a run, existing or not: its run named
        assert status.status_main([str(inside)]) == 2
        assert capsys.readouterr().err.strip().endswith(f"it is inside the run or sweep folder {runs[0]}: "
                                                        f"allconv-hpc status {runs[0]}")


def test_several_folders_make_one_table_each_row_named_by_its_path(tmp_path, capsys, monkeypatch):
    """`status runs/*` (a shell's glob) or two sweeps: one table, two sweeps' points of one name told apart by their
    path; a folder that is no run is said and the others still shown (exit 2); `.` is named by the folder's name."""
    monkeypatch.chdir(tmp_path)
    for sweep in ("a", "b"):  # runs started by hand: no scheduler to ask
        (tmp_path / sweep / "seed=0").mkdir(parents=True)
        (tmp_path / sweep / "seed=0" / "status.json").write_text(json.dumps({"state": "completed", "epoch": 3,
                                                                             "epochs": 3}))
    assert status.status_main(["a/seed=0", "b/seed=0", "--json"]) == 0
    assert [r["folder"] for r in json.loads(capsys.readouterr().out)] == ["a/seed=0", "b/seed=0"]
    assert status.status_main(["a/seed=0", "nope"]) == 2
    out, err = capsys.readouterr()
    assert "a/seed=0" in out and err.strip() == ("allconv-hpc status: error: nope does not exist; give a run folder "
                                                 "(hydra.run.dir) or a sweep folder"), err
    (tmp_path / "a" / "notes.md").write_text("")  # `status a/*`: a plain file beside the runs is no folder given
    assert status.status_main(["a/seed=0", "a/notes.md"]) == 0 and capsys.readouterr().err == ""
    assert status.status_main(["a/notes.md"]) == 2  # alone: asked for, so said
    assert "a/notes.md is neither a run folder" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "a" / "seed=0")
    assert status.status_main([".", "--json"]) == 0
    assert [r["folder"] for r in json.loads(capsys.readouterr().out)] == ["seed=0"]  # was ""


def test_a_run_that_failed_before_its_first_record_shows_the_error(tmp_path, capsys):
    """A real train that fails in start-up (a damaged dataset file: found when read, not by the preflight)
    leaves train.log and its lock but no status.json: status says FAILED with train.log's error."""
    from proc import PY, clean_env
    root, run = tmp_path / "data", tmp_path / "run"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (root / "cifar-10-batches-py" / name).write_bytes(b"not a pickle.")  # ends as a pickle does: passes the preflight
    (run / "checkpoints").mkdir(parents=True)  # a run folder made before (a new run's files are read before it is)
    r = subprocess.run([PY, "-m", "allconv_hpc", "train", "data=cifar10", f"data.root={root}", "model.width=0.125",
                        "wandb.mode=disabled", f"hydra.run.dir={run}"], env=clean_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and not (run / "status.json").exists(), r.stderr
    rows = status.run_rows(run)
    assert (rows[0]["state"], rows[0]["failed"], rows[0]["active"]) == ("FAILED", True, False), rows
    assert "data_batch_1" in rows[0]["error"] and rows[0]["error"] in r.stderr, (rows[0]["error"], r.stderr)
    assert status.status_main([str(run)]) == 1
    from allconv_hpc import runlock
    fd = runlock.acquire(run)  # the same folder while a train holds it, before its first record: starting
    try:
        row = status.run_rows(run)[0]
        assert (row["state"], row["active"], row["failed"]) == ("RUNNING (starting)", True, False)
    finally:
        os.close(fd)


def test_a_run_waiting_for_its_peers_is_running_and_once_killed_failed(tmp_path):
    """Rank 0 of two, its peer never coming: it waits in the rendezvous, train.log written, holding the lock
    from before that (status: RUNNING, not the error of an earlier start); killed, it is FAILED with no error
    of its own to show (an earlier start's is not its)."""
    import signal as sig
    import time
    from proc import PY, clean_env, free_port, wait_for_line
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("[2026-01-01 00:00:00 INFO] run folder x\n[2026-01-01 00:00:01 ERROR] old one\n")
    p = subprocess.Popen([PY, "-m", "allconv_hpc", "train", "data=synthetic", "model.width=0.125", "wandb.mode=disabled",
                          f"hydra.run.dir={run}"], env=clean_env(tmp_path, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0",
                                                                  LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                                                  MASTER_PORT=str(free_port())),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_line(run / "train.log", f"run folder {run}", timeout=120, proc=p)
        time.sleep(1)
        assert p.poll() is None  # in the rendezvous
        row = status.run_rows(run)[0]
        assert (row["state"], row["active"], row["failed"]) == ("RUNNING (starting)", True, False), row
    finally:
        p.send_signal(sig.SIGKILL)
        p.wait()
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("FAILED", True), row
    assert row["error"].startswith("ended before its first status record; see train.log"), row


def test_a_resume_starting_over_a_completed_run_is_running_until_it_lets_the_lock_go(tmp_path, capsys):
    """A completed run started again: rank 0 of two holds the lock in its rendezvous, its peer never coming, and
    status says RUNNING (starting), not the last start's COMPLETED; stopped there (SIGTERM: at once, nothing
    written), status is the recorded COMPLETED again. A start whose rendezvous times out leaves COMPLETED too, with
    its error said below the table."""
    import signal as sig
    from proc import TINY, clean_env, free_port, run_train, train_cmd, wait_listening
    run, args = tmp_path / "run", TINY + ["trainer.epochs=1"]
    run_train(tmp_path, run, args)
    assert (status.run_rows(run)[0]["state"], status.run_rows(run)[0]["failed"]) == ("COMPLETED", False)
    port = free_port()
    p = subprocess.Popen(train_cmd(run, args + ["dist.timeout_s=120"]), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=clean_env(tmp_path, RANK=0, WORLD_SIZE=2, LOCAL_RANK=0,
                                                                  LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                                                                  MASTER_PORT=port))
    try:
        wait_listening(p, port)  # in the rendezvous (a SIGTERM before would wait for the timeout)
        row = status.run_rows(run)[0]
        assert (row["state"], row["active"], row["failed"], row["run"]) == ("RUNNING (starting)", True, False,
                                                                          "completed"), row
        p.send_signal(sig.SIGTERM)
        assert p.wait(timeout=30) == -sig.SIGTERM
    finally:
        p.kill()
        p.wait()
    row = status.run_rows(run)[0]
    assert (row["state"], row["active"], row["failed"], row["start_error"]) == ("COMPLETED", False, False, None), row
    again = subprocess.run(train_cmd(run, args + ["dist.timeout_s=2"]), capture_output=True, text=True, timeout=120,
                           env=clean_env(tmp_path, RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=2,
                                         MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()))
    assert again.returncode == 1, again.stderr[-2000:]  # its rendezvous timed out: status.json is left as it was
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("COMPLETED", False), row
    assert "rendezvous with 2 ranks" in (row["start_error"] or ""), row  # that start is not lost from sight
    assert status.status_main([str(run)]) == 0
    assert f"run: a later start failed before it wrote status.json (the state shown is the start before): " \
           f"{row['start_error']}" in capsys.readouterr().out


def test_a_lock_taken_after_the_last_record_is_a_start_and_one_taken_before_it_an_end(tmp_path):
    """The lock held over an interrupted run's record: taken after it, a new start (RUNNING (starting)); the record
    written after the lock was taken, its holder on its way out (the recorded state); let go, the recorded state."""
    from allconv_hpc import runlock
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "interrupted", "epoch": 1, "epochs": 3, "updated": 1.0}))
    fd = runlock.acquire(run)
    try:
        row = status.run_rows(run)[0]
        assert (row["state"], row["active"], row["failed"]) == ("RUNNING (starting)", True, False), row
        (run / "status.json").write_text(json.dumps({"state": "interrupted", "epoch": 2, "epochs": 3,
                                                      "updated": runlock.taken_at(run) + 1}))
        row = status.run_rows(run)[0]
        assert (row["state"], row["active"], row["epoch"]) == ("INTERRUPTED", False, 2), row
    finally:
        os.close(fd)
    row = status.run_rows(run)[0]
    assert (row["state"], row["active"], row["failed"]) == ("INTERRUPTED", False, False), row


def test_a_jobs_error_from_its_err_files_when_the_run_wrote_none(tmp_path):
    """A job that failed before its trainer wrote status.json: the error comes from its tasks' .err files, a
    rank's own refusal (`allconv-hpc: error: ...`) before a logged error or a traceback's last line, and a
    message that names its rank already is not prefixed twice."""
    sub = tmp_path / "sub"
    run = write_run(tmp_path / "run", None, job="7_1", submitit_folder=str(sub))
    (sub / "7_1").mkdir(parents=True)
    err = lambda task, text: (sub / "7_1" / f"7_1_{task}_log.err").write_text(text)  # noqa: E731
    err(0, "[2026-12-03 11:03:33 ERROR] rank 0: rendezvous with 2 ranks at n1:5000 failed after 61 s (dist.timeout_s=60; ...)\n")
    err(1, "submitit ERROR (2026-12-03) - Submitted job triggered an exception\nTraceback (most recent call last):\n"
           '  File "x.py", line 1, in <module>\n    f()\nOSError: [Errno 5] Input/output error\n')
    assert status._job_error(json.loads((run / "submission.json").read_text())) == \
        "rank 0: rendezvous with 2 ranks at n1:5000 failed after 61 s (dist.timeout_s=60; ...)"
    err(0, "[2026-12-03 11:03:33 WARNING] slow\n")
    assert status._job_error({"job_id": "7_1", "submitit_folder": str(sub)}) == \
        "rank 1: OSError: [Errno 5] Input/output error"
    err(0, "[rank0]:[E1203 11:03:33.123456 99 torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:632] [Rank 0] Watchdog "
           "caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE) ran for 1800000 milliseconds\n")
    assert status._job_error({"job_id": "7_1", "submitit_folder": str(sub)}).startswith(
        "rank 0: [Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5")  # NCCL ends the process
    err(2, "[2026-12-03 11:03:30 WARNING rank 2] x\nallconv-hpc: error: run folder /r is busy\n")
    assert status._job_error({"job_id": "7_1", "submitit_folder": str(sub)}) == "rank 2: run folder /r is busy"
    assert status._job_error({"job_id": "8", "submitit_folder": str(sub)}) is None
    (sub / "7_1" / "7_1_2_log.err").unlink()
    err(0, "srun: error: n2: task 0: Killed\nsrun: error: n2: task 1: Exited with exit code 1\n")  # a signal, no word
    err(1, "srun: Job step aborted: Waiting up to 32 seconds for job step to finish.\n")
    assert status._job_error({"job_id": "7_1", "submitit_folder": str(sub)}) == \
        "rank 0: ended by a signal (srun: error: n2: task 0: Killed)"
    err(1, "Traceback (most recent call last):\n  f()\nRuntimeError: peer rank 0 failed\n")  # what followed from it
    assert status._job_error({"job_id": "7_1", "submitit_folder": str(sub)}) == \
        "rank 0: ended by a signal (srun: error: n2: task 0: Killed)"
    err(0, "srun: error: n2: task 1: Killed\n")  # in the batch step's file (task 0's), of another task
    assert status._job_error({"job_id": "7_1", "submitit_folder": str(sub)}) == \
        "rank 1: ended by a signal (srun: error: n2: task 1: Killed)"
    err(0, "Traceback (most recent call last):\n  f()\nMemoryError\nsrun: error: n2: task 0: Aborted\n")
    assert status._job_error({"job_id": "7_1", "submitit_folder": str(sub)}) == "rank 0: MemoryError"  # says more


def test_a_ranks_refusal_is_the_failure_where_rank_0_recorded_the_sigterm_it_brought(tmp_path, monkeypatch, capsys):
    """Rank 1 refused in start-up (no data on its node) and srun's --kill-on-bad-exit SIGTERMed rank 0, which,
    past its signal set-up, recorded a stop in start-up: the job FAILED for rank 1's refusal, said so, with no
    resume advice (the same command fails alike). A stop so recorded without any rank's refusal (scancel
    --signal=TERM) stays the job's word, with its advice. The real-Slurm test meets either timing."""
    ended_job(tmp_path, monkeypatch, "FAILED")
    sub = tmp_path / "sub"
    run = write_run(tmp_path / "run", None, job="9", submitit_folder=str(sub))
    stop = "stopped by SIGTERM during start-up, before training; nothing was trained or written to its checkpoints"
    (run / "status.json").write_text(json.dumps({"state": "interrupted", "error": stop, "updated": 2.0,
                                                  "slurm_job_id": "9"}))
    (sub / "9").mkdir(parents=True)
    (sub / "9" / "9_0_log.err").write_text(f"srun: error: n2: task 1: Exited with exit code 2\n"
                                           f"[2026-12-05 22:09:14 WARNING] {stop}\n")
    refusal = "rank 1: CIFAR-10 not found: expected /d1/cifar-10-batches-py"
    (sub / "9" / "9_1_log.err").write_text(f"allconv-hpc: error: {refusal}\n")
    assert status.status_main([str(run)]) == 1
    out = capsys.readouterr().out
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"], row["error"]) == ("FAILED", True, refusal), row
    assert f"run: {refusal}" in out and "starts it over" not in out, out
    (sub / "9" / "9_1_log.err").write_text("")  # no rank refused: the stop is the job's own word (exit 3: FAILED)
    assert status.status_main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "INTERRUPTED" in out and "the same submit (or train) command starts it over" in out, out
    assert status.run_rows(run)[0]["failed"] is False


@pytest.mark.parametrize("job_state,said,rc", [
    ("CANCELLED", "allconv-hpc: SIGTERM during cluster.setup (a preemption, scancel or the time limit), in: sleep 30; "
                  "nothing was trained", 0),
    ("FAILED", "allconv-hpc: cluster.setup line ended the job before training (exit 7): exit 7", 1)])
def test_a_job_ended_in_its_setup_reads_so_also_from_a_moved_folder(tmp_path, monkeypatch, capsys, job_state, said,
                                                                      rc):
    """A scancel while the batch shell ran cluster.setup (no rank yet) read as rank 0's failure (exit 1); and a
    run folder moved since was read for its job's logs at the old path: a failed setup's reason was gone, a task
    that never ran read as one that stopped (found by a Slurm journey audit)."""
    ended_job(tmp_path, monkeypatch, job_state, jobs=("9", "40", "41"))  # 40, 41: the sweep's, below
    run = write_run(tmp_path / "run", None, job="9", submitit_folder=str(tmp_path / "run" / ".submitit"))
    (run / ".submitit" / "9").mkdir(parents=True)
    (run / ".submitit" / "9" / "9_0_log.err").write_text(said + "\n")
    moved = tmp_path / "archive" / "run"
    for folder in (run, moved):
        if folder == moved:
            moved.parent.mkdir()
            run.rename(moved)
        assert status.status_main([str(folder)]) == rc
        out = capsys.readouterr().out
        row = status.run_rows(folder)[0]
        assert (row["state"], row["failed"]) == (job_state, bool(rc)), (folder, row)
        assert "rank 0:" not in out, out
        if rc:
            assert said.removeprefix("allconv-hpc: ") in out, out
    if job_state != "CANCELLED":
        return
    # a sweep moved: each point's job logs are in the sweep's .submitit, moved with it; none started
    root, runs = sweep(tmp_path)
    doc = json.loads((root / "sweep.json").read_text())
    for i, r in enumerate(doc["jobs"]):
        r["submitit_folder"] = str(root / ".submitit")
        (root / ".submitit" / r["job_id"]).mkdir(parents=True)  # submit's own files only: no task log
        (runs[i] / "status.json").unlink()
    (root / "sweep.json").write_text(json.dumps(doc))
    away = tmp_path / "archive" / "sweep"
    root.rename(away)
    assert [r["state"] for r in status.run_rows(away)] == ["CANCELLED (never started)"] * 2


def test_a_stop_in_start_up_before_the_config_was_read_shows_the_jobs_epochs(tmp_path, monkeypatch, capsys):
    """Its status.json names no trainer.epochs: the table read 0/? where the job's record has them (found by a
    Slurm journey audit)."""
    ended_job(tmp_path, monkeypatch, "CANCELLED")
    run = write_run(tmp_path / "run", None, job="9", submitted=1.0, epochs=16)
    (run / "status.json").write_text(json.dumps({"state": "interrupted", "updated": 2.0, "slurm_job_id": "9",
                                                  "error": "stopped by SIGTERM during start-up, before training"}))
    row = status.run_rows(run)[0]
    assert (row["epoch"], row["epochs"], row["failed"]) == (0, 16, False), row


@pytest.mark.parametrize("job_state", ["COMPLETED", "FAILED", "REQUEUED"])  # REQUEUED: cancelled while it waited
def test_a_run_resumed_by_hand_after_its_job_ended_reads_as_the_hand_runs_own(tmp_path, monkeypatch, job_state):
    """A `train` by hand resumed a run whose submitted job had ended (COMPLETED, or FAILED: a stop's exit 3): its
    record names no Slurm job. Its Ctrl-C reads INTERRUPTED (not the job's COMPLETED, nor a failure), its kill
    LOST (failed), as for any run by hand; the job's own record still reads by the job's state."""
    ended_job(tmp_path, monkeypatch, job_state)
    run = write_run(tmp_path / "run", None, job="9", submitted=1.0)
    record = lambda state, job: (run / "status.json").write_text(json.dumps(  # noqa: E731
        {"state": state, "epoch": 8, "epochs": 12, "updated": 2.0, "slurm_job_id": job}))
    record("interrupted", None)
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"], row["started_by"]) == ("INTERRUPTED", False, "train"), row
    assert row["job"] == "-", row  # not job 9, which trained none of this record (it read "9 COMPLETED")
    assert "the same train command" in status.notes(row)[0], status.notes(row)  # its epochs, not the job's
    record("running", None)  # killed: its lock is free
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("LOST", True), row
    if job_state != "REQUEUED":
        record("interrupted", "9")  # the job's own stop
        row = status.run_rows(run)[0]
        assert row["state"] == ("COMPLETED" if job_state == "COMPLETED" else "INTERRUPTED"), row


def test_a_run_resumed_by_hand_after_its_local_job_ended_reads_as_the_hand_runs_own(tmp_path):
    """The same for a cluster=local job: its result came after its last record, a train by hand's record after
    the result (it read COMPLETED, the job's, and advised the submit whose smaller trainer.epochs is refused)."""
    import pickle
    sub = tmp_path / "sub"
    (sub / "123").mkdir(parents=True)
    result = sub / "123" / "123_0_result.pkl"
    result.write_bytes(pickle.dumps(("success", 0)))
    os.utime(result, (100.0, 100.0))
    run = write_run(tmp_path / "run", None, job="123", backend="local", submitted=1.0, submitit_folder=str(sub))
    record = lambda state, updated, **job: (run / "status.json").write_text(json.dumps(  # noqa: E731
        {"state": state, "epoch": 4, "epochs": 5, "updated": updated, **job}))
    record("completed", 99.0)  # the job's own, from before records named their job: by the time of its result
    row = status.run_rows(run)[0]
    assert (row["state"], row["started_by"]) == ("COMPLETED", "submit"), row
    record("completed", 102.0)  # ... with the slack for file times kept to the second, or another clock
    assert status.run_rows(run)[0]["started_by"] == "submit"
    record("completed", 300.0, local_job_id="123")  # the job's own, named: whatever the clocks say
    assert status.run_rows(run)[0]["started_by"] == "submit"
    record("interrupted", 100.5, local_job_id=None)  # a train by hand, named as none: at once after the job
    row = status.run_rows(run)[0]
    assert (row["state"], row["started_by"], row["job"]) == ("INTERRUPTED", "train", "-"), row
    result.unlink()  # a job killed before its result (no state of its own): the hand run's record still tells
    assert status.run_rows(run)[0]["started_by"] == "train"
    result.write_bytes(pickle.dumps(("success", 0)))
    os.utime(result, (100.0, 100.0))
    record("interrupted", 200.0)  # a train by hand with trainer.epochs=5, Ctrl-C'd
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"], row["started_by"]) == ("INTERRUPTED", False, "train"), row
    # epochs recorded, no checkpoint: they are gone (deleted?) since; it said "stopped before its first checkpoint"
    assert status.notes(row) == [  # (laptop journey audit)
        "stopped with epoch 4/5 done (step 0); the same train command starts it over: its checkpoints are gone "
        "(deleted?), and the epochs it recorded are set aside in checkpoints.oldN/"], status.notes(row)
    assert status.notes({**row, "step": 3, "epoch": 0})[0].endswith(  # a stop in epoch 1: nothing to set aside
        "the same train command starts it over: its checkpoints are gone (deleted?)")
    assert status.notes({**row, "step": 0, "epoch": 0})[0].endswith("it stopped before its first checkpoint")
    record("failed", 200.0)
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("FAILED", True), row


def test_a_sweep_folder_without_its_sweep_json_is_no_run(tmp_path, capsys):
    """A sweep folder copied without sweep.json holds .submit.lock and point folders: not a run of its own."""
    sweep = tmp_path / "sweep"
    write_run(sweep / "seed=0", "completed")
    (sweep / ".submit.lock").touch()
    assert status.status_main([str(sweep)]) == 2
    assert "is neither a run folder" in capsys.readouterr().err


def test_wait_ends_with_the_failed_runs_error(tmp_path, capsys):
    """`submit --wait` (status.wait_for) prints, under its last table, why a failed run failed, as `status` does."""
    p = subprocess.Popen(["true"])  # the job's controller, gone
    p.wait()
    sub, job = tmp_path / "sub", str(p.pid)
    run = write_run(tmp_path / "run", None, job=job, backend="local", submitit_folder=str(sub))
    (sub / job).mkdir(parents=True)
    (sub / job / f"{job}_0_log.err").write_text("allconv-hpc: error: downloading CIFAR-10 failed (URLError)\n")
    assert within(20, status.wait_for, run, poll_s=0.01) == 1
    assert capsys.readouterr().out.rstrip().endswith("run: rank 0: downloading CIFAR-10 failed (URLError)")


STOP_AT_RENDEZVOUS = ("allconv-hpc: stopped by SIGTERM during start-up, before training (at its rendezvous); nothing "
                      "was trained or written to its checkpoints\n")
KILLED = "allconv-hpc (controller): ended by {}, without a word of its own (a kill -9, the OOM killer, a crash)\n"


@pytest.mark.parametrize("err0,err1,state,error", [
    # a Ctrl-C, or a SIGTERM, there or (logged) elsewhere in start-up: a stop, the same submit starts it again
    ("allconv-hpc: interrupted (Ctrl-C) during start-up, at its rendezvous; nothing was written to the run's "
     "checkpoints\n", STOP_AT_RENDEZVOUS, "INTERRUPTED", None),
    (STOP_AT_RENDEZVOUS, "[2026-12-06 10:00:00 WARNING rank 1] stopped by SIGTERM during start-up, before training; "
                         "nothing was trained or written to its checkpoints\n", "INTERRUPTED", None),
    # a SIGKILL: the job's failure, named, not the peer the reaper's SIGTERM then ended
    (STOP_AT_RENDEZVOUS, KILLED.format("SIGKILL") + "note: this rank ended by SIGKILL, and its job's other ranks "
     "still ran: sent SIGTERM to 12 at 30 s\n", "FAILED",
     "rank 1: ended by SIGKILL, without a word of its own (a kill -9, the OOM killer, a crash)"),
    # a rank's own error comes before the controller's word on a peer the error took down (NCCL's watchdog)
    (KILLED.format("SIGABRT"), "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                               "torch.OutOfMemoryError: CUDA out of memory\n", "FAILED",
     "rank 1: torch.OutOfMemoryError: CUDA out of memory"),
    # a logged stop followed by an error is no stop
    ("", "[2026-12-06 10:00:00 WARNING rank 1] stopped by SIGTERM during start-up, before training; nothing was "
         "trained\n[2026-12-06 10:00:01 ERROR rank 1] cannot write x\n", "FAILED", "rank 1: cannot write x")])
def test_a_local_jobs_ranks_ended_by_a_signal(tmp_path, err0, err1, state, error):
    """A cluster=local job whose ranks a signal ended with no word of their own (the controller writes one,
    localcontrol.Controller._signalled), or that logged a stop in start-up: a stop reads INTERRUPTED, not LOST
    or FAILED; a failure names the rank that failed, the controller's word only where no rank said why."""
    p = subprocess.Popen(["true"])  # the job's controller, gone
    p.wait()
    sub, job = tmp_path / "sub", str(p.pid)
    run = write_run(tmp_path / "run", None, job=job, backend="local", submitted=1.0, submitit_folder=str(sub))
    (sub / job).mkdir(parents=True)
    (sub / job / f"{job}_0_log.err").write_text(err0)
    (sub / job / f"{job}_1_log.err").write_text(err1)
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"], row["error"]) == (state, error is not None, error), row


def test_a_failed_run_whose_peer_was_lost_names_that_ranks_own_log(tmp_path, monkeypatch):
    """Rank 0's own error says only that rank 1 did not answer; what ended rank 1 (the OOM killer's SIGKILL, in
    srun's or the controller's word) is in rank 1's own .err, which the row now names (status showed rank 0's error
    alone). Named, not quoted: the same words come from a clean-up that ended a hung rank (diff review)."""
    ended_job(tmp_path, monkeypatch, "FAILED")
    sub = tmp_path / "sub"
    run = write_run(tmp_path / "run", None, job="9", submitted=1.0, submitit_folder=str(sub))
    said = "rank 0: peer rank(s) 1, 3 did not answer: died, hung or stopped (collective failed: reset by peer)"
    (run / "status.json").write_text(json.dumps({"state": "failed", "epoch": 2, "epochs": 30, "updated": 2.0,
                                                 "slurm_job_id": "9", "peer_lost": True, "error": said}))
    assert status.run_rows(run)[0]["error"] == said  # no job folder: nothing to name
    (sub / "9").mkdir(parents=True)
    for task in (0, 1, 2):
        (sub / "9" / f"9_{task}_log.err").write_text("")
    assert status.run_rows(run)[0]["error"] == (f"{said}; the lost rank's own log (srun's or the controller's word on "
                                                f"a signal that ended one): {sub / '9' / '9_1_log.err'}")


@pytest.mark.parametrize("error,failed", [(None, False), ("stopped by SIGTERM during start-up, before training; nothing "
                                                           "was trained or written to its checkpoints", True)])
def test_a_time_limit_whose_requeue_was_refused_is_a_stop_unless_it_came_in_start_up(tmp_path, monkeypatch, error,
                                                                                    failed):
    """cluster.requeue=false: the time limit's SIGTERM, taken as its lost warning, cannot requeue, and the job ends
    TIMEOUT with the run's checkpoint: the same submit resumes it (it read as a failure). One in start-up trained
    nothing, and the next start would spend its time alike: a failure, with the run's word."""
    ended_job(tmp_path, monkeypatch, "TIMEOUT")
    run = write_run(tmp_path / "run", None, job="9")
    (run / "status.json").write_text(json.dumps({"state": "interrupted", "epoch": 4, "epochs": 30, "updated": 2.0,
                                                  "slurm_job_id": "9", "error": error}))
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("TIMEOUT", failed), row
    assert (row["error"] == error) if failed else "the same submit (or train) command" in status.notes(row)[0], row


def test_the_note_of_a_stopped_sweep_point_names_the_sweeps_submit(tmp_path, no_slurm, capsys):
    """A sweep's point stopped part-way is resumed by submitting the sweep again (a lone train would need the
    point's overrides); the same point submitted on its own since, by that submit."""
    root, runs = sweep(tmp_path)
    (runs[1] / "status.json").write_text(json.dumps({"state": "interrupted", "epoch": 0, "epochs": 3}))
    assert status.status_main([str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["notes"] for r in rows] == [[], ["stopped with epoch 0/3 done (step 0); the same `submit -m` command "
                                              "(the whole sweep) starts it over: it stopped before its first checkpoint"]]
    assert status.status_main([str(runs[1])]) == 0  # asked about the point alone: its own submission.json
    assert capsys.readouterr().out.rstrip().endswith("p1: stopped with epoch 0/3 done (step 0); the same submit (or "
                                                     "train) command starts it over: it stopped before its first checkpoint")


def test_ctrl_c_in_status_is_one_line_and_130(tmp_path):
    """A Ctrl-C while squeue is asked (slow on a busy controller) was a KeyboardInterrupt traceback."""
    run = write_run(tmp_path / "run", "running")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "squeue").write_text(f"#!/bin/sh\nkill -INT $PPID\nexec {shutil.which('sleep')} 5\n")
    (bin_ / "squeue").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run([sys.executable, "-m", "allconv_hpc", "status", str(run)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stderr) == (130, "allconv-hpc status: interrupted (Ctrl-C)\n"), r.stderr


def test_wait_on_a_folder_removed_meanwhile_stops_with_one_line(tmp_path, no_slurm, capsys):
    """`submit --wait` whose sweep folder is moved away: a FileNotFoundError traceback before."""
    assert status.wait_for(tmp_path / "gone", poll_s=0) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"allconv-hpc submit: error: {tmp_path / 'gone'} does not exist") and err.rstrip().endswith(
        "stopped watching (the jobs go on)"), err


def test_a_resume_never_submission_cancelled_before_it_recorded_says_its_command_starts_over(tmp_path, monkeypatch,
                                                                                             capsys):
    """A `checkpoint.resume=never` submit scancelled in start-up, before its job wrote a record or its config: the
    note is what that submit command does again (start over, setting the checkpoints aside), not a resume."""
    ended_job(tmp_path, monkeypatch, "CANCELLED")
    run = write_run(tmp_path / "run", None, job="9", submitted=5.0, overrides=["trainer.epochs=8",
                                                                               "checkpoint.resume=never"])
    (run / "status.json").write_text(json.dumps({"state": "completed", "epoch": 8, "epochs": 8, "updated": 2.0,
                                                 "global_step": 128}))  # the earlier job's
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step_128.pt").write_bytes(b"x")
    row = status.run_rows(run)[0]
    assert row["state"] == "CANCELLED" and row["starts_over"], row
    assert any(n.startswith("stopped with epoch 8/8 done (step 128); the same submit (or train) command starts it "
                            "over again (checkpoint.resume=never sets its checkpoints aside)")
               for n in status.notes(row)), status.notes(row)


def test_a_plain_sbatch_run_that_gave_up_is_resumed_by_its_sbatch(tmp_path, no_slurm):
    """slurm/train.sbatch's run (no submission.json) that gave up after its time limits: the note names the sbatch
    that goes on with it, as for its other stops (it said `the same train command`: training on the login node)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_60.pt").write_bytes(b"x")
    (run / "status.json").write_text(json.dumps({"state": "gave_up", "epoch": 2, "epochs": 9, "global_step": 60,
                                                 "updated": 2.0, "slurm_job_id": "77"}))
    row = status.run_rows(run)[0]
    assert row["state"] == "GAVE UP" and row["started_by"] == "sbatch", row
    assert status.notes(row) == ["stopped with epoch 2/9 done (step 60), giving up: its time limit came more than "
                                 "checkpoint.max_requeues times; the same sbatch or srun (or train) command resumes "
                                 "it from its newest checkpoint, step 60 (with a longer sbatch --time, each start "
                                 "trains longer)"], status.notes(row)
    # a train in an allocation (salloc; its status.json names no job it could requeue): the allocation's --time
    (run / "status.json").write_text(json.dumps({"state": "gave_up", "epoch": 2, "epochs": 9, "global_step": 60,
                                                 "updated": 2.0}))
    row = status.run_rows(run)[0]
    assert row["started_by"] == "train" and status.notes(row)[0].endswith(
        "(with a longer allocation (--time), each start trains longer)"), status.notes(row)


@pytest.mark.parametrize("reason,never", [
    ("PartitionConfig", True), ("QOSMaxWallDurationPerJobLimit", True), ("AssocMaxNodesPerJobLimit", True),
    ("QOSMaxGRESPerJob", True), ("DependencyNeverSatisfied", True),
    ("Resources", False), ("Priority", False), ("Dependency", False), ("QOSMaxJobsPerUserLimit", False),
    ("AssocGrpCPULimit", False), ("JobArrayTaskLimit", False), ("", False)])
def test_only_reasons_that_never_clear_end_a_pending_jobs_wait(reason, never):
    """A per-job limit of a QOS or account (a job asking over it waits for good; submit cannot check them) and a
    dependency that can no longer be met end --wait; a limit that other jobs ending frees does not."""
    from allconv_hpc.jobs import never_starts
    said = never_starts(reason, "7_1")
    assert bool(said) is never, said
    if never:
        assert said.startswith(f"{reason}: ") and "scancel 7_1" in said


def test_the_submit_command_status_gives_goes_to_the_folder_it_was_run_in(tmp_path, monkeypatch):
    """Its relative values (data.root=data) are taken from where submit ran: pasted in another folder, the command
    read another data folder, or none (a status audit). From elsewhere it goes there first; from there, as typed."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # the local job's controller, ended
    where = tmp_path / "my project"
    where.mkdir()
    run = write_run(tmp_path / "runs" / "a", "interrupted", job=str(gone.pid), backend="local",
                    submitit_folder=str(tmp_path / "sub"), cwd=str(where),
                    command=["allconv-hpc", "submit", "cluster=local", "data.root=data", "hydra.run.dir=runs/a"])
    typed = f"allconv-hpc submit cluster=local data.root=data hydra.run.dir={run}"
    monkeypatch.chdir(tmp_path)
    assert status.run_rows(run)[0]["resume_command"] == f"cd '{where}' && {typed}"
    monkeypatch.chdir(where)
    assert status.run_rows(run)[0]["resume_command"] == typed
    monkeypatch.chdir(tmp_path)
    where.rename(tmp_path / "moved")  # the project moved since: a `cd` there would fail, and the command with it
    assert status.run_rows(run)[0]["resume_command"] == typed


def test_the_train_command_of_a_run_started_by_hand_has_its_ranks(tmp_path):
    """A torchrun of 2 ranks on one node is resumed by torchrun's line of 2 (one `allconv-hpc train` resumed it on
    one rank, reseeded); one over several nodes has no one line to give; one process, or a record from before
    status.json named its launch, keeps `allconv-hpc train`."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- optim.lr=0.01\n")
    tail = f"train optim.lr=0.01 hydra.run.dir={run}"
    for st, said in (({"launch": "torchrun", "ranks": 2, "nodes": 1},
                      f"torchrun --standalone --nproc_per_node=2 -m allconv_hpc {tail}"),
                     ({"launch": "torchrun", "ranks": 4, "nodes": 2}, None),
                     ({"launch": "by_hand", "ranks": 2, "nodes": 1}, None),  # RANK, WORLD_SIZE set without torchrun
                     ({"launch": "single", "ranks": 1, "nodes": 1}, f"allconv-hpc {tail}"),
                     ({}, f"allconv-hpc {tail}")):
        assert status._train_command(run, st) == said, st


def test_a_local_job_whose_controller_failed_at_its_start_is_a_failure_naming_its_log(tmp_path):
    """A controller that raised before it started a task (a module of the submit's folder shadowing one it imports:
    a cluster=local audit) read as LOST (never started), a stop to resume (exit 3), its traceback unnamed."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    sub = tmp_path / "sub"
    (sub / str(gone.pid)).mkdir(parents=True)
    (sub / str(gone.pid) / f"{gone.pid}_submission.sh").write_text("#!/bin/bash\n")  # submitted, no task started
    run = write_run(tmp_path / "run", None, job=str(gone.pid), backend="local", submitit_folder=str(sub))
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == ("LOST (never started)", False), row  # no word from it: a stop
    log = sub / f"controller-{gone.pid}.log"
    log.write_text("Traceback (most recent call last):\n  ...\nAttributeError: module 'grp' has no attribute "
                   "'getgrnam'\n")
    log.write_text("Traceback (most recent call last):\n  ...\nKeyboardInterrupt\n")  # a Ctrl-C as it started: a stop
    assert (status.run_rows(run)[0]["state"], status.run_rows(run)[0]["failed"]) == ("LOST (never started)", False)
    log.write_text("Traceback (most recent call last):\n  ...\nAttributeError: module 'grp' has no attribute "
                   "'getgrnam'\n")
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == (f"LOST (never started: its controller failed, see {log})", True), row
    assert row["error"] == "AttributeError: module 'grp' has no attribute 'getgrnam'" and status.exit_code([row]) == 1
    # so for a run submitted again (an earlier job's record in the folder): the same submit would fail alike
    (run / "status.json").write_text(json.dumps({"state": "interrupted", "epoch": 1, "epochs": 3, "updated": 1.0}))
    rec = json.loads((run / "submission.json").read_text())
    (run / "submission.json").write_text(json.dumps({**rec, "submitted": 2.0}))
    row = status.run_rows(run)[0]
    assert (row["state"], row["failed"]) == (f"LOST (never started: its controller failed, see {log})", True), row


def test_a_sweep_point_resubmitted_otherwise_narrows_the_command_given_for_the_others(tmp_path, no_slurm, capsys):
    """seed=1,2 submitted with trainer.epochs=20; seed=1 stopped and submitted again with trainer.epochs=4 (done);
    seed=2 stopped later. The first command, given for seed=2, would also grow seed=1 to 20 epochs: it is given
    for seed=2 alone (seed=choice(2), the same point folder). A sweep submitted once keeps its one command."""
    root = tmp_path / "sweep"
    first = ["allconv-hpc", "submit", "-m", "cluster=local", "trainer.epochs=20", "seed=1,2", f"hydra.sweep.dir={root}"]
    again = ["allconv-hpc", "submit", "-m", "cluster=local", "trainer.epochs=4", "seed=1,2", f"hydra.sweep.dir={root}"]
    recs = []
    for seed, command, state in ((1, again, "completed"), (2, first, "interrupted")):
        run = write_run(root / f"seed={seed}", None, job=str(40 + seed), backend="local", command=command,
                        overrides=["cluster=local", f"trainer.epochs={command[4].split('=')[1]}", f"seed={seed}"])
        (run / "status.json").write_text(json.dumps({"state": state, "epoch": 2, "epochs": 4 if seed == 1 else 20}))
        recs.append(json.loads((run / "submission.json").read_text()))
    (root / "sweep.json").write_text(json.dumps({"sweep_dir": str(root), "jobs": recs}))
    rows = {r["folder"]: r for r in status.run_rows(root)}
    narrowed = shlex.join([*first[:5], "seed=choice(2)", f"hydra.sweep.dir={root}"])
    assert rows["seed=2"]["resume_command"] == narrowed, rows["seed=2"]
    recs[0]["command"] = first  # one command for both: given as it was typed
    (root / "sweep.json").write_text(json.dumps({"sweep_dir": str(root), "jobs": recs}))
    assert status.run_rows(root)[1]["resume_command"] == shlex.join(first)


def test_a_run_half_set_aside_says_the_next_start_finishes_that_and_starts_over(tmp_path, no_slurm, capsys):
    """checkpoints/ still holds the old run's step files and the set-aside's marker (a resume=never start stopped as
    it moved the run's files in): the next start trains anew, so no checkpoint is offered as the resume point."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004.pt").write_bytes(b"x")
    (run / "status.json").write_text(json.dumps({"state": "interrupted", "epoch": 2, "epochs": 4, "global_step": 4}))
    row = status.run_rows(run)[0]
    assert row["checkpoint_step"] == 4 and "resumes it from its newest checkpoint" in status.notes(row)[0]
    (run / "checkpoints" / ".setting-aside").touch()
    row = status.run_rows(run)[0]
    assert row["checkpoint_step"] is None and row["half_aside"], row
    assert status.notes(row)[0].endswith("finishes setting its old run aside (a start with checkpoint.resume=never "
                                         "was stopped doing it) and starts it over"), status.notes(row)

"""DDP on CPU with gloo and real processes: equivalence with one process, exact sharding, exact
evaluation, a killed rank, and the uneven-batch error."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from proc import (PY, TINY, assert_same_history, assert_same_weights, clean_env, final_weights, history, run_train,
                  start_ranks, train_cmd, wait_for_line)

# dropout off: each rank draws its own dropout masks, so with dropout on the runs differ (see README);
# augmentation stays on: it is a pure function of (seed, epoch, sample), so sharding cannot change it.
EQUIV = TINY + ["model.dropout=false", "data.augment=paper", "trainer.batch_size=60"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp1")
    run_train(tmp, tmp / "run", EQUIV)
    return tmp / "run"


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_match_one_process(one_rank, tmp_path, world):
    r = run_train(tmp_path, tmp_path / "run", EQUIV + ["wandb.mode=offline"], nproc=world)
    h1, hn = history(one_rank), history(tmp_path / "run")
    assert_same_history(hn, h1, exact=False)
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(one_rank), exact=False)
    log = (tmp_path / "run" / "train.log").read_text()
    # every training image once per epoch across ranks (300 = 5 steps of 60), the whole test split once
    assert log.count("(300 images) | val loss") == 2, log[-2000:]
    val_counts = re.findall(r"val loss [\d.]+ acc [\d.]+ \((\d+) images\)", log)
    assert val_counts == ["101", "101"], log[-2000:]
    # 101 test images over 2 or 3 ranks: the reported accuracy is k/101 exactly
    for row in hn:
        assert abs(row["val_acc"] * 101 - round(row["val_acc"] * 101)) < 1e-9
    # only rank 0 writes: one summary, one set of epoch lines; other ranks print warnings only
    assert log.count("total parameters") == 1
    assert (r.stdout + r.stderr).count("total parameters") == 1
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1  # one W&B run, rank 0's
    tagged = [line for line in (r.stdout + r.stderr).splitlines() if re.search(r" rank \d+\]", line)]
    assert all(re.search(r"(WARNING|ERROR) rank [1-9]\d*\]", line) for line in tagged), tagged


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compiled_ranks_compile_and_match_one_process(one_rank, tmp_path):
    """trainer.compile=true with DDP really compiles (torch.compile(DDP(Sequential)) captured no
    graph and ran eagerly, unnoticed) and trains as the eager single process does."""
    r = run_train(tmp_path, tmp_path / "run", EQUIV + ["trainer.compile=true", "trainer.epochs=1"], nproc=2,
                  timeout=900)
    log = (tmp_path / "run" / "train.log").read_text()
    graphs = re.findall(r"torch.compile: (\d+) graph\(s\) compiled", log)
    assert graphs and int(graphs[0]) >= 1, log[-2000:]
    assert "captured no graph" not in r.stdout + r.stderr
    a, b = history(one_rank)[0], history(tmp_path / "run")[0]
    for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-4), (k, a, b)


def test_uneven_batch_is_refused(tmp_path):
    procs = start_ranks(tmp_path, tmp_path / "run", TINY + ["trainer.batch_size=64"], world=3)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 2, out
        assert "Traceback" not in out, out
    assert "trainer.batch_size=64 is not divisible by the world size 3; use a multiple of 3" in outs[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def signal_rank_1(tmp_path, sig: int, timeout_s: int) -> tuple[int, str, float]:
    """Two ranks; once training runs, send `sig` to rank 1. Rank 0's exit code, output and seconds to exit."""
    run = tmp_path / "run"
    ov = TINY + ["trainer.epochs=200", f"dist.timeout_s={timeout_s}", "checkpoint.every_steps=null"]
    procs = start_ranks(tmp_path, run, ov, world=2)
    try:
        wait_for_line(run / "train.log", "epoch 2 step", timeout=120, proc=procs[0])
        procs[1].send_signal(sig)
        t0 = time.time()
        out, _ = procs[0].communicate(timeout=90)
        return procs[0].returncode, out, time.time() - t0
    finally:
        for p in procs:
            p.kill()


def test_killed_rank_fails_the_others_within_timeout(tmp_path):
    code, out, waited = signal_rank_1(tmp_path, signal.SIGKILL, timeout_s=20)
    assert code not in (0, None)
    assert waited < 20 + 15, f"survivor took {waited:.0f} s"
    # killed without a word (the OOM killer): it reported nothing, so the roll call names it
    assert "peer rank(s) 1 did not answer" in out, out[-2000:]
    st = json.loads((tmp_path / "run" / "status.json").read_text())  # `allconv-hpc status` must not say running
    assert st["state"] == "failed" and "peer rank(s) 1 did not answer" in st["error"], st
    assert st["peer_lost"] is True, st  # status says what resumes it
    r = subprocess.run([PY, "-m", "allconv_hpc", "status", str(tmp_path / "run")], env=clean_env(tmp_path),
                       capture_output=True, text=True, timeout=60)
    # as many ranks as before (one `allconv-hpc train`, as said before, resumed it on one: not exactly); ranks
    # started by hand, as here, have no one line (torchrun's: tests/test_status_files.py)
    assert r.returncode == 1 and re.search(r"the same launch of its 2 ranks, with the same overrides, resumes it from "
                                           r"its newest checkpoint, step \d+$", r.stdout.rstrip()), r.stdout


def test_a_rank_that_raises_fails_the_others_naming_it(tmp_path):
    run = tmp_path / "run"
    ov = TINY + ["trainer.epochs=200", "dist.timeout_s=20", "checkpoint.every_steps=null"]
    procs = start_ranks(tmp_path, run, ov, world=2, entry=(str(Path(__file__).with_name("fault_rank.py")),),
                        FAIL_RANK=1, FAIL_STEP=7)
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode not in (0, None) and "injected failure at global step 7" in outs[1], outs[1][-2000:]
    assert procs[0].returncode == 1, outs[0][-2000:]
    assert "peer rank 1 failed: RuntimeError: injected failure at global step 7" in outs[0], outs[0][-2000:]
    assert "Traceback" not in outs[0]  # the survivor explains in one line; the failing rank has the traceback
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "failed" and "injected failure at global step 7" in st["error"], st


def test_a_rank_killed_in_the_epoch_end_save_leaves_status_at_the_saved_epoch(tmp_path):
    """The epoch's row and checkpoint never land when a peer dies inside the save's collectives: status.json (and
    `status`) say the epoch before, as the resume will start, not the one that was lost."""
    run = tmp_path / "run"  # TINY: 5 steps per epoch; rank 1 dies entering epoch 2's save (global step 10)
    ov = TINY + ["trainer.epochs=3", "dist.timeout_s=20", "checkpoint.every_steps=null"]
    procs = start_ranks(tmp_path, run, ov, world=2, entry=(str(Path(__file__).with_name("fault_rank.py")),),
                        FAIL_RANK=1, FAIL_STEP=10, FAIL_AT="epoch_end_save")
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -signal.SIGKILL and procs[0].returncode == 1, outs[0][-2000:]
    assert "epoch 2/3:" in outs[0], outs[0][-2000:]  # scored, then lost in the save
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "failed" and "peer rank" in st["error"], st
    assert [r["epoch"] for r in history(run)] == [1], history(run)
    assert (st["epoch"], st["global_step"], st["step_in_epoch"]) == (1, 5, 0), st  # epoch 1's checkpoint
    assert st["last_val_acc"] == history(run)[0]["val_acc"], st
    r = subprocess.run([PY, "-m", "allconv_hpc", "status", str(run)], env=clean_env(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert "epoch 1/3" in r.stdout and "from its newest checkpoint, step 5" in r.stdout, r.stdout


def test_a_process_killed_while_its_checkpoint_is_written_leaves_status_at_the_saved_epoch(tmp_path):
    """status.json is written once the save it describes has landed: killed while the epoch's checkpoint was in
    flight, it names the epoch before (where the resume starts), not the one whose checkpoint never landed."""
    run = tmp_path / "run"  # TINY: 5 steps per epoch; the process is killed writing epoch 2's (global step 10)
    [p] = start_ranks(tmp_path, run, TINY + ["trainer.epochs=3", "checkpoint.every_steps=null"], world=1,
                      entry=(str(Path(__file__).with_name("fault_rank.py")),), FAIL_RANK=0, FAIL_STEP=10,
                      FAIL_AT="checkpoint_write")
    try:
        out = p.communicate(timeout=120)[0]
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL and "epoch 2/3:" in out, out[-2000:]
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "running" and (st["epoch"], st["global_step"]) == (1, 5), st
    assert [r["epoch"] for r in history(run)] == [1]
    r = subprocess.run([PY, "-m", "allconv_hpc", "status", str(run)], env=clean_env(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert "epoch 1/3 done (step 5)" in r.stdout and "from its newest checkpoint, step 5" in r.stdout, r.stdout


def test_ranks_that_composed_different_runs_refuse_to_start_naming_the_key(tmp_path):
    """Each rank composes the overrides itself: one whose config or run folder resolved otherwise (a ${now:...}
    folder, an ${oc.env:...} set otherwise on another node) would train, or resume, another run. Every rank
    refuses, naming the key, before the data or a checkpoint is read; a node's own data.root is allowed."""
    run = tmp_path / "run"
    for own, said in (([[], ["data.root=/elsewhere"]], None),  # a node's local copy of the data: fine
                      ([["optim.lr=0.05"], ["optim.lr=0.1"]], "rank 1 has optim.lr=0.1 where rank 0 has 0.05"),
                      ([[], [f"hydra.run.dir={tmp_path / 'other'}"]],
                       f"rank 1 has hydra.run.dir='{tmp_path / 'other'}' where rank 0 has '{run}'")):
        procs = start_ranks(tmp_path, run, TINY + ["trainer.epochs=1", "data.root=/data"], world=2,
                            rank_overrides=own)
        try:
            outs = [p.communicate(timeout=120)[0] for p in procs]
        finally:
            for p in procs:
                p.kill()
        if said is None:
            assert [p.returncode for p in procs] == [0, 0], outs
            shutil.rmtree(run)
            continue
        for p, out in zip(procs, outs):
            assert p.returncode == 2, out[-2000:]
            assert f"the ranks composed different runs: {said}" in out, out[-2000:]
        assert {p.name for p in run.iterdir()} <= {"train.log", ".train.lock"}  # no checkpoint, no history
        assert not (tmp_path / "other").exists()


def test_ranks_reading_other_images_refuse_to_start(tmp_path):
    """Each node may read its own copy (data.root on its disk): an exact copy trains; a copy of other images (a
    stale or rebuilt one on one node) would train the ranks on different data, silently. Every rank refuses."""
    import torch
    from allconv_hpc import data

    def cifar(folder: Path, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (160, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (160,), generator=g)
        data.write_cifar(folder, "cifar10", x[:120], y[:120], x[120:], y[120:], [f"c{i}" for i in range(10)])
    cifar(tmp_path / "a", 0)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    cifar(tmp_path / "b", 1)
    ov = [o for o in TINY if not o.startswith("data.")] + ["data=cifar10", "trainer.epochs=1"]
    for other, code in (("copy", 0), ("b", 2)):
        run = tmp_path / f"run-{other}"
        procs = start_ranks(tmp_path, run, ov, world=2,
                            rank_overrides=[[f"data.root={tmp_path / 'a'}"], [f"data.root={tmp_path / other}"]])
        try:
            outs = [p.communicate(timeout=120)[0] for p in procs]
        finally:
            for p in procs:
                p.kill()
        assert [p.returncode for p in procs] == [code, code], outs
        if code:
            for out in outs:
                assert ("rank(s) 1 read other images than rank 0 (their train, test split differs; data.root="
                        in out and "every rank must read the same dataset; give each node an exact copy" in out), out
            assert not (run / "checkpoints").exists()


def test_data_download_is_one_per_folder_also_where_a_node_reads_its_own(tmp_path):
    """data.download=true under DDP: rank 0 downloads into its data.root while the others wait; a node whose root
    is its own disk (here ranks 1 and 2, one node, another root) downloads once, by its first rank, not once per
    rank into the same folder at the same time (an archive written twice over). The download is a stand-in."""
    log = tmp_path / "downloads.log"
    ov = [o for o in TINY if not o.startswith("data.")] + ["data=cifar10", "data.download=true", "trainer.epochs=1"]
    roots = [tmp_path / "a", tmp_path / "b", tmp_path / "b"]
    procs = start_ranks(tmp_path, tmp_path / "run", ov, world=3, entry=(str(Path(__file__).parent / "stub_download.py"),),
                        rank_overrides=[[f"data.root={r}"] for r in roots], local_ranks=[0, 0, 1], DOWNLOAD_LOG=log)
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    calls = log.read_text().splitlines()
    assert sorted(calls) == sorted([f"start 0 {roots[0]}", f"end 0 {roots[0]}", f"start 1 {roots[1]}",
                                    f"end 1 {roots[1]}"]), calls
    assert calls.index(f"end 0 {roots[0]}") < calls.index(f"start 1 {roots[1]}"), calls  # in turn: a shared root
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "completed"


def test_a_download_longer_than_the_collective_timeout_or_failing_on_one_node_is_said_by_every_rank(tmp_path):
    """The others waited for it in one barrier, bounded by dist.timeout_s: a download longer than that failed a
    healthy run, each rank blaming a lost peer; and one that failed on a node was said by its rank alone, the
    others naming a lost connection (found by a code review). Now they ask every few seconds (a third of
    dist.timeout_s if less: an interval of 10 s here, which a timeout of 3 s failed), and say its error."""
    log = tmp_path / "downloads.log"
    ov = [o for o in TINY if not o.startswith("data.")] + ["data=cifar10", "data.download=true", "trainer.epochs=1",
                                                           "dist.timeout_s=3"]
    entry = (str(Path(__file__).parent / "stub_download.py"),)
    procs = start_ranks(tmp_path, tmp_path / "slow", ov, world=2, entry=entry, DOWNLOAD_LOG=log, DOWNLOAD_SECONDS=8,
                        DOWNLOAD_POLL_S=10, rank_overrides=[[f"data.root={tmp_path / 'a'}"]] * 2)
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(log.read_text().splitlines()) == 2  # rank 0's download, once
    # rank 1, the first of another node with its own root, fails its download: both ranks say why, exit 2
    procs = start_ranks(tmp_path, tmp_path / "fails", ov, world=2, entry=entry, DOWNLOAD_LOG=log, DOWNLOAD_FAILS=1,
                        rank_overrides=[[f"data.root={tmp_path / 'a'}"], [f"data.root={tmp_path / 'b'}"]],
                        local_ranks=[0, 0])
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    said = f"downloading CIFAR-10 into {tmp_path / 'b'} failed (URLError: no route to host)"
    assert f"rank 1's download failed: {said}" in outs[0] and said in outs[1], outs
    assert not any("did not answer" in out or "unreachable" in out for out in outs), outs


@pytest.mark.parametrize("world", [1, 2])
def test_a_sigterm_during_a_download_stops_the_start_at_once(tmp_path, world):
    """A preemption's SIGTERM while rank 0 downloads (here to the rank that waits for it; alone, to the one
    process): the start ends now, as an interruption, not when the download is done, after the grace time."""
    log = tmp_path / "downloads.log"
    ov = [o for o in TINY if not o.startswith("data.")] + ["data=cifar10", "data.download=true",
                                                           f"data.root={tmp_path / 'a'}"]
    procs = start_ranks(tmp_path, tmp_path / "run", ov, world=world, entry=(str(Path(__file__).parent /
                        "stub_download.py"),), DOWNLOAD_LOG=log, DOWNLOAD_SECONDS=120)
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and "start 0" in log.read_text()):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.1)
        time.sleep(1)
        t0 = time.monotonic()
        procs[-1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=60)[0] for p in procs]
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [3] * world and waited < 30, (waited, outs)
    assert "stopped by SIGTERM during start-up, before training" in outs[-1], outs[-1][-2000:]
    assert world == 1 or "stopped by a peer's signal during start-up" in outs[0], outs[0][-2000:]
    assert "end 0" not in log.read_text()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "interrupted"


def test_a_hung_rank_fails_the_others_within_the_timeout(tmp_path):
    """A rank that stops answering but keeps its connections (SIGSTOP: a hang, a stuck file system):
    only the collective timeout can catch it."""
    code, out, waited = signal_rank_1(tmp_path, signal.SIGSTOP, timeout_s=10)
    assert code == 1, out[-2000:]
    assert 5 < waited < 10 + 20, f"survivor took {waited:.0f} s with dist.timeout_s=10"
    assert "peer rank(s) 1 did not answer" in out, out[-2000:]


def test_a_rendezvous_port_held_by_another_program_is_named_with_the_fix(tmp_path):
    """cluster=local's rank 0 finds its port (the one `submit` picked) taken: one line says so and how
    to get another, at once, instead of a rendezvous timeout."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        r = subprocess.run(train_cmd(tmp_path / "run", TINY), capture_output=True, text=True, timeout=120,
                           env=clean_env(tmp_path, SUBMITIT_LOCAL_JOB_ID="4242", SUBMITIT_LOCAL_GLOBALID="0",
                                         SUBMITIT_LOCAL_LOCALID="0", SUBMITIT_LOCAL_NTASKS="2",
                                         ALLCONV_LOCAL_PORT=port))
    assert r.returncode == 1, r.stderr[-2000:]
    assert (f"rank 0: port 127.0.0.1:{port} is already in use on this node (another job or program holds it); "
            f"submit again: it picks a free port") in (tmp_path / "run" / "train.log").read_text()


def test_a_rank_of_another_job_on_the_same_port_does_not_join_the_world(tmp_path):
    """Two jobs' ids may map to one rendezvous port (Slurm: ids 22768 apart; or a port picked free and taken
    since): the second job's rank 1 reaches the first's store. Its keys are its own job's, so it waits for its own
    peers and times out, and the first job trains with its own rank 1; it made one world of both, which each
    refused as a mix of runs (the innocent job failed too)."""
    from proc import free_port, wait_listening
    port = free_port()

    def rank(job: str, r: int, run: Path, timeout_s: int) -> subprocess.Popen:
        return subprocess.Popen(train_cmd(run, TINY + [f"dist.timeout_s={timeout_s}"]), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env=clean_env(tmp_path, SUBMITIT_LOCAL_JOB_ID=job, SUBMITIT_LOCAL_GLOBALID=r,
                                              SUBMITIT_LOCAL_LOCALID=r, SUBMITIT_LOCAL_NTASKS=2,
                                              ALLCONV_LOCAL_PORT=port))
    first = rank("1001", 0, tmp_path / "first", 120)
    procs = [first]
    try:
        wait_listening(first, port)
        stray = rank("2002", 1, tmp_path / "second", 8)
        procs.append(stray)
        out, _ = stray.communicate(timeout=120)
        assert stray.returncode != 0 and "rank 1: rendezvous with 2 ranks at 127.0.0.1:" in out, out[-2000:]
        assert first.poll() is None  # still waiting for its own rank 1
        own = rank("1001", 1, tmp_path / "first", 120)
        procs.append(own)
        out, _ = first.communicate(timeout=240)
        assert own.wait(timeout=60) == 0 and first.returncode == 0, out[-2000:]
    finally:
        for p in procs:
            p.kill()
    assert json.loads((tmp_path / "first" / "status.json").read_text())["state"] == "completed"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_rank_waiting_for_its_peers_stops_at_once_on_a_signal(tmp_path, sig):
    """Rank 0 waits at the rendezvous for a rank that never comes: kill (or Ctrl-C) ends it at once, not
    after dist.timeout_s; nothing was trained since this start, so nothing is lost."""
    from proc import free_port, wait_listening
    run, port = tmp_path / "run", free_port()
    p = subprocess.Popen(train_cmd(run, TINY + ["dist.timeout_s=120"]), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env=clean_env(tmp_path, RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=2,
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    try:
        wait_listening(p, port)  # into the rendezvous (its signals were set to stop at once before)
        t0 = time.monotonic()
        p.send_signal(sig)
        p.wait(timeout=30)
        waited = time.monotonic() - t0
    finally:
        p.kill()
    assert p.returncode == -sig and waited < 10, (p.returncode, waited, p.stdout.read()[-2000:])


def test_a_sigterm_before_the_rendezvous_ends_the_start_there_not_after_the_timeout(tmp_path):
    """A SIGTERM in start-up before the rendezvous (imports, the compiler check, the lock) was only recorded, for
    the first safe point after the rendezvous, which a missing peer never lets come: the rank waited out
    dist.timeout_s and failed (torchrun's SIGTERM after another rank failed: 30 s, then its SIGKILL). Here the
    signal lands while a slow $CXX --version runs (trainer.compile's check, before the run lock)."""
    from proc import free_port
    run, port, marker = tmp_path / "run", free_port(), tmp_path / "in-cxx"
    cxx = tmp_path / "slow-g++"
    cxx.write_text(f"#!/bin/sh\ntouch {marker}\nsleep 2\nexec {shutil.which('g++')} \"$@\"\n")
    cxx.chmod(0o755)
    p = subprocess.Popen(train_cmd(run, TINY + ["dist.timeout_s=60", "trainer.compile=true"]),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=clean_env(tmp_path, RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=2,
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, CXX=cxx))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=90)
        waited = time.monotonic() - t0
    finally:
        p.kill()
    assert p.returncode == 3 and waited < 30, (p.returncode, waited, out[-2000:])
    assert "stopped by SIGTERM during start-up, before training" in out and "rendezvous" not in out, out[-2000:]
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"  # status: a stop, not a failure


def test_a_rendezvous_timeout_says_how_long_it_waited(tmp_path):
    """A rank that never comes: rank 0 gives up after dist.timeout_s and says how long it waited."""
    from proc import free_port
    r = subprocess.run(train_cmd(tmp_path / "run", TINY + ["dist.timeout_s=3"]), capture_output=True, text=True,
                       timeout=120, env=clean_env(tmp_path, RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=2,
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()))
    out = r.stdout + r.stderr
    said = re.search(r"rank 0: rendezvous with 2 ranks at 127.0.0.1:\d+ failed after (\d+) s \(dist.timeout_s=3; ", out)
    assert r.returncode != 0 and said and 3 <= int(said.group(1)) <= 10, out[-2000:]
    # a hand start in a shell holding another launch's variables waits for peers that never come: said where from
    assert ("the world size came from WORLD_SIZE, and torchrun did not start this process: started by hand in a "
            "shell that holds it? unset RANK and WORLD_SIZE, or start with torchrun") in out, out[-2000:]
    # ...and said as the wait begins, not only after dist.timeout_s (300 s by default) of silence
    waiting = re.search(r"WARNING\] rank 0: still waiting for 2 ranks at 127.0.0.1:\d+ \(up to dist.timeout_s=3 s\); "
                        r"the world size came from WORLD_SIZE", out)
    assert waiting and waiting.start() < said.start(), out[-2000:]
    assert re.search(r"INFO\] waiting up to 3 s \(dist.timeout_s\) for 2 ranks at 127.0.0.1:\d+ \(RANK and WORLD_SIZE, "
                     r"not torchrun\)", out)  # no torchrun started it (from a laptop audit)


def _signal_worker(cmd: list[str], run: Path, after: str, sig: int, tmp_path: Path) -> tuple[int, str]:
    """Runs the torchrun command `cmd`, sends `sig` to its worker of rank 1 once train.log says `after`, and
    returns torchrun's exit status and output."""
    p = subprocess.Popen(cmd, env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(run / "train.log", after, timeout=120, proc=p)
        pid = _worker_pid(1, run)
        assert pid, "no torchrun worker of rank 1"
        os.kill(pid, sig)
        out, _ = p.communicate(timeout=240)
    finally:
        p.kill()
    return p.returncode, out


def _worker_pid(rank: int, run: Path) -> int | None:
    """The pid of this run's torchrun worker of `rank` (its environment names it)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env, cmd = environ.read_bytes().split(b"\0"), (environ.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"allconv_hpc" in cmd and str(run).encode() in cmd:  # not the agent
            return int(environ.parent.name)
    return None


@pytest.mark.parametrize("sig, code, says, why", [
    (signal.SIGINT, "130", "stopped with peer rank 1, which was interrupted (Ctrl-C) during start-up",
     "interrupted (Ctrl-C) in start-up or during a stop (exit 130)"),
    # SIGTERM (scancel): both ranks end the start at the same safe point (trainer._stop_if_asked)
    (signal.SIGTERM, "3", "stopped by a peer's signal during start-up, before training",
     "not a failure: stopped on a signal (exit 3)")])
def test_a_signal_to_one_torchrun_rank_in_set_up_interrupts_the_run(tmp_path, sig, code, says, why):
    """torchrun, 2 ranks: a Ctrl-C (or SIGTERM) to rank 1 after the rendezvous, before training (the whitening fit),
    stops rank 0 as an interruption too: its line names no error, it exits as rank 1 does, and status reads the run
    INTERRUPTED, not FAILED ("peer rank 1 failed")."""
    run = tmp_path / "run"
    p = subprocess.Popen(train_cmd(run, TINY + ["trainer.epochs=1", "data.preprocess=gcn_zca"], nproc=2),
                         env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(run / "train.log", "rank 0/2 joined", timeout=120, proc=p)
        pid = _worker_pid(1, run)
        assert pid, "no torchrun worker of rank 1"
        time.sleep(0.5)  # past the rendezvous (where a signal ends a rank at once), in the fit of seconds
        os.kill(pid, sig)
        out, _ = p.communicate(timeout=120)
    finally:
        p.kill()
    log = (run / "train.log").read_text()
    assert "training synthetic" not in log and " ERROR] " not in log, log[-2000:]
    assert says in log, log[-2000:]
    codes = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s+exitcode\s*: (-?\d+)", out))
    assert codes == {"0": code, "1": code}, out[-3000:]
    # torchrun's report says why, where it would say "To enable traceback see: ..." for any non-zero exit
    assert f"traceback : {why}" in out, out[-3000:]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())  # nothing trained
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "interrupted", st
    rows = subprocess.run([PY, "-m", "allconv_hpc", "status", "--json", str(run)], env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    row = json.loads(rows.stdout)[0]
    assert rows.returncode == 0 and (row["state"], row["failed"]) == ("INTERRUPTED", False), rows.stdout


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_after_a_worker_dies(one_rank, tmp_path):
    """torchrun --max-restarts=1: rank 1 SIGKILLed mid-training; torchrun restarts both workers, which join a
    fresh rendezvous (keys of their own attempt: torch 2.14's gloo otherwise dials the dead attempt's ports),
    resume from the newest checkpoint and end where the one-process run ends."""
    run = tmp_path / "run"
    cmd = train_cmd(run, EQUIV + ["checkpoint.every_steps=2", "dist.timeout_s=30"], nproc=2)
    cmd.insert(cmd.index("--standalone") + 1, "--max-restarts=1")
    code, out = _signal_worker(cmd, run, "(global 5)", signal.SIGKILL, tmp_path)
    assert code == 0, out[-3000:]
    log = (run / "train.log").read_text()
    assert "resumed from" in log, log[-3000:]
    assert [r["epoch"] for r in history(run)] == [r["epoch"] for r in history(one_rank)]
    assert_same_weights(final_weights(run), final_weights(one_rank), exact=False)


def test_torchruns_report_says_a_stop_with_a_checkpoint_is_no_failure(tmp_path):
    """torchrun reports any non-zero worker exit as FAILED, with "To enable traceback see: ..." in place of a
    traceback; a worker that stopped on a signal with a checkpoint (exit 3) says there that it did."""
    run = tmp_path / "run"
    _, out = _signal_worker(train_cmd(run, TINY + ["trainer.epochs=1000", "trainer.progress=log",
                                                   "trainer.log_every_steps=1"], nproc=2),
                            run, "(global 3)", signal.SIGTERM, tmp_path)
    codes = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s+exitcode\s*: (-?\d+)", out))
    assert set(codes.values()) == {"3"}, out[-3000:]
    assert "traceback : not a failure: stopped on a signal (exit 3); the same command resumes" in out
    assert "To enable traceback see" not in out, out[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"


def test_torchruns_report_names_a_config_refused_before_any_work(tmp_path):
    """A bad config under torchrun: its report, where a traceback would be, says why (it said "To enable
    traceback see: ..." and error_file <N/A>, after each worker's own line)."""
    run = tmp_path / "run"
    r = subprocess.run(train_cmd(run, TINY + ["trainer.batch_size=3"], nproc=2), env=clean_env(tmp_path),
                       capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "To enable traceback see" not in out, out[-3000:]
    for rank in (0, 1):
        assert (f"traceback : refused before any work (exit 2): rank {rank}: trainer.batch_size=3 is not divisible by "
                f"the world size 2; use a multiple of 2") in out, out[-3000:]

"""Preemption safety with real processes and real signals: interrupted-and-resumed runs end bitwise
where uninterrupted runs end; corrupt checkpoints fall back; NaN never overwrites a good checkpoint."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from allconv_hpc.checkpoint import CheckpointDir, load_file
from allconv_hpc.wandb_offline import merged_history, read_run, segments
from proc import (PY, TINY, TORCHRUN, assert_same_history, assert_same_weights, clean_env, final_weights, history,
                  run_train, start_ranks, train_cmd, wait_for_line)

# 3 epochs x 5 steps, dropout ON (its RNG state is checkpointed), augmentation on, deterministic
EXACT = TINY + ["trainer.epochs=3", "trainer.deterministic=true", "data.augment=paper", "data.test_size=400",
                "trainer.eval_batch_size=20", "checkpoint.every_steps=4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    run_train(tmp, tmp / "run", EXACT + ["wandb.mode=offline"])
    return tmp / "run"


def interrupt_at(tmp: Path, run: Path, overrides: list[str], needle: str, sig: int, **env) -> subprocess.Popen:
    """Start a run, send `sig` when `needle` shows in its log, wait for it to exit. `env`: more variables."""
    log_now = run / "train.log"
    start = log_now.stat().st_size if log_now.exists() else 0  # an earlier start's lines do not count
    # SIGHUP as in a terminal session: a test runner started under nohup (or in the background) would pass on
    # its ignored SIGHUP, which the trainer then rightly leaves ignored
    p = subprocess.Popen(train_cmd(run, overrides), env=clean_env(tmp, **env), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        wait_for_line(run / "train.log", needle, timeout=120, proc=p, offset=start)
        p.send_signal(sig)
        out, _ = p.communicate(timeout=120)
    finally:
        p.kill()
    p.output = out
    return p


def stop_inside_eval(tmp: Path, overrides: list[str], needle: str, step: int) -> Path:
    """A run stopped (SIGUSR2 when `needle` is logged) inside an evaluation at global `step`."""
    for attempt in range(3):  # the timing is the OS's: retry the rare miss rather than accept it
        run = tmp / f"run{attempt}"
        p = interrupt_at(tmp, run, overrides, needle, signal.SIGUSR2)
        assert p.returncode == 3, p.output[-3000:]
        if f"during evaluation at global step {step}" in (run / "train.log").read_text():
            return run
    raise AssertionError(f"the signal never landed inside the evaluation at step {step} in 3 attempts")


@pytest.mark.parametrize("sig,seed", [(signal.SIGUSR2, 0), (signal.SIGTERM, 1), (signal.SIGINT, 2),
                                      (signal.SIGUSR2, 3), (signal.SIGHUP, 5)])
def test_signal_mid_training_then_resume_is_bitwise_exact(reference, tmp_path, sig, seed):
    rng = random.Random(seed)
    run = tmp_path / "run"
    stops = sorted(rng.sample(range(1, 15), 2))  # two interruptions at random global steps (not adjacent: the
    # lagged stop poll stops a step late, and the resumed run would never log the second one)
    for step in stops:
        if (run / "status.json").exists() and '"completed"' in (run / "status.json").read_text():
            break
        p = interrupt_at(tmp_path, run, EXACT + ["wandb.mode=offline"], f"(global {step})", sig)
        assert p.returncode == 3, p.output[-3000:]  # stopped with a checkpoint, not requeued (no Slurm)
        assert "checkpoint saved" in p.output
        # a first Ctrl-C is answered at once (a step may take seconds); other signals are the cluster's, logged
        assert ("allconv-hpc: Ctrl-C: stopping after the next step, with a checkpoint (Ctrl-C again stops at once, "
                "without one)" in p.output) == (sig == signal.SIGINT), p.output[-3000:]
        said = re.search(r"interrupted at global step \d+ \((epoch \d, step \d/\d; |epoch \d trained, not yet scored; )?"
                         r"(\d)/(\d) epochs done\): the run stops with its checkpoint; the same "
                         r"command resumes it from this checkpoint", p.output)
        assert said, p.output[-3000:]
        st = json.loads((run / "status.json").read_text())  # the log counts epochs done as status does
        assert (int(said[2]), int(said[3])) == (st["epoch"], st["epochs"]), (said[0], st)
    run_train(tmp_path, run, EXACT + ["wandb.mode=offline"])
    assert_same_weights(final_weights(run), final_weights(reference), exact=True)
    assert_same_history(history(run), history(reference), exact=True)
    # W&B: one run id, segments with contiguous, non-overlapping steps
    steps = [r["_step"] for r in merged_history(run / "wandb", (run / "wandb_id.txt").read_text().strip())]
    assert steps == list(range(1, 17)), steps  # the last eval is logged at step 16


def test_sighup_is_ignored_under_nohup(reference, tmp_path):
    """nohup (SIGHUP ignored) asks to outlive the terminal: the run goes on to the end."""
    run = tmp_path / "run"
    p = subprocess.Popen(train_cmd(run, EXACT), env=clean_env(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        wait_for_line(run / "train.log", "(global 3)", timeout=120, proc=p)
        p.send_signal(signal.SIGHUP)
        out, _ = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 0 and "done: best val_acc" in out, out[-3000:]
    assert_same_history(history(run), history(reference), exact=True)


def test_a_second_writer_is_refused_and_status_follows_the_first(tmp_path):
    """Two processes training into one folder would interleave it: a second `train` or a `submit` is refused
    naming the first; `status` shows a hand-started run RUNNING while it runs and LOST once killed hard."""
    run = tmp_path / "run"
    ov = TINY + ["trainer.epochs=200", "checkpoint.every_steps=2"]
    first = subprocess.Popen(train_cmd(run, ov), env=clean_env(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    cli = lambda *a: subprocess.run([PY, "-m", "allconv_hpc", *a], env=clean_env(tmp_path),  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    try:
        wait_for_line(run / "train.log", "(global 4)", timeout=120, proc=first)
        before = (run / "history.csv").read_bytes() if (run / "history.csv").exists() else None
        second = run_train(tmp_path, run, ov, check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is being trained into by pid {first.pid} on " in second.stderr, second.stderr[-2000:]
        sub = cli("submit", "cluster=local", *ov, f"hydra.run.dir={run}")
        assert sub.returncode == 2 and f"pid {first.pid}" in sub.stderr, sub.stderr
        assert not (run / "submission.json").exists()
        st = cli("status", str(run), "--json")
        assert st.returncode == 0 and json.loads(st.stdout)[0]["state"] == "RUNNING", st.stdout
        assert first.poll() is None  # the first trains on, untouched
    finally:
        first.kill()
        first.wait()
    st = cli("status", str(run), "--json")
    assert st.returncode == 1 and json.loads(st.stdout)[0]["state"] == "LOST", st.stdout
    assert json.loads(st.stdout)[0]["step"] >= 4  # status.json follows the periodic checkpoints
    after = (run / "history.csv").read_bytes() if (run / "history.csv").exists() else None
    assert before is None or after.startswith(before)
    again = subprocess.Popen(train_cmd(run, ov), env=clean_env(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:  # the lock died with its holder: the same command resumes
        wait_for_line(run / "train.log", "resumed from", timeout=120, proc=again)
    finally:
        again.kill()
        again.wait()


def test_signal_during_evaluation(tmp_path):
    # Evaluation in 200 batches of 2 images takes a good part of a second: the signal, sent when
    # global step 10 (the last of epoch 2) is logged, lands inside it. A stop there saves with
    # the epoch's steps done and redoes the evaluation on resume. onecycle: its curve stretches with trainer.epochs
    ov = EXACT + ["schedule=onecycle", "trainer.eval_batch_size=2", "wandb.mode=offline"]
    ref = tmp_path / "ref"
    run_train(tmp_path, ref, ov)
    run = stop_inside_eval(tmp_path, ov, "(global 10)", step=10)
    grown = tmp_path / "grown"  # the same stop, resumed to 4 epochs: epoch 2's row keeps the lr its steps ran at
    shutil.copytree(run, grown, symlinks=True)  # (it was the 4-epoch curve's lr at step 10)
    run_train(tmp_path, grown, ov + ["trainer.epochs=4"])
    assert history(grown)[1]["lr"] == history(ref)[1]["lr"], (history(grown)[1], history(ref)[1])
    run_train(tmp_path, run, ov)
    assert_same_weights(final_weights(run), final_weights(ref), exact=True)
    assert_same_history(history(run), history(ref), exact=True)
    steps = [r["_step"] for r in merged_history(run / "wandb", (run / "wandb_id.txt").read_text().strip())]
    assert steps == list(range(1, 17)), steps  # the redone eval is logged once, at step 11


def test_a_stopped_sweep_points_log_names_the_sweeps_command(tmp_path):
    """A sweep's point stopped by hand: its train.log said "the same command resumes it", which for a point is the
    sweep's submit, not a train of the point (found by a laptop journey audit); it names status, which prints it."""
    sweep = tmp_path / "sw"
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")  # what submit -m writes there: the sweep's record
    run = sweep / "seed_0"  # (a point's own name, seed=0, takes quotes in hydra.run.dir=)
    run.mkdir()  # its record, as submit -m writes it (a point submitted on its own since names no -m: a run of its own)
    (run / "submission.json").write_text(json.dumps({"command": ["allconv-hpc", "submit", "-m", "seed=0,1"]}))
    # as its job runs it (submitit's variable; no other of a job's is read on this path)
    p = interrupt_at(tmp_path, run, EXACT + ["wandb.mode=disabled"], "(global 2)", signal.SIGUSR2,
                     SUBMITIT_EXECUTOR="local")
    assert p.returncode == 3, p.output[-3000:]
    assert (f"the run stops with its checkpoint; the sweep's submit command (`allconv-hpc status {sweep}` prints it) "
            f"resumes it from this checkpoint") in (run / "train.log").read_text(), p.output[-3000:]
    # trained by hand since (as a point may be): the same train command resumes it, as status says (diff review)
    p = interrupt_at(tmp_path, run, EXACT + ["wandb.mode=disabled"], "(global 7)", signal.SIGUSR2)
    assert p.returncode == 3, p.output[-3000:]
    assert (run / "train.log").read_text().count(
        "the run stops with its checkpoint; the same command resumes it from this checkpoint") == 1, p.output[-3000:]
    # submitted on its own since, into the sweep's folder: a run of its own, its own submit command (diff review)
    (run / "submission.json").write_text(json.dumps({"command": ["allconv-hpc", "submit", "trainer.epochs=3"]}))
    p = interrupt_at(tmp_path, run, EXACT + ["wandb.mode=disabled"], "(global 12)", signal.SIGUSR2,
                     SUBMITIT_EXECUTOR="local")
    assert p.returncode == 3, p.output[-3000:]
    assert (run / "train.log").read_text().count(
        "the run stops with its checkpoint; the same command resumes it from this checkpoint") == 2, p.output[-3000:]


def test_a_failed_history_row_says_the_checkpoint_landed(tmp_path):
    """history.csv unwritable after the epoch's checkpoint landed: the error said "writing checkpoint step 5 failed"
    (found by a checkpoint review); it says which part failed, and the next start writes the row from the
    checkpoint."""
    run = tmp_path / "run"
    r = subprocess.run([PY, str(FAULT), *EXACT, "wandb.mode=disabled", f"hydra.run.dir={run}"], capture_output=True,
                       text=True, timeout=300, env=clean_env(tmp_path, **folder_at(run / "history.csv", "save")))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"writing checkpoint step 5 failed: IsADirectoryError: \[Errno 21\] step 5's checkpoint landed, "
                     r"but adding its row to history.csv failed \(Is a directory: \S+/history.csv\); the next start "
                     r"writes the row from it", (run / "train.log").read_text()), (run / "train.log").read_text()[-2000:]
    (run / "history.csv").rmdir()
    run_train(tmp_path, run, EXACT + ["wandb.mode=disabled"])
    assert [r["epoch"] for r in history(run)] == [1, 2, 3]


def test_a_failed_epoch_end_write_after_a_stop_in_evaluation_leaves_best_pt_alone(tmp_path):
    """A stop inside epoch 2's evaluation saved its step 10 mid-epoch; the resumed start's epoch-end write of step 10
    failed, yet best.pt took epoch 2, which no checkpoint, history row or status.json held, over the real best (the
    step 10 file already on disk read as that write's: found by a checkpoint review). best.pt, like the history row
    and status.json, now lands only with this start's own write of its step. And the writes queued behind the
    failed one are not made: epoch 3's landed after it, leaving history.csv without epoch 2 (the next start
    called it edited by hand)."""
    ov = EXACT + ["trainer.eval_batch_size=2", "wandb.mode=disabled", "seed=1"]  # seed 1: epoch 2 scores best
    run = stop_inside_eval(tmp_path, ov, "(global 10)", step=10)
    before = load_file(run / "checkpoints" / "best.pt")
    assert before["epoch"] == 1
    r = subprocess.run([PY, str(FAULT), *ov, f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=300,
                       env=clean_env(tmp_path, FAIL_AT="write_error", FAIL_RANK=0, FAIL_STEP=10))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    log = (run / "train.log").read_text()
    assert re.search(r"writing checkpoint step 10 failed: OSError: \[Errno 28\] .* any checkpoint already on disk is "
                     r"kept, and the writes queued after it were not made \(best.pt", log), log[-3000:]
    after = load_file(run / "checkpoints" / "best.pt")
    assert after["epoch"] == 1 and after["val_acc"] == before["val_acc"], (after["epoch"], after["val_acc"])
    assert_same_weights(after["model"], before["model"], exact=True)
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["epoch"], status["global_step"]) == ("failed", 1, 10), status
    assert [r["epoch"] for r in history(run)] == [1]
    assert [p.name for p in CheckpointDir(run / "checkpoints", keep=3).step_files()][0] == "step_00000010.pt"
    run_train(tmp_path, run, ov)  # the disk fine again: it resumes and completes, history.csv as it was
    assert [r["epoch"] for r in history(run)] == [1, 2, 3] and "edited by hand" not in (run / "train.log").read_text()


def test_held_out_split_and_a_stop_inside_the_final_test_eval(tmp_path):
    # data.val_size: each epoch scores 64 held-out images; the 400 test images are scored once, after
    # the last epoch. A signal sent when epoch 3's line is logged lands in that test eval (200 batches
    # of 2): the run stops with its checkpoint, and the resumed run (past its last epoch) trains
    # nothing more and scores test once, exactly as the run that was never stopped.
    ov = EXACT + ["data.val_size=64", "trainer.eval_batch_size=2", "wandb.mode=offline"]
    ref = tmp_path / "ref"
    run_train(tmp_path, ref, ov)
    log = (ref / "train.log").read_text()
    assert log.count("(64 images)") == 3 and "test (the final weights, scored once):" in log and "(400 images)" in log
    ref_status = json.loads((ref / "status.json").read_text())
    assert 0.0 <= ref_status["test_acc"] <= 1.0 and ref_status["test_loss"] > 0
    run = stop_inside_eval(tmp_path, ov, "epoch 3/3:", step=15)
    assert "test_acc" not in json.loads((run / "status.json").read_text())
    run_train(tmp_path, run, ov)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["test_acc"] == ref_status["test_acc"]
    assert status["test_loss"] == ref_status["test_loss"]
    assert_same_weights(final_weights(run), final_weights(ref), exact=True)
    assert_same_history(history(run), history(ref), exact=True)
    first, last = (read_run(seg) for seg in segments(run / "wandb"))  # the resumed segment scored test
    assert last["summary"]["test_acc"] == status["test_acc"] and last["summary"]["test_loss"] == status["test_loss"]
    # W&B's own state says failed/finished by exit code; the summary's status is status.json's word
    assert first["summary"]["status"] == "interrupted" and last["summary"]["status"] == "completed"


def test_a_whitened_run_resumes_exactly_and_evaluate_reuses_its_fit(tmp_path):
    # data.preprocess=gcn_zca: the whitening is fitted again by the resumed process and by evaluate,
    # from the training images alone (not the held-out ones): the stopped-and-resumed run ends where the
    # uninterrupted one does, and evaluate scores the final weights exactly as the run scored them.
    ov = EXACT + ["data.preprocess=gcn_zca", "data.val_size=64"]
    ref = tmp_path / "ref"
    run_train(tmp_path, ref, ov)
    assert "data.preprocess=gcn_zca: fitted on the 300 training images" in (ref / "train.log").read_text()
    run = tmp_path / "run"
    p = interrupt_at(tmp_path, run, ov, "(global 7)", signal.SIGUSR2)
    assert p.returncode == 3, p.output[-3000:]
    run_train(tmp_path, run, ov)
    assert_same_weights(final_weights(run), final_weights(ref), exact=True)
    assert_same_history(history(run), history(ref), exact=True)
    status = json.loads((ref / "status.json").read_text())
    r = subprocess.run([PY, "-m", "allconv_hpc", "evaluate", str(ref), "--checkpoint", "last", "--json"],
                       env=clean_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    scored = json.loads(r.stdout)
    assert (scored["accuracy"], scored["images"]) == (status["test_acc"], 400)
    assert scored["loss"] == pytest.approx(status["test_loss"], rel=1e-6)


def _children_named(pid: int, name: str) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids if Path(f"/proc/{k}/comm").read_text().strip() == name]


def test_sigterm_to_the_whole_step_loses_no_wandb_step(reference, tmp_path):
    """Slurm's SIGTERM (scancel, preemption without a warning) reaches every process of the step, W&B's
    service too, which dies with its last records unwritten; the resumed process re-logs them.
    Worst case made certain: the service dies first, then the trainer logs 4 more steps into the void."""
    run = tmp_path / "run"
    ov = EXACT + ["wandb.mode=offline"]
    p = subprocess.Popen(train_cmd(run, ov), env=clean_env(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_line(run / "train.log", "(global 3)", timeout=120, proc=p)
        p.send_signal(signal.SIGSTOP)  # hold training while W&B's service is killed
        (core,) = _children_named(p.pid, "wandb-core")
        os.kill(core, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{core}").exists() or "Z" in Path(f"/proc/{core}/stat").read_text().split()[2]:
                break
            time.sleep(0.1)
        p.send_signal(signal.SIGCONT)
        wait_for_line(run / "train.log", "(global 7)", timeout=120, proc=p)
        os.killpg(p.pid, signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 3, out[-3000:]
    r = run_train(tmp_path, run, ov)
    assert "re-logging" in (run / "train.log").read_text(), r.stderr[-2000:]  # what the dead service never wrote
    assert_same_weights(final_weights(run), final_weights(reference), exact=True)
    steps = [r["_step"] for r in merged_history(run / "wandb", (run / "wandb_id.txt").read_text().strip())]
    assert steps == list(range(1, 17)), steps


@pytest.mark.slow
def test_sigkill_after_wandb_wrote_past_the_checkpoint_logs_each_step_once(reference, tmp_path):
    """A SIGKILL leaves W&B's record ahead of the newest checkpoint (epoch-end saves only here: step 5);
    the resumed process trains those steps again and must not log them a second time."""
    run = tmp_path / "run"
    ov = EXACT[:-1] + ["checkpoint.every_steps=100", "wandb.mode=offline"]
    p = subprocess.Popen(train_cmd(run, ov), env=clean_env(tmp_path), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        wait_for_line(run / "train.log", "(global 7)", timeout=120, proc=p)
        p.send_signal(signal.SIGSTOP)  # hold it at step 7+ while W&B's service writes its buffer out (~10 s)
        rid = (run / "wandb_id.txt").read_text().strip()
        deadline = time.time() + 60
        while time.time() < deadline:
            steps = [r["_step"] for r in merged_history(run / "wandb", rid)]
            if steps and steps[-1] > 5:
                break
            time.sleep(0.2)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
    assert CheckpointDir(run / "checkpoints", keep=2).load_latest()[1].name == "step_00000005.pt"
    assert steps[-1] > 5, steps
    r = run_train(tmp_path, run, ov)
    assert f"steps up to {steps[-1]} are in this run's W&B record" in (run / "train.log").read_text(), r.stderr[-2000:]
    assert_same_weights(final_weights(run), final_weights(reference), exact=True)
    assert [r["_step"] for r in merged_history(run / "wandb", rid)] == list(range(1, 17))


def newest_step(run: Path) -> int:
    files = CheckpointDir(run / "checkpoints", keep=2).step_files()
    return int(files[0].stem[5:]) if files else -1


@pytest.mark.slow
def test_sigkill_many_times_never_leaves_an_unloadable_checkpoint(reference, tmp_path):
    """Kill -9 at random moments (checkpoints every step, so many kills land inside a write)."""
    run = tmp_path / "run"
    ov = EXACT[:-1] + ["checkpoint.every_steps=1"]
    rng = random.Random(7)
    kills = 0
    for _ in range(8):
        before = newest_step(run)
        p = subprocess.Popen(train_cmd(run, ov), env=clean_env(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        # Kill once this start has written a checkpoint of its own, at a random moment after it: the whole
        # run is ~15 steps in ~3 s, so a fixed sleep would often find it finished (and test nothing).
        while p.poll() is None and newest_step(run) <= before:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        ck = CheckpointDir(run / "checkpoints", keep=2)
        if ck.exists():
            state, path = ck.load_latest()
            # writes are atomic: the newest step file itself loads, no fallback to an older one needed
            assert path == ck.step_files()[0], (path, ck.step_files())
            assert state["train_state"]["global_step"] == int(path.stem[5:])
            assert len(list((run / "checkpoints").glob(".*.tmp"))) <= 2  # at most a killed writer's
    assert kills >= 4
    run_train(tmp_path, run, ov)
    assert_same_weights(final_weights(run), final_weights(reference), exact=True)
    assert_same_history(history(run), history(reference), exact=True)


def test_kill_inside_checkpoint_write_keeps_the_previous_file(tmp_path):
    """Fault injection at the file level: a writer killed at random points inside `save`."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
from allconv_hpc.checkpoint import CheckpointDir
d = CheckpointDir({str(tmp_path / 'ck')!r}, keep=2)
big = torch.arange(4_000_000, dtype=torch.float64)
step = 0
while True:
    step += 1
    d.save({{"model": {{"w": big + step}}, "train_state": {{"global_step": step}}}}, step)
    print(step, flush=True)
"""
    rng = random.Random(3)
    for _ in range(12):
        p = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # at least one complete checkpoint exists
        time.sleep(rng.uniform(0.0, 0.4))
        p.kill()
        p.wait()
        d = CheckpointDir(tmp_path / "ck", keep=2)
        state, path = d.load_latest()
        step = state["train_state"]["global_step"]
        assert step >= 1 and path == d.step_files()[0]  # the newest file is whole: no fallback needed
        w = state["model"]["w"]  # and it is one consistent state: w = arange + step throughout
        assert (float(w[0]), float(w[-1])) == (step, 3_999_999 + step)
        # partial files of killed writers are cleared by the next save: only the last kill's can remain
        partial = list((tmp_path / "ck").glob(".*.tmp"))
        assert len(partial) <= 2, partial


def test_truncated_and_bitflipped_newest_checkpoint_falls_back(reference, tmp_path, caplog):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ck = CheckpointDir(run / "checkpoints", keep=2)
    files = ck.step_files()
    assert len(files) == 2
    newest, older = files
    good_step = load_file(older)["train_state"]["global_step"]
    # truncate the newest (and last.pt, its hard link)
    data = newest.read_bytes()
    (run / "checkpoints" / "last.pt").unlink()
    newest.write_bytes(data[: len(data) // 2])
    state, path = ck.load_latest()
    assert path == older and state["train_state"]["global_step"] == good_step
    # status names the checkpoint the resume loads, and the one passed over (it named the cut one; its trailer, the
    # file's last bytes, tells, as for a run folder copied by an rsync stopped part-way)
    from allconv_hpc import status
    row = status.run_rows(run)[0]
    assert (row["checkpoint_step"], row["cut_short"]) == (good_step, [int(newest.stem[5:])]), row
    assert status._resumes(row["checkpoint_step"]) in " ".join(status.notes({**row, "active": False,
                                                                             "run": "interrupted"}))
    assert f"({newest.name}, newer, is cut short: no completeness trailer)" in " ".join(
        status.notes({**row, "active": False, "run": "interrupted"})), status.notes(row)
    # a whole last.pt of its own (a copy, as rsync without -H leaves): the resume loads it, at the newest step
    (run / "checkpoints" / "last.pt").write_bytes(data)
    assert ck.load_latest()[0]["train_state"]["global_step"] == int(newest.stem[5:])
    row = status.run_rows(run)[0]
    assert (row["checkpoint_step"], row["cut_short"]) == (int(newest.stem[5:]), []), row
    (run / "checkpoints" / "last.pt").unlink()
    # flip one bit in the middle instead
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x10
    newest.write_bytes(bytes(flipped))
    state, path = ck.load_latest()
    assert path == older
    # best.pt from epoch 3, after the checkpoint that is left (step 12, inside epoch 3): those epochs train again
    best = load_file(run / "checkpoints" / "best.pt")
    ck.save_best({**best, "epoch": 3})
    # and the trainer resumes from the older one and still ends where the reference ended
    r = run_train(tmp_path, run, EXACT + ["trainer.epochs=4"])
    log = r.stdout + r.stderr + (run / "train.log").read_text()
    assert "skipping unusable checkpoint" in log
    assert "best.pt is from epoch 3, after the checkpoint resumed here (epoch 2; the newer ones were unusable)" in log
    assert load_file(run / "checkpoints" / "best.pt")["epoch"] >= 3  # replaced by a finished epoch of this run


def test_a_folder_whose_every_checkpoint_is_unusable_fails_the_run_and_keeps_the_files(reference, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    files = sorted((run / "checkpoints").glob("*.pt"))  # best.pt is never resumed from
    for f in files:
        if f.name != "best.pt":
            f.write_bytes(f.read_bytes()[:1000])
    r = run_train(tmp_path, run, EXACT, check=False)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]  # a checkpoint failure, not "bad config" (2)
    assert "is unusable" in (run / "train.log").read_text()
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "failed" and "is unusable" in st["error"], st
    before = json.loads((reference / "status.json").read_text())  # how far the run got still shows
    assert (st["epoch"], st["global_step"], st["best_val_acc"]) == (before["epoch"], before["global_step"],
                                                                   before["best_val_acc"]), st
    assert sorted((run / "checkpoints").glob("*.pt")) == files  # nothing renamed or deleted


def test_nan_stops_without_touching_good_checkpoints(tmp_path):
    run = tmp_path / "run"
    # an lr x1e9 from epoch 3 (global step 11): the loss goes non-finite within a step or two
    logged = [o for o in EXACT if not o.startswith("trainer.log_every_steps=")] + ["trainer.log_every_steps=3"]
    r = run_train(tmp_path, run, logged + ["schedule.milestones=[2]", "schedule.gamma=1e9"], check=False)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    log = (run / "train.log").read_text()
    assert "non-finite loss or weights found at global step" in log and "Traceback" not in r.stderr
    # checked at log steps and saves: the stretch since the last check it passed is named (from a laptop audit)
    found = re.search(r"found at global step (\d+) \(epoch 3\), after step (\d+), the last check it passed \(checked "
                      r"every trainer.log_every_steps=3 steps and at saves\)", log)
    assert found and 1 < int(found[1]) - int(found[2]) <= 3, log[-3000:]
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "failed" and len(st["error"]) > 500, st  # whole, to its last advice (it was cut at 500)
    assert st["error"].endswith("the same command would resume from that checkpoint and repeat the steps that "
                                "diverged") and f"ERROR] {st['error']}\n" in log, st["error"]
    files = list((run / "checkpoints").glob("*.pt"))
    newest = max(f.name for f in files if f.name.startswith("step_"))
    assert f"the newest checkpoint with finite weights ({newest}) is kept" in log, log[-2000:]
    assert "Lower optim.lr or lengthen the warm-up" in log and "checkpoint.resume=never" in log, log[-2000:]
    early = run_train(tmp_path, tmp_path / "early", EXACT + ["optim.lr=1e9", "schedule.warmup_epochs=0"], check=False)
    assert early.returncode == 1 and "no checkpoint was written yet" in early.stderr, early.stderr[-2000:]
    assert "the same command would start it over as it was, to diverge again" in early.stderr, early.stderr[-2000:]
    # what it advises: the new values with checkpoint.resume=never, in the same folder
    fixed = run_train(tmp_path, tmp_path / "early", EXACT + ["optim.lr=0.05", "schedule.warmup_epochs=0",
                                                             "checkpoint.resume=never", "trainer.epochs=1"], check=False)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert '"completed"' in (tmp_path / "early" / "status.json").read_text()
    # a sweep's point, run by its job: new values here would leave the point its name and sweep do not describe
    # (it advised them: Slurm journey audit); new points of the sweep instead
    (tmp_path / "sw" / "p0").mkdir(parents=True)
    (tmp_path / "sw" / "sweep.json").write_text("{}")
    (tmp_path / "sw" / "p0" / "submission.json").write_text(json.dumps({"command": ["allconv-hpc", "submit", "-m"]}))
    point = run_train(tmp_path, tmp_path / "sw" / "p0", EXACT + ["optim.lr=1e9", "schedule.warmup_epochs=0"],
                      check=False, SUBMITIT_EXECUTOR="local")
    assert point.returncode == 1 and ("Sweep a lower optim.lr or a longer warm-up (schedule.warmup_epochs=0 now) as "
                                      "new points, leaving this point's value out of the sweep (choice(...) of the "
                                      "others), or in a new hydra.sweep.dir; the sweep's submit command would start "
                                      "it over as it was, to diverge again") in point.stderr, point.stderr[-2000:]
    assert "checkpoint.resume=never" not in point.stderr
    for f in files:  # every checkpoint left behind loads and holds finite weights from before the blow-up
        state = load_file(f)
        assert all(bool(t.isfinite().all()) for t in state["model"].values()), f
        if "train_state" in state:
            assert state["train_state"]["global_step"] <= 11


FAULT = Path(__file__).with_name("fault_rank.py")


def folder_at(path: Path, when: str) -> dict:
    """fault_rank.py's environment: rank 0 makes `path` a folder once set up, or at its first save."""
    return dict(FAIL_AT="folder", FAIL_PATH=path, FAIL_WHEN=when, FAIL_RANK=0, FAIL_STEP=0)


def test_a_failed_checkpoint_write_stops_the_run_with_one_line_and_keeps_the_older_files(tmp_path):
    """Checkpoints are written in the background: a write that fails (here the rename onto best.pt,
    which is a folder) is reported by a later save or the end of the run, the run stops with one
    line, and the step checkpoints written before it load."""
    run = tmp_path / "run"  # best.pt made a folder at the first save (start-up refuses one already there)
    r = subprocess.run([PY, str(FAULT), *EXACT, f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=300,
                       env=clean_env(tmp_path, **folder_at(run / "checkpoints" / "best.pt", "save")))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    log = (run / "train.log").read_text()
    assert "writing best.pt failed: IsADirectoryError" in log and "any checkpoint already on disk is kept" in log, log[-2000:]
    assert "Traceback" not in r.stderr + log and '"failed"' in (run / "status.json").read_text()
    assert load_file(run / "checkpoints" / "step_00000004.pt")["train_state"]["global_step"] == 4
    assert '"completed"' not in (run / "status.json").read_text()
    # the folder fixed, the same command resumes; the later checkpoints landed recording the epoch's
    # val_acc as the best, yet its best.pt never did: it is written again, not left missing for good
    (run / "checkpoints" / "best.pt").rmdir()
    run_train(tmp_path, run, EXACT)
    assert '"completed"' in (run / "status.json").read_text()
    log = (run / "train.log").read_text()
    resumed = int(re.search(r"resumed from \S+: .*\(global step (\d+)\)", log).group(1))
    rewritten = "best.pt did not hold the best epoch" in log  # from a checkpoint at that epoch's end
    # which checkpoints landed depends on when the failure surfaced: past epoch 1 (global step 5), the
    # resumed checkpoint records a best whose best.pt is missing
    assert (resumed >= 5) == (rewritten or "best.pt does not hold the best epoch so far" in log), log[-3000:]
    best = load_file(run / "checkpoints" / "best.pt")
    rows = {r["epoch"]: r["val_acc"] for r in history(run)}
    assert rows[best["epoch"]] == best["val_acc"], (best["epoch"], best["val_acc"], rows)
    candidates = [v for e, v in rows.items() if 5 * e > resumed or (rewritten and 5 * e == resumed)]
    assert best["val_acc"] == max(candidates), (best, rows, resumed)


def test_a_failed_periodic_write_stops_the_run_within_steps_and_status_names_what_landed(tmp_path):
    """A mid-epoch checkpoint that fails to land (its file's place taken by a folder, as a broken disk would fail
    it) stops the run within steps (the step poll asks the writer), not at the next save, and status.json names
    the newest checkpoint on disk (step 4), not the failed one (step 8) nor where training had got to."""
    run = tmp_path / "run"  # 15 steps an epoch, a checkpoint every 4 steps: 4 lands, 8 fails
    r = subprocess.run([PY, str(FAULT), *TINY, "trainer.batch_size=20", "trainer.epochs=1", "checkpoint.every_steps=4",
                        f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=300,
                       env=clean_env(tmp_path, **folder_at(run / "checkpoints" / "step_00000008.pt", "setup")))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    log = (run / "train.log").read_text()
    assert "writing checkpoint step 8 failed: IsADirectoryError" in log, log[-2000:]
    st = json.loads((run / "status.json").read_text())
    assert (st["state"], st["epoch"], st["global_step"], st["step_in_epoch"]) == ("failed", 0, 4, 4), st
    assert [p.name for p in (run / "checkpoints").glob("step_*.pt") if p.is_file()] == ["step_00000004.pt"]
    # stopped at the poll after the write failed, not at the next save (step 12) nor the epoch's end
    logged = [int(m) for m in re.findall(r"\bstep (\d+)/15\b", log)]
    assert logged and max(logged) < 12, log[-3000:]


def test_a_failed_checkpoint_write_on_rank_0_fails_every_rank(tmp_path):
    """Only rank 0 writes; its failure must not leave the other rank exiting 0 or waiting forever."""
    run = tmp_path / "run"
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(FAULT), *EXACT, f"hydra.run.dir={run}"],
                       capture_output=True, text=True, timeout=180,
                       env=clean_env(tmp_path, **folder_at(run / "checkpoints" / "best.pt", "save")))
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "writing best.pt failed: IsADirectoryError" in (run / "train.log").read_text()
    out = r.stdout + r.stderr
    assert "rank 1: peer rank 0 failed: writing best.pt failed" in out, out[-3000:]  # one line, naming rank 0
    assert "allconv_hpc/" not in "".join(out.split("Traceback")[1:]), out[-3000:]  # only torchrun's own traceback


def test_config_mismatch_is_refused(reference, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.pt")}
    hydra_before = (run / ".hydra" / "config.yaml").read_text()
    status_before = (run / "status.json").read_text()
    log_before = (run / "train.log").read_bytes()
    r = run_train(tmp_path, run, EXACT + ["trainer.batch_size=30"], check=False)
    assert r.returncode == 2
    assert "allconv-hpc: error: run folder" in r.stderr and "holds a run of a different config (trainer.batch_size: " \
        "60 -> 30)" in r.stderr, r.stderr
    assert (run / "train.log").read_bytes() == log_before  # refused before start-up (data, model), not after
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.pt")} == before
    assert (run / ".hydra" / "config.yaml").read_text() == hydra_before  # the folder's record is untouched
    assert (run / "status.json").read_text() == status_before
    # fewer epochs than the run has done: refused too, not "completed" with weights of a later epoch
    r = run_train(tmp_path, run, EXACT + ["trainer.epochs=2"], check=False)
    assert r.returncode == 2
    assert "trainer.epochs=2 but the run in" in r.stderr and "has finished epoch 3" in r.stderr, r.stderr
    assert "use trainer.epochs >= 3" in r.stderr and (run / "train.log").read_bytes() == log_before
    assert (run / "status.json").read_text() == status_before
    # a newer checkpoint of another config copied in, beside the run's own: that file is named, not the run
    from allconv_hpc.checkpoint import write_file
    stray, _ = CheckpointDir(run / "checkpoints", keep=2).load_latest()
    stray["identity"] = {**stray["identity"], "trainer.batch_size": 30}
    write_file(run / "checkpoints" / "step_00099999.pt", stray)
    r = run_train(tmp_path, run, EXACT, check=False)
    assert r.returncode == 2 and (f"checkpoint {run}/checkpoints/step_00099999.pt is of a different config "
                                  f"(trainer.batch_size: 30 -> 60) than its run folder's .hydra/config.yaml, which is "
                                  f"of this one: copied in from another run? Move it out of {run}/checkpoints; the "
                                  f"run then resumes from its own newest checkpoint, or starts over where it has none") in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").glob("step_0000*.pt")} == {
        k: v for k, v in before.items() if k.startswith("step_")}


def test_resume_never_starts_fresh_and_keeps_old_checkpoints(reference, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    old_id = (run / "wandb_id.txt").read_text().strip()
    (run / "history.csv.edited1").write_text("a history changed by hand, kept by an earlier start\n")
    (kept,) = segments(run / "wandb")
    dead = run / "wandb" / f"offline-run-20990101_000000-{old_id}"  # the old run's start killed as it began
    dead.mkdir()
    (dead / f"run-{old_id}.wandb").write_bytes(next(kept.glob("run-*.wandb")).read_bytes()[:7])
    run_train(tmp_path, run, EXACT + ["checkpoint.resume=never", "wandb.mode=offline"])
    # out of the sync glob, where it stopped `wandb sync` of both runs (the old one's id is no longer the folder's)
    assert not dead.exists() and (run / "wandb" / f"empty-{dead.name}").is_dir() and kept.is_dir()
    old = run / "checkpoints.old1"
    assert (old / "last.pt").exists()
    assert (old / "history.csv.edited1").is_file() and not (run / "history.csv.edited1").exists()  # that run's
    assert_same_weights(final_weights(run), final_weights(reference), exact=True)
    # the old run's W&B id and history are kept with its checkpoints; the fresh start is a new W&B run
    assert (old / "wandb_id.txt").read_text().strip() == old_id
    assert (old / "history.csv").read_text() == (reference / "history.csv").read_text()
    new_id = (run / "wandb_id.txt").read_text().strip()
    assert new_id != old_id
    steps = [r["_step"] for r in merged_history(run / "wandb", new_id)]
    assert steps == list(range(1, 17)), steps


def test_resume_never_keeps_a_checkpoints_link_to_scratch_and_the_old_run_there(reference, tmp_path):
    """checkpoints/ a relative link onto another file system (scratch): the old run's files cross to it, whole,
    beside its checkpoints; checkpoints/ stays the user's link, and the new run trains into it."""
    import shutil
    import uuid
    run, scratch = tmp_path / "run", Path("/dev/shm") / f"allconv-never-{uuid.uuid4().hex[:8]}"
    shutil.copytree(reference, run)
    try:
        scratch.mkdir()
        assert scratch.stat().st_dev != run.stat().st_dev, "this test needs /dev/shm on a file system of its own"
        shutil.move(run / "checkpoints", scratch / "ckpt")
        text = os.path.relpath(scratch / "ckpt", run)
        os.symlink(text, run / "checkpoints")
        old_id = (run / "wandb_id.txt").read_text().strip()
        run_train(tmp_path, run, EXACT + ["checkpoint.resume=never", "wandb.mode=offline"])
        assert os.readlink(run / "checkpoints") == text and (scratch / "ckpt" / "last.pt").is_file()
        assert os.readlink(run / "checkpoints.old1") == text + ".old1"
        old = scratch / "ckpt.old1"
        assert (old / "last.pt").read_bytes() == (reference / "checkpoints" / "last.pt").read_bytes()
        assert (old / "history.csv").read_text() == (reference / "history.csv").read_text()
        assert (old / "wandb_id.txt").read_text().strip() == old_id != (run / "wandb_id.txt").read_text().strip()
        assert (old / ".hydra" / "config.yaml").read_text() == (reference / ".hydra" / "config.yaml").read_text()
        assert_same_weights(final_weights(run), final_weights(reference), exact=True)
        assert f"kept in {run / 'checkpoints.old1'} (a link to {text}.old1)" in (run / "train.log").read_text()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_set_aside_stopped_part_way_is_finished_by_the_next_start_whatever_its_mode(reference, tmp_path):
    """A resume=never start killed as it moved the old run's files into checkpoints/ (before the one rename): the
    next start, a plain resume=auto, does not resume that half-moved folder (its history.csv read as the run's, the
    moved copies left to shadow the real ones at a later set-aside). It finishes the set-aside and trains anew."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    old_id = (run / "wandb_id.txt").read_text().strip()
    (run / "checkpoints" / ".setting-aside").touch()  # what move_aside writes first, then the files it moved in
    for name in ("history.csv", ".hydra"):
        shutil.move(run / name, run / "checkpoints" / name)
    run_train(tmp_path, run, EXACT + ["wandb.mode=offline"])
    old = run / "checkpoints.old1"
    assert (old / "history.csv").read_text() == (reference / "history.csv").read_text()
    assert (old / "wandb_id.txt").read_text().strip() == old_id
    assert (old / ".hydra" / "config.yaml").is_file() and (old / "last.pt").is_file()
    assert not [p.name for p in old.iterdir() if p.name.endswith(".1") or p.name == ".setting-aside"]
    assert "stopped while it set the old run aside: finished now" in (run / "train.log").read_text()
    assert_same_weights(final_weights(run), final_weights(reference), exact=True)  # trained anew, as that start would
    assert not (run / "checkpoints" / ".setting-aside").exists() and not (run / "checkpoints.old2").exists()


def test_a_set_aside_stopped_after_renaming_a_linked_target_is_finished(reference, tmp_path):
    """checkpoints/ links to scratch; the start setting the old run aside renamed the target to <target>.old1 and
    was killed before it made the target again: checkpoints/ dangles. The next start is not refused for it: it
    makes the target again and trains, the old run whole where it was."""
    import shutil
    import uuid
    run, scratch = tmp_path / "run", Path("/dev/shm") / f"allconv-never-{uuid.uuid4().hex[:8]}"
    shutil.copytree(reference, run)
    try:
        scratch.mkdir()
        shutil.move(run / "checkpoints", scratch / "ckpt.old1")
        for name in ("history.csv", "wandb_id.txt", "wandb_steps.jsonl", ".hydra"):
            shutil.move(run / name, scratch / "ckpt.old1" / name)
        (scratch / "ckpt.old1" / ".setting-aside").touch()
        os.symlink(scratch / "ckpt", run / "checkpoints")  # dangling
        os.symlink(scratch / "ckpt.old1", run / "checkpoints.old1")
        run_train(tmp_path, run, EXACT + ["wandb.mode=offline"])
        assert (scratch / "ckpt" / "last.pt").is_file() and os.readlink(run / "checkpoints") == str(scratch / "ckpt")
        assert (scratch / "ckpt.old1" / "history.csv").read_text() == (reference / "history.csv").read_text()
        assert not (scratch / "ckpt.old1" / ".setting-aside").exists()
        assert_same_weights(final_weights(run), final_weights(reference), exact=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_fresh_start_over_an_earlier_runs_epochs_keeps_them(reference, tmp_path):
    """The checkpoints of a finished run were deleted (best.pt kept): another config is refused there, as in
    any run folder of another config (before any work, nothing moved); the same config starts over without
    overwriting its history and best.pt, nor logging into its W&B run."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for p in (run / "checkpoints").glob("*.pt"):
        if p.name != "best.pt":
            p.unlink()
    best = (run / "checkpoints" / "best.pt").read_bytes()
    old_id = (run / "wandb_id.txt").read_text().strip()
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    r = run_train(tmp_path, run, EXACT + ["optim.lr=0.2", "wandb.mode=offline"], check=False)
    assert r.returncode == 2 and "holds a run of a different config (optim.lr: " in r.stderr, r.stderr[-2000:]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    run_train(tmp_path, run, EXACT + ["wandb.mode=offline"])
    old = run / "checkpoints.old1"
    assert (old / "best.pt").read_bytes() == best
    assert (old / "history.csv").read_text() == (reference / "history.csv").read_text()
    assert (old / "wandb_id.txt").read_text().strip() == old_id != (run / "wandb_id.txt").read_text().strip()
    assert "an earlier run's epochs are here: the old run's checkpoints" in (run / "train.log").read_text()
    # its config goes with it; the folder's .hydra/ is the new run's
    assert (old / ".hydra" / "config.yaml").read_text() == (reference / ".hydra" / "config.yaml").read_text()
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()


def test_resume_never_applies_to_a_jobs_first_start_not_to_its_requeues(reference, tmp_path):
    """A requeued job runs the same command again: with checkpoint.resume=never it must resume what the
    job trained since its first start set the old run aside, not start over at every preemption."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    slurm = dict(SLURM_JOB_ID="4242", SLURM_ARRAY_JOB_ID="4240", SLURM_ARRAY_TASK_ID="2")

    def start(epochs: int, **env) -> None:
        r = subprocess.run(train_cmd(run, EXACT + ["checkpoint.resume=never", f"trainer.epochs={epochs}"]),
                           capture_output=True, text=True, timeout=300, env=clean_env(tmp_path, **env))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    start(2, **slurm, SLURM_RESTART_COUNT="0")  # the job's first start: the reference run goes aside
    assert history(run / "checkpoints.old1") == history(reference)
    first = history(run)
    assert len(first) == 2
    start(3, **slurm, SLURM_RESTART_COUNT="1")  # its requeue (grown by one epoch, to have something to do)
    assert not (run / "checkpoints.old2").exists()
    assert "restart 1 of job 4240_2: resuming" in (run / "train.log").read_text()
    assert json.loads((run / "status.json").read_text())["slurm_job_id"] == "4240_2"  # what squeue -j takes
    assert len(history(run)) == 3 and history(run)[:2] == first
    # torchrun --max-restarts: its restarted workers carry TORCHELASTIC_RESTART_COUNT (no Slurm here)
    start(4, TORCHELASTIC_RUN_ID="r7", TORCHELASTIC_RESTART_COUNT="0")
    assert history(run / "checkpoints.old2")[:2] == first
    first = history(run)
    start(5, TORCHELASTIC_RUN_ID="r7", TORCHELASTIC_RESTART_COUNT="2")
    assert not (run / "checkpoints.old3").exists()
    assert "torchrun's restart 2 of its workers: resuming" in (run / "train.log").read_text()
    assert json.loads((run / "status.json").read_text())["slurm_job_id"] is None
    assert len(history(run)) == 5 and history(run)[:4] == first


def test_resume_never_on_a_restart_whose_first_start_never_set_the_old_run_aside(reference, tmp_path):
    """The job's first start died before it set the old run aside (in the data load, a lost node, a port
    in use): its requeue must still start over, not quietly continue the run the user asked to discard."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / ".fresh_start.json").write_text(json.dumps({"job": "slurm 4241"}))  # an earlier job's start over
    r = subprocess.run(train_cmd(run, EXACT + ["checkpoint.resume=never", "trainer.epochs=2", "seed=7"]),
                       capture_output=True, text=True, timeout=300,
                       env=clean_env(tmp_path, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    log = (run / "train.log").read_text()
    assert "restart 1 of job 4242, whose first start ended before it set the old run aside: starting over" in log
    assert history(run / "checkpoints.old1") == history(reference)
    assert len(history(run)) == 2 and json.loads((run / ".fresh_start.json").read_text())["job"] == "slurm 4242"


def test_a_finished_run_run_again_does_nothing_and_opens_no_wandb_segment(reference, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {p.name: p.read_bytes() for p in [run / "status.json", run / "history.csv", *run.glob("checkpoints/*")]}
    segs = segments(run / "wandb")
    run_train(tmp_path, run, EXACT + ["wandb.mode=offline"])
    log = (run / "train.log").read_text()
    assert "this run completed its 3 epochs already: nothing to do" in log
    assert re.search(r"resumed from \S+: after epoch 3, global step 15\n", log), log[-1500:]
    assert segments(run / "wandb") == segs  # no new, empty segment to sync
    assert {p.name: p.read_bytes() for p in [run / "status.json", run / "history.csv", *run.glob("checkpoints/*")]} == before
    (run / "status.json").unlink()  # without a held-out split its last checkpoint says it is over: still nothing to do
    run_train(tmp_path, run, EXACT + ["wandb.mode=offline"])
    assert segments(run / "wandb") == segs and (run / "train.log").read_text().count("nothing to do") == 2
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    run_train(tmp_path, run, EXACT + ["wandb.mode=offline", "trainer.epochs=4"])  # grown: it trains on
    assert len(history(run)) == 4 and history(run)[:3] == history(reference)
    assert len(segments(run / "wandb")) == len(segs) + 1


def _wandb_record(run: Path) -> list[dict]:
    """The W&B history of the run as `wandb sync` of its offline segments gives it, less the clock's columns."""
    rid = (run / "wandb_id.txt").read_text().strip()
    return [{k: v for k, v in row.items() if k == "_step" or not (k.startswith("_") or "second" in k)}
            for row in merged_history(run / "wandb", rid)]


def test_a_finished_run_whose_wandb_record_lacks_logs_gets_them_then_nothing(reference, tmp_path):
    """The last epoch trained with W&B disabled completed the run; run again with W&B, the same command said
    "nothing to do" and W&B never got that epoch. It now logs what the record lacks, at its steps, with the
    run's end summary: the record is the uninterrupted run's. Then nothing. A segment without a record (a start
    killed as it began) is renamed out of the sync glob, and status.json names the run's W&B id throughout."""
    run = tmp_path / "run"
    run_train(tmp_path, run, EXACT + ["wandb.mode=offline", "trainer.epochs=2"])
    run_train(tmp_path, run, EXACT + ["wandb.mode=disabled"])
    rid = (run / "wandb_id.txt").read_text().strip()
    assert json.loads((run / "status.json").read_text())["wandb_id"] == rid  # it showed "-" after the disabled end
    (first,) = segments(run / "wandb")
    dead = run / "wandb" / f"offline-run-20990101_000000-{rid}"
    dead.mkdir()
    (dead / f"run-{rid}.wandb").write_bytes(next(first.glob("run-*.wandb")).read_bytes()[:7])
    assert [r["_step"] for r in _wandb_record(run)] != [r["_step"] for r in _wandb_record(reference)]
    # W&B cannot start (its folder cannot take a segment): said, and the run stays completed, exit 0, not failed
    subprocess.run(["chattr", "+i", run / "wandb"], check=True)
    try:
        r = run_train(tmp_path, run, EXACT + ["wandb.mode=offline"])
    finally:
        subprocess.run(["chattr", "-i", run / "wandb"], check=True)
    assert "W&B did not start (PermissionError: " in r.stderr and "the same command with W&B logs it later" in \
        r.stderr, r.stderr[-2000:]
    assert json.loads((run / "status.json").read_text())["state"] == "completed" and dead.exists()
    run_train(tmp_path, run, EXACT + ["wandb.mode=offline"])
    log = (run / "train.log").read_text()
    assert "re-logging" in log and ("this run completed its 3 epochs already: nothing to train: its W&B record has "
                                    "what it lacked") in log, log[-2000:]
    assert not dead.exists() and (run / "wandb" / f"empty-{dead.name}").is_dir()
    # the uninterrupted run's record, but for the train log at step 11: the first segment logged epoch 2's
    # evaluation there, and W&B adds nothing to a step a resumed run's record holds (README, W&B across restarts)
    ours, theirs = _wandb_record(run), _wandb_record(reference)
    assert [r["_step"] for r in ours] == [r["_step"] for r in theirs]
    assert [r for r in ours if r["_step"] != 11] == [r for r in theirs if r["_step"] != 11]
    (at11,), (ref11,) = [r for r in ours if r["_step"] == 11], [r for r in theirs if r["_step"] == 11]
    assert at11 == {k: v for k, v in ref11.items() if not k.startswith("train/") or k.startswith("train/epoch_")}
    st = json.loads((run / "status.json").read_text())
    last = read_run(segments(run / "wandb")[-1])
    assert last["id"] == rid and last["exit_code"] == 0, last
    assert {k: last["summary"].get(k) for k in ("status", "best_val_acc", "final_val_acc")} == \
        {"status": "completed", "best_val_acc": st["best_val_acc"], "final_val_acc": st["last_val_acc"]}, last["summary"]
    segs = segments(run / "wandb")
    run_train(tmp_path, run, EXACT + ["wandb.mode=offline"])  # whole now: no segment opened
    assert segments(run / "wandb") == segs


def test_a_finished_run_run_under_another_wandb_entity_is_logged_there(tmp_path):
    """wandb.entity null (the default): wandb takes WANDB_ENTITY. A completed run run again under another one said
    "nothing to do", and that entity's W&B run never got it; as for a changed wandb.entity, it is logged there."""
    run = tmp_path / "run"
    for entity in ("ent1", "ent2"):
        r = subprocess.run(train_cmd(run, [o for o in TINY if not o.startswith("wandb.mode")] + ["wandb.mode=offline"]),
                           env=clean_env(tmp_path, WANDB_ENTITY=entity), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (read_run(s) for s in segments(run / "wandb"))
    assert (one["entity"], two["entity"]) == ("ent1", "ent2"), (one["entity"], two["entity"])
    assert [x["_step"] for x in two["history"]] == [x["_step"] for x in one["history"]] != [], two["history"]


def test_resume_that_switches_channels_last_gives_momentum_the_weights_layout(reference, tmp_path):
    """trainer.channels_last may change on resume; the loaded momentum buffers must follow the
    weights' new layout (CUDA's fused SGD refuses mismatched strides; CPU's foreach would not say)."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    run_train(tmp_path, run, EXACT + ["trainer.epochs=4", "trainer.channels_last=true"])
    assert len(history(run)) == 4
    ck = load_file(run / "checkpoints" / "last.pt")
    weights = [v for k, v in ck["model"].items() if k.endswith("weight") and v.dim() == 4]
    moms = [s["momentum_buffer"] for _, s in sorted(ck["optimizer"]["state"].items())][0::2]  # weight, bias, ...
    assert len(weights) == len(moms) == 9
    for w, m in zip(weights, moms):
        assert w.shape == m.shape and w.is_contiguous(memory_format=torch.channels_last)
        assert m.stride() == w.stride(), (m.stride(), w.stride())


@pytest.mark.parametrize("stopped", [False, True])
def test_a_ctrl_c_after_the_run_said_its_exit_leaves_its_exit_code(tmp_path, stopped):
    """Completed (0) or stopped (3), the run has said so; a Ctrl-C while the process tears down its process group
    is ignored (it ended the process 130, "interrupted", a completed run's too)."""
    run = tmp_path / "run"
    cmd = [PY, str(Path(__file__).with_name("fault_rank.py")), *EXACT, f"hydra.run.dir={run}"]
    p = subprocess.Popen(cmd, env=clean_env(tmp_path, FAIL_RANK=0, FAIL_STEP=0, FAIL_AT="slow_close"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ctrl_c = False
    try:
        for line in p.stdout:
            if stopped and "(global 7)" in line:
                p.send_signal(signal.SIGUSR2)
                stopped = "sent"
            if "closing the process group" in line:
                p.send_signal(signal.SIGINT)
                ctrl_c = True
                break
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert ctrl_c and stopped in (False, "sent"), err[-2000:]  # both signals went where the test is about
    assert p.returncode == (3 if stopped == "sent" else 0), err[-2000:]
    assert "interrupted (Ctrl-C)" not in err, err[-2000:]
    assert json.loads((run / "status.json").read_text())["state"] == ("interrupted" if stopped else "completed")


def stop_two_ranks(tmp: Path, run: Path, overrides: list[str], signals: dict[int, int], world: int = 2) -> None:
    """Two ranks (or `world`) train `run`; after global step 7 each rank in `signals` gets its signal, every rank
    held meanwhile (SIGSTOP) so that every signal is taken in one step, as Slurm sends them at once. All exit 3."""
    procs = start_ranks(tmp, run, overrides, world=world)
    try:
        wait_for_line(run / "train.log", "(global 7)", timeout=120, proc=procs[0])
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        for rank, sig in signals.items():
            procs[rank].send_signal(sig)
        for p in procs:
            p.send_signal(signal.SIGCONT)
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [3] * world, outs


def test_a_peers_sigterm_that_made_the_stop_an_exit_is_the_signal_named(tmp_path):
    """Rank 1 got SIGTERM (scancel), rank 0 only the warning: the stop is an exit, not a requeue, and rank 0's log
    and status.json name the SIGTERM that decided it, not its own USR2."""
    run = tmp_path / "run"
    stop_two_ranks(tmp_path, run, EXACT, {1: signal.SIGTERM, 0: signal.SIGUSR2})
    assert "stop requested (SIGTERM on rank 1) during" in (run / "train.log").read_text()
    assert json.loads((run / "status.json").read_text())["signal"] == "SIGTERM"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_interrupted_and_resumed(tmp_path, world):
    """Dropout on: each rank's RNG state is in the checkpoint, so the resumed run is bitwise the same. With 3 ranks
    the gradients' sum has an order to keep: DDP's bucket layout differs at a process's first step, and gloo's
    all-reduce order with it (distributed.rank_order_mean; without it the resumed run drifted ~1e-6)."""
    ov = EXACT
    ref = tmp_path / "ref"
    run_train(tmp_path, ref, ov, nproc=world)
    run = tmp_path / "run"
    stop_two_ranks(tmp_path, run, ov, {1: signal.SIGUSR2}, world)  # only rank 1 gets it: all ranks agree and stop
    # rank 0, which writes the log and the record, names the signal and the rank that got it
    assert "stop requested (SIGUSR2 on rank 1) during" in (run / "train.log").read_text()
    assert json.loads((run / "status.json").read_text())["signal"] == "SIGUSR2"
    run_train(tmp_path, run, ov, nproc=world)
    assert_same_weights(final_weights(run), final_weights(ref), exact=True)
    assert_same_history(history(run), history(ref), exact=True)


def test_a_resume_on_more_ranks_reseeds_dropout_at_its_step_and_trains_every_image(reference, tmp_path):
    run = tmp_path / "run"
    p = interrupt_at(tmp_path, run, EXACT, "(global 6)", signal.SIGUSR2)
    assert p.returncode == 3, p.output[-3000:]
    step = json.loads((run / "status.json").read_text())["global_step"]
    run_train(tmp_path, run, EXACT, nproc=2)
    log = (run / "train.log").read_text()
    assert ("checkpoint was written by 1 rank(s), this job has 2: dropout draws from streams seeded anew at this "
            "step, so the result will not be bitwise the uninterrupted one") in log, log[-3000:]
    ours, ref = history(run), history(reference)
    assert [r["epoch"] for r in ours] == [r["epoch"] for r in ref] == [1, 2, 3]
    assert [r["step"] for r in ours] == [r["step"] for r in ref]  # the same images, split over two ranks
    later = [r for r in ours if r["step"] > step]
    assert later and all(abs(a["train_loss"] - b["train_loss"]) < 0.5 for a, b in zip(ours, ref)), (ours, ref)
    assert any(a["train_loss"] != b["train_loss"] for a, b in zip(later, ref[-len(later):]))  # other masks


def test_growing_a_length_dependent_schedule_says_the_lr_jumps(tmp_path):
    run = tmp_path / "run"
    run_train(tmp_path, run, TINY + ["schedule=cosine"])
    r = run_train(tmp_path, run, TINY + ["schedule=cosine", "trainer.epochs=4"])
    m = re.search(r"trainer.epochs=4 but the checkpoint's run was planned for 2: the cosine schedule is stretched "
                  r"to the new length, so the lr jumps from ([\d.e-]+) \(its last step\) to ([\d.e-]+)", r.stderr)
    assert m and float(m.group(2)) > float(m.group(1)), r.stderr[-2000:]
    rows = history(run)
    assert float(rows[2]["lr"]) > float(rows[1]["lr"])  # what it warned of
    # from the first step on: the saved optimizer's lr (the old curve's, 0 at its end) is not taken as it stands
    first = int(rows[1]["step"]) + 1
    logged = [json.loads(line) for line in (run / "wandb_steps.jsonl").read_text().splitlines()]
    ran = [e["data"]["train/lr"] for e in logged if e["kind"] == "train" and e["step"] == first]
    assert ran and ran[-1] == pytest.approx(float(m.group(2)), rel=1e-3), (ran, m.group(2))
    r = run_train(tmp_path, run, TINY + ["schedule=cosine", "trainer.epochs=5"] + ["schedule.name=paper"],
                  check=False)  # another schedule is another config: refused, not warned about
    assert r.returncode == 2 and "stretched" not in r.stderr


def test_a_run_folder_file_that_cannot_be_written_is_one_line_and_resumable(tmp_path):
    run = tmp_path / "run"
    run_train(tmp_path, run, TINY + ["trainer.epochs=1"])
    # what an immutable file or a foreign-owned one in a sticky folder also gives, at a write after start-up's
    # checks (which refuse a folder there before any work: test_config); made one once the trainer is set up
    bad = run / ".hydra" / "overrides.yaml"
    r = subprocess.run([PY, str(FAULT), *TINY, f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=300,
                       env=clean_env(tmp_path, **folder_at(bad, "setup")))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"cannot read/write {bad} (IsADirectoryError" in r.stderr
    assert '"failed"' in (run / "status.json").read_text()
    st = subprocess.run([PY, "-m", "allconv_hpc", "status", str(run)], env=clean_env(tmp_path), capture_output=True,
                        text=True, timeout=60)
    assert st.returncode == 1 and f"run: cannot read/write {bad}" in st.stdout, st.stdout  # why, too
    bad.rmdir()
    run_train(tmp_path, run, TINY)  # fixed: the same command resumes and finishes
    assert '"completed"' in (run / "status.json").read_text()


def signal_in_start_up(tmp: Path, run: Path, args: list[str], sig: int | tuple[int, ...]
                       ) -> tuple[subprocess.Popen, str, str]:
    """Start train (args with data.preprocess=gcn_zca: a fit of seconds) and send `sig` (or each of several, 0.2 s
    apart) in that fit: after this start's "run folder" line (train.log is appended to by every start), before
    training."""
    starts = (run / "train.log").read_text().count("run folder") if (run / "train.log").exists() else 0
    p = subprocess.Popen(train_cmd(run, args), env=clean_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "train.log").exists() and (run / "train.log").read_text().count("run folder") > starts):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # in the whitening fit
        for i, one in enumerate(sig if isinstance(sig, tuple) else (sig,)):
            time.sleep(0.2 if i else 0)
            p.send_signal(one)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    return p, out, err


def test_a_stop_after_wandb_init_closes_the_segment_failed_and_records_its_id(tmp_path):
    """A SIGTERM right after W&B's init (in start-up, or at the first steps): exit 3, and the segment closes with
    W&B's failed exit code 1, as README says of every stop (a stop in start-up closed it with 3)."""
    run = tmp_path / "run"
    p = subprocess.Popen(train_cmd(run, TINY + ["wandb.mode=offline"]), env=clean_env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(run / "train.log", "W&B offline (run", proc=p)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 3, err[-2000:]
    [seg] = segments(run)
    assert read_run(seg)["exit_code"] == 1, (read_run(seg), err[-2000:])
    assert json.loads((run / "status.json").read_text())["wandb_id"] == (run / "wandb_id.txt").read_text().strip()


def test_ctrl_c_during_set_up_is_a_start_up_interrupt_not_a_failure(tmp_path):
    """A Ctrl-C after the run folder is made but before training (data, its whitening fit, model, resume) stops
    at once with the start-up line, and status reads the folder as interrupted (a stop the user asked for),
    not as a start that failed; the same command then trains the run."""
    run, args = tmp_path / "run", TINY + ["trainer.epochs=1", "data.preprocess=gcn_zca"]  # a fit of seconds
    p, out, err = signal_in_start_up(tmp_path, run, args, signal.SIGINT)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "interrupted (Ctrl-C) during start-up, before training" in err and "training synthetic" not in out, err
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"
    st = subprocess.run([PY, "-m", "allconv_hpc", "status", "--json", str(run)], env=clean_env(tmp_path),
                        capture_output=True, text=True, timeout=60)
    row = json.loads(st.stdout)[0]
    assert st.returncode == 0 and row["state"] == "INTERRUPTED" and not row["failed"], st.stdout
    assert (row["epoch"], row["epochs"]) == (0, 1), st.stdout  # a new folder: none done of this config's epochs
    assert row["train_command"] is None, row  # stopped before it wrote .hydra/overrides.yaml: no command to name
    assert row["notes"] == ["stopped with epoch 0/1 done (step 0); the same train command starts it over: it stopped "
                            "before its first checkpoint"] and row["run_dir"] == str(run.resolve()), st.stdout
    run_train(tmp_path, run, args)
    assert [r["epoch"] for r in history(run)] == [1]


def test_a_warning_in_start_up_is_honoured_at_the_first_steps_and_said_to_be_from_start_up(tmp_path):
    """USR2 before training (a preemption while the data loads) is kept, and the first steps stop with a checkpoint;
    the log says when it came, not "during training"."""
    run = tmp_path / "run"
    p = interrupt_at(tmp_path, run, TINY, "run folder", signal.SIGUSR2)
    assert p.returncode == 3, p.output[-3000:]
    log = (run / "train.log").read_text()
    assert re.search(r"stop requested \(SIGUSR2\) received during start-up, taken at global step [12]: checkpoint saved", log), log[-2000:]


def test_a_sigterm_after_a_warning_in_start_up_ends_the_start_there(tmp_path):
    """A preemption in start-up: USR2, then GraceTime's SIGTERM, then KillWait's SIGKILL. The SIGTERM was dropped
    behind the warning (only the first signal was kept): the start went on to train its first steps, which KillWait
    cuts short on a slow start (found by a code review). It ends the start at its next safe point, as alone."""
    run = tmp_path / "run"
    p, out, err = signal_in_start_up(tmp_path, run, TINY + ["data.preprocess=gcn_zca"],
                                     (signal.SIGUSR2, signal.SIGTERM))
    assert p.returncode == 3 and "stopped by SIGTERM during start-up, before training" in err, err[-2000:]
    assert "training synthetic" not in out and not (run / "checkpoints").exists(), out[-2000:]
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"


def test_sigterm_during_a_resumes_start_up_stops_there_with_nothing_written(tmp_path):
    """scancel's SIGTERM while a resume starts (here in its whitening fit) ends the start at the next safe point,
    before training: exit 3, the run interrupted and resumable, no checkpoint written. Waiting for the first steps
    to stop let Slurm's KillWait SIGKILL a slow start-up, which `status` then read as a failure."""
    run, args = tmp_path / "run", TINY + ["data.preprocess=gcn_zca"]  # a fit of seconds
    run_train(tmp_path, run, args + ["trainer.epochs=1"])
    files = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    earlier_job = {"slurm_job_id": "77", "restarts": 4, "timeouts": 2, "signal": "USR2",  # another job's record,
                   "launch": "torchrun", "ranks": 2, "nodes": 1}  # of 2 ranks (as if: the checkpoint is 1 rank's)
    (run / "status.json").write_text(json.dumps({**json.loads((run / "status.json").read_text()), **earlier_job}))
    p, out, err = signal_in_start_up(tmp_path, run, args + ["trainer.epochs=2"], signal.SIGTERM)
    assert p.returncode == 3 and "Traceback" not in err, err
    assert "stopped by SIGTERM during start-up, before training" in err and "training synthetic" not in out, err
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == files
    st = json.loads((run / "status.json").read_text())
    assert (st["state"], st["epoch"]) == ("interrupted", 1), st  # the run's progress stands, not the other job's counts
    assert (st["slurm_job_id"], st["restarts"], "timeouts" in st, "signal" in st) == (None, 0, False, False), st
    # the launch that trained it stands too, not this one-process start's, which trained nothing
    assert (st["launch"], st["ranks"], st["nodes"]) == ("torchrun", 2, 1), st
    r = subprocess.run([PY, "-m", "allconv_hpc", "status", str(run)], env=clean_env(tmp_path), capture_output=True,
                       text=True, timeout=60)
    step = int(st["global_step"])
    assert r.returncode == 0 and re.search(rf"the same train command \(`torchrun --standalone --nproc_per_node=2 -m "
                                           rf"allconv_hpc train .*`\) resumes it from its newest checkpoint, step "
                                           rf"{step}\b", r.stdout), r.stdout
    run_train(tmp_path, run, args + ["trainer.epochs=2"])
    assert [r["epoch"] for r in history(run)] == [1, 2]
    # the same command again on the completed run, stopped in start-up: it had nothing to do, and stays completed
    p, out, err = signal_in_start_up(tmp_path, run, args + ["trainer.epochs=2"], signal.SIGTERM)
    assert p.returncode == 3 and "stopped by SIGTERM during start-up" in err, err
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    # a run that diverged, started again and stopped in start-up: nothing trained, so its failure stands (it was
    # recorded interrupted, and submit no longer warned that a resume diverges again)
    bad = tmp_path / "bad"
    diverge = args + ["optim.lr=1e9", "schedule.warmup_epochs=0", "trainer.epochs=1"]
    assert run_train(tmp_path, bad, diverge, check=False).returncode == 1
    failed = json.loads((bad / "status.json").read_text())
    assert failed["state"] == "failed" and failed["error"].startswith("non-finite"), failed
    p, out, err = signal_in_start_up(tmp_path, bad, diverge, signal.SIGTERM)
    assert p.returncode == 3 and "stopped by SIGTERM during start-up" in err, err
    after = json.loads((bad / "status.json").read_text())
    assert {k: after[k] for k in ("state", "error", "global_step")} == {k: failed[k] for k in ("state", "error",
                                                                                              "global_step")}


def test_a_deleted_lock_is_taken_again_and_a_second_writer_stops_the_first_before_it_writes(tmp_path):
    """.train.lock deleted while its run trains (the way out RunBusy names for a dead node's lock, taken for a live
    one): a second start took the folder, and both trained into it (history rows twice). The first now finds its
    lock file replaced at its next checkpoint and stops without writing; a deleted lock nobody took it takes again."""
    run, args = tmp_path / "run", TINY + ["trainer.epochs=12", "checkpoint.every_steps=2"]
    first = subprocess.Popen(train_cmd(run, args), env=clean_env(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(run / "train.log", "training synthetic", proc=first)
        first.send_signal(signal.SIGSTOP)  # between two checkpoints
        (run / ".train.lock").unlink()
        run_train(tmp_path, run, args)  # the second start resumes the newest checkpoint and trains to the end
        done = history(run)
        files = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
        record = (run / "status.json").read_text()
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 1 and "Traceback" not in err, err
    assert (f"run folder {run}: its lock file was deleted while this process trained into it, and another start made "
            f"a new one since (") in err and ", ended since), which may have written into the folder" in err, err
    assert [r["epoch"] for r in done] == list(range(1, 13)) and history(run) == done
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == files
    assert (run / "status.json").read_text() == record  # the second start's "completed"

    # deleted, and nobody took it: the run locks it again at its next checkpoint and trains on
    again = tmp_path / "again"
    first = subprocess.Popen(train_cmd(again, args), env=clean_env(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(again / "train.log", "training synthetic", proc=first)
        (again / ".train.lock").unlink()
        deadline = time.monotonic() + 60
        while not (again / ".train.lock").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # still training: a second start now finds the folder held
        r = subprocess.run(train_cmd(again, args), env=clean_env(tmp_path), capture_output=True, text=True, timeout=120)
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert r.returncode == 2 and f"is being trained into by pid {first.pid}" in r.stderr, r.stderr
    assert first.returncode == 0, err
    assert [r["epoch"] for r in history(again)] == list(range(1, 13))


@pytest.mark.parametrize("loading", [b"libtorch", b"_multiarray_umath"])
def test_ctrl_c_while_torch_imports_is_one_line_and_130(tmp_path, loading):
    """A Ctrl-C in the first second (the imports) is the same one line and exit status as later in start-up,
    not a traceback from inside `import torch`; nor is it lost when it comes as torch's C++ start-up imports numpy
    (`loading` its core library), which dropped it: the run trained on."""
    p = subprocess.Popen(train_cmd(tmp_path / "run", TINY), env=clean_env(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        maps = Path(f"/proc/{p.pid}/maps")
        deadline = time.monotonic() + 60
        while loading not in maps.read_bytes():  # inside main: only train's imports load torch
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.002)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("allconv-hpc: interrupted (Ctrl-C) during start-up"), err


SLOW_WANDB_FINISH = """
import pathlib, sys, time
from allconv_hpc import tracking
from allconv_hpc.cli import main
finish = tracking.Tracker.finish
def slow(self, *a, **k):  # an online upload at the end takes its time: the window a Ctrl-C falls into
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(120)
    return finish(self, *a, **k)
tracking.Tracker.finish = slow
sys.exit(main(["train", *sys.argv[2:]]))
"""


def test_ctrl_c_while_wandb_finishes_a_completed_run_says_it_completed(tmp_path):
    """A Ctrl-C after training, while W&B still finishes: the run stays completed (status.json, checkpoints),
    and the console says so, and what W&B may lack, instead of only "interrupted"."""
    run, marker = tmp_path / "run", tmp_path / "finishing"
    overrides = [o for o in TINY if not o.startswith("wandb.")] + ["wandb.mode=offline", "trainer.epochs=1",
                                                                  f"hydra.run.dir={run}"]
    p = subprocess.Popen([PY, "-c", SLOW_WANDB_FINISH, str(marker), *overrides], env=clean_env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), p.communicate(timeout=30)[0][-3000:]
        p.send_signal(signal.SIGINT)
        out = p.communicate(timeout=60)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out[-3000:]
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "completed" and st["epoch"] == 1, st
    seg = segments(run / "wandb", (run / "wandb_id.txt").read_text().strip())[0]
    assert ("Ctrl-C while W&B finished: the run had completed (its checkpoints and status.json are written); "
            f"W&B's record may lack its last logs and summary: `wandb sync {seg}` uploads what this start "
            f"wrote") in out, out[-3000:]
    assert CheckpointDir(run / "checkpoints", keep=2).load_latest()[0]["train_state"]["epoch"] == 1

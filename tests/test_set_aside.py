"""checkpoint.resume=never's set-aside of an old run (CheckpointDir.move_aside): whole in one checkpoints.oldN,
nothing overwritten, across file systems (checkpoints/ linked to scratch), and finished by the next start after
a kill at any point of it (each test builds the files a kill leaves there)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from allconv_hpc.checkpoint import CheckpointDir, load_file


def old_run(run: Path, folder: Path | None = None) -> CheckpointDir:
    """A run's files: two step files, last.pt, history.csv, wandb_id.txt, .hydra/config.yaml. `folder`: where
    its checkpoints are, linked from run/checkpoints."""
    run.mkdir(parents=True, exist_ok=True)
    if folder is not None:
        folder.mkdir(parents=True)
        os.symlink(os.path.relpath(folder, run), run / "checkpoints")
    ck = CheckpointDir(run / "checkpoints", keep=2)
    for step in (1, 2):
        ck.save({"step": step}, step)
    (run / "history.csv").write_text("epoch,val_acc\n1,0.5\n")
    (run / "wandb_id.txt").write_text("old1d\n")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    return ck


ALSO = ("history.csv", "wandb_id.txt", ".hydra")


def also(run: Path) -> list[Path]:
    return [run / n for n in ALSO]


def assert_whole(old: Path) -> None:
    """`old` holds the whole old run, as old_run wrote it."""
    assert load_file(old / "last.pt")["step"] == 2 and load_file(old / "step_00000002.pt")["step"] == 2
    assert (old / "history.csv").read_text() == "epoch,val_acc\n1,0.5\n"
    assert (old / "wandb_id.txt").read_text() == "old1d\n"
    assert (old / ".hydra" / "config.yaml").read_text() == "seed: 0\n"


@pytest.fixture
def scratch(tmp_path):
    """A folder on another file system than tmp_path (/dev/shm, a tmpfs): a checkpoints/ linked to scratch."""
    where = Path("/dev/shm") / f"allconv-aside-{uuid.uuid4().hex[:8]}"
    where.mkdir()
    assert where.stat().st_dev != tmp_path.stat().st_dev, "this test needs /dev/shm on a file system of its own"
    yield where
    shutil.rmtree(where)


def test_the_old_run_moves_whole_into_one_folder(tmp_path):
    run = tmp_path / "run"
    ck = old_run(run)
    assert ck.move_aside(also(run)) == run / "checkpoints.old1"
    assert_whole(run / "checkpoints.old1")
    assert not any(os.path.lexists(run / n) for n in (*ALSO, "checkpoints"))
    assert ck.move_aside(also(run)) is None  # nothing left to set aside


def test_a_start_killed_part_way_is_finished_in_the_same_folder(tmp_path, monkeypatch):
    """Killed as it moved wandb_id.txt (history.csv moved already): the next start moves the rest into the same
    folder, not a second one (the old run split over two)."""
    run = tmp_path / "run"
    ck = old_run(run)
    real = {f: getattr(os, f) for f in ("rename", "replace")}

    def killed_at_the_id(f):
        def move(src, dst, *a, **k):
            if Path(src).name == "wandb_id.txt":
                raise KeyboardInterrupt("killed")
            return real[f](src, dst, *a, **k)
        return move
    for f in real:
        monkeypatch.setattr(os, f, killed_at_the_id(f))
    with pytest.raises(KeyboardInterrupt):
        ck.move_aside(also(run))
    for f in real:
        monkeypatch.setattr(os, f, real[f])
    assert ck.interrupted_aside()  # any next start finishes it
    assert ck.move_aside(also(run)) == run / "checkpoints.old1"
    assert_whole(run / "checkpoints.old1")
    assert not os.path.lexists(run / "checkpoints.old2")


def test_nothing_there_is_overwritten(tmp_path):
    """A name taken in checkpoints/ (a leftover) keeps its file; the moved one goes beside it; a taken oldN, even a
    dangling link, is passed over."""
    run = tmp_path / "run"
    ck = old_run(run)
    (run / "checkpoints" / "history.csv").write_text("a leftover\n")
    os.symlink("nowhere", run / "checkpoints.old1")
    assert ck.move_aside(also(run)) == run / "checkpoints.old2"
    old = run / "checkpoints.old2"
    assert (old / "history.csv").read_text() == "a leftover\n"
    assert (old / "history.csv.1").read_text() == "epoch,val_acc\n1,0.5\n"
    assert os.readlink(run / "checkpoints.old1") == "nowhere"


def test_a_checkpoints_link_to_another_file_system_stays_the_users_link(tmp_path, scratch):
    """The old run stays on scratch (target.old1, linked from checkpoints.old1 as the user's link is: relative);
    checkpoints/ is the same link, to an empty target for the new run."""
    run, target = tmp_path / "run", scratch / "ckpt"
    ck = old_run(run, target)
    text = os.readlink(run / "checkpoints")
    assert ck.move_aside(also(run)) == run / "checkpoints.old1"
    assert os.readlink(run / "checkpoints") == text and list(target.iterdir()) == []
    assert os.readlink(run / "checkpoints.old1") == os.path.join(os.path.dirname(text), "ckpt.old1")
    assert_whole(scratch / "ckpt.old1")
    assert not any(os.path.lexists(run / n) for n in ALSO)
    assert not list((scratch / "ckpt.old1").glob(".*aside-part"))


def test_a_copy_across_file_systems_killed_part_way_is_redone(tmp_path, scratch):
    """Killed in the copy of .hydra/ (a partial copy there) and after history.csv's copy landed but before its
    original was removed: the partial copy is dropped and made again, the landed one kept beside the original."""
    run, target = tmp_path / "run", scratch / "ckpt"
    ck = old_run(run, target)
    (target / "..hydra.aside-part").mkdir()
    (target / "..hydra.aside-part" / "config.yaml").write_text("se")
    shutil.copy2(run / "history.csv", target / "history.csv")
    ck.move_aside(also(run))
    assert_whole(scratch / "ckpt.old1")
    assert (scratch / "ckpt.old1" / "history.csv.1").read_text() == "epoch,val_acc\n1,0.5\n"
    assert not list((scratch / "ckpt.old1").glob(".*aside-part"))


def test_a_start_killed_after_linking_the_old_target_takes_that_link_again(tmp_path, scratch):
    """Killed after making checkpoints.old1 (dangling: the target not yet renamed): the same N, not old2."""
    run, target = tmp_path / "run", scratch / "ckpt"
    ck = old_run(run, target)
    text = os.readlink(run / "checkpoints")
    os.symlink(os.path.join(os.path.dirname(text), "ckpt.old1"), run / "checkpoints.old1")
    assert ck.move_aside(also(run)) == run / "checkpoints.old1"
    assert_whole(run / "checkpoints.old1")
    assert not os.path.lexists(run / "checkpoints.old2") and not os.path.lexists(scratch / "ckpt.old2")


def test_a_start_killed_after_renaming_the_target_makes_it_again(tmp_path, scratch):
    """Killed after the rename, before the new target was made: checkpoints/ dangles; the next start makes its
    target (the new run's, empty) and leaves the old run where it is."""
    run, target = tmp_path / "run", scratch / "ckpt"
    ck = old_run(run, target)
    assert ck.move_aside(also(run)) == run / "checkpoints.old1"
    target.rmdir()
    (scratch / "ckpt.old1" / ".setting-aside").touch()  # still there: removed last
    assert ck.interrupted_aside()
    assert ck.move_aside(also(run)) is None
    assert target.is_dir() and list(target.iterdir()) == []
    assert_whole(run / "checkpoints.old1")
    assert not ck.interrupted_aside() and not (scratch / "ckpt.old1" / ".setting-aside").exists()


def test_a_set_aside_stopped_part_way_leaves_nothing_to_resume(tmp_path):
    """What submit and train check before any work: the next start finishes the set-aside, so it resumes nothing;
    checkpoint.resume=must is refused there, not after the queue (the start would set the run aside, then fail)."""
    from allconv_hpc.checkpoint import check_resume
    from allconv_hpc.compose import compose
    from allconv_hpc.config import ConfigError
    run = tmp_path / "run"
    old_run(run)
    (run / "checkpoints" / ".setting-aside").touch()
    cfg = compose(["data=synthetic", f"hydra.run.dir={run}"]).cfg
    assert check_resume(run, cfg) is None
    must = compose(["data=synthetic", "checkpoint.resume=must", f"hydra.run.dir={run}"]).cfg
    with pytest.raises(ConfigError, match=r"checkpoint.resume=must but a start with checkpoint.resume=never was "
                                          r"stopped while it set the old run in .* aside .*: the next start finishes "
                                          r"that and trains anew, with nothing to resume; start it with "
                                          r"checkpoint.resume=auto, or give another hydra.run.dir"):
        check_resume(run, must)

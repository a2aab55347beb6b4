"""Files written atomically (checkpoints, history.csv, status.json, ...) get the mode a plain open()
gives, not mkstemp's 0600: on a shared project folder the group must be able to read them."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from allconv_hpc.checkpoint import CheckpointDir, load_file
from allconv_hpc.fsio import write_atomic


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def _write_all(run: Path) -> list[Path]:
    """Everything the tool writes through a temp file + rename, as the trainer and tracker write it."""
    ck = CheckpointDir(run / "checkpoints", keep=2)
    state = {"model": {"w": torch.arange(10, dtype=torch.float32)}, "step": 0}
    for step in (1, 2, 3):  # step_1 is pruned, last.pt relinked twice
        ck.save({**state, "step": step}, step)
    ck.save_best({**state, "step": 2})
    write_atomic(run / "history.csv", "epoch,val_acc\n1,0.5\n")  # str
    write_atomic(run / "status.json", b'{"state": "running"}')  # bytes
    write_atomic(run / "sweeps" / "sweep.json", lambda f: f.write(b"{}"))  # streamed, into a new folder
    return [ck.folder / n for n in ("step_00000002.pt", "step_00000003.pt", "last.pt", "best.pt")] + \
        [run / "history.csv", run / "status.json", run / "sweeps" / "sweep.json"]


def _check_contents(run: Path) -> None:
    ck = run / "checkpoints"
    assert load_file(ck / "last.pt")["step"] == 3 and load_file(ck / "best.pt")["step"] == 2
    assert load_file(ck / "step_00000002.pt")["step"] == 2
    assert os.path.samefile(ck / "last.pt", ck / "step_00000003.pt")
    assert not (ck / "step_00000001.pt").exists()
    assert (run / "history.csv").read_text() == "epoch,val_acc\n1,0.5\n"
    assert (run / "status.json").read_bytes() == b'{"state": "running"}'
    assert [p for p in run.rglob(".*.tmp")] == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002, 0o077])
def test_atomic_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        files = _write_all(run)
        ref = run / "train.log"
        with open(ref, "w") as f:  # how train.log is written
            f.write("x\n")
    finally:
        os.umask(old)
    assert _mode(ref) == 0o666 & ~umask
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}
    for folder in (run, run / "checkpoints", run / "sweeps"):
        assert _mode(folder) == 0o777 & ~umask
    _check_contents(run)


def test_umask_of_a_fresh_process_is_honoured_in_the_writer_thread(tmp_path):
    """As a job script's `umask 027` reaches the trainer: set before the interpreter (and this package)
    starts, checkpoints written by the background Writer thread."""
    code = ("import sys, torch; from pathlib import Path\n"
            "from allconv_hpc.checkpoint import CheckpointDir, Writer\n"
            "from allconv_hpc.fsio import write_atomic\n"
            "run = Path(sys.argv[1]); ck = CheckpointDir(run / 'checkpoints', keep=2); w = Writer()\n"
            "w.submit('step 5', ck.save, {'step': 5, 'w': torch.ones(3)}, 5)\n"
            "w.submit('best', ck.save_best, {'step': 5, 'w': torch.ones(3)})\n"
            "w.close()\n"
            "write_atomic(run / 'status.json', b'{}')\n")
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-c", code, str(run)], check=True, timeout=120,
                   preexec_fn=lambda: os.umask(0o027))
    for p in (run / "checkpoints" / "step_00000005.pt", run / "checkpoints" / "last.pt",
              run / "checkpoints" / "best.pt", run / "status.json"):
        assert _mode(p) == 0o640, p
    assert _mode(run / "checkpoints") == 0o750
    assert load_file(run / "checkpoints" / "last.pt")["step"] == 5


def test_a_default_acl_on_the_folder_applies_as_to_a_plain_open(tmp_path):
    """A project folder with a default ACL (setfacl -d) gives new files its group bits whatever the
    umask; a umask-and-chmod scheme would take them away again."""
    # a minimal default ACL, the xattr's binary form: user::rwx group::rwx other::---
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                          for tag, perm in ((0x01, 7), (0x04, 7), (0x20, 0)))
    try:
        os.setxattr(tmp_path, "system.posix_acl_default", acl)
    except (OSError, AttributeError) as e:
        pytest.skip(f"no POSIX ACLs here: {e}")
    old = os.umask(0o077)
    try:
        ref = tmp_path / "plain"
        ref.write_text("x")
        write_atomic(tmp_path / "status.json", b"{}")
        CheckpointDir(tmp_path / "checkpoints", keep=1).save({"step": 1}, 1)
    finally:
        os.umask(old)
    assert _mode(ref) == 0o660  # the ACL, not the umask
    assert _mode(tmp_path / "status.json") == _mode(ref)
    assert _mode(tmp_path / "checkpoints" / "last.pt") == _mode(ref)
    assert load_file(tmp_path / "checkpoints" / "last.pt")["step"] == 1

"""`allconv-hpc train` whose CIFAR download is a stand-in (no network here, and none needed to test who fetches).

DOWNLOAD_LOG=FILE python tests/stub_download.py [overrides]: each call of the download appends "start RANK ROOT" to
FILE, takes a second (DOWNLOAD_SECONDS), writes a small CIFAR-10 (120 training, 40 test images; the same for every
call) into its root in the official layout, then appends "end RANK ROOT". DOWNLOAD_FAILS=RANK: that rank's download
fails as one without network does. DOWNLOAD_POLL_S: the trainer's poll interval while ranks wait for it."""
import os
import sys
import time

import torch

from allconv_hpc import data
from allconv_hpc.cli import main


def _log(what: str, root: str) -> None:
    with open(os.environ["DOWNLOAD_LOG"], "a") as f:  # one short line per write: appends do not interleave
        f.write(f"{what} {os.environ.get('RANK', '0')} {root}\n")


def _download(cfg) -> None:
    _log("start", cfg.root)
    time.sleep(float(os.environ.get("DOWNLOAD_SECONDS", "1")))
    if os.environ.get("DOWNLOAD_FAILS") == os.environ.get("RANK", "0"):
        raise data.DataError(f"downloading CIFAR-10 into {cfg.root} failed (URLError: no route to host)")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (160, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (160,), generator=g)
    data.write_cifar(cfg.root, "cifar10", x[:120], y[:120], x[120:], y[120:], [f"c{i}" for i in range(10)])
    _log("end", cfg.root)


data._download = _download
if "DOWNLOAD_POLL_S" in os.environ:
    from allconv_hpc import trainer
    trainer.DOWNLOAD_POLL_S = float(os.environ["DOWNLOAD_POLL_S"])
sys.exit(main(["train", *sys.argv[1:]]))

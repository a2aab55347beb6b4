"""`allconv-hpc train`, with one rank made to raise (fault injection for the tests, never shipped).

FAIL_RANK=N FAIL_STEP=K python tests/fault_rank.py [overrides]: rank N raises a RuntimeError when it
logs global step K, as a bug or an out-of-memory error would, while its peers go on into a collective.
"""
import os
import sys

from allconv_hpc import trainer
from allconv_hpc.cli import main

RANK, STEP = int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_STEP"])
_log_train = trainer.Trainer._log_train


def _failing_log_train(self, *args, **kwargs):
    if self.env.rank == RANK and self.state.global_step >= STEP:
        raise RuntimeError(f"injected failure at global step {self.state.global_step}")
    return _log_train(self, *args, **kwargs)


trainer.Trainer._log_train = _failing_log_train
sys.exit(main(["train", *sys.argv[1:]]))

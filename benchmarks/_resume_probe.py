"""Child process of bench_resume.py: `allconv-hpc train ARGS` with timestamps at each start-up phase.

Wraps (without changing behaviour) compose, data.load, build_model, checkpoint.load_file,
Trainer._maybe_resume, Trainer.__init__ and the first training batch, then runs the real CLI
entry point. Writes {phase: seconds since the parent spawned us} as JSON to $BENCH_MARKS when
the first training step has finished. $BENCH_T0 is the parent's time.time() just before spawn.
"""
import time

T_START = time.time()
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

T0 = float(os.environ.get("BENCH_T0", T_START))
marks = {"python_started": T_START - T0}
durations: dict = {}


def mark(name):
    marks[name] = time.time() - T0


import torch  # noqa: E402,F401

mark("imported_torch")
import hydra  # noqa: E402,F401
import omegaconf  # noqa: E402,F401

from allconv_hpc import checkpoint, cli, compose as compose_mod, data, trainer  # noqa: E402
from allconv_hpc import train as train_mod  # noqa: E402,F401

mark("imported_package")


def wrap(owner, name, key, count=False):
    fn = getattr(owner, name)

    def w(*a, **kw):
        t = time.time()
        try:
            return fn(*a, **kw)
        finally:
            d = time.time() - t
            durations[key] = durations.get(key, 0.0) + d
            if count:
                durations[key + "_calls"] = durations.get(key + "_calls", 0) + 1
            mark(key + "_done")

    setattr(owner, name, w)


wrap(compose_mod, "compose", "compose")
wrap(data, "load", "data_load")
wrap(trainer, "build_model", "model_build")
wrap(checkpoint, "load_file", "checkpoint_load_file", count=True)
wrap(trainer.Trainer, "_maybe_resume", "resume_total")
wrap(trainer.Trainer, "__init__", "trainer_init")
wrap(trainer, "make_tracker", "tracker")
wrap(trainer, "summary", "summary")
wrap(torch.optim.SGD, "__init__", "optimizer")  # the first Optimizer() imports torch._dynamo
wrap(checkpoint.CheckpointDir, "load_latest", "load_latest")

_epoch = data.TrainBatches.epoch


def _timed_epoch(self, epoch, start_step=0):
    for i, item in enumerate(_epoch(self, epoch, start_step)):
        if i == 0:
            mark("first_batch_ready")
        yield item  # the trainer runs the step (and its logging/polling) before asking for the next
        if i == 0:
            break_mark()


def break_mark():
    if "first_step_done" in marks:
        return
    mark("first_step_done")
    out = os.environ.get("BENCH_MARKS")
    if out:
        with open(out, "w") as f:
            json.dump({"marks": marks, "durations": durations}, f)


data.TrainBatches.epoch = _timed_epoch

if __name__ == "__main__":
    sys.exit(cli.main(["train", *sys.argv[1:]]))

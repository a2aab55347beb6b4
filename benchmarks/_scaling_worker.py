"""One rank of bench_scaling.py, started by torchrun: the real Trainer (DistEnv from torchrun's
variables, gloo), one timed epoch, plus the cost of the per-step stop poll (a blocking round trip,
and the lagged poll the trainer does) and of an all-reduce of
All-CNN-C's full gradient. Rank 0 writes JSON to argv[1]; the rest of argv are Hydra overrides."""
import json
import sys
import time

import common as C
import torch
import torch.distributed as dist
from allconv_hpc.distributed import detect_env
from allconv_hpc.preempt import StopRequest


def main():
    out, warmup, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    C.quiet_logs()
    env = detect_env()
    tr = C.make_trainer(overrides, run_dir=None if env.world_size == 1 else C.Path(out).with_suffix(".run"), env=env)
    runs = [C.time_trainer_epoch(tr, warmup) for _ in range(2)]
    res = {"world": env.world_size, "threads": torch.get_num_threads(), "global_batch": tr.cfg.trainer.batch_size,
           "step_s": [s for r in runs for s in r["step_s"]], "n_params": tr.n_params}
    if env.world_size > 1:
        tr.polls.finish()
        polls, lagged = [], []
        for _ in range(50):  # a blocking round trip: what every step paid before the poll was lagged
            t = time.perf_counter()
            tr.dist.max_ints_finish(tr.dist.max_ints_start([0, 0, 0]))
            polls.append(time.perf_counter() - t)
        stop = StopRequest(tr.cfg.checkpoint.signal)
        for _ in range(50):  # what a step pays now: the previous poll's answer came in during the "step"
            time.sleep(0.002)
            t = time.perf_counter()
            tr.polls.poll(stop)
            lagged.append(time.perf_counter() - t)
        tr.polls.finish()
        grad = torch.zeros(1_369_738)  # All-CNN-C width 1: fp32 gradient, 5.48 MB
        ars = []
        for _ in range(5):
            t = time.perf_counter()
            dist.all_reduce(grad)
            ars.append(time.perf_counter() - t)
        res["poll_ms"] = 1e3 * C.median(polls)
        res["poll_lagged_ms"] = 1e3 * C.median(lagged)
        res["allreduce_full_grad_ms"] = 1e3 * C.median(ars)
    if env.rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    if env.world_size > 1:
        dist.barrier()  # without it, rank 1 sometimes aborts at exit (see RESULTS.md section 5)
    tr.close()


if __name__ == "__main__":
    main()

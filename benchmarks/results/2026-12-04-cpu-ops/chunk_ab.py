import sys; sys.path.insert(0, 'benchmarks')
import common as C, torch, json
C.quiet_logs()
ov = C.data_overrides("synthetic", 10*128, 100, "paper") + C.trainer_overrides(width=0.25, batch=128, device="cpu")
tr = C.make_trainer(ov)
res = {1: {"step": [], "cpu": [], "batch": []}, 64: {"step": [], "cpu": [], "batch": []}}
for r in range(10):
    for ch in ((1, 64) if r % 2 == 0 else (64, 1)):
        tr.batches.chunk_steps = ch
        t = C.time_trainer_epoch(tr, 3)
        res[ch]["step"] += t["step_s"]; res[ch]["cpu"] += t["cpu_s"]; res[ch]["batch"].append(t["batch_s"])
out = {}
for ch, d in res.items():
    out[ch] = {"median_step_ms": 1e3*C.median(d["step"]), "p10_step_ms": 1e3*C.quantile(d["step"], .1),
               "median_cpu_ms": 1e3*C.median(d["cpu"]), "median_batch_ms": 1e3*C.median(d["batch"])}
    print(ch, {k: round(v, 2) for k, v in out[ch].items()})
json.dump(out, open(sys.argv[1], "w"), indent=1)

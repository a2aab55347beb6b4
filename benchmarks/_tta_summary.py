"""Summarise a time-to-accuracy run (benchmarks/time_to_accuracy.sh): history.csv -> one JSON.

GPU time to the target = the run's own epoch_seconds (train + eval, the compile in epoch 1
included) summed up to the first epoch whose val_acc reaches it; the wall time adds the process
start, data loading and the end-of-epoch checkpoints.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path


def summarise(history: Path, target: float) -> dict:
    rows = []
    if history.exists():
        with history.open() as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    out = {"target": target, "epochs_run": len(rows), "reached": False, "epoch_reached": None,
           "train_seconds_to_target": None, "train_seconds_total": sum(r["epoch_seconds"] for r in rows),
           "final_val_acc": rows[-1]["val_acc"] if rows else None,
           "best_val_acc": max((r["val_acc"] for r in rows), default=None), "per_epoch": []}
    seconds = 0.0
    for r in rows:
        seconds += r["epoch_seconds"]
        out["per_epoch"].append({"epoch": int(r["epoch"]), "val_acc": r["val_acc"], "train_loss": r["train_loss"],
                                 "epoch_seconds": r["epoch_seconds"], "cumulative_seconds": seconds,
                                 "images_per_second": r["images_per_second"]})
        if not out["reached"] and r["val_acc"] >= target:
            out.update(reached=True, epoch_reached=int(r["epoch"]), train_seconds_to_target=seconds)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--history", required=True, type=Path)
    p.add_argument("--target", type=float, required=True)
    p.add_argument("--wall-s", type=float, required=True, help="process start to exit, measured by the script")
    p.add_argument("--exit-code", type=int, required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--meta", action="append", default=[], help="key=value, recorded as is (true/false as booleans)")
    a = p.parse_args(argv)
    meta = {k: {"true": True, "false": False}.get(v, v) for k, v in (m.split("=", 1) for m in a.meta)}
    doc = {**meta, "exit_code": a.exit_code, "wall_seconds": a.wall_s,
           **summarise(a.history, a.target)}
    try:
        import torch
        if torch.cuda.is_available():
            doc["gpu"] = torch.cuda.get_device_name(0)
        doc["torch"] = torch.__version__
    except Exception as e:  # the summary must come out even if torch cannot be imported here
        doc["torch"] = f"unavailable: {e}"
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, a.out)
    pe = doc["per_epoch"]
    for r in pe[:3] + ([{"epoch": "..."}] if len(pe) > 6 else []) + pe[max(3, len(pe) - 3):]:
        if "val_acc" in r:
            print(f"  epoch {r['epoch']:>3}: val_acc {r['val_acc']:.4f}, {r['cumulative_seconds']:8.1f} s, "
                  f"{r['images_per_second']:,.0f} img/s")
        else:
            print("  ...")
    if doc["reached"]:
        print(f"time to {a.target:.2%}: {doc['train_seconds_to_target']:.1f} s of training (epoch "
              f"{doc['epoch_reached']}); wall {a.wall_s:.0f} s for the whole command")
    else:
        print(f"{a.target:.2%} NOT reached in {doc['epochs_run']} epochs (best {doc['best_val_acc']}); exit "
              f"{a.exit_code}, wall {a.wall_s:.0f} s")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Merge gpu_check.sh's per-section JSON (scratch files) into ONE gpu_check.json.

Stdlib only (no torch import: it runs after every section and must take milliseconds), so the
merged file is current even when a later section is killed. Written atomically (tmp + rename).

    python benchmarks/_gpu_merge.py --sections DIR --status TSV --out FILE [--meta KEY=VALUE ...]

TSV lines: name <TAB> key <TAB> status <TAB> seconds <TAB> limit_s (status: ok, FAIL(rc), TIMEOUT,
skipped: no time left, omitted: not in GPU_CHECK_SECTIONS). Each DIR/<key>.json becomes results[<key>].
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sections", required=True)
    p.add_argument("--status", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--meta", action="append", default=[])
    a = p.parse_args(argv)
    doc: dict = {}
    for kv in a.meta:
        k, _, v = kv.partition("=")
        doc[k] = int(v) if v.isdigit() else v
    sections = []
    st = Path(a.status)
    if st.exists():
        for line in st.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) != 5:
                continue
            name, key, status, secs, limit = parts
            sections.append({"name": name, "key": key, "status": status, "seconds": int(secs),
                             "limit_s": int(limit)})
    doc["sections"] = sections
    doc["failed"] = [s["name"] for s in sections if s["status"] not in ("ok", "skipped", "omitted")]
    doc["skipped"] = [s["name"] for s in sections if s["status"] == "skipped"]
    results = {}
    for f in sorted(Path(a.sections).glob("*.json")):
        try:
            results[f.stem] = json.loads(f.read_text())
        except ValueError as e:  # a section killed mid-write: keep the others
            results[f.stem] = {"unreadable": str(e)}
    doc["results"] = results
    out = Path(a.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()

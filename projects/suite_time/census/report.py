"""Sums a compile census (sitecustomize.py): compilations and seconds by module name, by test
file, and the processes with the most compile time.

    python projects/suite_time/census/report.py CSTATS_DIR [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    by_name = collections.defaultdict(lambda: [0, 0.0])
    by_file = collections.defaultdict(float)
    procs = []
    for path in glob.glob(os.path.join(args.dir, "*.json")):
        d = json.load(open(path))
        procs.append((sum(r[2] for r in d["rec"]), d["wall"], " ".join(d["argv"])[:80]))
        for test, name, seconds in d["rec"]:
            by_name[name][0] += 1
            by_name[name][1] += seconds
            by_file[test.split(" ")[0].split("::")[0]] += seconds
    total = sum(p[0] for p in procs)
    print(f"{len(procs)} processes, {sum(c for c, _ in by_name.values())} compilations, "
          f"{total:.0f} s")
    print("\nseconds  count  module")
    for name, (count, seconds) in sorted(by_name.items(), key=lambda x: -x[1][1])[:args.top]:
        print(f"{seconds:7.1f} {count:6d}  {name}")
    print("\nseconds  test file")
    for name, seconds in sorted(by_file.items(), key=lambda x: -x[1])[:args.top]:
        print(f"{seconds:7.1f}  {name or '(outside a test)'}")
    print("\ncompile s  wall s  process")
    for c, w, argv in sorted(procs, reverse=True)[:args.top]:
        print(f"{c:9.1f} {w:7.1f}  {argv}")


if __name__ == "__main__":
    main()

"""SGLang's own decode throughput, read from a server log: the `gen throughput (token/s)`
of its decode log lines with a given number of running requests.

    python eval/log_throughput.py LOG [LOG ...] --running 16 [--out FILE.json]

SGLang logs one such line every `--decode-log-interval` (40) decode steps. The first line of
a batch round also counts the idle time before it, so the summary drops lines below half
the median. Logs may be gzipped. Prints (and writes) {log: {"values", "steady", "median"}}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
from pathlib import Path

LINE = re.compile(r"#running-req: (\d+),.*?gen throughput \(token/s\): ([\d.]+)")


def throughputs(text: str, running: int) -> dict:
    values = [float(m.group(2)) for m in LINE.finditer(text) if int(m.group(1)) == running]
    if not values:
        return {"values": [], "steady": [], "median": None}
    steady = [v for v in values if v >= statistics.median(values) / 2]
    return {"values": values, "steady": steady, "median": statistics.median(steady)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", type=Path, nargs="+")
    parser.add_argument("--running", type=int, required=True, help="requests running in the lines to read")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = {}
    for path in args.logs:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as handle:
            report[str(path)] = throughputs(handle.read(), args.running)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

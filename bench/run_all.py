"""Run every benchmark and print one table of the headline figures.

    python bench/run_all.py              # about 8 minutes on 2 idle cores
    python bench/run_all.py --quick      # smoke test of every script, about a minute
    python bench/run_all.py --only polling transfer

Each script runs in its own process (so memory figures do not mix), one after another
(so they do not compete for the cores), prints its own detailed tables, and hands its
headline figures back through a JSON file; this script then prints them as one Markdown
table (pasteable into bench/README.md). The exit status is 1 when a target was missed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import machine_line, print_table, verdict

HERE = Path(__file__).resolve().parent
SCRIPTS = {
    "polling": "bench_polling.py",
    "many_jobs": "bench_many_jobs.py",
    "transfer": "bench_transfer.py",
    "media": "bench_media.py",
    "render_long": "bench_render_long.py",
    "startup": "bench_startup.py",
    "load": "bench_load.py",
}
QUICK_OK = {"polling", "many_jobs", "transfer", "startup", "render_long"}  # bench_media has no quick mode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script that has it")
    parser.add_argument("--only", nargs="*", choices=sorted(SCRIPTS), help="run only these")
    parser.add_argument("--quiet", action="store_true", help="hide each script's own tables")
    args = parser.parse_args(argv)
    names = args.only or list(SCRIPTS)
    print(f"# Benchmarks\n\n{machine_line()}")
    rows, missed, broken = [], 0, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(HERE / SCRIPTS[name]), "--json", str(out)]
            if args.quick and name in QUICK_OK:
                cmd.append("--quick")
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=args.quiet, text=True)
            took = time.perf_counter() - t0
            print(f"\n({SCRIPTS[name]}: {took:.0f} s, exit {done.returncode})", flush=True)
            if done.returncode != 0 or not out.exists():
                broken.append(name)
                if args.quiet:
                    print(done.stdout[-2000:], done.stderr[-2000:])
                continue
            for fig in json.loads(out.read_text()):
                met = fig["met"]
                missed += met is False
                rows.append([fig["area"], fig["figure"], fig["value"], fig["target"] or "-",
                             "-" if met is None else verdict(met)])
    print_table("Headline figures", ["area", "figure", "value", "target", "met"], rows)
    if broken:
        print(f"\nThese scripts failed: {', '.join(broken)}")
    print(f"\n{missed} target(s) missed.")
    return 1 if missed or broken else 0


if __name__ == "__main__":
    sys.exit(main())

"""Start-up: from ``python app.py`` to the first successful page load.

    python bench/bench_startup.py            # 3 starts, about 40 s
    python bench/bench_startup.py --quick    # 1 start

Each run starts ``python app.py`` as a user would (fresh process, a free port, an empty
output folder, no API keys), then:
- "page served": GET / is polled every 50 ms until it answers 200 with the app's HTML;
- "page usable": headless Chromium (started beforehand, not counted) opens the page and
  waits for the Generate button to be drawn, i.e. the Gradio front end has loaded its
  scripts, fetched the config and rendered the form.
Both are measured from the moment the process was started. The issue sets no target; the
median of the runs is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import ROOT, free_port, machine_line, print_table, stop_process, write_figures

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
GIVE_UP_S = 90.0


def one_start(browser, tmp: Path) -> dict:
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_API_TOKEN", "_KEY"))}
    env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False",
               AVATAR_OUTPUT_DIR=str(tmp / f"out-{port}"), PYTHONUNBUFFERED="1")
    url = f"http://127.0.0.1:{port}/"
    log = (tmp / f"app-{port}.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        served = None
        while time.perf_counter() - t0 < GIVE_UP_S:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}; see {log.name}")
            try:
                r = httpx.get(url, timeout=2)
                if r.status_code == 200 and "<html" in r.text.lower():
                    served = time.perf_counter() - t0
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        if served is None:
            raise RuntimeError(f"no page after {GIVE_UP_S:.0f} s")
        usable = None
        if browser is not None:
            page = browser.new_page()
            page.goto(url)
            page.locator("#generate").wait_for(timeout=GIVE_UP_S * 1000)
            usable = time.perf_counter() - t0
            page.close()
        return {"served": served, "usable": usable}
    finally:
        stop_process(proc)
        log.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one start")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-browser", action="store_true", help="only time GET /")
    parser.add_argument("--json", type=Path, help="also write the summary figures here (for run_all.py)")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = 1
    print(f"# Start-up\n\n{machine_line()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        pw = browser = None
        if not args.no_browser and Path(CHROMIUM).exists():
            try:
                from playwright.sync_api import sync_playwright

                pw = sync_playwright().start()
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            except Exception as exc:
                print(f"(no browser: {exc})")
        try:
            for _ in range(args.runs):
                results.append(one_start(browser, Path(tmp)))
        finally:
            if browser is not None:
                browser.close()
            if pw is not None:
                pw.stop()
    served = [r["served"] for r in results]
    usable = [r["usable"] for r in results if r["usable"] is not None]
    rows = [["GET / answers 200", f"{statistics.median(served):.1f} s", ", ".join(f"{s:.1f}" for s in served)]]
    if usable:
        rows.append(["page usable in Chromium (Generate drawn)", f"{statistics.median(usable):.1f} s",
                     ", ".join(f"{s:.1f}" for s in usable)])
    print_table(f"From `python app.py` to the first page ({len(results)} starts)", ["milestone", "median", "runs"], rows)
    if args.json:
        figures = [("start-up", "python app.py to GET / 200", f"{statistics.median(served):.1f} s", "(none set)", None)]
        if usable:
            figures.append(("start-up", "python app.py to a usable page (Chromium)",
                            f"{statistics.median(usable):.1f} s", "(none set)", None))
        write_figures(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())

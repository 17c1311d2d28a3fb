"""How quick the page at / feels, and what it costs to load, measured in a real browser (Debian's chromium).

    python -m bench.page [--strokes 40] [--chromium /usr/bin/chromium]

Starts vae-serve on the bundled models, opens the page, and prints:
- the bytes the page transferred to show its first view (with the 2-D model's map, and without one);
- for each of `--strokes` pointer strokes (a "1" and a "0" in turn, the pad cleared between), the time from
  the end of the stroke (pointerup) to its reconstruction, anomaly score and latent point on screen, as the
  page itself records it (window.vaePage.timings: three API calls in parallel, then drawing).
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys

from playwright.sync_api import Page, sync_playwright

from bench.serve import free_port, start_server, stopping

ONE = [(0.52, 0.12), (0.5, 0.5), (0.48, 0.88)]
ZERO = [(0.5 + 0.22 * math.sin(t / 12 * math.pi), 0.5 - 0.36 * math.cos(t / 12 * math.pi)) for t in range(26)]
TRANSFERRED = """() => {
  const entries = [...performance.getEntriesByType("navigation"), ...performance.getEntriesByType("resource")];
  return entries.map(e => [e.name.replace(location.origin, ""), e.transferSize, e.encodedBodySize]);
}"""


def first_view(page: Page, url: str, ready: str) -> list[tuple[str, int, int]]:
    page.goto(url)
    page.wait_for_function(ready)
    page.wait_for_load_state("networkidle")
    return page.evaluate(TRANSFERRED)


def stroke(page: Page, points: list[tuple[float, float]]) -> float:
    box = page.locator("#pad").bounding_box()
    before = page.evaluate("window.vaePage.timings.length")
    page.mouse.move(box["x"] + points[0][0] * box["width"], box["y"] + points[0][1] * box["height"])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=3)
    page.mouse.up()
    page.wait_for_function(f"window.vaePage.timings.length > {before}")
    return page.evaluate("window.vaePage.timings.at(-1)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strokes", type=int, default=40)
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = p.parse_args()
    if not args.chromium:
        raise SystemExit("chromium not found: apt-get install chromium, or pass --chromium PATH")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with stopping(start_server(port, {})), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        ready = "document.getElementById('model').disabled === false"
        for label, path in [("vae-2d, with its map", "/"), ("vae, no map", "/?model=vae")]:
            entries = first_view(browser.new_page(), base + path, ready)
            print(f"first view ({label}): {sum(e[1] for e in entries) / 1024:.1f} KiB transferred in "
                  f"{len(entries)} responses")
            for name, transferred, body in entries:
                print(f"  {transferred / 1024:7.1f} KiB  (body {body / 1024:6.1f} KiB)  {name}")
        page.goto(base + "/")
        page.wait_for_function(ready)
        page.wait_for_load_state("networkidle")
        stroke(page, ONE)  # warm-up
        times = []
        for i in range(args.strokes):
            page.get_by_role("button", name="Clear").click()
            times.append(stroke(page, ONE if i % 2 == 0 else ZERO))
        q = statistics.quantiles(times, n=10)
        print(f"stroke end -> reconstruction, score and latent point on screen, {len(times)} strokes: "
              f"median {statistics.median(times):.1f} ms, p90 {q[8]:.1f} ms, max {max(times):.1f} ms")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

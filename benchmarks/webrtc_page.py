"""The browser page over WebRTC, measured where a listener is: inside headless Chromium.

Starts `voxflow serve` (WebRTC loopback candidates on, audio cache off so every sentence is
synthesized) on a free loopback port, opens its page in Chromium and reads the page's own
figures (`window.voxflow.stats`):

- first audio: Speak to the remote audio level rising above the page's threshold, N runs on
  one connected page;
- stop to silence: Stop to the level falling back under the threshold for good;
- sessions: 1, 2, 4, 8 pages at once, each speaking a paragraph; a session holds when its
  packets keep arriving at ~50 per second, it heard its first audio and saw no error.

Prints a table, writes JSON (default benchmarks/results/webrtc.json) and, with --screenshot,
saves a phone-sized picture of the page mid-sentence.

    python benchmarks/webrtc_page.py [--runs 20] [--sweep 1,2,4,8] [--screenshot docs/webrtc-page.png] [--check]
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
from playwright.sync_api import Browser, Page, sync_playwright
from report import add_check_flag, finish, print_table, stamp, write_json
from serve_process import voxflow_serve

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", "--allow-loopback-in-peer-connection",
]
SENTENCES = [
    "The quick brown fox jumps high.", "Please close the door behind you.", "I will call you back soon.",
    "Your order ships on Monday morning.", "The meeting starts in ten minutes.", "Let me check that for you.",
    "It looks like rain this afternoon.", "Turn left at the next light.", "Dinner is ready in the kitchen.",
    "We found three results for you.",
]
PARAGRAPH = (Path(__file__).parents[1] / "demos" / "paragraph.txt").read_text().strip()
STEADY_PACKETS_PER_SECOND = 45  # 50 expected (20 ms packets); a little slack for the sampling edges
FIRST_AUDIO_P50_MS = 250
STOP_TO_SILENCE_MS = 200  # every stop
PAGES_HOLDING = 8


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@contextmanager
def voxflow_server() -> Iterator[str]:
    with voxflow_serve(env={"VOXFLOW_WEBRTC_LOOPBACK": "true", "VOXFLOW_CACHE_ENABLED": "false"}) as port:
        if httpx.get(f"http://127.0.0.1:{port}/").status_code != 200:
            raise SystemExit("the server does not serve the page at / (voxflow.transports.web_page not installed)")
        yield f"http://127.0.0.1:{port}"


def open_page(browser: Browser, url: str, **viewport) -> Page:
    page = browser.new_context(**viewport).new_page()
    page.goto(url)
    page.wait_for_function("['ready', 'error'].includes(voxflow.stats.state)", timeout=30_000)
    if page.evaluate("voxflow.stats.state") != "ready":
        raise SystemExit(f"the page did not connect: {page.evaluate('voxflow.stats.lastError')}")
    return page


def stats(page: Page) -> dict:
    return page.evaluate("({...voxflow.stats})")


def first_audio(page: Page, runs: int) -> tuple[list[float], list[float]]:
    firsts, stops = [], []
    for i in range(runs):
        page.evaluate("text => voxflow.speak(text)", SENTENCES[i % len(SENTENCES)])
        page.wait_for_function("voxflow.stats.firstAudioMs !== null", timeout=10_000)
        firsts.append(stats(page)["firstAudioMs"])
        page.wait_for_function("voxflow.stats.state !== 'speaking'", timeout=20_000)
        time.sleep(0.3)  # `done` leaves before the last audio has played out
    for _ in range(max(3, runs // 4)):
        page.evaluate("text => voxflow.speak(text)", PARAGRAPH)
        page.wait_for_function("voxflow.stats.firstAudioMs !== null", timeout=10_000)
        time.sleep(1.0)
        page.evaluate("voxflow.stop()")
        page.wait_for_function("voxflow.stats.stopToSilenceMs !== null", timeout=5_000)
        stops.append(stats(page)["stopToSilenceMs"])
    return firsts, stops


def sessions(browser: Browser, url: str, n: int, hold: float) -> dict:
    pages = [open_page(browser, url) for _ in range(n)]
    try:
        for page in pages:
            page.evaluate("text => voxflow.speak(text)", PARAGRAPH)
        start = [stats(p)["packetsReceived"] for p in pages]
        time.sleep(hold)
        end = [stats(p) for p in pages]
        rates = [(e["packetsReceived"] - s) / hold for s, e in zip(start, end)]
        errors = [e["lastError"] for e in end if e["lastError"]]
        firsts = [e["firstAudioMs"] for e in end if e["firstAudioMs"] is not None]
        steady = sum(r >= STEADY_PACKETS_PER_SECOND and e["firstAudioMs"] is not None and not e["lastError"]
                     for r, e in zip(rates, end))
        return {"sessions": n, "steady": steady, "packets_per_second_min": min(rates), "first_audio_p50_ms": pct(firsts, 50),
                "first_audio_max_ms": max(firsts, default=None), "errors": errors}
    finally:
        for page in pages:
            page.evaluate("voxflow.disconnect()")
            page.context.close()


def screenshot(browser: Browser, url: str, path: str) -> None:
    page = open_page(browser, url, viewport={"width": 430, "height": 760}, device_scale_factor=2)
    page.select_option("#mode", "paste")
    page.fill("#text", PARAGRAPH)
    page.click("#speak")
    page.wait_for_function("voxflow.stats.firstAudioMs !== null", timeout=10_000)
    time.sleep(2.5)  # a few words in, so the highlight has moved along
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=path)
    page.evaluate("voxflow.stop()")
    page.context.close()


def measure(url: str, args: argparse.Namespace) -> dict:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = open_page(browser, url)
            page.evaluate("voxflow.speak('Warming up.')")  # the first synthesis of a fresh process
            page.wait_for_function("voxflow.stats.state === 'ready'", timeout=20_000)
            time.sleep(0.3)
            firsts, stops = first_audio(page, args.runs)
            page.context.close()
            sweep = [sessions(browser, url, n, args.hold) for n in args.sweep]
            if args.screenshot:
                screenshot(browser, url, args.screenshot)
        finally:
            browser.close()
    holding = [s["sessions"] for s in sweep if s["steady"] == s["sessions"]]
    return {
        "first_audio_at_browser_ms": {"p50": pct(firsts, 50), "p95": pct(firsts, 95), "max": max(firsts), "n": len(firsts)},
        "stop_to_silence_ms": {"p50": pct(stops, 50), "max": max(stops), "n": len(stops), "values": stops},
        "sessions": sweep,
        "largest_count_holding": max(holding, default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--sweep", default="1,2,4,8")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds each session sweep step is watched")
    parser.add_argument("--server", help="an already running server (http://HOST:PORT) instead of starting one")
    parser.add_argument("--screenshot", help="PNG of the page mid-sentence, phone-sized")
    parser.add_argument("--out", default="benchmarks/results/webrtc.json")
    add_check_flag(parser)
    args = parser.parse_args()
    args.sweep = [int(n) for n in args.sweep.split(",")]

    if args.server:
        figures = measure(args.server.rstrip("/") + "/", args)
    else:
        with voxflow_server() as url:
            figures = measure(url + "/", args)

    result = {
        **stamp(),
        "browser": "Chromium (headless), server and browser on the same machine",
        "server": args.server or "voxflow serve, started by this script",
        **figures,
    }
    f, s = result["first_audio_at_browser_ms"], result["stop_to_silence_ms"]
    rows = [
        ("first audio at the browser after Speak (p50 / p95)", f"{f['p50']:.0f} / {f['p95']:.0f} ms", f"p50 <= {FIRST_AUDIO_P50_MS} ms"),
        ("Stop to silence at the browser (p50 / max)", f"{s['p50']:.0f} / {s['max']:.0f} ms", f"<= {STOP_TO_SILENCE_MS} ms"),
    ]
    for step in result["sessions"]:
        rows.append((f"{step['sessions']} pages speaking at once: steady, min packets/s, max first audio",
                     f"{step['steady']}/{step['sessions']}, {step['packets_per_second_min']:.0f}/s, {step['first_audio_max_ms']} ms"
                     + (f", {len(step['errors'])} errors" if step["errors"] else ""), "all steady"))
    rows.append(("largest page count holding steady audio", str(result["largest_count_holding"]), f">= {PAGES_HOLDING}"))
    targets = {
        "first_audio_p50": f["p50"] <= FIRST_AUDIO_P50_MS,
        "stop_to_silence_max": s["max"] <= STOP_TO_SILENCE_MS,
        **{f"{step['sessions']}_pages_steady": step["steady"] == step["sessions"] for step in result["sessions"]},
        "largest_count_holding": result["largest_count_holding"] >= PAGES_HOLDING,
    }
    result["targets"] = targets
    print_table(rows)
    write_json(args.out, result)
    finish([name for name, met in targets.items() if not met], args.check)


if __name__ == "__main__":
    main()

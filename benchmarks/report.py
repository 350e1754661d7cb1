"""What every benchmark reports the same way: when and where it ran, a table, a JSON file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path


def stamp() -> dict[str, str]:
    """The date and machine a result was measured on (results drift between machines and days)."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}",
    }


def print_table(rows: list[tuple[str, str, str]]) -> None:
    """(measure, result, target) rows, aligned for a terminal."""
    width = max(len(r[0]) for r in rows)
    value_width = max(30, *(len(r[1]) for r in rows))
    print(f"{'measure':<{width}}  {'result':<{value_width}}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<{value_width}}  {target}")


def write_json(path: str, result: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


def add_check_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")


def finish(missed: list[str], check: bool) -> None:
    """Say which targets were missed; with --check, exit 1 if any was."""
    print("targets missed: " + ", ".join(missed) if missed else "all targets met")
    if check and missed:
        sys.exit(1)


def conclude(rows: list[tuple[str, str, str]], result: dict, targets: dict[str, bool], out: str, check: bool) -> None:
    """Print the table, write the JSON with each target's outcome, and finish (see `finish`)."""
    result["targets"] = targets
    print_table(rows)
    write_json(out, result)
    finish([name for name, met in targets.items() if not met], check)

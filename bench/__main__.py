"""Run every benchmark (`python -m bench`), or those whose names are given (`python -m bench cache`)."""

from __future__ import annotations

import importlib
import os
import platform
import sys
from pathlib import Path


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    ) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def main(selected: list[str]) -> int:
    names = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    if selected:
        names = [n for n in names if any(s in n for s in selected)]
    print(f"# Benchmarks\n\nMachine: {machine()}\n")
    for name in names:
        print(f"## {name.removeprefix('bench_')}\n", flush=True)
        importlib.import_module(f"bench.{name}").main()
        print(flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

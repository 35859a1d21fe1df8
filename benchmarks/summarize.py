"""Markdown tables from a pytest-benchmark JSON file, with each case's ratio to its baseline.

    pytest benchmarks/ --benchmark-json=bench.json && python -m benchmarks.summarize bench.json

Ratios are taken within one benchmark group (one case, several providers): attention against the
fastest SDPA backend, VQ against the naive path, the model cases against the official-style one.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

BASELINES = {"vq": ("naive",), "block": ("official",), "rollout": ("official",),
             "adaptive": ("official-b1-fp32",), "training": ("official-fp16",)}


def _baseline(group: str, rows: list[dict]) -> dict | None:
    if group.startswith("attention"):
        sdpa = [r for r in rows if r["provider"].startswith("sdpa-")]
        return min(sdpa, key=lambda r: r["median_ms"]) if sdpa else None
    for prefix, names in BASELINES.items():
        if group.startswith(prefix):
            return next((r for r in rows if r["provider"] in names), None)
    return None


def _rate(r: dict) -> float:
    # images/s where a case has images (batches differ between providers), else runs per second
    return r.get("images_per_s") or 1e3 / r["median_ms"]


def summarize(data: dict) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        info = dict(bench.get("extra_info", {}))
        if "median_ms" not in info:
            continue
        info.setdefault("provider", bench["name"])
        groups[bench.get("group") or bench["name"]].append(info)
    machine = data.get("machine_info", {})
    lines = [f"machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
             f"python {machine.get('python_version', '?')}; {data.get('datetime', '')}", ""]
    lines += ["| group | provider | median ms | TFLOP/s | images/s | peak MiB | vs baseline |", "|---|---|---|---|---|---|---|"]
    for group in sorted(groups):
        rows = groups[group]
        base = _baseline(group, rows)
        for r in sorted(rows, key=lambda r: r["provider"]):
            ratio = f"{_rate(r) / _rate(base):.2f}x {base['provider']}" if base else "-"
            lines.append(
                f"| {group} | {r['provider']} | {r['median_ms']:.4g} | {r.get('tflops', '-')} | "
                f"{r.get('images_per_s', '-')} | {r.get('peak_mib', '-')} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.summarize", description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="a file written by pytest --benchmark-json")
    args = p.parse_args(argv)
    with open(args.json, encoding="utf-8") as f:
        print(summarize(json.load(f)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

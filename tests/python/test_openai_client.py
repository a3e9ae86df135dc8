#!/usr/bin/env python3
"""`metal-candle serve` through the official `openai` Python client.

Runs against servers that scripts/test_server_python.sh starts (it passes their URLs):

  --url        `serve --model smol=GGUF --lora a=A@smol --lora b=B@smol --parallel 4 --ctx CTX`
  --auth-url   the same model served with `--api-key KEY`

References never come from the server under test where a better one exists: adapters are compared
with `BINARY generate --adapter DIR` (the CLI), concurrent answers with the same request run alone.

Prints one PASS/FAIL line per check and exits 1 if any failed.
"""

import argparse
import concurrent.futures
import json
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request

import openai

ARGS = None
RESULTS = []  # (name, ok, seconds, detail)

CHAT_PROMPT = "What is the capital of France?"
TEXT_PROMPT = "The capital of France is"


# ---------------------------------------------------------------- harness


def check(name):
    """Decorator: runs the function as one check, recording PASS/FAIL (never raising)."""

    def wrap(fn):
        def run():
            t0 = time.monotonic()
            try:
                detail = fn()
                ok = True
            except AssertionError as e:
                ok, detail = False, f"assertion: {e}"
            except Exception as e:  # noqa: BLE001 - a crash is a failed check, with its trace
                ok, detail = False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            dt = time.monotonic() - t0
            RESULTS.append((name, ok, dt, detail))
            line = f"{'PASS' if ok else 'FAIL'} {name} ({dt:.1f}s)"
            if detail:
                line += f": {detail}"
            print(line, flush=True)

        run.check_name = name
        return run

    return wrap


def eq(got, want, what):
    assert got == want, f"{what}: got {got!r}, want {want!r}"


def raises(exc_type, fn, what):
    """Calls fn, asserts it raises exc_type, returns the exception."""
    try:
        r = fn()
    except exc_type as e:
        return e
    except openai.APIStatusError as e:
        raise AssertionError(f"{what}: got {type(e).__name__} (HTTP {e.status_code}, body {e.body}), want {exc_type.__name__}")
    # A stream that did not raise at create(): drain it so the connection is released.
    if isinstance(r, openai.Stream):
        r.close()
    raise AssertionError(f"{what}: no error, want {exc_type.__name__}")


def client(url=None, api_key="unused"):
    # No retries: a 5xx or 429 must show up as itself, never be retried away.
    return openai.OpenAI(base_url=(url or ARGS.url) + "/v1", api_key=api_key, max_retries=0, timeout=120)


def http(method, path, body=None, url=None, headers=None):
    """(status, parsed JSON or text) of a raw request."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request((url or ARGS.url) + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_healthy(url, limit=120):
    deadline = time.monotonic() + limit
    last = None
    while time.monotonic() < deadline:
        try:
            status, body = http("GET", "/health", url=url)
            if status == 200:
                return body
            last = (status, body)
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise SystemExit(f"{url}/health not 200 within {limit}s (last: {last})")


def cli_generate(prompt, max_tokens, adapter=None):
    """The reference: `BINARY generate` stdout (the completion, then one newline)."""
    cmd = [ARGS.binary, "generate", "--model", ARGS.gguf, "--prompt", prompt, "--max-tokens", str(max_tokens), "--temperature", "0"]
    if adapter:
        cmd += ["--adapter", adapter]
    r = subprocess.run(cmd, capture_output=True, timeout=120)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.decode(errors='replace')[-2000:]}")
    out = r.stdout.decode()
    assert out.endswith("\n"), f"generate stdout does not end with its newline: {out!r}"
    return out[:-1]


def chat(model="smol", content=CHAT_PROMPT, max_tokens=16, c=None, **kw):
    return (c or client()).chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0, seed=7, **kw
    )


def complete(model="smol", prompt=TEXT_PROMPT, max_tokens=16, c=None, **kw):
    return (c or client()).completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, seed=7, **kw)


def join_chat_stream(stream):
    """(text per choice index, finish reasons, usage chunks, all chunks) of a chat stream."""
    texts, finish, usage, chunks = {}, {}, [], []
    for ch in stream:
        chunks.append(ch)
        if ch.usage is not None:
            usage.append(ch)
        for c in ch.choices:
            if c.delta.content:
                texts[c.index] = texts.get(c.index, "") + c.delta.content
            if c.finish_reason is not None:
                assert c.index not in finish, f"choice {c.index} got two finish_reason chunks"
                finish[c.index] = c.finish_reason
    return texts, finish, usage, chunks


def join_text_stream(stream):
    texts, finish, usage, chunks = {}, {}, [], []
    for ch in stream:
        chunks.append(ch)
        if ch.usage is not None:
            usage.append(ch)
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.text or "")
            if c.finish_reason is not None:
                assert c.index not in finish, f"choice {c.index} got two finish_reason chunks"
                finish[c.index] = c.finish_reason
    return texts, finish, usage, chunks


def check_usage(u, what, completion=None):
    assert u is not None, f"{what}: no usage"
    assert u.prompt_tokens > 0, f"{what}: prompt_tokens {u.prompt_tokens}"
    assert u.completion_tokens > 0, f"{what}: completion_tokens {u.completion_tokens}"
    eq(u.total_tokens, u.prompt_tokens + u.completion_tokens, f"{what}: total_tokens")
    if completion is not None:
        eq(u.completion_tokens, completion, f"{what}: completion_tokens")


# ---------------------------------------------------------------- models


@check("models list: ids, status, context_length, adapters' parent")
def t_models():
    models = {m.id: m for m in client().models.list()}
    eq(sorted(models), ["a", "b", "smol"], "ids")
    for id_, m in models.items():
        eq(m.object, "model", f"{id_}.object")
        eq(m.status, "loaded", f"{id_}.status (base and adapters are preloaded)")
        eq(m.context_length, ARGS.ctx, f"{id_}.context_length (--ctx)")
    eq(models["smol"].parent, None, "smol.parent")
    eq(models["a"].parent, "smol", "a.parent")
    eq(models["b"].parent, "smol", "b.parent")
    one = client().models.retrieve("a")
    eq((one.id, one.parent, one.context_length), ("a", "smol", ARGS.ctx), "GET /v1/models/a")
    e = raises(openai.NotFoundError, lambda: client().models.retrieve("nope"), "GET /v1/models/nope")
    eq(e.code, "model_not_found", "code")


# ---------------------------------------------------------------- chat / completions


@check("chat: non-streamed answer, usage; streamed (include_usage) joins to the same text")
def t_chat_stream():
    r = chat(max_tokens=16)
    eq(r.object, "chat.completion", "object")
    assert r.id.startswith("chatcmpl-"), f"id {r.id!r}"
    eq(r.model, "smol", "model")
    eq(len(r.choices), 1, "choices")
    c = r.choices[0]
    eq((c.index, c.message.role), (0, "assistant"), "index, role")
    text = c.message.content
    assert isinstance(text, str) and text, f"content {text!r}"
    assert c.finish_reason in ("stop", "length"), c.finish_reason
    check_usage(r.usage, "usage", 16 if c.finish_reason == "length" else None)
    texts, finish, usage, chunks = join_chat_stream(chat(max_tokens=16, stream=True, stream_options={"include_usage": True}))
    eq(texts.get(0, ""), text, "streamed text vs non-streamed")
    eq(finish, {0: c.finish_reason}, "streamed finish_reason")
    eq(chunks[0].choices[0].delta.role, "assistant", "first chunk's delta.role")
    assert all(ch.object == "chat.completion.chunk" for ch in chunks), "chunk object"
    assert len({ch.id for ch in chunks}) == 1, "one id across chunks"
    eq(len(usage), 1, "usage chunks")
    assert usage[0] is chunks[-1], "the usage chunk is the last one"
    eq(usage[0].choices, [], "usage chunk choices")
    eq(usage[0].usage.model_dump(exclude_none=True), r.usage.model_dump(exclude_none=True), "streamed usage vs non-streamed")
    # Without stream_options: no usage chunk.
    texts, _, usage, _ = join_chat_stream(chat(max_tokens=16, stream=True))
    eq(texts.get(0, ""), text, "streamed text without include_usage")
    eq(usage, [], "usage chunks without include_usage")
    return repr(text)


@check("completions: non-streamed answer, usage; streamed (include_usage) joins to the same text")
def t_completions_stream():
    r = complete(max_tokens=16)
    eq(r.object, "text_completion", "object")
    assert r.id.startswith("cmpl-"), f"id {r.id!r}"
    eq(len(r.choices), 1, "choices")
    c = r.choices[0]
    assert isinstance(c.text, str) and c.text, f"text {c.text!r}"
    check_usage(r.usage, "usage", 16 if c.finish_reason == "length" else None)
    # The prompt of a plain completion is not templated: a handful of tokens.
    assert r.usage.prompt_tokens < 12, f"prompt_tokens {r.usage.prompt_tokens} for {TEXT_PROMPT!r}"
    texts, finish, usage, chunks = join_text_stream(complete(max_tokens=16, stream=True, stream_options={"include_usage": True}))
    eq(texts.get(0, ""), c.text, "streamed text vs non-streamed")
    eq(finish, {0: c.finish_reason}, "finish_reason")
    eq(len(usage), 1, "usage chunks")
    assert usage[0] is chunks[-1], "the usage chunk is the last one"
    eq(usage[0].choices, [], "usage chunk choices")
    eq(usage[0].usage.model_dump(exclude_none=True), r.usage.model_dump(exclude_none=True), "streamed usage")
    texts, _, usage, _ = join_text_stream(complete(max_tokens=16, stream=True))
    eq((texts.get(0, ""), usage), (c.text, []), "streamed without include_usage")
    # The base model's plain completion equals the CLI's (the same greedy decode).
    eq(c.text, cli_generate(TEXT_PROMPT, 16), "server completion vs `generate` stdout")
    return repr(c.text)


@check("chat logprobs + top_logprobs: OpenAI shape, bytes join to the content, greedy picks the top")
def t_chat_logprobs():
    # repetition_penalty 1: the chosen token is then exactly the argmax of the reported distribution.
    r = chat(max_tokens=12, logprobs=True, top_logprobs=3, extra_body={"repetition_penalty": 1.0})
    c = r.choices[0]
    content = c.logprobs.content
    eq(len(content), r.usage.completion_tokens, "one logprobs entry per token")
    raw = b""
    for i, e in enumerate(content):
        assert isinstance(e.token, str), f"[{i}].token"
        assert isinstance(e.logprob, float) and e.logprob <= 0, f"[{i}].logprob {e.logprob}"
        assert isinstance(e.bytes, list) and all(isinstance(b, int) and 0 <= b < 256 for b in e.bytes), f"[{i}].bytes {e.bytes}"
        raw += bytes(e.bytes)
        eq(len(e.top_logprobs), 3, f"[{i}] top_logprobs count")
        lps = [t.logprob for t in e.top_logprobs]
        eq(lps, sorted(lps, reverse=True), f"[{i}] top_logprobs sorted")
        for t in e.top_logprobs:
            assert isinstance(t.token, str) and isinstance(t.bytes, list) and t.logprob <= 0, f"[{i}] top entry {t}"
        top = e.top_logprobs[0]
        eq((top.token, top.bytes), (e.token, e.bytes), f"[{i}] greedy token is the most likely one")
        assert abs(top.logprob - e.logprob) < 1e-6, f"[{i}] chosen logprob {e.logprob} vs top {top.logprob}"
    eq(raw.decode("utf-8", errors="replace"), c.message.content, "tokens' bytes joined vs content")
    # Streamed: the same entries, in order.
    stream = chat(max_tokens=12, logprobs=True, top_logprobs=3, extra_body={"repetition_penalty": 1.0}, stream=True)
    streamed = [e for ch in stream for x in ch.choices if x.logprobs and x.logprobs.content for e in x.logprobs.content]
    eq([(e.token, e.bytes) for e in streamed], [(e.token, e.bytes) for e in content], "streamed logprobs tokens")
    for s, n in zip(streamed, content):
        assert abs(s.logprob - n.logprob) < 1e-5, f"streamed logprob {s.logprob} vs {n.logprob}"
    # Without logprobs: none.
    eq(chat(max_tokens=4).choices[0].logprobs, None, "logprobs when not asked")
    return f"{len(content)} tokens"


@check("completions logprobs=2: tokens, token_logprobs, top_logprobs, text_offset")
def t_text_logprobs():
    r = complete(max_tokens=12, logprobs=2)
    c = r.choices[0]
    lp = c.logprobs
    n = r.usage.completion_tokens
    eq((len(lp.tokens), len(lp.token_logprobs), len(lp.top_logprobs), len(lp.text_offset)), (n, n, n, n), "lengths")
    eq("".join(lp.tokens), c.text, "tokens joined vs text")
    for i in range(n):
        top = lp.top_logprobs[i]
        eq(len(top), 2, f"[{i}] top_logprobs entries")
        assert lp.token_logprobs[i] <= 0, f"[{i}] logprob {lp.token_logprobs[i]}"
        best = max(top.values())
        assert abs(best - lp.token_logprobs[i]) < 1e-6, f"[{i}] greedy logprob {lp.token_logprobs[i]} vs best {best}"
        eq(top.get(lp.tokens[i]), lp.token_logprobs[i], f"[{i}] chosen token among the top")
        eq(lp.text_offset[i], len("".join(lp.tokens[:i])), f"[{i}] text_offset")
    eq(complete(max_tokens=12).choices[0].text, c.text, "same text without logprobs")


@check("n=2: two choices, each the greedy answer at temperature 0 (chat; completions streamed)")
def t_n2():
    solo_r = chat(max_tokens=12)
    solo = solo_r.choices[0].message.content
    r = chat(max_tokens=12, n=2)
    eq([c.index for c in r.choices], [0, 1], "chat choice indexes")
    eq([c.message.content for c in r.choices], [solo, solo], "chat choices")
    eq(r.usage.completion_tokens, 2 * solo_r.usage.completion_tokens, "completion_tokens summed over the choices")
    eq(r.usage.prompt_tokens, solo_r.usage.prompt_tokens, "prompt_tokens counted once")
    solo_text = complete(max_tokens=12).choices[0].text
    texts, finish, usage, _ = join_text_stream(complete(max_tokens=12, n=2, stream=True, stream_options={"include_usage": True}))
    eq(texts, {0: solo_text, 1: solo_text}, "completions streamed choices")
    eq(sorted(finish), [0, 1], "a finish_reason per choice")
    eq(len(usage), 1, "one usage chunk")
    # Sampled (temperature 1): still two well-formed choices.
    r = client().chat.completions.create(model="smol", messages=[{"role": "user", "content": CHAT_PROMPT}], max_tokens=8, n=2, temperature=1.0, seed=3)
    eq(len(r.choices), 2, "sampled choices")
    assert all(isinstance(c.message.content, str) for c in r.choices)


# ---------------------------------------------------------------- errors


@check("unknown model -> NotFoundError, code model_not_found, message lists the ids")
def t_unknown_model():
    for what, fn in [
        ("chat", lambda: chat(model="no-such-model")),
        ("chat stream", lambda: chat(model="no-such-model", stream=True)),
        ("completions", lambda: complete(model="no-such-model")),
    ]:
        e = raises(openai.NotFoundError, fn, what)
        eq(e.status_code, 404, f"{what}: status")
        eq(e.code, "model_not_found", f"{what}: code")
        msg = e.body.get("message", "") if isinstance(e.body, dict) else str(e.body)
        for id_ in ("smol", "a", "b"):
            assert f"{id_}" in msg, f"{what}: message {msg!r} does not list {id_!r}"
        assert "no-such-model" in msg, f"{what}: message {msg!r} does not name the id asked for"


@check("bad temperature / top_p / max_tokens=0 / empty messages -> BadRequestError (also streamed)")
def t_bad_params():
    msgs = [{"role": "user", "content": "hi"}]
    c = client()
    cases = [
        ("temperature=-0.5", "temperature", dict(messages=msgs, temperature=-0.5)),
        ("temperature=1000", "temperature", dict(messages=msgs, temperature=1000)),
        ("top_p=0", "top_p", dict(messages=msgs, top_p=0)),
        ("top_p=1.5", "top_p", dict(messages=msgs, top_p=1.5)),
        ("max_tokens=0", "max_tokens", dict(messages=msgs, max_tokens=0)),
        ("messages=[]", "messages", dict(messages=[])),
    ]
    for label, param, kw in cases:
        for stream in (False, True):
            what = f"chat {label}{' stream' if stream else ''}"
            e = raises(openai.BadRequestError, lambda: c.chat.completions.create(model="smol", stream=stream, **kw), what)
            eq(e.status_code, 400, f"{what}: status")
            eq(e.param, param, f"{what}: param")
            eq(e.type, "invalid_request_error", f"{what}: type")
    for label, param, kw in [("temperature=-1", "temperature", dict(temperature=-1)), ("max_tokens=0", "max_tokens", dict(max_tokens=0)), ("top_p=0", "top_p", dict(top_p=0))]:
        for stream in (False, True):
            what = f"completions {label}{' stream' if stream else ''}"
            e = raises(openai.BadRequestError, lambda: c.completions.create(model="smol", prompt="hi", stream=stream, **kw), what)
            eq(e.param, param, f"{what}: param")
    # The server still answers after all that.
    assert chat(max_tokens=2).choices[0].message.content is not None


@check("prompt longer than --ctx -> BadRequestError code context_length_exceeded (also streamed)")
def t_context():
    long_text = "hello " * (ARGS.ctx + 100)
    c = client()
    for what, fn in [
        ("chat", lambda: chat(content=long_text, max_tokens=4)),
        ("chat stream", lambda: chat(content=long_text, max_tokens=4, stream=True)),
        ("completions", lambda: complete(prompt=long_text, max_tokens=4)),
        ("completions stream", lambda: complete(prompt=long_text, max_tokens=4, stream=True)),
    ]:
        e = raises(openai.BadRequestError, fn, what)
        eq(e.code, "context_length_exceeded", f"{what}: code")
        msg = e.body.get("message", "") if isinstance(e.body, dict) else ""
        assert str(ARGS.ctx) in msg, f"{what}: message {msg!r} does not give the context {ARGS.ctx}"
    # A prompt that fits still works.
    assert complete(prompt="hello " * 50, max_tokens=2, c=c).choices[0].text is not None


@check("--api-key: wrong key -> AuthenticationError, the right key works, /health needs none")
def t_auth():
    url = ARGS.auth_url
    wrong = client(url, api_key=ARGS.api_key + "-wrong")
    e = raises(openai.AuthenticationError, lambda: wrong.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=2), "chat, wrong key")
    eq(e.status_code, 401, "status")
    raises(openai.AuthenticationError, lambda: list(wrong.models.list()), "models, wrong key")
    raises(openai.AuthenticationError, lambda: wrong.completions.create(model="smol", prompt="hi", max_tokens=2, stream=True), "completions stream, wrong key")
    status, _ = http("GET", "/v1/models", url=url)  # no Authorization header at all
    eq(status, 401, "no key at all")
    right = client(url, api_key=ARGS.api_key)
    r = right.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
    assert r.choices[0].message.content is not None
    eq([m.id for m in right.models.list()], ["smol"], "models with the right key")
    status, body = http("GET", "/health", url=url)
    eq(status, 200, f"/health without a key ({body})")


# ---------------------------------------------------------------- concurrency


CONCURRENT_PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Tell me a fun fact about cats.",
    "How do airplanes fly?",
    "What is the boiling point of water?",
    "Give me a synonym for happy.",
]


@check("8 concurrent streaming chats on --parallel 4: each equals its solo answer")
def t_concurrent():
    c = client()
    solo = [chat(content=p, max_tokens=24, c=c).choices[0].message.content for p in CONCURRENT_PROMPTS]
    assert len(set(solo)) > 1, f"the prompts all gave the same answer: {solo[0]!r}"
    barrier = threading.Barrier(len(CONCURRENT_PROMPTS))
    busy = {"max": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                status, h = http("GET", "/health")
                if status == 200:
                    busy["max"] = max(busy["max"], h["slots_processing"])
            except OSError:
                pass
            time.sleep(0.02)

    def one(p):
        barrier.wait(timeout=60)
        texts, finish, _, _ = join_chat_stream(chat(content=p, max_tokens=24, c=c, stream=True))
        eq(sorted(finish), [0], f"{p!r} finish")
        return texts.get(0, "")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(CONCURRENT_PROMPTS)) as pool:
            got = list(pool.map(one, CONCURRENT_PROMPTS))
    finally:
        stop.set()
        watcher.join()
    bad = [(p, g, s) for p, g, s in zip(CONCURRENT_PROMPTS, got, solo) if g != s]
    assert not bad, "concurrent != solo: " + "; ".join(f"{p!r}: got {g!r}, solo {s!r}" for p, g, s in bad)
    # The engine really ran them together (at most --parallel at once).
    assert 2 <= busy["max"] <= ARGS.parallel, f"slots_processing peaked at {busy['max']}"
    return f"slots_processing peaked at {busy['max']}"


# ---------------------------------------------------------------- adapters


ADAPTER_PROMPT = "The capital of France is"
ADAPTER_TOKENS = 16
REFS = {}


def refs():
    """CLI references (computed once): base, adapter a, adapter b."""
    if not REFS:
        REFS["smol"] = cli_generate(ADAPTER_PROMPT, ADAPTER_TOKENS)
        REFS["a"] = cli_generate(ADAPTER_PROMPT, ADAPTER_TOKENS, ARGS.adapter_a)
        REFS["b"] = cli_generate(ADAPTER_PROMPT, ADAPTER_TOKENS, ARGS.adapter_b)
    return REFS


@check("two adapters of one base in parallel (/v1/completions): each equals `generate --adapter`, all differ")
def t_adapters():
    ref = refs()
    assert ref["a"] != ref["smol"], f"adapter a's CLI output equals the base's: {ref['a']!r} (make_lora's B too small?)"
    assert ref["b"] != ref["smol"], f"adapter b's CLI output equals the base's: {ref['b']!r}"
    assert ref["a"] != ref["b"], f"adapters a and b give the same CLI output: {ref['a']!r}"
    c = client()
    jobs = [("a", False), ("b", False), ("smol", False), ("a", True), ("b", True), ("a", False), ("b", False)]
    barrier = threading.Barrier(len(jobs))

    def one(job):
        model, stream = job
        barrier.wait(timeout=60)
        if stream:
            texts, _, _, _ = join_text_stream(complete(model=model, prompt=ADAPTER_PROMPT, max_tokens=ADAPTER_TOKENS, c=c, stream=True))
            return texts.get(0, "")
        r = complete(model=model, prompt=ADAPTER_PROMPT, max_tokens=ADAPTER_TOKENS, c=c)
        eq(r.model, model, "response model")
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    bad = [(j, g) for j, g in zip(jobs, got) if g != ref[j[0]]]
    assert not bad, "server != CLI: " + "; ".join(f"{m}{' (stream)' if s else ''}: got {g!r}, generate gave {ref[m]!r}" for (m, s), g in bad)
    return f"a={ref['a']!r} b={ref['b']!r}"


def cli_logprobs(prompt, max_tokens, adapter=None):
    """`BINARY generate --json --logprobs 0`: (whole text, the chosen tokens' logprobs)."""
    cmd = [ARGS.binary, "generate", "--model", ARGS.gguf, "--prompt", prompt, "--max-tokens", str(max_tokens), "--temperature", "0", "--json", "--logprobs", "0"]
    if adapter:
        cmd += ["--adapter", adapter]
    r = subprocess.run(cmd, capture_output=True, timeout=120)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.decode(errors='replace')[-2000:]}")
    lines = [json.loads(line) for line in r.stdout.decode().splitlines() if line.strip()]
    return lines[-1]["text"], [x["logprob"] for x in lines if "logprob" in x]


@check("the same completion twice in a row (the 2nd reuses the slot's prompt prefix): text and logprobs equal `generate`, base and adapters")
def t_adapter_repeat():
    # The second request of each pair finds the first one's prompt in a free slot and reuses its
    # keys/values; neither answer may change. "smol" is the control (no adapter).
    prompt = "The three primary colors are"  # used by no earlier check: the first request prefills it whole
    bad = []
    for model, adapter in (("smol", None), ("a", ARGS.adapter_a), ("b", ARGS.adapter_b)):
        want_text, want_lp = cli_logprobs(prompt, ADAPTER_TOKENS, adapter)
        for attempt in ("1st", "2nd"):
            r = complete(model=model, prompt=prompt, max_tokens=ADAPTER_TOKENS, logprobs=0)
            c = r.choices[0]
            got_lp = c.logprobs.token_logprobs
            n = min(len(got_lp), len(want_lp))
            worst = max((abs(g - w) for g, w in zip(got_lp[:n], want_lp[:n])), default=0.0)
            first = next((i for i in range(n) if abs(got_lp[i] - want_lp[i]) > 1e-4), None)
            if c.text != want_text or worst > 1e-4:
                bad.append(f"{model} {attempt}: text {'equal' if c.text == want_text else f'{c.text!r} vs {want_text!r}'}, "
                           f"max |logprob - generate's| {worst:.2e} (first over 1e-4 at token {first})")
    assert not bad, "; ".join(bad)


@check("load_lora_adapter then use it; bad path -> 400; unload -> the name is 404")
def t_load_unload():
    ref = refs()
    status, body = http("POST", "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": ARGS.adapter_a, "base_model": "smol"})
    eq(status, 200, f"load status ({body})")
    eq((body.get("id"), body.get("parent")), ("c", "smol"), "load response")
    models = {m.id: m for m in client().models.list()}
    assert "c" in models, f"c not listed: {sorted(models)}"
    eq(models["c"].parent, "smol", "c.parent")
    eq(complete(model="c", prompt=ADAPTER_PROMPT, max_tokens=ADAPTER_TOKENS).choices[0].text, ref["a"], "model c (adapter a's files) vs `generate --adapter A`")
    # Prompts no earlier request used (a fresh prefill, no slot prefix reuse), CLI references.
    pa, pb = "Once upon a time", "Water boils at"
    ref_a2, ref_b2 = cli_generate(pa, ADAPTER_TOKENS, ARGS.adapter_a), cli_generate(pb, ADAPTER_TOKENS, ARGS.adapter_b)
    eq(complete(model="a", prompt=pa, max_tokens=ADAPTER_TOKENS).choices[0].text, ref_a2, "model a beside c")

    status, body = http("POST", "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": ARGS.adapter_a + "/no-such-dir", "base_model": "smol"})
    eq(status, 400, f"bad path status ({body})")
    assert isinstance(body, dict) and body.get("error", {}).get("type") == "invalid_request_error", f"bad path body {body}"
    assert "d" not in {m.id for m in client().models.list()}, "a failed load is listed"
    status, body = http("POST", "/v1/load_lora_adapter", {"lora_name": "e", "lora_path": ARGS.adapter_a, "base_model": "no-such-base"})
    eq(status, 404, f"unknown base_model status ({body})")

    status, body = http("POST", "/v1/unload_lora_adapter", {"lora_name": "c"})
    eq(status, 200, f"unload status ({body})")
    assert "c" not in {m.id for m in client().models.list()}, "c still listed after unload"
    e = raises(openai.NotFoundError, lambda: complete(model="c", max_tokens=2), "completion on the unloaded adapter")
    eq(e.code, "model_not_found", "code")
    status, body = http("POST", "/v1/unload_lora_adapter", {"lora_name": "c"})
    eq(status, 404, f"unloading it again ({body})")
    # The preloaded adapters are untouched.
    eq(complete(model="b", prompt=pb, max_tokens=ADAPTER_TOKENS).choices[0].text, ref_b2, "model b after the unload")


# ---------------------------------------------------------------- main


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def check_weather_call(call, what):
    eq(call.type, "function", f"{what}: type")
    eq(call.function.name, "get_weather", f"{what}: name")
    args = json.loads(call.function.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str) and len(args["city"]) <= 40, f"{what}: arguments {args!r}"
    assert call.id, f"{what}: no id"


@check("tool loop: required call, tool message, answer (SmolLM2: the generic format)")
def t_tool_loop():
    c = client()
    messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    # One call per turn keeps the conversation inside the server's 512-token context.
    one = dict(tools=[WEATHER_TOOL], parallel_tool_calls=False, temperature=0, seed=7)
    r = c.chat.completions.create(model="smol", messages=messages, tool_choice="required", max_tokens=80, **one)
    ch = r.choices[0]
    eq(ch.finish_reason, "tool_calls", "first turn finish_reason")
    assert ch.message.tool_calls and len(ch.message.tool_calls) >= 1, f"no tool_calls: {ch.message}"
    check_weather_call(ch.message.tool_calls[0], "first turn")
    # The SDK's own loop: the assistant message as returned, then one tool message per call.
    messages.append(ch.message)
    for call in ch.message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21, "sky": "sunny"})})
    # The answer, as agents ask for it (tool_choice auto). SmolLM2-135M may keep calling: after
    # two more rounds the loop asks with tool_choice none, which must give text (the loop's
    # mechanics are tested here, not the model's judgement).
    answer, how = None, "auto"
    for round in range(3):
        choice = "auto" if round < 2 else "none"
        r = c.chat.completions.create(model="smol", messages=messages, tool_choice=choice, max_tokens=80, **one)
        ch = r.choices[0]
        if ch.finish_reason != "tool_calls":
            answer, how = ch, choice
            break
        assert choice == "auto", f"tool_choice none returned calls: {ch.message}"
        for call in ch.message.tool_calls:
            check_weather_call(call, "a further call")
        messages.append(ch.message)
        for call in ch.message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21, "sky": "sunny"})})
    assert answer is not None, "no answer"
    assert answer.finish_reason in ("stop", "length"), answer.finish_reason
    assert answer.message.tool_calls is None, answer.message
    text = answer.message.content
    assert isinstance(text, str) and text.strip(), f"empty answer: {answer.message}"
    assert not text.lstrip().startswith(('{"response"', '{"tool_calls"')), f"the generic JSON leaked: {text!r}"
    return f"{len(messages)} messages; answer (tool_choice {how}) {text[:60]!r}"


@check("tool calls stream: id and name first, then arguments; no content")
def t_tool_stream():
    stream = client().chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
        seed=7,
        stream=True,
    )
    frags, content, finish = [], "", None
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            frags += ch.delta.tool_calls or []
            finish = ch.finish_reason or finish
    eq(finish, "tool_calls", "finish_reason")
    eq(content, "", "content")
    assert frags and frags[0].id and frags[0].function.name == "get_weather", f"first fragment {frags[:1]}"
    args = "".join(f.function.arguments or "" for f in frags if f.index == 0)
    parsed = json.loads(args)
    assert set(parsed) == {"city"}, parsed


@check("tool_choice errors: unknown function, required without tools")
def t_tool_errors():
    c = client()
    e = raises(openai.BadRequestError, lambda: chat(c=c, tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}), "unknown function")
    eq(e.body.get("param"), "tool_choice.function.name", "param")
    e = raises(openai.BadRequestError, lambda: chat(c=c, tool_choice="required"), "required without tools")
    eq(e.body.get("param"), "tool_choice", "param")


CHECKS = [
    t_models,
    t_chat_stream,
    t_completions_stream,
    t_chat_logprobs,
    t_text_logprobs,
    t_n2,
    t_unknown_model,
    t_bad_params,
    t_context,
    t_auth,
    t_concurrent,
    t_adapters,
    t_adapter_repeat,
    t_load_unload,
    t_tool_loop,
    t_tool_stream,
    t_tool_errors,
]


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", required=True)
    p.add_argument("--gguf", required=True)
    p.add_argument("--url", required=True, help="the main server (model smol, adapters a and b)")
    p.add_argument("--auth-url", required=True, help="a server run with --api-key")
    p.add_argument("--api-key", required=True)
    p.add_argument("--adapter-a", required=True)
    p.add_argument("--adapter-b", required=True)
    p.add_argument("--ctx", type=int, required=True, help="the main server's --ctx")
    p.add_argument("--parallel", type=int, required=True, help="the main server's --parallel")
    p.add_argument("-k", default="", help="run only the checks whose name contains this")
    ARGS = p.parse_args()
    print(f"openai {openai.__version__}; waiting for {ARGS.url} and {ARGS.auth_url}", flush=True)
    wait_healthy(ARGS.url)
    wait_healthy(ARGS.auth_url)
    t0 = time.monotonic()
    for c in CHECKS:
        if ARGS.k in c.check_name:
            c()
    failed = [r for r in RESULTS if not r[1]]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed in {time.monotonic() - t0:.1f}s", flush=True)
    for name, _, _, detail in failed:
        print(f"  FAILED: {name}: {detail.splitlines()[0] if detail else ''}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

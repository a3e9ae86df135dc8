"""/v1/embeddings through the official `openai` client, against sentence-transformers.

The server runs the real all-MiniLM-L6-v2 (`--embedding-model minilm=DIR`); the reference is
tests/fixtures/embed/minilm_reference.safetensors, made by sentence-transformers from the same
model and texts (scripts/fixtures). The client asks for base64 by default and decodes it; float is
checked too. Tolerance 1e-5 (the library's, tests/embeddings.rs).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import openai
from safetensors.numpy import load_file

TOL = 1e-5


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    args = p.parse_args()
    root = Path(__file__).resolve().parents[2]
    ref = json.loads((root / "tests/fixtures/embed/minilm_reference.json").read_text())
    want = load_file(str(root / "tests/fixtures/embed/minilm_reference.safetensors"))["embeddings"]
    client = openai.OpenAI(base_url=args.url + "/v1", api_key="unused", max_retries=0)
    failures = 0

    def check(name, ok, detail=""):
        nonlocal failures
        print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        failures += 0 if ok else 1

    r = client.embeddings.create(model="minilm", input=ref["texts"])  # base64 on the wire
    got = np.array([d.embedding for d in sorted(r.data, key=lambda d: d.index)], dtype=np.float32)
    worst = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    check("embeddings (base64) equal sentence-transformers", worst <= TOL, f"shape {got.shape}, max diff {worst:.2e}")
    check("usage counts the tokens", r.usage.prompt_tokens == sum(ref["tokens"]), f"{r.usage.prompt_tokens} vs {sum(ref['tokens'])}")
    r2 = client.embeddings.create(model="minilm", input=ref["texts"][0], encoding_format="float")
    diff = float(np.abs(np.array(r2.data[0].embedding, dtype=np.float32) - want[0]).max())
    check("encoding_format=float gives the same vector", diff <= TOL, f"max diff {diff:.2e}")
    try:
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
        check("a chat request to the embedding model is a BadRequestError", False, "it succeeded")
    except openai.BadRequestError as e:
        check("a chat request to the embedding model is a BadRequestError", e.body.get("param") == "model", str(e.body))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

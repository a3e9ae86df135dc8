#!/usr/bin/env bash
# Makes Qwen2.5's tokenizer.json (vocabulary 151,643 + 22 added tokens) offline, from the
# `qwen.tiktoken` ranks file in the dashscope PyPI wheel, under
# ${METAL_CANDLE_CACHE:-~/.cache/metal-candle}/qwen-tokenizer/ and prints its path (progress on
# stderr). Used by `cargo bench --bench constraint` for the 151,936-id vocabulary.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${METAL_CANDLE_CACHE:-$HOME/.cache/metal-candle}/qwen-tokenizer"
out="$dir/tokenizer.json"
if [ ! -f "$out" ]; then
  mkdir -p "$dir"
  tmp=$(mktemp -d "$dir/download.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching qwen.tiktoken (the dashscope 2.0.2 wheel from PyPI, once)" >&2
  python3 -m pip download --no-deps --disable-pip-version-check -q -d "$tmp" dashscope==2.0.2 >&2
  python3 - "$tmp"/dashscope-*.whl "$tmp/qwen.tiktoken" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, open(out, "wb") as f:
    f.write(z.read("dashscope/resources/qwen.tiktoken"))
PY
  python3 "$root/scripts/bench/make_qwen_tokenizer.py" "$tmp/qwen.tiktoken" "$out"
fi
echo "$out"

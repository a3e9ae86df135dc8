#!/usr/bin/env bash
# llama.cpp accepts metal-candle's quantized GGUFs, and they are as good as its own.
#
# 1. SmolLM2-135M-Instruct (scripts/get_smollm2.sh) → an HF directory with transformers
#    (`from_pretrained(gguf_file=...)` + `save_pretrained`), the input of both pipelines:
#    ours (`metal-candle quantize`) and llama.cpp's (`convert_hf_to_gguf.py --outtype f32` +
#    `llama-quantize`), for Q8_0 and Q4_K_M. `llama-perplexity` runs on all four files; ours must be
#    within 1% of llama.cpp's. The gguf package reads every key of our files back, and our
#    Q4_K_M tensor types equal llama-quantize's.
# 2. The random Qwen2.5-0.5B and Llama-3.2-1B shapes of scripts/bench/make_models.py (F16 GGUF):
#    our Q4_K_M of the F16 file has llama-quantize's tensor types (recorded into
#    tests/fixtures/quantize/<shape>.q4_k_m.types.json with RECORD=1), and quantize time and peak
#    RSS of both tools for F16 → Q4_K_M are printed (the PERFORMANCE.md numbers).
#
# Needs cmake, python3 and ~7 GB of disk (torch pulls CUDA wheels); first run ~20 min on 2 cores
# (llama.cpp build ~7 min, venv ~2 min), later runs ~3 min. Cache: $METAL_CANDLE_BENCH_CACHE (else
# ~/.cache/metal-candle-bench). Env: THREADS (default 2), SKIP_SHAPES=1 skips part 2.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cache="${METAL_CANDLE_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/metal-candle-bench}"
threads=${THREADS:-2}
version=0.3.36
llama="$cache/llama-cpp-python-$version/vendor/llama.cpp"
bin="$llama/build/bin"
work="$cache/quantize-test"
mkdir -p "$work"

# llama.cpp: the sdist as in scripts/bench/build_llama_cpp.sh, only the two tools needed here.
if [ ! -x "$bin/llama-quantize" ] || [ ! -x "$bin/llama-perplexity" ]; then
  command -v cmake >/dev/null || { echo "cmake is missing (apt-get install -y cmake)" >&2; exit 1; }
  sdist="$cache/llama_cpp_python-$version.tar.gz"
  [ -f "$sdist" ] || python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$cache" "llama-cpp-python==$version" >&2
  if [ ! -d "$llama" ]; then
    tar -xzf "$sdist" -C "$cache" "llama_cpp_python-$version/vendor/llama.cpp"
    mv "$cache/llama_cpp_python-$version" "$cache/llama-cpp-python-$version"
  fi
  flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" # see build_llama_cpp.sh: AMX kernels SIGILL here
  (cd "$llama" && cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2 &&
    cmake --build build -j"$(nproc)" --target llama-quantize llama-perplexity >&2)
fi

# Python: transformers + torch to write the HF directory, llama.cpp's converter, gguf to read back.
venv="${QUANTIZE_VENV:-$cache/quantize-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, transformers, gguf, sentencepiece" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.15.0 transformers==5.23.0 safetensors==0.8.0 tokenizers==0.23.3 \
    sentencepiece==0.2.3 protobuf==7.36.2 gguf==0.19.0 numpy==2.4.6 >&2
fi
py="$venv/bin/python"

(cd "$root" && cargo build --release --features cli >&2)
mc="$root/target/release/metal-candle"

# 1. SmolLM2: HF directory, both pipelines, perplexity.
gguf_src=$("$root/scripts/get_smollm2.sh")
hf="$work/smollm2-hf"
if [ ! -f "$hf/config.json" ]; then
  HF_HUB_OFFLINE=1 "$py" - "$gguf_src" "$hf" <<'PY'
import os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, out = sys.argv[1:]
d, f = os.path.dirname(src), os.path.basename(src)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model.save_pretrained(out + ".part")
tok.save_pretrained(out + ".part")
os.replace(out + ".part", out)
PY
fi
text="$work/perplexity.txt"
cat "$root/LICENSE-APACHE" "$root/docs/ARCHITECTURE.md" > "$text"
ref32="$work/smollm2-llama.F32.gguf"
[ -f "$ref32" ] || "$py" "$llama/convert_hf_to_gguf.py" "$hf" --outtype f32 --outfile "$ref32" >&2

ppl() { # file → perplexity (llama-perplexity's final estimate)
  "$bin/llama-perplexity" -m "$1" -f "$text" -c 128 -b 128 -t "$threads" 2>&1 | tee "$1.ppl.log" |
    sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p'
}
status=0
for t in q8_0 q4_k_m; do
  T=$(echo "$t" | tr a-z A-Z)
  ours="$work/smollm2-ours.$T.gguf"
  theirs="$work/smollm2-llama.$T.gguf"
  "$mc" quantize --model "$hf" --type "$t" --out "$ours" --force >&2
  [ -f "$theirs" ] || "$bin/llama-quantize" "$ref32" "$theirs" "$T" > "$theirs.log" 2>&1
  p_ours=$(ppl "$ours")
  p_theirs=$(ppl "$theirs")
  "$py" - "$ours" "$theirs" "$p_ours" "$p_theirs" "$t" <<'PY' || status=1
import sys, gguf
ours, theirs, po, pt, t = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
r = gguf.GGUFReader(ours)
for k, f in r.fields.items():
    f.contents()  # every key reads back
types = lambda p: {x.name: x.tensor_type.name for x in gguf.GGUFReader(p).tensors}
same_mix = types(ours) == types(theirs)
rel = abs(po - pt) / pt
print(f"smollm2 {t}: perplexity ours {po:.4f}, llama.cpp {pt:.4f} ({100 * rel:.2f}%), "
      f"{len(r.fields)} keys read back, tensor types {'equal' if same_mix else 'DIFFER'}")
sys.exit(0 if rel <= 0.01 and (t != "q4_k_m" or same_mix) else 1)
PY
done

# 2. The make_models.py shapes: Q4_K_M mix and quantize time / peak RSS, ours vs llama-quantize.
if [ "${SKIP_SHAPES:-0}" != 1 ]; then
  bench_py="$cache/bench-venv"
  [ -x "$bench_py/bin/python" ] || { python3 -m venv "$bench_py" && "$bench_py/bin/pip" install --quiet -r "$root/scripts/bench/requirements.txt" >&2; }
  for shape in qwen2.5-0.5b llama3.2-1b; do
    f16=$("$bench_py/bin/python" "$root/scripts/bench/make_models.py" --shapes "$shape" --types f16 --out "$cache/models")
    theirs="$work/$shape.llama.Q4_K_M.gguf"
    ours="$work/$shape.ours.Q4_K_M.gguf"
    rm -f "$theirs" "$ours"
    /usr/bin/time -f "%e s %M KB" -o "$work/time.llama" "$bin/llama-quantize" "$f16" "$theirs" Q4_K_M "$threads" > "$theirs.log" 2>&1
    RAYON_NUM_THREADS=$threads /usr/bin/time -f "%e s %M KB" -o "$work/time.ours" "$mc" quantize --model "$f16" --type q4_k_m --out "$ours" >&2
    echo "$shape F16 → Q4_K_M, $threads threads: llama-quantize $(cat "$work/time.llama"), metal-candle $(cat "$work/time.ours")"
    "$py" - "$ours" "$theirs" "$shape" "$root/tests/fixtures/quantize" "${RECORD:-0}" <<'PY' || status=1
import json, sys, gguf
ours, theirs, shape, fixtures, record = sys.argv[1:]
types = lambda p: {x.name: x.tensor_type.name for x in gguf.GGUFReader(p).tensors}
a, b = types(ours), types(theirs)
if record == "1":
    with open(f"{fixtures}/{shape}.q4_k_m.types.json", "w") as f:
        json.dump({"source": "llama-quantize (llama-cpp-python==0.3.36 sdist) Q4_K_M of scripts/bench/make_models.py's F16 file",
                   "types": b}, f, indent=1, sort_keys=True)
        f.write("\n")
diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
print(f"{shape} Q4_K_M tensor types: {'equal to llama-quantize' if not diff else diff}")
sys.exit(0 if not diff else 1)
PY
  done
fi
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p')"
exit $status

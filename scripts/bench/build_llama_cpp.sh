#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-batched-bench, llama-quantize and llama-server (CPU) from the llama-cpp-python==0.3.36 sdist
# into a cache OUTSIDE the repository and prints the bin directory. No llama.cpp code is committed:
# the sdist (a PyPI package that vendors llama.cpp) is fetched with pip at run time.
#
# Cache: $METAL_CANDLE_BENCH_CACHE, else $XDG_CACHE_HOME/metal-candle-bench, else
# ~/.cache/metal-candle-bench. Build flags as in ../shared/REFERENCES.md (~7 min on 2 cores, a few
# more for llama-server, the OpenAI-compatible peer of `metal-candle serve`; see serve_bench.py).
# Env: JOBS (default: nproc); LLAMA_CPP_AMX=1 keeps ggml's AMX kernels (off by default: on the
# Sapphire Rapids VMs here -march=native turns them on and llama-bench dies of SIGILL in
# ggml_backend_amx_mul_mat for Q4_0/Q8_0/Q4_1 files, so the peer is built without AMX).
set -euo pipefail
version=0.3.36
cache="${METAL_CANDLE_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/metal-candle-bench}"
src="$cache/llama-cpp-python-$version"
bin="$src/vendor/llama.cpp/build/bin"
targets="llama-bench llama-quantize llama-batched-bench llama-server"
have=1
for t in $targets; do [ -x "$bin/$t" ] || have=0; done
if [ "$have" = 1 ]; then
  echo "$bin"
  exit 0
fi
command -v cmake >/dev/null || { echo "cmake is missing (apt-get install -y cmake)" >&2; exit 1; }
mkdir -p "$cache"
sdist="$cache/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$cache" "llama-cpp-python==$version" >&2
fi
if [ ! -d "$src/vendor/llama.cpp" ]; then
  tar -xzf "$sdist" -C "$cache" "llama_cpp_python-$version/vendor/llama.cpp"
  mv "$cache/llama_cpp_python-$version" "$src"
fi
cd "$src/vendor/llama.cpp"
flags=""
if [ "${LLAMA_CPP_AMX:-0}" != 1 ]; then
  flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF >&2
# shellcheck disable=SC2086 # $targets is a word list
cmake --build build -j"${JOBS:-$(nproc)}" --target $targets >&2
echo "$bin"

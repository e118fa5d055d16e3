#!/usr/bin/env bash
# One table of GPU numbers (DiT-XL/1 training throughput and MFU, sampling, tokenizer memory/time at
# 1024 px batch 8 vs VA-VAE); < 8 min on one H200. `--smoke`: toy sizes on CPU (CI). See gpu_check.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$root/benchmarks/gpu_check.py" "$@"

#!/usr/bin/env bash
# The accelerator benchmark (benchmarks/gpu.py): paper-size configs of every model, bf16,
# XLA vs cuDNN attention, MFU, peak memory, predict spectra/s, in ~8 minutes on one H100/H200.
#   benchmarks/gpu.sh            # on a GPU machine; rows -> benchmarks/results.jsonl + RESULTS.md
#   benchmarks/gpu.sh --smoke    # the same code on CPU with tiny configs (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m benchmarks.gpu "$@"

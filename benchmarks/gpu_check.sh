#!/usr/bin/env bash
# One GPU check in at most 6 minutes (see benchmarks/gpu_check.py). Needs only python3 + torch.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 360 python3 benchmarks/gpu_check.py "$@"

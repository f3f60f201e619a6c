#!/usr/bin/env bash
# The GPU test suite (marker `gpu`): run it on a CUDA machine with triton whenever the kernels or the
# GPU-only paths change. CPU CI deselects these tests (scripts/run_tests.sh passes -m "not gpu").
set -eo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'" 
# The kernels' maths on CPU tensors through Triton's interpreter (its own process: the variable must be
# set before triton is imported).
TRITON_INTERPRET=1 python tests/core/fused_interpreter_probe.py
exec python -m pytest -q -p no:cacheprovider -m gpu tests/gpu "$@"

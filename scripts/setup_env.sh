#!/usr/bin/env bash
# Source this to get a Python environment with mixlora_ds and its test tools installed.
# Uses the already-active virtual environment when it has mixlora_ds; otherwise creates .venv in the
# repository (once) and installs into it. Safe to source repeatedly: a ready environment is reused.
set -eo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ -n "${VIRTUAL_ENV:-}" ] && python -c "import mixlora_ds, deepspeed, pytest" 2>/dev/null; then
    return 0 2>/dev/null || exit 0
fi
if [ ! -x "$repo_root/.venv/bin/python" ]; then
    echo "[setup] creating $repo_root/.venv" >&2
    python3 -m venv "$repo_root/.venv"
fi
# shellcheck disable=SC1091
. "$repo_root/.venv/bin/activate"
if ! python -c "import mixlora_ds, deepspeed, pytest, mixlora" 2>/dev/null; then
    echo "[setup] installing torch (CPU build when no GPU wheel is configured) and mixlora_ds[test]" >&2
    python -m pip install -q --upgrade pip
    # torch first: a plain resolve would pull several GB of CUDA packages on a CPU machine.
    python -m pip install -q "torch==${MIXLORA_TORCH_VERSION:-2.13.0}"
    # DS_BUILD_OPS=0: DeepSpeed compiles its ops lazily, only if a run needs them.
    DS_BUILD_OPS=0 python -m pip install -q -e "$repo_root[test]"
fi

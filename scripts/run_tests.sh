#!/usr/bin/env bash
# The project's test command: sets up the environment if needed, then runs every test.
set -eo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo_root/scripts/setup_env.sh"
cd "$repo_root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" DS_ACCELERATOR=cpu
set +e
# --durations: the slowest tests in every run, to keep the whole CI run well under 30 minutes.
python -m pytest -q -p no:cacheprovider -m "not gpu" --durations=25 tests "$@"  # GPU tests: scripts/run_gpu_tests.sh
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"

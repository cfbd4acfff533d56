#!/usr/bin/env bash
# Set up (if needed) and run the test suite: fast tests first, then the slow ones when
# MOELAB_SLOW=1 (CI runs them as a separate step).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -m "not slow and not sweep" "$@"
if [ "${MOELAB_SLOW:-0}" = "1" ]; then
  python -m pytest -q -m slow "$@"
fi

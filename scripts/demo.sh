#!/usr/bin/env bash
# Set up (if needed) and run the demo: trains small models without balancing, with the Switch
# aux loss and with loss-free balancing, then writes runs/demo/report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
moelab demo "$@"

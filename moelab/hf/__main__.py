"""``python -m moelab.hf {profile,finetune} ...`` until moelab.cli wires the subcommands."""

import sys

from moelab.hf import main

sys.exit(main())

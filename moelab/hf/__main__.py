"""``python -m moelab.hf {profile,finetune} ...``: the same as ``moelab profile|finetune ...``."""

import sys

from moelab.hf import main

sys.exit(main())

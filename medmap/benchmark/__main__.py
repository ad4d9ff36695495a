"""``python -m medmap.benchmark``: the same as ``medmap bench``."""

import os
import sys

from medmap.benchmark.sections import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.exit(main())

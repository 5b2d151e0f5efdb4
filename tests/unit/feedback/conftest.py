"""Makes `feedback_test_rewards` importable as `feedback_test_rewards:function` (user-reward specs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

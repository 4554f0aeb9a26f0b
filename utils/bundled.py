"""The weights the repository ships, named once for the scripts' defaults, the demo app's menus
and the result-folder names (`utils.report.run_label`)."""
from __future__ import annotations

from pathlib import Path

BUNDLED = Path("pre_trained_logs")  # relative to the repository root, where the scripts run
BUNDLED_DIR = Path(__file__).resolve().parents[1] / BUNDLED
BUNDLED_ENHANCER = f"./{BUNDLED}/enhancer/emnet_dim32_lolv1_h200_bf16.pth"  # the default weights
BUNDLED_MEMORY = f"./{BUNDLED}/memory/emnet_dim32_lolv1_levels_memory.pth"  # test_script.sh's memory

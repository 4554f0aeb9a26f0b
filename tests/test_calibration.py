"""models/calibration.py: the gain strength fitted on leave-one-out reads trusts a recall that
helps and switches off one that does not."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import filled_memory
from models.calibration import calibrate_strength
from models.read_settings import ReadSettings


def twin_set(good: bool):
    """6 images in 3 pairs of twins with identical queries; outputs at half the target's
    brightness. With `good` twins share their target (a leave-one-out read recalls it exactly);
    else twins' targets differ wildly and the outputs are already right."""
    rng = np.random.default_rng(0)
    keys, ori, high = [], [], []
    for g in range(3):
        key = torch.zeros(4)
        key[g] = 1
        base = rng.uniform(0.2, 0.4, (12, 14, 3))
        for twin in range(2):
            target = base if good else base * (0.5 if twin == 0 else 2.0)
            keys.append(key)
            high.append((target * 255).round().astype(np.uint8))
            out = target * 0.5 if good else target
            ori.append(torch.from_numpy(out).permute(2, 0, 1).float())
    values = torch.stack([torch.from_numpy(h).float().mean(dim=(0, 1)) / 255 for h in high])
    return torch.stack(keys), values, ori, high


@pytest.mark.parametrize("good", [True, False])
def test_calibrated_strength_trusts_a_good_recall_and_switches_off_a_bad_one(good):
    keys, values, ori, high = twin_set(good)
    mem = filled_memory(keys, values)
    strength, curve = calibrate_strength(mem, F.normalize(keys, dim=1), ori, high, ReadSettings())
    assert set(curve) >= {0.0, 1.0}
    if good:
        assert strength == 1.0 and curve[1.0] > curve[0.0] + 3
    else:
        assert strength == 0.0

"""test.py's reports for a reader: a run stopped early keeps the rows of the images done, and a run
without ground truth says on the console that there are no metrics."""
from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

from fault_runs import noisy_pairs, reaped, start_script, wait_until

from conftest import run_test_py


def slow_second_image(flag: Path) -> str:
    """A prelude for `start_script`: writing 2.png first creates `flag`, then waits for the signal."""
    return f"""
import time, utils.image_io as image_io
_write = image_io.write_image
def _slow_write(path, img):
    if str(path).endswith("2.png"):
        open({str(flag)!r}, "w").close()
        time.sleep(60)
    return _write(path, img)
image_io.write_image = _slow_write
"""


def test_sigterm_after_the_first_image_writes_its_metrics(tmp_path, weights):
    """SIGTERM while test.py writes the second image: exit 143, metrics.csv, summary.json and
    result.txt hold the first image (and say the run stopped early), stderr says so."""
    pairs = noisy_pairs(tmp_path / "pairs", ["1", "2", "3"])
    result, flag = tmp_path / "result", tmp_path / "writing_2"
    proc = start_script("test.py", "--weights", weights, "--input_dir", pairs, "--result_dir", result,
                        "--save_images", "--device", "cpu", prelude=slow_second_image(flag))
    with reaped(proc):
        wait_until(flag.exists, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert f"stopped early: {result / 'metrics.csv'} has the 1 of 3 images done" in err
    with open(result / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["1"] and float(rows[0]["ori_psnr"]) > 0
    summary = json.loads((result / "summary.json").read_text())
    assert summary["num_images"] == 1 and summary["stopped_early"] == "1 of 3 images"
    assert "stopped_early: 1 of 3 images" in (result / "result.txt").read_text()


def test_no_ground_truth_is_said_on_the_console(tmp_path, weights):
    pairs = noisy_pairs(tmp_path / "pairs", ["1"])
    (pairs / "high" / "1.png").unlink()
    (pairs / "high").rmdir()
    proc = run_test_py("--weights", weights, "--input_dir", pairs, "--result_dir", tmp_path / "r", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert f"no ground truth (high/) in {pairs}: the images are enhanced only, no metrics" in proc.stdout

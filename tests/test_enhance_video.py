"""enhance_video.py: the recalled colour's moving average, the frame loop against the image path,
the script end to end (frame count, size, frame rate; less flicker with --smooth) and its errors.

A tiny random enhancer (emnet_tiny, embed_dim 8) and a two-slot memory whose keys are the queries
of the clip's dark and bright frames and whose values are far-apart colours: frame by frame, the
recall alternates between the slots, the worst case of flicker.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import assert_user_error, random_enhancer, run_script, write_enhancer_checkpoint, write_png
from enhance_video import RecallSmoother, enhance_frames, open_video, remaining_frames
from models.inference import enhance
from models.loading import load_memory, memory_payload
from models.memory import ExternalMemory, MemoryConfig
from models.query import EnhancerQuery
from models.refiner import MemoryRefiner, build_refiner
from utils.checkpoint import save_checkpoint
from utils.image_io import image_to_tensor, tensor_to_image, to_uint8

pytestmark = pytest.mark.slow  # runs the video script

FRAMES, HEIGHT, WIDTH, FPS = 12, 48, 64, 10.0
LEVELS = [0.3 + 0.05 * (i % 3) if i % 2 else 0.7 - 0.05 * (i % 3) for i in range(FRAMES)]  # dark/bright
COLOURS = torch.tensor([[0.6, 0.35, 0.1], [0.1, 0.35, 0.6]])  # slot values: far apart
SPREAD = float((COLOURS[0] - COLOURS[1]).abs().max())  # 0.5


def frame(level: float) -> np.ndarray:
    """A BGR uint8 frame: a fixed texture at brightness `level`."""
    texture = np.random.default_rng(0).random((HEIGHT, WIDTH, 3))
    return np.round(texture * level * 255).astype(np.uint8)


def rgb_tensor(bgr: np.ndarray) -> torch.Tensor:
    return image_to_tensor(bgr[:, :, ::-1].astype(np.float32) / 255.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The tiny enhancer's checkpoint, the MJPG clip and the two-slot memory."""
    tmp = tmp_path_factory.mktemp("video")
    model = random_enhancer("emnet_tiny", 8)
    weights = write_enhancer_checkpoint(tmp / "tiny.pth", model, epoch=0)
    clip = tmp / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT))
    for level in LEVELS:
        writer.write(frame(level))
    writer.release()
    memory = ExternalMemory(MemoryConfig(mem_size=2, key_dim=16 * 8, pooling_size=1))
    memory.key.copy_(EnhancerQuery(model)(torch.cat([rgb_tensor(frame(LEVELS[0])), rgb_tensor(frame(LEVELS[1]))])))
    memory.value.copy_(COLOURS)
    memory.top_index.copy_(torch.tensor([0, 1]))
    mem_weights = tmp / "memory.pth"
    save_checkpoint(mem_weights, memory_payload(memory, 0, "enhancer", None,
                                                {"enhancer_config": model.config.to_dict()}))
    return {"tmp": tmp, "model": model, "weights": weights, "clip": clip, "mem_weights": mem_weights}


def clip_frames(clip: Path) -> tuple[list[np.ndarray], float]:
    """All frames of `clip` (BGR uint8) and its frame rate, read as the script reads them."""
    capture, first, fps, _ = open_video(clip)
    frames = [first, *remaining_frames(capture)]
    capture.release()
    return frames, fps


def refiner_of(setup: dict) -> MemoryRefiner:
    memory, ckpt = load_memory(setup["mem_weights"])
    return build_refiner(memory, ckpt, setup["mem_weights"], setup["model"], None, None)


def largest_step(values: list[torch.Tensor]) -> float:
    """The largest change of any channel between consecutive frames."""
    stacked = torch.cat(values)
    return float((stacked[1:] - stacked[:-1]).abs().max())


def test_recall_smoother_is_an_exponential_moving_average():
    """m_0 = r_0, then m_t = S m_(t-1) + (1 - S) r_t; S = 0 passes r_t on; S outside [0, 1) is refused."""
    r = [torch.tensor([[1.0, 0.0, 0.5]]), torch.tensor([[0.0, 1.0, 0.5]]), torch.tensor([[1.0, 1.0, 0.0]])]
    smoother = RecallSmoother(0.75)
    m0, m1, m2 = (smoother(x).clone() for x in r)
    assert torch.equal(m0, r[0])
    assert torch.allclose(m1, 0.75 * r[0] + 0.25 * r[1])
    assert torch.allclose(m2, 0.75 * m1 + 0.25 * r[2])
    plain = RecallSmoother(0.0)
    assert all(torch.equal(plain(x), x) for x in r)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError):
            RecallSmoother(bad)


def test_frames_without_smoothing_match_the_image_path(setup):
    """With S = 0 each frame is what test.py makes of it as an image: the refiner applied to the
    enhancer's output; without a memory, the enhancer's output and no colour."""
    frames, _ = clip_frames(setup["clip"])
    model, refiner = setup["model"], refiner_of(setup)
    cpu = torch.device("cpu")
    with_memory = list(enhance_frames(frames[:3], model, cpu, 8, refiner, smooth=0.0))
    plain = list(enhance_frames(frames[:3], model, cpu, 8))
    for bgr, (mem_out, colour), (ori_out, none) in zip(frames, with_memory, plain):
        x = rgb_tensor(bgr)
        y = enhance(model, x, 8)
        assert np.array_equal(ori_out[:, :, ::-1], to_uint8(tensor_to_image(y))) and none is None
        assert np.array_equal(mem_out[:, :, ::-1], to_uint8(tensor_to_image(refiner(x, y))))
        assert colour.shape == (1, 3)


def test_smoothing_bounds_the_change_of_the_correction(setup):
    """The recall alternates between the slots (steps of the full spread without smoothing); with
    S = 0.9 the applied colour moves by at most (1 - S) x the spread per frame."""
    frames, _ = clip_frames(setup["clip"])
    refiner = refiner_of(setup)
    applied = {s: [c for _, c in enhance_frames(frames, setup["model"], torch.device("cpu"), 8, refiner, s)]
               for s in (0.0, 0.9)}
    assert largest_step(applied[0.0]) == pytest.approx(SPREAD)
    assert largest_step(applied[0.9]) <= 0.1 * SPREAD + 1e-6


def run_video(*args: str | Path) -> subprocess.CompletedProcess:
    return run_script("enhance_video.py", *args, "--device", "cpu", timeout=120, env_extra={"OMP_NUM_THREADS": "1"})


def channel_means(path: Path) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Per-frame channel means (frames, 3), the frame rate and the frame size (H, W) of a video."""
    frames, fps = clip_frames(path)
    assert len({f.shape for f in frames}) == 1
    return np.array([f.reshape(-1, 3).mean(axis=0) for f in frames]), fps, frames[0].shape[:2]


def test_script_keeps_the_clip_and_applies_the_smoothing(setup):
    """Exit 0; the output has the input's frame count, size and frame rate and nothing else is
    left beside it; its frames are those of `enhance_frames` with the --smooth asked for (up to
    MJPG's loss), clearly unlike those of the other setting (the flicker bound itself is tested
    in-process above)."""
    frames, _ = clip_frames(setup["clip"])
    refiner = refiner_of(setup)
    expected = {s: np.array([f.reshape(-1, 3).mean(axis=0) for f, _ in
                             enhance_frames(frames, setup["model"], torch.device("cpu"), 8, refiner, s)])
                for s in (0.0, 0.9)}
    for smooth, other in ((0.9, 0.0), (0.0, 0.9)):
        folder = setup["tmp"] / f"out_{smooth}"
        out = folder / "enhanced.avi"
        proc = run_video("--input", setup["clip"], "--output", out, "--weights", setup["weights"],
                         "--mem_weights", setup["mem_weights"], "--smooth", str(smooth))
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"{FRAMES} frames of {WIDTH}x{HEIGHT}" in proc.stdout
        assert [p.name for p in folder.iterdir()] == ["enhanced.avi"]
        means, fps, size = channel_means(out)
        assert (len(means), size, fps) == (FRAMES, (HEIGHT, WIDTH), FPS)
        own, far = (np.abs(means - expected[s]).max() for s in (smooth, other))
        assert own < 5 and far > 20, (smooth, own, far)  # 0-255 units; measured ~1.6 and ~67


def test_odd_size_loses_its_last_column_and_row(setup, tmp_path):
    """A 47x33 input gives a 46x32 output and a note saying so. OpenCV's writers crop odd sizes
    themselves, so the input is a PNG, which FFmpeg reads as a one-frame video at 25 fps."""
    still = write_png(tmp_path / "odd.png", frame(0.5)[:33, :47, ::-1])
    proc = run_video("--input", still, "--output", tmp_path / "out.mp4", "--weights", setup["weights"])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "is 47x33" in proc.stdout and "1 frames of 46x32" in proc.stdout
    means, fps, size = channel_means(tmp_path / "out.mp4")
    assert (len(means), size, fps) == (1, (32, 46), 25.0)


def test_missing_input(setup, tmp_path):
    missing = tmp_path / "nothing.mp4"
    proc = run_video("--input", missing, "--output", tmp_path / "out.mp4", "--weights", setup["weights"])
    assert_user_error(proc, missing)
    assert list(tmp_path.iterdir()) == []


def test_input_that_is_not_a_video(setup, tmp_path):
    """A text file named like a video, and an empty one."""
    for name, data in (("notes.mp4", b"not a video\n"), ("empty.avi", b"")):
        bad = tmp_path / name
        bad.write_bytes(data)
        proc = run_video("--input", bad, "--output", tmp_path / "out.avi", "--weights", setup["weights"])
        assert_user_error(proc, bad)
        assert not (tmp_path / "out.avi").exists() and len(list(tmp_path.iterdir())) == 1
        bad.unlink()


def test_unsupported_or_unwritable_output(setup, tmp_path):
    """An extension without a codec names the supported ones; a folder that cannot be made."""
    proc = run_video("--input", setup["clip"], "--output", tmp_path / "out.gif", "--weights", setup["weights"])
    assert ".mp4" in assert_user_error(proc, tmp_path / "out.gif")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    proc = run_video("--input", setup["clip"], "--output", blocker / "out.mp4", "--weights", setup["weights"])
    assert_user_error(proc, blocker)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

"""Enhance a low-light video frame by frame with EMNet, optionally corrected by the external memory.

Every frame goes through the enhancer; with --mem_weights the memory then recalls a colour for the
frame and corrects the enhancer's output towards it, as test.py does for images. Frame by frame,
neighbouring frames of one scene can recall different slots (the top-1 read is a hard choice), and
the correction then jumps from frame to frame: the video flickers. So the recalled colour is
smoothed over time with an exponential moving average, m_t = S m_(t-1) + (1 - S) r_t (--smooth S,
0 = none), before it corrects the frame. The output keeps the input's frame rate, frame count and
size (but even: the encoders need it); it is written to a temporary file beside --output, read
back (a full disk cuts it short without an error from the writer) and renamed when complete. Example:
    python enhance_video.py --input dark.mp4 --output bright.mp4 \
        --mem_weights pre_trained_logs/memory/emnet_dim32_lolv1_levels_memory.pth
"""
from __future__ import annotations

import argparse
import errno
import itertools
import os
import resource
import time
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.inference import check_border_margin, enhance_with_features
from models.loading import check_model_files, load_enhancer, load_memory
from models.refiner import MemoryRefiner, refiner_from_flags
from options import HelpFormatter, add_device_arg, add_trained_model_args
from utils.allocator import tune_allocator
from utils.device import resolve_device
from utils.errors import UserError, run_cli, writable_dir, write_error
from utils.image_io import image_to_tensor, tensor_to_image, to_uint8

CODECS = {".mp4": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}  # output extension -> FourCC
FALLBACK_FPS = 25.0  # for inputs that report no frame rate

# Unreadable inputs and failed writers are reported as one UserError line, so OpenCV's and FFmpeg's
# own messages are off (FFmpeg's is read when OpenCV first opens a video; set it to debug).
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET


class RecallSmoother:
    """Exponential moving average over frames of the memory's recalled colour (B, 3 p p):
    m_t = smooth * m_(t-1) + (1 - smooth) * r_t, starting at m_0 = r_0; smooth 0 passes r_t on."""

    def __init__(self, smooth: float):
        if not 0 <= smooth < 1:
            raise ValueError(f"smooth must be in [0, 1), got {smooth}")
        self.smooth = smooth
        self.state: torch.Tensor | None = None

    def __call__(self, recalled: torch.Tensor) -> torch.Tensor:
        """The smoothed colour after this frame's `recalled` colour."""
        if self.state is None:
            self.state = recalled
        else:
            self.state = self.smooth * self.state + (1 - self.smooth) * recalled
        return self.state


@torch.no_grad()
def enhance_frames(frames: Iterable[np.ndarray], model: nn.Module, device: torch.device, margin: int,
                   refiner: MemoryRefiner | None = None, smooth: float = 0.0
                   ) -> Iterator[tuple[np.ndarray, torch.Tensor | None]]:
    """Enhance BGR uint8 frames (H, W, 3) in order: yields each enhanced BGR uint8 frame and the
    colour the memory corrected it with (the smoothed recalled colour, (1, 3 p p); None without
    a `refiner`). The correction is `MemoryRefiner.forward` with the recalled colour smoothed."""
    smoother = RecallSmoother(smooth)
    for frame in frames:
        x = image_to_tensor(frame[:, :, ::-1].astype(np.float32) / 255.0).to(device)  # BGR -> RGB
        y, features = enhance_with_features(model, x, margin)
        applied = None
        if refiner is not None:
            applied = smoother(refiner.recall(x, features))
            y = refiner.correct(y, applied)
        yield np.ascontiguousarray(to_uint8(tensor_to_image(y))[:, :, ::-1]), applied


def open_video(path: Path) -> tuple[cv2.VideoCapture, np.ndarray, float, int]:
    """The capture of `path`, its first frame (BGR uint8), its frame rate and its frame count as
    the container states it (0 when unknown); a UserError when it holds no readable video."""
    if not path.is_file():
        raise UserError(f"--input {path} does not exist; pass a video file")
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    ok, first = capture.read() if capture.isOpened() else (False, None)
    if not ok:
        capture.release()
        raise UserError(f"cannot read a video frame from --input {path}: the file is not a video "
                        "OpenCV/FFmpeg can decode, or it holds no frames")
    fps = capture.get(cv2.CAP_PROP_FPS)
    if not fps > 0:
        print(f"note: --input {path} states no frame rate; writing {FALLBACK_FPS:g} fps")
        fps = FALLBACK_FPS
    return capture, first, fps, max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)


def remaining_frames(capture: cv2.VideoCapture) -> Iterator[np.ndarray]:
    """The frames of `capture` still unread, in order."""
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


def output_codec(path: Path) -> int:
    """The FourCC for `path`'s extension (see CODECS); a UserError for other extensions."""
    codec = CODECS.get(path.suffix.lower())
    if codec is None:
        raise UserError(f"--output {path}: unsupported extension {path.suffix or '(none)'}; "
                        f"use one of {', '.join(CODECS)}")
    return cv2.VideoWriter_fourcc(*codec)


def likely_fault(path: Path) -> OSError:
    """The OS fault that most likely cut the video at `path` short: FFmpeg reports none."""
    size = path.stat().st_size if path.exists() else 0
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and size >= limit:
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    free = os.statvfs(path.parent)
    if free.f_bavail * free.f_frsize < max(size, 2**20):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.EIO, "the video writer stopped early")


def check_complete(tmp: Path, dst: Path, count: int) -> None:
    """Read the written video back: OpenCV's writer says nothing when a write fails (a full disk,
    a size limit), so a video with fewer than `count` readable frames is a one-line UserError,
    and it never gets the name `dst`."""
    capture = cv2.VideoCapture(str(tmp), cv2.CAP_FFMPEG)
    readable = 0
    while capture.isOpened() and readable < count and capture.grab():
        readable += 1
    capture.release()
    if readable < count:
        raise write_error(dst, likely_fault(tmp))


def write_video(outputs: Iterable[tuple[np.ndarray, torch.Tensor | None]], dst: Path, fourcc: int, fps: float,
                size: tuple[int, int], stated: int) -> int:
    """Encode the frames of `outputs` (cropped to `size`, width x height) into `dst` atomically:
    into a hidden temporary file, read back (`check_complete`), then renamed; on any error or stop
    signal the temporary file is removed. Returns the frame count. The progress bar is built before
    the temporary file exists, so a signal from then on interrupts no half-built object."""
    tmp = dst.with_name(f".{dst.stem}.tmp{dst.suffix}")  # same extension: FFmpeg picks the container by it
    width, height = size
    writer, count = None, 0
    with tqdm(total=stated or None, desc="enhance", unit="frame", leave=False) as bar:
        try:
            writer = cv2.VideoWriter(str(tmp), cv2.CAP_FFMPEG, fourcc, fps, size)
            if not writer.isOpened():
                raise UserError(f"cannot write --output {dst}: OpenCV's FFmpeg could not open a "
                                f"{width}x{height} {CODECS[dst.suffix.lower()]} writer; try another extension")
            for out, _ in outputs:
                writer.write(np.ascontiguousarray(out[:height, :width]))
                count += 1
                bar.update()
            writer.release()
            check_complete(tmp, dst, count)
            os.replace(tmp, dst)
        except BaseException:
            if writer is not None:
                writer.release()
            tmp.unlink(missing_ok=True)
            raise
    return count


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Enhance a low-light video with EMNet (enhancer, then the "
                                            "external memory with a temporally smoothed colour)",
                                formatter_class=HelpFormatter)
    p.add_argument("--input", required=True, help="input video (any format OpenCV's FFmpeg reads)")
    p.add_argument("--output", required=True,
                   help="output video: the input's frame rate, frame count and size (an odd width or height "
                        "loses its last column or row: the encoders need even sizes); the extension picks the "
                        f"codec: {', '.join(f'{ext} ({codec})' for ext, codec in CODECS.items())}")
    p.add_argument("--smooth", type=float, default=0.9,
                   help="S in [0, 1): the memory's recalled colour is averaged over frames as "
                        "m_t = S m_(t-1) + (1 - S) r_t against flicker; 0 = every frame on its own")
    add_trained_model_args(p, "external memory checkpoint: corrects each frame's colour (none: enhancer only)")
    add_device_arg(p)
    return p


def main(args: argparse.Namespace) -> None:
    check_border_margin(args.border_margin)
    if not 0 <= args.smooth < 1:
        raise UserError(f"--smooth {args.smooth} must be in [0, 1) (0 = no smoothing)")
    src, dst = Path(args.input), Path(args.output)
    fourcc = output_codec(dst)
    if dst.is_dir():
        raise UserError(f"--output {dst} is a folder; pass a file name such as {dst / 'enhanced.mp4'}")
    device = resolve_device(args.device)
    check_model_files(args.weights, args.mem_weights, args.query_weights)
    capture, first, fps, stated = open_video(src)
    writable_dir(dst.parent, "--output")
    model, _ = load_enhancer(args.weights, args.arch, args.embed_dim)
    model.to(device)
    refiner = None
    if args.mem_weights:
        memory, mem_ckpt = load_memory(args.mem_weights)
        refiner = refiner_from_flags(memory, mem_ckpt, args, model,
                                     cannot_abstain="a video's frames are corrected by one smoothed colour").to(device)
    height, width = first.shape[:2]
    even_h, even_w = height // 2 * 2, width // 2 * 2  # FFmpeg's 4:2:0 encoders need even sizes
    if (even_h, even_w) != (height, width):
        print(f"note: --input {src} is {width}x{height}; the encoders need even sizes, so the output "
              f"is {even_w}x{even_h} (last column/row dropped)")
    start = time.perf_counter()
    try:
        frames = itertools.chain([first], remaining_frames(capture))
        outputs = enhance_frames(frames, model, device, args.border_margin, refiner, args.smooth)
        count = write_video(outputs, dst, fourcc, fps, (even_w, even_h), stated)
    finally:
        capture.release()
    seconds = time.perf_counter() - start
    print(f"{count} frames of {even_w}x{even_h} at {fps:g} fps in {seconds:.1f} s "
          f"({seconds / count:.2f} s/frame) on {device}; wrote {dst}")


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    run_cli(lambda: main(get_args_parser().parse_args()))

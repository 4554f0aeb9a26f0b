"""Latency of the demo app (app.py) for one photo: start it on a free local port, call it through
gradio_client (one warm-up call, then --repeats timed ones) and report the median seconds per
photo, upload and download included. Example (a 600x400 LOL photo, CPU):

    python benchmarks/bench_app.py --photo ../shared/data/LOL-v1/eval15/low/1.png \
        --weights pre_trained_logs/enhancer/emnet_small16_lolv1_cpu.pth \
        --mem_weights pre_trained_logs/memory/emnet_small16_lolv1_levels_memory.pth
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utils.allocator import tune_allocator  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(args: argparse.Namespace) -> None:
    from gradio_client import Client, handle_file

    photo = Path(args.photo).resolve()
    if not photo.is_file():
        raise UserError(f"--photo {args.photo} does not exist; pass a photo file")
    port = free_port()
    cmd = [sys.executable, "app.py", "--port", str(port), "--weights", args.weights, "--mem_weights",
           args.mem_weights, "--device", args.device, "--examples", str(photo.parent)]
    server = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(600):
            if server.poll() is not None:
                raise UserError(f"app.py ended: {server.stderr.read()[-1000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        client = Client(url, verbose=False)
        call = lambda: client.predict(handle_file(str(photo)), args.weights, args.mem_weights, api_name="/enhance")  # noqa: E731
        call()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        print(f"{photo.name}: {statistics.median(times):.2f} s per photo (median of {args.repeats}; "
              f"min {min(times):.2f}, max {max(times):.2f}) with {Path(args.weights).name} + "
              f"{Path(args.mem_weights).name} on {args.device}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    tune_allocator()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photo", required=True)
    p.add_argument("--weights", default="pre_trained_logs/enhancer/emnet_small16_lolv1_cpu.pth")
    p.add_argument("--mem_weights", default="pre_trained_logs/memory/emnet_small16_lolv1_levels_memory.pth")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    run_cli(lambda: main(p.parse_args()))

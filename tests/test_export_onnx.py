"""`export_onnx.py` end to end: a tiny random enhancer (emnet_tiny, embed_dim 8) and a tiny memory
are exported as users run the script (a subprocess: importing it would switch the CPU kernels off
for the whole test session), and ONNX Runtime's outputs must match test.py's code path
(`models.inference.enhance_with_features` and `MemoryRefiner`) on a 600x400 image and on odd-sized ones."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_user_error, random_enhancer, run_script, write_enhancer_checkpoint
from models.inference import enhance_with_features
from models.loading import enhancer_fingerprint, load_enhancer, load_memory, memory_payload
from models.memory import ExternalMemory, MemoryConfig
from models.query import describe_features
from models.read_settings import ReadSettings
from models.refiner import build_refiner
from utils.checkpoint import save_checkpoint

pytestmark = pytest.mark.slow  # exports and runs ONNX models

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

GRAY_LEVEL = 1 / 255
SIZES = [(400, 600), (37, 53), (5, 3)]  # (H, W): LOL's size, odd sizes, one too small to mirror
MEM_SIZE, UNWRITTEN = 12, (0, 5)  # slots 0 and 5 are never written


def image(h: int, w: int) -> torch.Tensor:
    """A fixed (1, 3, h, w) low-light-like input in [0, 0.3]."""
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * 0.3


def run_export(*args: str | Path) -> None:
    """Run export_onnx.py; it must succeed and print nothing on stderr (no tracer warnings)."""
    proc = run_script("export_onnx.py", *args, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny enhancer and a memory whose unwritten slots are the best matches of the test
    images' queries (with a far-off colour), so recalling one of them would show."""
    folder = tmp_path_factory.mktemp("export_onnx")
    enhancer = random_enhancer("emnet_tiny", 8)
    weights = write_enhancer_checkpoint(folder / "enhancer.pth", enhancer, epoch=1)
    g = torch.Generator().manual_seed(1)
    memory = ExternalMemory(MemoryConfig(mem_size=MEM_SIZE, key_dim=16 * 8), g)
    memory.top_index.copy_(torch.arange(MEM_SIZE))
    for slot, (h, w) in zip(UNWRITTEN, SIZES):
        _, features = enhance_with_features(enhancer, image(h, w))
        memory.key[slot] = describe_features(features, "enhancer")[0]
        memory.value[slot] = torch.tensor([0.9, 0.05, 0.05])
        memory.top_index[slot] = -1
    mem_weights = save_memory(folder / "memory.pth", memory, enhancer, {"top_k": 3, "temperature": 0.1})
    return {"folder": folder, "weights": weights, "mem_weights": mem_weights}


def save_memory(path: Path, memory: ExternalMemory, enhancer, read: dict, query_encoder: str = "enhancer") -> Path:
    """Write `memory` as train_memory.py does, filled with `enhancer`'s queries, read as `read` says."""
    save_checkpoint(path, memory_payload(memory, 1, query_encoder, None,
                                         {"enhancer_config": enhancer.config.to_dict(), "read": read,
                                          "enhancer_fingerprint": enhancer_fingerprint(enhancer)}))
    return path


@pytest.mark.parametrize("flags", [(), ("--testing_top_k", "1", "--strength", "0.6", "--border_margin", "3")],
                         ids=["stored-read", "top1-strength-margin3"])
def test_onnx_matches_pytorch(files, flags):
    """ori and mem of ONNX Runtime equal `enhance_with_features` + `MemoryRefiner` (built by
    `build_refiner` with the same flags, as test.py does) within one gray level, at every size."""
    output = files["folder"] / f"emnet{len(flags)}.onnx"
    run_export("--weights", files["weights"], "--mem_weights", files["mem_weights"], "--output", output, *flags)
    opts = dict(zip(flags[::2], flags[1::2]))
    margin = int(opts.get("--border_margin", 8))
    enhancer, _ = load_enhancer(files["weights"])
    memory, ckpt = load_memory(files["mem_weights"])
    given = argparse.Namespace(testing_top_k=int(opts["--testing_top_k"]) if "--testing_top_k" in opts else None,
                               temperature=None, strength=opts.get("--strength"), pooling_mean=None,
                               query_encoder=None)
    refiner = build_refiner(memory, ckpt, files["mem_weights"], enhancer,
                            ReadSettings.from_checkpoint(ckpt).with_flags(given))
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["low"]
    assert [o.name for o in session.get_outputs()] == ["ori", "mem"]
    for h, w in SIZES:
        x = image(h, w)
        ori, mem = session.run(None, {"low": x.numpy()})
        y, features = enhance_with_features(enhancer, x, margin)
        expected_mem = refiner(x, y, features)
        assert ori.shape == mem.shape == (1, 3, h, w)
        assert np.abs(ori - y.numpy()).max() <= GRAY_LEVEL, (h, w)
        assert np.abs(mem - expected_mem.numpy()).max() <= GRAY_LEVEL, (h, w)
        assert 0 <= mem.min() and mem.max() <= 1


def test_enhancer_only_export_has_one_output(files):
    """Without --mem_weights the model has the one output `ori`; the file records its source."""
    output = files["folder"] / "enhancer_only.onnx"
    run_export("--weights", files["weights"], "--output", output, "--opset", "20")
    model = onnx.load(str(output))
    assert [o.name for o in model.graph.output] == ["ori"]
    assert model.opset_import[0].version == 20
    assert {p.key: p.value for p in model.metadata_props}["border_margin"] == "8"


def error_case(files, case: str) -> tuple[list, Path, str]:
    """(command-line arguments, a fresh folder that holds --output, text the error must name) of
    the user error `case`."""
    folder = files["folder"] / f"error_{case}"
    folder.mkdir()
    args = ["--weights", files["weights"], "--output", folder / "out.onnx"]
    if case == "missing_weights":
        args[1] = folder / "nope.pth"
        return args, folder, str(args[1])
    if case == "enhancer_as_memory":
        return args + ["--mem_weights", files["weights"]], folder, "not an external-memory checkpoint"
    if case == "resnet18_memory":
        mem = ExternalMemory(MemoryConfig(mem_size=4, key_dim=512))
        mem.top_index.fill_(0)
        path = save_memory(folder / "resnet.pth", mem, random_enhancer("emnet_tiny", 8), {}, "resnet18")
        return args + ["--mem_weights", path], folder, "resnet18"
    if case == "unwritten_memory":
        mem = ExternalMemory(MemoryConfig(mem_size=4, key_dim=16 * 8))
        path = save_memory(folder / "empty.pth", mem, random_enhancer("emnet_tiny", 8), {})
        return args + ["--mem_weights", path], folder, "no written slots"
    if case == "output_is_a_folder":
        args[3] = folder
        return args, folder, "is a folder"
    if case == "output_under_a_file":  # the folder of --output would have to replace a file
        (folder / "file").write_text("")
        args[3] = folder / "file" / "out.onnx"
        return args, folder, "--output"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["missing_weights", "enhancer_as_memory", "resnet18_memory", "unwritten_memory",
                                  "output_is_a_folder", "output_under_a_file"])
def test_user_errors(files, case):
    """Exit status 2, one `error:` line naming the problem, no traceback, nothing written."""
    args, folder, must_contain = error_case(files, case)
    assert_user_error(run_script("export_onnx.py", *args), must_contain)
    assert not [p for p in folder.rglob("*") if p.suffix in (".onnx", ".tmp")]


def test_onnx_not_installed(files, tmp_path):
    """Without the onnx package: one line that says to install it, exit status 2, no file."""
    (tmp_path / "onnx.py").write_text('raise ImportError("No module named onnx")\n')
    proc = run_script("export_onnx.py", "--weights", files["weights"], "--output", tmp_path / "out.onnx",
                      env_extra={"PYTHONPATH": str(tmp_path)})
    assert_user_error(proc, "pip install onnx")
    assert not (tmp_path / "out.onnx").exists()

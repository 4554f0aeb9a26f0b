"""Export a trained EMNet to ONNX: the enhancer and, with --mem_weights, its external memory.

Why: an ONNX file runs under ONNX Runtime (or any ONNX back end) without PyTorch or this
repository. The graph takes one image of any size and does all of what test.py does around the
network, so a caller needs no pre- or post-processing:
- input `low`: (1, 3, H, W) float32 RGB in [0, 1], H and W free (dynamic axes);
- output `ori`: the enhancer's image, (1, 3, H, W) in [0, 1], as `models.inference.enhance`
  computes it: a reflected --border_margin on every side, a reflected pad of the bottom/right to
  multiples of 8, the network, the crop back to H x W and the clamp to [0, 1]. Both pads are
  index look-ups computed from the input's size inside the graph (replicate instead of reflect
  for images too small to mirror, as `enhance` does);
- output `mem` (with --mem_weights): `ori` corrected by the memory as test.py's `MemoryRefiner`
  does it, its query made from the encoder features of the same pass. The banks are constants
  that hold only the written slots, so an unwritten slot can never be recalled.
Only memories queried by the enhancer (`enhancer`, `enhancer_levels`) are supported.

The classic (TorchScript-tracing) exporter is used with dynamic axes, on the plain network of
models/enhancer.py (the fast path's C kernels are not part of it). Example:
    python export_onnx.py --weights pre_trained_logs/enhancer/emnet_dim32_lolv1_h200_bf16.pth \
        --mem_weights pre_trained_logs/memory/emnet_dim32_lolv1_levels_memory.pth --output emnet.onnx
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from models.enhancer import EMNetEnhancer
from models.inference import MULTIPLE, check_border_margin
from models.loading import check_model_files, load_enhancer, load_memory
from models.memory import ExternalMemory
from models.query import ENHANCER_DESCRIPTORS
from models.refiner import MemoryRefiner, refiner_from_flags
from options import HelpFormatter, add_trained_model_args
from utils.allocator import tune_allocator
from utils.atomic import atomic_write
from utils.errors import UserError, run_cli, writable_dir

OPSETS = range(17, 21)  # 17: the first with LayerNormalization; 20: the classic exporter's last
EXAMPLE_SIZE = (37, 53)  # the traced example: both pads non-zero


def _source_index(pos: torch.Tensor, n: torch.Tensor, reflect: torch.Tensor) -> torch.Tensor:
    """Indices in [0, n) that padded positions `pos` (possibly outside) copy: mirrored without
    repeating the edge (F.pad "reflect") where `reflect`, else clamped ("replicate")."""
    mirrored = pos.abs()
    mirrored = torch.where(mirrored > n - 1, 2 * (n - 1) - mirrored, mirrored)
    clamped = pos.clamp(min=0)
    clamped = torch.where(clamped > n - 1, n - 1, clamped)
    return torch.where(reflect, mirrored, clamped)


def padding_indices(h: torch.Tensor, w: torch.Tensor, margin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices into an (h, w) image that give `models.inference.pad_for_network`'s
    output: the `margin` pad on every side, then the pad of the bottom/right to multiples of 8,
    each reflected where the image is large enough (both axes) and replicated otherwise.

    Meant for tracing: `h` and `w` are the traced 0-d sizes, so the graph follows the input size.
    """
    h1, w1 = h + 2 * margin, w + 2 * margin
    extra_h, extra_w = (MULTIPLE - h1 % MULTIPLE) % MULTIPLE, (MULTIPLE - w1 % MULTIPLE) % MULTIPLE
    reflect_margin = (margin < h) & (margin < w)
    reflect_extra = (extra_h < h1) & (extra_w < w1)
    rows = _source_index(_source_index(torch.arange(h1 + extra_h), h1, reflect_extra) - margin, h, reflect_margin)
    cols = _source_index(_source_index(torch.arange(w1 + extra_w), w1, reflect_extra) - margin, w, reflect_margin)
    return rows, cols


class ExportedEMNet(nn.Module):
    """`enhance` (and the `MemoryRefiner` correction) of one (1, 3, H, W) image, all in one graph."""

    def __init__(self, enhancer: EMNetEnhancer, margin: int, refiner: MemoryRefiner | None = None):
        super().__init__()
        self.enhancer, self.margin, self.refiner = enhancer, margin, refiner

    def forward(self, low: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h, w = low.shape[-2], low.shape[-1]  # 0-d tensors while tracing
        rows, cols = padding_indices(h, w, self.margin)
        padded = low.index_select(2, rows).index_select(3, cols)
        features = self.enhancer.forward_features(padded)
        y = self.enhancer.forward_head(padded, features)
        ori = y[:, :, self.margin:self.margin + h, self.margin:self.margin + w].clamp(0, 1)
        if self.refiner is None:
            return ori
        return ori, self.refiner(low, ori, features)


def written_slots(memory: ExternalMemory, path: str | Path) -> ExternalMemory:
    """A copy of `memory` with only its written slots (`top_index` >= 0)."""
    written = memory.top_index >= 0
    if not written.any():
        raise UserError(f"memory {path} has no written slots (it was never trained); pass a trained "
                        "memory to --mem_weights")
    kept = ExternalMemory(dataclasses.replace(memory.config, mem_size=int(written.sum())))
    kept.load_state_dict({name: buf[written] for name, buf in memory.state_dict().items()})
    return kept


def export_refiner(args: argparse.Namespace, enhancer: EMNetEnhancer) -> MemoryRefiner:
    """The refiner of --mem_weights as test.py builds it, with only the written slots.

    Reading the top k of the written slots is `ExternalMemory.read`'s masked read: k beyond their
    number adds slots of weight 0 there, so k is capped at it."""
    memory, ckpt = load_memory(args.mem_weights)
    if ckpt["query_encoder"] not in ENHANCER_DESCRIPTORS:
        raise UserError(f"memory {args.mem_weights} is queried by {ckpt['query_encoder']}; only memories "
                        f"queried by the enhancer ({', '.join(ENHANCER_DESCRIPTORS)}) can be exported")
    if memory.config.pooling_size != 1:
        raise UserError(f"memory {args.mem_weights} stores p = {memory.config.pooling_size} values; only "
                        "p = 1 memories can be exported (ONNX has no adaptive pooling for dynamic sizes)")
    refiner = refiner_from_flags(memory, ckpt, args, enhancer, cannot_abstain="the ONNX graph cannot match scenes")
    refiner.memory = written_slots(memory, args.mem_weights)
    refiner.read = dataclasses.replace(refiner.read, top_k=min(refiner.read.top_k, refiner.memory.config.mem_size))
    return refiner


def to_onnx(model: ExportedEMNet, opset: int) -> bytes:
    """The serialised ONNX model of `model` with dynamic height and width.

    Traced, then frozen: freezing turns the sizes of weights into constants (the ONNX convolution
    needs static kernel shapes, and GDFN slices its depthwise kernels by a weight's size), while
    the image's height and width stay symbolic.
    """
    outputs = ["ori"] if model.refiner is None else ["ori", "mem"]
    axes = {name: {2: "height", 3: "width"} for name in ["low", *outputs]}
    example = torch.rand(1, 3, *EXAMPLE_SIZE)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Python branches on tensors are traced as constants; here they depend only on the
        # weights and memory banks, constant anyway.
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning)
        # The TorchScript tools are deprecated but still the ones that export dynamic sizes here.
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        warnings.filterwarnings("ignore", "no signature found for", UserWarning)
        traced = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
        torch.onnx.export(traced, (example,), buffer, input_names=["low"], output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return buffer.getvalue()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export the EMNet enhancer (and its memory) to ONNX with "
                                            "dynamic image height and width",
                                formatter_class=HelpFormatter)
    p.add_argument("--output", required=True, help="the .onnx file to write (replaced atomically)")
    p.add_argument("--opset", type=int, choices=OPSETS, default=min(OPSETS),
                   help="ONNX opset version (17 is the first with LayerNormalization)")
    add_trained_model_args(p, "external memory checkpoint (enhancer query): adds the output 'mem'")
    return p


def main(args: argparse.Namespace) -> None:
    """Check the flags and files, export, check the ONNX model, write it atomically."""
    try:
        import onnx
    except ImportError:
        raise UserError("the onnx package is not installed; pip install onnx (and onnxruntime to run "
                        "the exported model)") from None
    check_border_margin(args.border_margin)
    check_model_files(args.weights, args.mem_weights, args.query_weights)
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; pass a file name such as {output / 'emnet.onnx'}")
    writable_dir(output.parent, "--output")
    enhancer, _ = load_enhancer(args.weights, args.arch, args.embed_dim)
    refiner = export_refiner(args, enhancer) if args.mem_weights else None
    data = to_onnx(ExportedEMNet(enhancer, args.border_margin, refiner).eval(), args.opset)
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    source = {"weights": args.weights, "border_margin": args.border_margin}
    if refiner is not None:
        read = refiner.read
        source.update(mem_weights=args.mem_weights, top_k=read.top_k, temperature=read.temperature,
                      strength=read.strength_flag, pooling_mean=read.pooling_mean)
    onnx.helper.set_model_props(model, {k: str(v) for k, v in source.items()})
    atomic_write(output, model.SerializeToString())
    print(f"wrote {output} (opset {args.opset}; outputs {', '.join(o.name for o in model.graph.output)})")


if __name__ == "__main__":
    tune_allocator()  # before the first tensor, however the script is started
    run_cli(lambda: main(get_args_parser().parse_args()))

"""Command-line flags shared by the entry scripts, so one flag means one thing everywhere (the
original release keeps its options beside its scripts too)."""
from __future__ import annotations

import argparse

from models.abstention import RULES
from models.enhancer import ARCH_PRESETS
from models.inference import BORDER_MARGIN
from models.query import QUERY_ENCODERS
from utils import config
from utils.bundled import BUNDLED_ENHANCER
from utils.errors import UserError

DEFAULT_VAL_PERCENT = 10.0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" once: not where the help says its default itself, not for required
    flags, switches or a None default (the help says what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.required or action.default is None
                or action.default is argparse.SUPPRESS or action.nargs == 0):
            return text
        return super()._get_help_string(action)


def add_enhancer_args(p: argparse.ArgumentParser, defaults_from_checkpoint: bool = False) -> None:
    """--arch and --embed_dim. With `defaults_from_checkpoint` both default to None: the value
    stored in our checkpoints (or the published network for published files) is used."""
    p.add_argument("--arch", choices=sorted(ARCH_PRESETS),
                   default=None if defaults_from_checkpoint else "emnet_enhancer",
                   help="enhancer architecture; emnet_enhancer is the published one, emnet_small "
                        "and emnet_tiny are CPU presets" +
                        (" (default: from the checkpoint)" if defaults_from_checkpoint else ""))
    p.add_argument("--embed_dim", type=int, default=None if defaults_from_checkpoint else 32,
                   help="embedding width C; 32 is the published network" +
                        (" (default: from the checkpoint)" if defaults_from_checkpoint else ""))


def add_trained_model_args(p: argparse.ArgumentParser, mem_help: str) -> None:
    """The flags of every script that runs the trained enhancer and, optionally, its memory:
    --weights, --mem_weights (`mem_help` says what it adds there), --arch/--embed_dim from the
    checkpoint, --border_margin and the memory's read settings."""
    p.add_argument("--weights", default=BUNDLED_ENHANCER,
                   help="enhancer checkpoint: ours or the published {'epoch','state_dict'} format")
    p.add_argument("--mem_weights", default=None, help=mem_help)
    add_enhancer_args(p, defaults_from_checkpoint=True)
    add_border_arg(p)
    add_memory_args(p)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="where to run: auto takes CUDA, then Apple MPS, then the CPU")


MEMORY_ARCH = "emnet_memory"  # the original's --arch_memory: the one memory module there is


def add_memory_build_args(p: argparse.ArgumentParser, shape_from_file: bool = False) -> None:
    """--arch_memory, --mem_size, --K_feat_dim, --V_feat_dim, the original's names for the memory's
    shape. train_memory.py builds a memory of that shape; with `shape_from_file` (test.py) they
    default to None and, when given, must match the loaded memory (`models.loading.check_memory_flags`)."""
    checked = " (checked against --mem_weights)" if shape_from_file else ""
    p.add_argument("--arch_memory", default=MEMORY_ARCH, choices=[MEMORY_ARCH],
                   help="memory module: emnet_memory, the one kind (the original's name)" + checked)
    p.add_argument("--mem_size", type=int, default=None if shape_from_file else 9000,
                   help="number of memory slots (the original: 9000)" + checked)
    p.add_argument("--K_feat_dim", type=int, default=None,
                   help="key width: the query encoder's (resnet18: 512)" + checked +
                        ("" if shape_from_file else "; default: the query's, a different value is an error"))
    p.add_argument("--V_feat_dim", type=int, default=None,
                   help="values per colour channel, p * p for --pooling_size p (the original: 1)" + checked +
                        ("" if shape_from_file else "; default: from --pooling_size"))


def add_memory_args(p: argparse.ArgumentParser, training: bool = False) -> None:
    """How a memory is queried and read, with the original release's names. test.py defaults to
    what the memory file stores; in training (`training`) they say what the new memory stores."""
    if training:
        p.add_argument("--pooling_size", type=int, default=None,
                       help="p: a slot's value is the p x p average-pooled colour of its target "
                            "(default: 1, the release)")
    else:
        p.add_argument("--pooling_size", type=int, default=None,
                       help="p of the memory's values (default: as stored in the memory)")
    p.add_argument("--pooling_mean", action=argparse.BooleanOptionalAction, default=False if training else None,
                   help="one gain for all three channels" +
                        ("" if training else " (default: as stored in the memory; --no-pooling_mean turns "
                                             "a stored one off)"))
    p.add_argument("--testing_top_k", type=int, default=None,
                   help="slots read per query: at validation, and stored in the memory as test.py's "
                        "default (default: 1, the release)" if training else
                        "slots read per query (default: as stored in the memory; the release: 1)")
    p.add_argument("--temperature", type=float, default=None,
                   help="top-k reads weigh slots by softmax(score / temperature) " +
                        ("(default: 1, the release; stored for test.py)" if training else
                         "(default: as stored in the memory; the release: 1)"))
    p.add_argument("--strength", default=None,
                   help="correction: 'release' (softmax of the paper, about half-way to the recalled "
                        "colour), a gain strength s (gain = 1 + s (m / mu - 1))" +
                        (" or 'auto' (s calibrated on the training pairs); stored for test.py "
                         "(default: release)" if training else " (default: as stored in the memory)"))
    p.add_argument("--query_encoder", choices=list(QUERY_ENCODERS), default=None,
                   help="enhancer or enhancer_levels (descriptors of the enhancer's features, offline) "
                        "or resnet18 (the original; torchvision's ImageNet weights from --query_weights, "
                        "the torch hub cache or a download) " +
                        ("(default: resnet18, the original)" if training else "(default: as stored in the memory)"))
    p.add_argument("--query_weights", default=None,
                   help="torchvision resnet18 state_dict for --query_encoder resnet18 (default: the torch "
                        "hub cache, downloaded once)")
    if training:
        p.add_argument("--abstain", choices=list(RULES), default="off",
                       help="after training, fit when the memory leaves an image uncorrected, on the training "
                            "pairs read as unseen scenes (models/abstention.py), and store it for test.py: "
                            "by the read's top-1 score, by the scene match of the low-light input, or both; "
                            "off: correct every image (the release)")
    else:
        p.add_argument("--abstain", choices=["stored", "off"], default="stored",
                       help="stored: leave images uncorrected where the memory's stored rule says it has not "
                            "seen their scene (export_onnx.py and enhance_video.py cannot, and correct every "
                            "image with a note); off: correct every image (the release)")


def add_max_memory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max_memory", type=float, default=None,
                   help="memory budget in GB for the enhancer's inference forwards (test images, validation; on "
                        "the CPU the whole process's, on CUDA the forward's): larger photos run in exact row "
                        "strips, on the CPU with their feature maps on disk (EMNET_SPILL_DIR, default the "
                        "temporary folder or /var/tmp if that is tmpfs) when even those do not fit "
                        "(default: 4 GB or half the free memory on the CPU, 80%% of the free memory on CUDA)")


def set_memory_budget(gb: float | None) -> None:
    """Apply --max_memory (None: the default); a budget that is not positive is a UserError."""
    if gb is not None and not gb > 0:
        raise UserError(f"--max_memory {gb} must be a positive number of GB")
    config.set_max_memory(gb)


def add_border_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--border_margin", type=int, default=BORDER_MARGIN,
                   help="reflected margin (pixels per side) around the enhancer's input, cropped "
                        "after: keeps the convolutions' zero padding out of the picture (no frame); "
                        "0 = the original code")


def add_split_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val_percent", type=float, default=DEFAULT_VAL_PERCENT,
                   help="share of training pairs held out for validation when --val_dir is not "
                        "given (a fixed rule on file names: see dataset/pairing.py)")

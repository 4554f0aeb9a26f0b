"""Checkpoints of the models: which enhancer or memory a file holds, built and loaded.

Two enhancer formats load:
- ours: `{'format': 'emnet-enhancer', 'arch', 'config', 'state_dict', 'epoch', ...}` (optimizer,
  scheduler and RNG state for resuming are optional);
- the published release: `{'epoch', 'state_dict'}` with or without DataParallel's `module.`
  prefix (a bare state_dict works too).
Weights may be stored in half precision; they are cast to the model's dtype on load.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch

from models.enhancer import ARCH_PRESETS, EMNetEnhancer, EnhancerConfig, make_config
from models.memory import ExternalMemory, MemoryConfig
from utils.checkpoint import load_checkpoint_file, save_checkpoint
from utils.errors import UserError

ENHANCER_FORMAT = "emnet-enhancer"


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DataParallel/DDP's `module.` prefix from every key that has it."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def enhancer_state_dict(ckpt: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The enhancer weights of a checkpoint in any supported format, without `module.`."""
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"checkpoint {path} holds no enhancer state_dict (expected a 'state_dict' "
                        "of tensors); pass an enhancer checkpoint to --weights")
    return strip_module_prefix(sd)


def _count_blocks(state_dict: dict[str, torch.Tensor], stage: str) -> int:
    pattern = re.compile(rf"^{stage}\.(\d+)\.")
    return len({m.group(1) for k in state_dict if (m := pattern.match(k))})


def infer_config(state_dict: dict[str, torch.Tensor]) -> EnhancerConfig | None:
    """The enhancer config that a state_dict was made with, read off its names and shapes."""
    w = state_dict.get("patch_embed.proj.weight")
    if w is None or w.dim() != 4:
        return None
    dim = int(w.shape[0])
    stages = ("encoder_level1", "encoder_level2", "encoder_level3", "latent")
    blocks = tuple(_count_blocks(state_dict, s) for s in stages)
    heads = tuple(int(state_dict[f"{s}.0.attn.temperature"].shape[0])
                  if f"{s}.0.attn.temperature" in state_dict else 1 for s in stages)
    ffn = state_dict.get("encoder_level1.0.ffn.project_in.weight")
    expansion = ARCH_PRESETS["emnet_enhancer"].ffn_expansion_factor
    if ffn is not None and int(ffn.shape[0]) // 2 != int(dim * expansion):
        expansion = int(ffn.shape[0]) // 2 / dim
    return EnhancerConfig(embed_dim=dim, num_blocks=blocks, heads=heads,
                          num_refinement_blocks=_count_blocks(state_dict, "refinement"),
                          num_latent_decoder_blocks=_count_blocks(state_dict, "decoder_latent"),
                          ffn_expansion_factor=expansion)


def describe_config(config: EnhancerConfig) -> str:
    """`--arch NAME --embed_dim D` when a preset matches, else the config spelled out."""
    for name, preset in ARCH_PRESETS.items():
        if make_config(name, config.embed_dim) == config:
            return f"--arch {name} --embed_dim {config.embed_dim}"
    return f"a custom config {config.to_dict()}"


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Raise one UserError line when `state_dict` does not fit `model` exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        inferred = infer_config(state_dict)
        hint = describe_config(inferred) if inferred else "no enhancer architecture known here"
        raise UserError(f"checkpoint {path} does not fit {describe_config(model.config)}: "
                        f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} "
                        f"mis-shaped keys; it fits {hint}")


def load_enhancer(path: str | Path, arch: str | None = None, embed_dim: int | None = None,
                  ) -> tuple[EMNetEnhancer, dict[str, Any]]:
    """Build the enhancer a checkpoint was trained as and load its weights (on the CPU).

    Our checkpoints carry their config; `arch`/`embed_dim`, when given, must agree with it.
    Published files carry none: `arch`/`embed_dim` (default: the published network) define it.
    Returns the model in eval mode and the checkpoint dict (for epoch and other metadata).
    """
    path = Path(path)
    ckpt = load_checkpoint_file(path)
    state_dict = enhancer_state_dict(ckpt, path)
    if "config" in ckpt:
        config = EnhancerConfig.from_dict(ckpt["config"])
        stored_arch = ckpt.get("arch") if ckpt.get("arch") in ARCH_PRESETS else "emnet_enhancer"
        wanted = make_config(arch or stored_arch, embed_dim or config.embed_dim) if arch or embed_dim else config
        if wanted != config:
            raise UserError(f"checkpoint {path} was trained as {describe_config(config)}, but "
                            f"{describe_config(wanted)} was asked for; drop --arch/--embed_dim or fix them")
    else:
        config = make_config(arch or "emnet_enhancer", embed_dim or 32)
    model = EMNetEnhancer(config)
    check_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict)
    return model.eval(), ckpt


def enhancer_payload(model: EMNetEnhancer, arch: str, epoch: int, iteration: int, best_psnr: float,
                     best_epoch: int, options: dict[str, Any], extra: dict[str, Any] | None = None,
                     ) -> dict[str, Any]:
    """An enhancer checkpoint in our format (what `load_enhancer` reads): the config it was built
    with, its weights, where training stood and the run's flags; `extra` (optimizer, scheduler,
    RNG state for --resume) is merged in."""
    return {"format": ENHANCER_FORMAT, "arch": arch, "config": model.config.to_dict(),
            "state_dict": model.state_dict(), "epoch": epoch, "iteration": iteration,
            "best_psnr": best_psnr, "best_epoch": best_epoch, "options": options, **(extra or {})}


def enhancer_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits of SHA-256 over the enhancer's weights (names, shapes, float32 values), as
    loaded: the same for a file stored in float16 or float32 with equal values. A memory stores
    the fingerprint of the enhancer whose features filled it (`models.refiner.check_enhancer`)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu()
        t = t.float() if t.is_floating_point() else t
        digest.update(f"{name}{tuple(t.shape)}".encode())
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def export_half(src: str | Path, dst: str | Path) -> None:
    """Copy a checkpoint's weights, config and metadata (no optimizer or RNG state) with the
    floating-point weights in float16: half the size, for bundling. `load_enhancer` casts back."""
    ckpt = load_checkpoint_file(src)
    keep = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler", "scaler", "rng")}
    keep["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    save_checkpoint(dst, keep)


MEMORY_FORMAT = "emnet-memory"
PUBLISHED_MEMORY_KEYS = ("mem_key", "mem_vale", "mem_age", "mem_index")


def memory_payload(memory: ExternalMemory, epoch: int, query_encoder: str,
                   head: torch.nn.Module | None, extra: dict[str, Any]) -> dict[str, Any]:
    """A memory checkpoint: the published keys (`mem_vale` sic) plus how to rebuild the query."""
    return {"epoch": epoch, "mem_key": memory.key, "mem_vale": memory.value, "mem_age": memory.age,
            "mem_index": memory.top_index, "format": MEMORY_FORMAT,
            "memory_config": memory.config.to_dict(), "query_encoder": query_encoder,
            "head_state_dict": head.state_dict() if head is not None else None, **extra}


def load_memory(path: str | Path) -> tuple[ExternalMemory, dict[str, Any]]:
    """A memory from our checkpoint or a published one (which holds only the banks: its query
    encoder is the ImageNet ResNet-18 and p follows from the value width 3 * p * p)."""
    path = Path(path)
    ckpt = load_checkpoint_file(path)
    if not all(k in ckpt for k in PUBLISHED_MEMORY_KEYS):
        raise UserError(f"{path} is not an external-memory checkpoint (it lacks "
                        f"{', '.join(k for k in PUBLISHED_MEMORY_KEYS if k not in ckpt)}); "
                        "pass a memory file to --mem_weights (an enhancer goes to --weights)")
    key, value = ckpt["mem_key"], ckpt["mem_vale"]
    if "memory_config" in ckpt:
        config = MemoryConfig(**ckpt["memory_config"])
    else:
        p = round((value.shape[1] / 3) ** 0.5)
        if 3 * p * p != value.shape[1]:
            raise UserError(f"{path}: value width {value.shape[1]} is not 3 * p * p for any p")
        config = MemoryConfig(mem_size=key.shape[0], key_dim=key.shape[1], pooling_size=p)
        ckpt = {**ckpt, "query_encoder": "resnet18", "head_state_dict": None}
    if key.shape != (config.mem_size, config.key_dim) or value.shape != (config.mem_size, config.value_dim):
        raise UserError(f"{path}: banks of shapes {tuple(key.shape)} / {tuple(value.shape)} do not fit "
                        f"mem_size {config.mem_size}, key_dim {config.key_dim}, p {config.pooling_size}")
    memory = ExternalMemory(config)
    memory.key.copy_(key)
    memory.value.copy_(value)
    memory.age.copy_(ckpt["mem_age"])
    memory.top_index.copy_(ckpt["mem_index"])
    return memory, ckpt


def check_memory_flags(mem_size: int | None, key_dim: int | None, value_dim: int | None,
                       config: MemoryConfig, what: str) -> None:
    """The memory-shape flags given (--mem_size, --K_feat_dim, --V_feat_dim; None: not given)
    against the memory of `config`, which `what` describes; a mismatch is a UserError naming both
    values. --V_feat_dim counts values per colour channel, p * p."""
    for flag, value, actual in (("--mem_size", mem_size, config.mem_size), ("--K_feat_dim", key_dim, config.key_dim),
                                ("--V_feat_dim", value_dim, config.pooling_size ** 2)):
        if value is not None and value != actual:
            raise UserError(f"{flag} {value} does not match {what}, which has {actual}; "
                            f"pass {flag} {actual} or drop it")


def check_model_files(weights: str | Path | None, mem_weights: str | Path | None,
                      query_weights: str | Path | None) -> None:
    """One UserError naming every model file given (--weights, --mem_weights, --query_weights;
    None: not given or not needed) that does not exist, before any is loaded, so that two wrong
    paths are fixed in one go."""
    given = {"--weights": weights, "--mem_weights": mem_weights, "--query_weights": query_weights}
    missing = [f"{flag} {path}" for flag, path in given.items() if path and not Path(path).is_file()]
    if missing:
        raise UserError(f"{'these files do' if len(missing) > 1 else 'this file does'} not exist: "
                        f"{', '.join(missing)}; pass the paths of .pth checkpoints (the bundled ones are in "
                        "pre_trained_logs/, see pre_trained_logs/README.md)")

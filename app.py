"""A local demo for one's own photos: upload a low-light photo (or click an example's thumbnail),
see ori (enhancer) and mem (after the memory) behind a comparison slider, what the memory changed
(gain per channel, brightness) and recalled (with each score's percentile among the memory's own
reads), and download both PNGs (`<photo>_ori.png`, `<photo>_mem.png`).

    pip install -r requirements-demo.txt
    python app.py            # then open http://127.0.0.1:7860

Offline: Gradio's analytics are off, no share link, the page uses system fonts, and it listens on
127.0.0.1 unless --host says otherwise. The outputs are test.py's for the same image and weights
(`models.photo`); large photos follow --max_memory, photos over --max_pixels are refused.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from dataset.demo import ensure_demo_set  # noqa: E402
from models.photo import PhotoRunner  # noqa: E402
from options import (  # noqa: E402
    HelpFormatter,
    add_device_arg,
    add_max_memory_arg,
    add_memory_build_args,
    add_trained_model_args,
    set_memory_budget,
)
from utils.allocator import tune_allocator  # noqa: E402
from utils.bundled import BUNDLED, BUNDLED_DIR  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.image_io import is_image_file  # noqa: E402
from utils.memory_effect import UNCHANGED_PCT, MemoryEffect  # noqa: E402

NO_MEMORY = "none"
MAX_EXAMPLES = 24  # thumbnails shown from --examples


def hints() -> dict[str, str]:
    """What the dropdowns say of the bundled files (README "Weights"; CPU speeds: benchmarks/README.md,
    0.84 against 4.35 s per 600x400 image with the fast path), with the eval15 PSNR of each enhancer
    as pre_trained_logs/model_card.json holds it (measured; tests/test_bundled_weights.py checks it)."""
    card = json.loads((BUNDLED_DIR / "model_card.json").read_text())
    psnr = {Path(e["weights"]).name: e["mean"]["ori_psnr"] for e in card["eval15"]}
    return {
        "emnet_small16_lolv1_cpu.pth": f"small16: ~5x faster on a CPU, eval15 {psnr['emnet_small16_lolv1_cpu.pth']:.1f} dB",
        "emnet_dim32_lolv1_h200_bf16.pth": f"dim32: the published size, eval15 "
                                           f"{psnr['emnet_dim32_lolv1_h200_bf16.pth']:.1f} dB",
        "emnet_small16_lolv1_levels_memory.pth": "small16 memory: for the small16 enhancer",
        "emnet_dim32_lolv1_levels_memory.pth": "dim32 memory: for the dim32 enhancer",
        NO_MEMORY: "none: the enhancer alone",
    }


HINTS = hints()
TABLE_CAPTION = (f"unchanged: \\|brightness change\\| < {UNCHANGED_PCT:g} %; percentile: of the best score among the "
               "memory's own training reads (README, *What the memory changed*)")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="EMNet photo demo (Gradio, local)", formatter_class=HelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--max_pixels", type=float, default=24e6,
                   help="largest photo accepted, in pixels (larger ones: use test.py)")
    p.add_argument("--examples", default="datasets/demo/low",
                   help="folder of example photos (default: the bundled synthetic demo set, built on first use)")
    add_trained_model_args(p, "external memory checkpoint (default: the bundled memory of --weights)")
    add_memory_build_args(p, shape_from_file=True)
    add_max_memory_arg(p)
    add_device_arg(p)
    return p


def bundled(kind: str) -> list[str]:
    """The .pth files of pre_trained_logs/<kind>/ as strings, sorted."""
    return sorted(str(p) for p in (BUNDLED / kind).glob("*.pth"))


def choices(paths: list[str], current: str) -> list[tuple[str, str]]:
    """Dropdown entries (label, value) for `paths` and `current`: the value is the path, the label
    its hint (HINTS), else its file name."""
    shown = paths if current in paths else [*paths, current]
    return [(HINTS.get(Path(p).name, Path(p).name), p) for p in shown]


def effect_rows(effect: MemoryEffect | None) -> list[list[str]]:
    """The effect table beside the slider: one (column, value) row per `MemoryEffect.columns`."""
    if effect is None:
        return []
    return [[k, "" if v is None else str(v)] for k, v in effect.columns().items()]


def matching_memory(weights: str) -> str:
    """The bundled memory trained on `weights` (same name prefix, e.g. emnet_small16), else none."""
    prefix = "_".join(Path(weights).stem.split("_")[:2]) + "_"
    return next((m for m in bundled("memory") if Path(m).name.startswith(prefix)), NO_MEMORY)


def default_memory(args: argparse.Namespace) -> str:
    """--mem_weights, else the bundled memory of --weights."""
    return str(Path(args.mem_weights)) if args.mem_weights else matching_memory(str(args.weights))


class Demo:
    """The runners loaded so far (one per enhancer and memory) and where outputs are written."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = resolve_device(args.device)
        self.runners: dict[tuple[str, str], PhotoRunner] = {}
        self.out_root = Path(tempfile.mkdtemp(prefix="emnet_app_"))

    def runner(self, weights: str, memory: str) -> PhotoRunner:
        key = (weights, memory)
        if key not in self.runners:
            args = copy.copy(self.args)
            args.weights, args.mem_weights = weights, None if memory == NO_MEMORY else memory
            self.runners[key] = PhotoRunner(args, self.device)
        return self.runners[key]

    def enhance(self, photo: str | None, weights: str, memory: str) -> tuple[Any, ...]:
        """The app's one action: (slider pair, effect rows, recalled rows, recalled thumbnails,
        downloads)."""
        runner = self.runner(weights, memory)
        out = Path(tempfile.mkdtemp(dir=self.out_root))
        result = runner.run(photo, out, int(self.args.max_pixels))
        pair = (result.ori, result.mem) if result.mem is not None else (photo, result.ori)
        rows = [[e["name"], round(float(e["score"]), 4), e.get("percentile")] for e in result.recalled]
        thumbs = [(t.repeat(4, 0).repeat(4, 1), f"{e['name']} ({e['score']:.3f}, p{e.get('percentile')})")
                  for e in result.recalled if (t := runner.thumbnail(e["index"])) is not None]
        files = [str(p) for p in (result.ori, result.mem) if p is not None]
        return tuple(map(str, pair)), effect_rows(result.effect), rows, thumbs, files


def build_ui(demo: Demo, examples: list[str]):
    """The Gradio Blocks of the demo (offline theme: system fonts, no analytics)."""
    import gradio as gr

    def enhance(photo, weights, memory):
        try:
            return demo.enhance(photo, weights, memory)
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from None

    args = demo.args
    with gr.Blocks(title="EMNet demo", analytics_enabled=False) as ui:
        gr.Markdown("# EMNet: low-light enhancement with an external memory\nUpload a photo; **ori** is the "
                    "enhancer's output, **mem** the output after the memory. Drag the slider to compare.")
        with gr.Row():
            photo = gr.File(label="photo", type="filepath")
            with gr.Column():
                weights = gr.Dropdown(choices(bundled("enhancer"), str(Path(args.weights))), label="enhancer",
                                      value=str(Path(args.weights)), allow_custom_value=True)
                memory = gr.Dropdown(choices([NO_MEMORY, *bundled("memory")], default_memory(args)), label="memory",
                                     value=default_memory(args), allow_custom_value=True)
                button = gr.Button("Enhance", variant="primary")
        if examples:
            picker = gr.Dataset(components=["image"], samples=[[p] for p in examples], type="index",
                                label="examples: click one to use it", samples_per_page=MAX_EXAMPLES)
            picker.click(lambda i: examples[i], picker, photo, api_name="example")
        with gr.Row():
            slider = gr.ImageSlider(label="ori | mem (without a memory: input | ori)", type="filepath",
                                    format="png", scale=3)
            with gr.Column(scale=1):
                effect = gr.Dataframe(headers=["column", "value"], label="what the memory changed")
                gr.Markdown(TABLE_CAPTION)
        with gr.Row():
            recalled = gr.Dataframe(headers=["recalled training image", "score", "percentile among own reads"],
                                    label="recalled by the memory")
            thumbs = gr.Gallery(label="their normal-light targets", columns=6, height=160)
        downloads = gr.File(label="downloads (PNG)", file_count="multiple")
        button.click(enhance, [photo, weights, memory], [slider, effect, recalled, thumbs, downloads],
                     api_name="enhance")
    return ui


def example_photos(folder: str) -> list[str]:
    """Up to MAX_EXAMPLES example photos from `folder` (the bundled demo set, all 7, is built when
    it is missing)."""
    path = Path(folder)
    if folder == get_args_parser().get_default("examples") and not path.is_dir():
        ensure_demo_set(path.parent)
    if not path.is_dir():
        raise UserError(f"--examples {folder} is not a folder of images; pass one or leave the default")
    return [str(p) for p in sorted(path.iterdir()) if is_image_file(p)][:MAX_EXAMPLES]


def main(args: argparse.Namespace) -> None:
    set_memory_budget(args.max_memory)
    demo = Demo(args)
    demo.runner(str(Path(args.weights)), default_memory(args))  # a bad --weights fails here, in one line
    ui = build_ui(demo, example_photos(args.examples))
    print(f"EMNet demo on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    import gradio as gr

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts
    ui.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, ssr_mode=False,
                      theme=theme, allowed_paths=[str(demo.out_root)], quiet=True)


if __name__ == "__main__":
    tune_allocator()
    run_cli(lambda: main(get_args_parser().parse_args()))

"""`vflowopt show`: a picture of the visual tokens a method keeps at each stage (vflowopt.visualize)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    DEFAULT_BUDGET,
    DEFAULT_METHOD,
    SAMPLE_SCENE,
    CLIError,
    _budget,
    _output_file,
    _prompt_text,
    add_model_arguments,
)
from .run import _prepare, _run_config

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp"}


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="draw which visual tokens a method keeps at each stage (a PNG)",
        description=(
            "Run one prefill of one prompt about one image with pruning attached and draw, per stage (before "
            "the LLM and each in-LLM stage), the picture with the kept tokens shown and the dropped ones "
            "darkened; tokens carrying recycled or merged features are outlined. For VFlowOpt also the "
            "importance map, the patch-entropy map and the calibration set K. LLaVA-NeXT / OneVision: one row "
            "for the base grid and one for the anyres crops, both over the whole picture; Qwen-VL: one cell "
            "per merged 2x2 patch group. Images only: videos are not supported yet."
        ),
    )
    p.add_argument("--model", metavar="DIR|ID",
                   help="local model directory or hub id; default: the shipped VQA model (vflowopt/assets/vqa_model)")
    p.add_argument("--image", metavar="FILE", help=f"image file; default: the shipped sample scene {SAMPLE_SCENE}")
    p.add_argument("--prompt", metavar="TEXT", type=_prompt_text,
                   help="the question about the image; default (only without --image): the sample scene's question")
    p.add_argument("--method", metavar="NAME", help=f"pruning method (default: {DEFAULT_METHOD})")
    p.add_argument("--budget", type=_budget, metavar="B",
                   help=f"mean fraction of visual tokens kept, in (0, 1] (default: {DEFAULT_BUDGET}); not with "
                        "--strategy")
    p.add_argument("--strategy", metavar="FILE", help="a saved config (JSON written by cfg.save)")
    p.add_argument("--out", metavar="OUT.png", type=_output_file, required=True, help="the PNG to write")
    add_model_arguments(p)
    p.set_defaults(func=_cmd_show, json=False, positions=None)


def _refuse_video(path: str) -> None:
    """show draws still pictures; a video file (or an animated image) is refused before anything loads."""
    if Path(path).suffix.lower() in VIDEO_SUFFIXES:
        raise CLIError(f"--image {path} is a video; vflowopt show draws still images only (videos are not "
                       "supported yet): give one frame as a PNG or JPEG")
    try:
        from PIL import Image

        with Image.open(path) as im:
            frames = int(getattr(im, "n_frames", 1))
    except Exception:  # noqa: BLE001 - not readable: _load_image says why
        return
    if frames > 1:
        raise CLIError(f"--image {path} is an animated image ({frames} frames); vflowopt show draws still images "
                       "only (videos are not supported yet): give one frame")


def _cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    cfg, source = _run_config(args)  # fails fast, before any model is loaded
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("vflowopt show needs matplotlib: pip install 'vflowopt[plot]'") from None

    import vflowopt
    from vflowopt.visualize import save_kept_tokens

    image, _, model, _, model_name, inputs = _prepare(args, console, cfg, announce=False, check_image=_refuse_video)
    try:
        handle = vflowopt.prune(model, cfg)
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    try:
        titles = save_kept_tokens(handle, image, args.out, inputs)
        summary = handle.stats.summary()
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    except vflowopt.PruningError as exc:
        raise CLIError(str(exc), code=1) from None
    finally:
        handle.remove()
    print(f"{model_name}: {handle.config.method} ({source})")
    print(summary)
    print(f"wrote {args.out}: " + "; ".join(t.replace("\n", ", ") for t in titles))
    return 0

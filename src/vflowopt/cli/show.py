"""`vflowopt show`: a picture of the visual tokens a method keeps at each stage (vflowopt.visualize).

Videos come as a directory of frame images or an animated GIF/APNG/WebP (read with Pillow): decoding .mp4
and other video files needs a video decoder vflowopt does not ship, so they are refused with a hint to
extract the frames first. Every frame problem is found before the model loads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import (
    DEFAULT_BUDGET,
    DEFAULT_METHOD,
    SAMPLE_SCENE,
    CLIError,
    _budget,
    _check_model_options,
    _check_strategy_fits,
    _image_tokens_note,
    _is_hub_id,
    _load_image,
    _load_model,
    _model_folder,
    _one_line,
    _output_file,
    _placed,
    _positive_int,
    _prompt_text,
    _to_rgb,
    add_model_arguments,
)
from .run import _prepare, _run_config

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp"}
DEFAULT_FRAMES = 8
#: model_type of the families whose videos vflowopt prunes (vflowopt.video_inputs.VIDEO_FAMILIES).
VIDEO_MODEL_TYPES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next_video", "video_llava")
EXTRACT_HINT = "e.g. ffmpeg -i CLIP -vf fps=2 frames/%04d.png, then --video frames/"


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="draw which visual tokens a method keeps at each stage (a PNG)",
        description=(
            "Run one prefill of one prompt about one image and/or one video with pruning attached and draw, "
            "per stage (before the LLM and each in-LLM stage), the picture with the kept tokens shown and the "
            "dropped ones darkened; tokens carrying recycled or merged features are outlined. For VFlowOpt also "
            "the importance map, the patch-entropy map and the calibration set K. LLaVA-NeXT / OneVision: one "
            "row for the base grid and one for the anyres crops, both over the whole picture; Qwen-VL: one cell "
            "per merged 2x2 patch group. A video (--video) is drawn as a strip of frames: a row per stage and "
            "map, a column per drawn frame (Qwen-VL: per temporal group of 2 frames, drawn by its first "
            "frame). --image and --video together make one prompt with both (the image first)."
        ),
    )
    p.add_argument("--model", metavar="DIR|ID",
                   help="local model directory or hub id; default: the shipped VQA model (vflowopt/assets/vqa_model; "
                        "images only, so --video needs --model)")
    p.add_argument("--image", metavar="FILE", help=f"image file; default (without --video): the shipped sample "
                                                    f"scene {SAMPLE_SCENE}")
    p.add_argument("--video", metavar="DIR|FILE",
                   help="a video as a directory of frame images (sorted by file name: zero-pad the numbers) or an "
                        "animated GIF/APNG/WebP; video files (.mp4, ...) need their frames extracted first. "
                        "Needs --model (a LLaVA-OneVision, Qwen2/2.5/3-VL, LLaVA-NeXT-Video or Video-LLaVA model) "
                        "and --prompt")
    p.add_argument("--frames", type=_positive_int, metavar="N",
                   help=f"frames of --video given to the model, sampled evenly over it (default: {DEFAULT_FRAMES}; "
                        "all when it has fewer); at most 8 of them are drawn")
    p.add_argument("--prompt", metavar="TEXT", type=_prompt_text,
                   help="the question about the image or video; default (only without --image and --video): the "
                        "sample scene's question")
    p.add_argument("--method", metavar="NAME", help=f"pruning method (default: {DEFAULT_METHOD})")
    p.add_argument("--budget", type=_budget, metavar="B",
                   help=f"mean fraction of visual tokens kept, in (0, 1] (default: {DEFAULT_BUDGET}); not with "
                        "--strategy")
    p.add_argument("--strategy", metavar="FILE", help="a saved config (JSON written by cfg.save)")
    p.add_argument("--out", metavar="OUT.png", type=_output_file, required=True, help="the PNG to write")
    add_model_arguments(p)
    p.set_defaults(func=_cmd_show, json=False, positions=None)


def _refuse_video(path: str) -> None:
    """--image takes a still picture; a video file or an animated image is pointed to --video."""
    if Path(path).suffix.lower() in VIDEO_SUFFIXES:
        raise CLIError(f"--image {path} is a video file; vflowopt cannot decode video files: extract its frames "
                       f"into a directory and pass --video DIR ({EXTRACT_HINT})")
    try:
        from PIL import Image

        with Image.open(path) as im:
            frames = int(getattr(im, "n_frames", 1))
    except Exception:  # noqa: BLE001 - not readable: _load_image says why
        return
    if frames > 1:
        raise CLIError(f"--image {path} is an animated image ({frames} frames); pass it as --video {path} to draw "
                       "its frames, or give one frame as --image")


def _evenly(total: int, wanted: int) -> list[int]:
    """`wanted` indices spread evenly over range(total), first and last included (all when fewer)."""
    if wanted >= total:
        return list(range(total))
    if wanted == 1:
        return [0]
    return [round(i * (total - 1) / (wanted - 1)) for i in range(wanted)]


def _numbers(indices: list[int]) -> str:
    """Which source frames (counting from 0) became the picture's frames 0, 1, ...: its titles number the
    frames given to the model."""
    return f"source frames {', '.join(map(str, indices))}, drawn as frames 0-{len(indices) - 1}"


def _open_image(path: Path, what: str):
    """The opened (not yet decoded) PIL image at `path`, or a CLIError naming `what` it was meant to be."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise CLIError(f"{what} {path} is too large to open safely ({_one_line(exc)}); downscale the frames, "
                       "e.g. to at most 4096 px a side") from None
    except UnidentifiedImageError:
        raise CLIError(f"{what} {path} is not an image Pillow can read (frames: PNG, JPEG, WebP, BMP, ...)") from None
    except OSError as exc:
        raise CLIError(f"cannot read {what} {path}: {_one_line(exc)}") from None


def _decoded(im, path: Path, what: str):
    """The current frame of `im` as 8-bit RGB, or a CLIError for damaged data."""
    from PIL import Image

    try:
        im.load()
        return _to_rgb(im, str(path))[0]
    except Image.DecompressionBombError as exc:
        raise CLIError(f"{what} {path} is too large to open safely ({_one_line(exc)})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise CLIError(f"cannot read {what} {path}: {_one_line(exc)} (the file is damaged or cut short)") from None


def _load_video(spec: str, frames: int) -> tuple[list, float | None, str]:
    """(the `frames` evenly sampled RGB frames, their frames per second or None, a description) of --video:
    a directory of frame images sorted by name, or an animated image; every problem is one CLIError."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in VIDEO_SUFFIXES and not path.is_dir():
        raise CLIError(f"--video {spec} is a video file; vflowopt cannot decode video files (no video decoder): "
                       f"extract its frames into a directory and pass that ({EXTRACT_HINT})")
    if not path.exists():
        raise CLIError(f"--video {spec} not found (give a directory of frame images or an animated GIF/APNG/WebP)")
    if path.is_dir():
        return _frames_from_directory(path, spec, frames)
    if not path.is_file():
        raise CLIError(f"--video {spec} is neither a directory nor a file")
    with _open_image(path, "--video") as im:
        total = int(getattr(im, "n_frames", 1))
        if total < 2:
            raise CLIError(f"--video {spec} is a still image (one frame); pass it with --image, or give an animated "
                           "GIF/APNG/WebP or a directory of frames")
        picked, durations, wanted = [], [], set(_evenly(total, frames))
        for index in range(total):
            try:
                im.seek(index)
            except (OSError, EOFError, ValueError) as exc:
                raise CLIError(f"cannot read frame {index} of --video {spec}: {_one_line(exc)}") from None
            durations.append(float(im.info.get("duration") or 0.0))
            if index in wanted:
                picked.append(_decoded(im, path, f"frame {index} of --video"))
    sizes = {f.size for f in picked}
    if len(sizes) > 1:  # Pillow gives every frame the canvas size; kept for other readers
        raise CLIError(f"--video {spec}: its frames have different sizes {sorted(sizes)}")
    seconds = sum(durations) / 1000.0
    fps = len(picked) / seconds if seconds > 0 and all(durations) else None
    return picked, fps, f"{spec}: {len(picked)} of {total} frames ({_numbers(sorted(wanted))})"


def _frames_from_directory(path: Path, spec: str, frames: int) -> tuple[list, None, str]:
    """Every non-hidden file of the directory is a frame (sorted by name); all are checked, `frames` decoded."""
    files = sorted(f for f in path.iterdir() if not f.name.startswith("."))
    if not files:
        raise CLIError(f"--video {spec} holds no frames (an empty directory)")
    others = [f.name for f in files if not f.is_file()]
    if others:
        raise CLIError(f"--video {spec} holds {others[0]!r}, which is not a file; the directory must hold only "
                       "frame images")
    size, first = None, None
    for f in files:  # headers only: sizes and formats of every frame, before anything is decoded
        with _open_image(f, "frame") as im:
            if int(getattr(im, "n_frames", 1)) > 1:
                raise CLIError(f"frame {f} of --video {spec} is itself animated; the directory must hold still "
                               "frames")
            if size is None:
                size, first = im.size, f.name
            elif im.size != size:
                raise CLIError(f"--video {spec}: frame {f.name} is {im.size[0]}x{im.size[1]} but {first} is "
                               f"{size[0]}x{size[1]}; all frames of a video must have the same size")
    picked, wanted = [], _evenly(len(files), frames)
    for index in wanted:
        with _open_image(files[index], "frame") as im:
            picked.append(_decoded(im, files[index], "frame"))
    return picked, None, f"{spec}: {len(picked)} of {len(files)} frames ({_numbers(wanted)})"


def _check_video_model(args: argparse.Namespace) -> None:
    """A --model of a supported family that takes no videos is refused from its config.json, before the
    weights load (other problems are left to the loader, which says them its own way)."""
    if args.model is None:
        raise CLIError("--video needs --model: a LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT-Video "
                       "or Video-LLaVA model directory or hub id (the shipped VQA model takes images only)")
    path = Path(args.model).expanduser()
    if path.is_dir():
        config = path / "config.json"
    elif _is_hub_id(args.model):
        try:
            from huggingface_hub import hf_hub_download

            config = Path(hf_hub_download(args.model, "config.json", revision=args.revision))
        except Exception:  # noqa: BLE001 - _model_folder says why
            return
    else:
        return
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return
    from vflowopt.models.base import supported_families

    if model_type in supported_families() and model_type not in VIDEO_MODEL_TYPES:
        raise CLIError(f"{args.model} is a '{model_type}' model, which takes no videos; --video needs one of: "
                       f"{', '.join(VIDEO_MODEL_TYPES)}")


def _video_processor_ready(processor, folder: Path, name: str) -> str:
    """The processor's video family; gives it the checkpoint's video settings (video_preprocessor_config.json)
    when it has no working video processor of its own (transformers' need torchvision)."""
    from vflowopt.video_inputs import (
        VIDEO_PROCESSOR_ATTR,
        attach_video_processor,
        video_family,
        video_frame_processor_from_dict,
    )

    try:
        family = video_family(processor)
    except ValueError as exc:
        raise CLIError(f"the processor loaded from {name} cannot take videos: {exc}") from None
    if getattr(processor, "video_processor", None) is None and getattr(processor, VIDEO_PROCESSOR_ATTR, None) is None:
        settings = folder / "video_preprocessor_config.json"
        if settings.is_file():
            try:
                attach_video_processor(processor, video_frame_processor_from_dict(family, json.loads(
                    settings.read_text())))
            except (OSError, ValueError, TypeError) as exc:
                raise CLIError(f"the video settings of {name} (video_preprocessor_config.json) cannot be used: "
                               f"{_one_line(exc)}") from None
    return family


def _prepare_video(args: argparse.Namespace, cfg) -> tuple[Any, list, Any, Any, str, Any, str]:
    """--video's (image or None, frames, model, processor, model name, inputs, what was read): the frames and
    the model's family are checked before the weights load (the `--model` branch of common._model_for,
    keeping the folder for the checkpoint's video settings)."""
    if args.model is None:
        _check_video_model(args)
    if args.prompt is None:
        raise CLIError("--prompt is required with --video (only the shipped sample scene has a default question)")
    if args.image is not None:
        _refuse_video(args.image)
    image = _load_image(args.image) if args.image is not None else None
    frames, fps, read = _load_video(args.video, args.frames or DEFAULT_FRAMES)
    _check_video_model(args)
    _check_model_options(args)
    folder = _model_folder(args)
    _check_strategy_fits(folder, args.model, cfg)
    model, processor = _load_model(folder, args, args.model)
    _placed(args, model)
    family = _video_processor_ready(processor, folder, args.model)
    from vflowopt.video_inputs import build_video_inputs

    kwargs: dict[str, Any] = {"fps": fps}
    if family == "qwen3_vl":  # its real default samples 2 frames a second: the frames were sampled here already
        kwargs["videos_kwargs"] = {"do_sample_frames": False}
    try:
        inputs = build_video_inputs(processor, [frames], [args.prompt], images=[[image]] if image is not None else None,
                                    **kwargs).to(args.device)
    except Exception as exc:  # noqa: BLE001 - a processor that cannot format this prompt
        raise CLIError(f"the processor could not prepare the prompt and video: {_one_line(exc)}") from None
    if image is not None:
        _image_tokens_note([image], inputs, model)
    return image, frames, model, processor, args.model, inputs, read


def _cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    if args.frames is not None and args.video is None:
        raise CLIError("--frames applies to --video")
    cfg, source = _run_config(args)  # fails fast, before any model is loaded
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("vflowopt show needs matplotlib: pip install 'vflowopt[plot]'") from None

    import vflowopt
    from vflowopt.visualize import save_kept_tokens

    frames, read = None, None
    if args.video is not None:
        image, frames, model, _, model_name, inputs, read = _prepare_video(args, cfg)
    else:
        image, _, model, _, model_name, inputs = _prepare(args, console, cfg, announce=False,
                                                          check_image=_refuse_video)
    try:
        handle = vflowopt.prune(model, cfg)
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    try:
        titles = save_kept_tokens(handle, image, args.out, inputs, video=frames)
        summary = handle.stats.summary()
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    except vflowopt.PruningError as exc:
        raise CLIError(str(exc), code=1) from None
    except (RuntimeError, ValueError) as exc:  # the model failed on these inputs (e.g. video settings that do
        # not fit its vision tower): one line, like every other failure of the command
        hint = ("; the frame size comes from the model's video_preprocessor_config.json (without one: the family's "
                "default), check that it fits the vision tower") if frames is not None else ""
        raise CLIError(f"the model could not run this prompt: {_one_line(exc)}{hint}", code=1) from None
    finally:
        handle.remove()
    print(f"{model_name}: {handle.config.method} ({source})")
    if read is not None:
        print(f"video {read}")
    print(summary)
    print(f"wrote {args.out}: " + "; ".join(t.replace("\n", ", ") for t in titles))
    return 0

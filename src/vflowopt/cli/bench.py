"""`vflowopt bench`: efficiency and fidelity of every method at every budget."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (
    DTYPES,
    HUB_EXAMPLE,
    TINY_MODEL_NAME,
    CLIError,
    _check_family,
    _check_model_options,
    _error,
    _image_tokens_note,
    _is_hub_id,
    _load_image,
    _load_model,
    _method_budget_grid,
    _model_folder,
    _one_line,
    _output_file,
    _placed,
    _positive_int,
    _processor_from_parts,
    _prompt_text,
    add_model_arguments,
)

BENCH_BUDGETS = "1.0,0.5,0.25,0.1"


_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from ..bench.realmodels import REAL_MODELS

    p = sub.add_parser(
        "bench",
        help="measure FLOPs, KV cache, latency, memory and fidelity of methods at budgets",
        description=(
            "Measure every method at every budget on one model and one input, the same way for all: "
            "analytic prefill FLOPs (2 x multiply-adds), KV-cache bytes after prefill, prefill and "
            "end-to-end latency (median of --repeats after warm-up), peak memory, pruning overhead, and "
            "fidelity to the unpruned model (cosine of the last hidden state, next-token KL, greedy "
            "token agreement). --model takes a local directory, a hub id (fetched into the Hugging Face cache, or "
            f"read from it offline) or one of the shipped architectures ({', '.join(REAL_MODELS)}), built "
            "with RANDOM weights for timing at real scale. Without --model the bundled tiny random "
            "LLaVA-OneVision is used."
        ),
    )
    p.add_argument("--model", metavar="DIR|ID|NAME",
                   help="local model directory, hub id, or a shipped architecture name; default: the bundled tiny "
                        "model")
    p.add_argument("--methods", metavar="A,B,...",
                   help="comma-separated methods (default: every registered one); see vflowopt.available_methods()")
    p.add_argument("--budgets", default=BENCH_BUDGETS, metavar="B1,B2,...",
                   help=f"comma-separated budgets in (0, 1] (default: {BENCH_BUDGETS})")
    p.add_argument("--images", nargs="+", metavar="FILE",
                   help="image file(s), all in one prompt; default: a procedural picture (see --image-size)")
    p.add_argument("--num-images", type=_positive_int, metavar="K",
                   help="without --images: how many procedural pictures to put in the prompt (default: 1)")
    p.add_argument("--image-size", type=_positive_int, metavar="PX",
                   help="without --images: side of the procedural pictures (default: the vision tower's "
                        "input size; 448 for Qwen-VL)")
    p.add_argument("--video-frames", type=_positive_int, metavar="F",
                   help="put one procedural video of F frames in the prompt instead of the picture (with --images "
                        "or --num-images given explicitly: in addition to them, images first); video families only")
    p.add_argument("--video-size", type=_positive_int, metavar="PX",
                   help="with --video-frames: side of the procedural video's square frames before the family's "
                        "video preprocessing (default: the vision tower's input size; 448 for Qwen-VL)")
    p.add_argument("--prompt", default=None, metavar="TEXT", type=_prompt_text,
                   help="the text prompt (default: 'Describe the image in detail.', or '... the video ...' with "
                        "--video-frames)")
    p.add_argument("--new-tokens", type=_count, default=8, metavar="N",
                   help="tokens generated for end-to-end latency and token agreement (default: 8; 0: prefills "
                        "only, no e2e latency or token agreement, half the time per cell)")
    p.add_argument("--repeats", type=_positive_int, default=3, metavar="R", help="timed runs per cell (default: 3)")
    p.add_argument("--warmup", type=int, default=1, metavar="W", help="untimed runs per cell first (default: 1)")
    add_model_arguments(p, dtype_default=None, dtype_help="fp32 on cpu, bf16 on cuda")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", metavar="OUT.json", type=_output_file, help="write the records (updated after every cell)")
    p.add_argument("--csv", metavar="OUT.csv", type=_output_file,
                   help="write the records as CSV (updated after every cell)")
    p.add_argument("--plot", metavar="OUT.png", type=_output_file, help="plot speedup and fidelity against budget")
    p.add_argument("--allow-random", action="store_true",
                   help="accept a model directory holding only a config: random weights, meaningless fidelity")
    p.set_defaults(func=_cmd_bench)



def _has_weights(path: Path) -> bool:
    return any(any(path.glob(pattern)) for pattern in _WEIGHT_FILES)


def _model_type_before_loading(args: argparse.Namespace) -> tuple[str, str] | None:
    """(model type, name) of --model read from its config alone (nothing heavy is loaded), or None when it
    cannot be told yet (a hub id not in the cache: the download's own checks then speak first)."""
    from vflowopt.bench.realmodels import REAL_MODELS, real_config_dict
    from vflowopt.checkpoint import CheckpointError, read_config

    if args.model is None:
        return "llava_onevision", TINY_MODEL_NAME
    if args.model in REAL_MODELS:
        return str(real_config_dict(args.model)["model_type"]), args.model
    path = Path(args.model).expanduser()
    if not path.is_dir():
        if not _is_hub_id(args.model):
            return None
        try:  # the hub id's config.json alone (the same file the snapshot download fetches first)
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(args.model, "config.json", revision=args.revision)).parent
        except Exception:  # noqa: BLE001 - let _model_folder report the hub failure in its own words
            return None
    try:
        return str(read_config(path)["model_type"]), args.model
    except (CheckpointError, KeyError):
        return None


def _check_video_family(args: argparse.Namespace) -> None:
    """--video-frames on a family that takes no videos: one line, before any weights are read or built."""
    from vflowopt.bench.video import video_refusal
    from vflowopt.models.base import supported_families

    known = _model_type_before_loading(args)
    if known is not None and known[0] in supported_families():  # others: the family check speaks first
        reason = video_refusal(*known)
        if reason:
            raise CLIError(reason)


def _bench_model(args: argparse.Namespace, dtype):
    """(model, processor, name, random_weights), placed as `args` asks, in `dtype` (None: the checkpoint's own,
    or the config's for a random-weight build), or a CLIError."""
    import torch

    from vflowopt.bench.realmodels import (
        REAL_MODELS,
        load_real_config,
        offline_processor,
        set_generation_ids,
    )

    if args.model is None:
        from vflowopt.tiny import tiny_llava_onevision

        model, processor = tiny_llava_onevision(attn_implementation=args.attn_implementation)
        return model.to(args.device, dtype or torch.float32), processor, TINY_MODEL_NAME, True
    if args.model in REAL_MODELS:
        config = load_real_config(args.model)
        processor = offline_processor(config, args.model)
        model = _random_model(args, config, dtype)
        set_generation_ids(model, processor)
        return model, processor, f"{args.model} (shipped architecture, random weights)", True
    if not Path(args.model).expanduser().is_dir() and not _is_hub_id(args.model):
        raise CLIError(f"model directory not found: {args.model} (--model takes a local directory, a hub id such as "
                       f"{HUB_EXAMPLE}, or one of {', '.join(REAL_MODELS)}; no hub downloads are attempted for "
                       "anything else)")
    path = _model_folder(args)
    args._folder = path  # the video settings are read from it too (a hub id: its snapshot)
    _check_family(path, args.model)
    if _has_weights(path):
        model, processor = _load_model(path, args, args.model)
        return model, processor, args.model, False
    if not args.allow_random:
        raise CLIError(f"{args.model} holds a config but no weights; pass --allow-random to benchmark it with "
                       "random weights (timing only: fidelity is then meaningless)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"could not read the config in {args.model}: {_one_line(exc)}") from None
    try:
        processor = _processor_from_parts(path)
    except Exception:  # noqa: BLE001 - no processor files: build one offline from the config
        try:
            processor = offline_processor(config)
        except Exception as exc:  # noqa: BLE001
            raise CLIError(f"no processor in {args.model} and none can be built offline: {_one_line(exc)}") from None
    model = _random_model(args, config, dtype)
    if getattr(processor.tokenizer, "image_token_id", None) is not None and hasattr(processor, "image_token"):
        set_generation_ids(model, processor)
    return model, processor, f"{args.model} (random weights)", True


def _random_model(args: argparse.Namespace, config, dtype):
    """A random-weight model of `config` on args.device, or a CLIError (out of memory included)."""
    import torch

    from vflowopt.bench.realmodels import build_random_model

    if args.device_map is not None:
        raise CLIError("--device-map places saved weights; a random-weight model is built on one --device")
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    _check_memory(args, config, dtype)
    try:
        return build_random_model(config, dtype=dtype, device=args.device,
                                  attn_implementation=args.attn_implementation)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise CLIError(f"out of memory building {args.model} with random weights ({_one_line(exc)}); try "
                       "--dtype bf16 or a smaller architecture") from None
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"could not build a model from the config of {args.model}: {_one_line(exc)}") from None


def _check_memory(args: argparse.Namespace, config, dtype) -> None:
    """Refuse, before allocating anything, a model whose weights alone exceed the memory available (on a
    Linux CPU an allocation that does not fit is not an error: the kernel kills the process)."""
    import torch

    from vflowopt.bench.memory import available_bytes
    from vflowopt.bench.realmodels import _model_class
    from vflowopt.checkpoint import config_parameters

    try:
        available = available_bytes(args.device)
        n = config_parameters(_model_class(config), config)
    except Exception:  # noqa: BLE001 - no estimate: let the build itself report
        return
    need = n * torch.empty((), dtype=dtype).element_size()
    if available is not None and need > available:
        raise CLIError(f"{args.model} with random weights needs {need / 2**30:.1f} GiB for its {n / 1e9:.2f} B "
                       f"parameters in {str(dtype).removeprefix('torch.')}, but {args.device} has "
                       f"{available / 2**30:.1f} GiB available: try --dtype bf16, --device cuda, or a smaller "
                       "architecture (llava-onevision-0.5b)")


def _bench_images(args: argparse.Namespace, model) -> tuple[list, dict]:
    from vflowopt.tiny import example_image

    if args.images:
        return [_load_image(f) for f in args.images], {"images": list(args.images)}
    vc = model.config.vision_config
    qwen = str(getattr(vc, "model_type", "")).startswith("qwen")
    side = args.image_size or (448 if qwen else int(vc.image_size))
    count = args.num_images or 1
    images = [example_image(seed=i, size=(side, side)) for i in range(count)]
    return images, {"images": f"{count} procedural picture(s) of {side}x{side} px"}


def _bench_video(args: argparse.Namespace, model, processor) -> tuple[list, dict, object]:
    """The procedural video (frames), its description, and the frame processor it goes through (None: the
    processor's own transformers video processor)."""
    from vflowopt.bench.video import frame_processor_for, video_refusal
    from vflowopt.video_inputs import example_video

    reason = video_refusal(model.config.model_type, args.model or TINY_MODEL_NAME)
    if reason:  # a model type the config check could not see before loading
        raise CLIError(reason)
    vc = model.config.vision_config
    qwen = str(getattr(vc, "model_type", "")).startswith("qwen") or model.config.model_type.startswith("qwen")
    side = args.video_size or (448 if qwen else int(vc.image_size))
    frames = example_video(seed=0, frames=args.video_frames, size=(side, side))
    folder = None
    if args.model is not None and Path(args.model).expanduser().is_dir():
        folder = Path(args.model).expanduser()
    elif getattr(args, "_folder", None) is not None:
        folder = args._folder
    try:
        frame_processor = frame_processor_for(processor, model.config, folder)
    except Exception as exc:  # noqa: BLE001 - an unreadable video_preprocessor_config.json
        raise CLIError(f"could not set up the video preprocessing of {args.model}: {_one_line(exc)}") from None
    return frames, {"video": f"1 procedural video of {args.video_frames} frame(s) of {side}x{side} px"}, frame_processor


def _check_video_flags(args: argparse.Namespace) -> None:
    """The video flags that conflict with each other or with the picture flags: one line, exit 2."""
    if args.video_frames is None:
        if args.video_size is not None:
            raise CLIError("--video-size shapes the procedural video; add --video-frames F to put one in the prompt")
        return
    if args.image_size is not None and not args.num_images:
        raise CLIError("--image-size shapes procedural pictures, which --video-frames replaces; add --num-images K "
                       "to put pictures beside the video, or drop --image-size")


def _cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=200)
    methods, budgets = _method_budget_grid(args)  # fails fast, before any model is loaded
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    if args.images:
        given = [flag for flag, value in (("--num-images", args.num_images), ("--image-size", args.image_size))
                 if value is not None]
        if given:
            one = len(given) == 1
            raise CLIError(f"{' and '.join(given)} {'shapes' if one else 'shape'} the procedural pictures, which "
                           f"--images replaces: drop {'it' if one else 'them'} or --images")
        for f in args.images:
            if not Path(f).is_file():
                raise CLIError(f"image file not found: {f}")
    _check_video_flags(args)
    if args.prompt is None:
        args.prompt = "Describe the video in detail." if args.video_frames else "Describe the image in detail."
    outputs = [Path(x).expanduser().resolve() for x in (args.json, args.csv, args.plot) if x]
    if len(set(outputs)) < len(outputs):
        raise CLIError("--json, --csv and --plot must name different files")

    import torch

    import vflowopt
    from vflowopt.bench.report import RANDOM_WEIGHTS_NOTE, bench_meta, plot_bench, print_table, write_csv, write_json
    from vflowopt.bench.run import run_bench
    from vflowopt.tiny import build_inputs
    from vflowopt.video_inputs import build_video_inputs

    _check_model_options(args)
    if args.video_frames:
        _check_video_family(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") or args.device_map else "fp32"
    dtype = None if args.dtype == "auto" else getattr(torch, DTYPES[args.dtype])
    model, processor, model_name, random_weights = _bench_model(args, dtype)
    _placed(args, model)
    try:
        vflowopt.models.base.adapter_for(model)
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    if args.video_frames:
        images, inputs_info = _bench_images(args, model) if (args.images or args.num_images) else ([], {})
        video, video_info, frame_processor = _bench_video(args, model, processor)
        inputs_info.update(video_info)
        videos_kwargs = {"do_sample_frames": False} if model.config.model_type == "qwen3_vl" else {}
        try:  # every frame is kept (Qwen3-VL would otherwise sample 2 per second of the assumed 24 fps)
            inputs = build_video_inputs(processor, [video], args.prompt, images=[images] if images else None,
                                        video_processor=frame_processor,
                                        **({"videos_kwargs": videos_kwargs} if videos_kwargs else {}))
        except Exception as exc:  # noqa: BLE001 - a processor that cannot format this prompt
            raise CLIError(f"the processor could not prepare the prompt and video: {_one_line(exc)}") from None
    else:
        images, inputs_info = _bench_images(args, model)
        try:
            inputs = build_inputs(processor, images, [args.prompt])
        except Exception as exc:  # noqa: BLE001 - a processor that cannot format this prompt
            raise CLIError(f"the processor could not prepare the prompt and images: {_one_line(exc)}") from None
    _image_tokens_note(images, inputs, model)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs and torch.is_tensor(inputs[key]) and torch.is_floating_point(inputs[key]):
            inputs[key] = inputs[key].to(model.dtype)
    adapter = vflowopt.models.base.adapter_for(model)
    ids = inputs["input_ids"]
    video_id = adapter.video_token_id
    inputs_info.update(prompt=args.prompt, prompt_tokens=int(ids.shape[1]),
                       image_tokens=int((ids == adapter.image_token_id).sum()),
                       video_tokens=int((ids == video_id).sum()) if video_id is not None else 0)
    meta = bench_meta(model, model_name=model_name, device=args.device, random_weights=random_weights,
                      new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup, inputs_info=inputs_info)
    if random_weights:
        console.print(f"{RANDOM_WEIGHTS_NOTE} ({model_name}); timings, FLOPs and memory are valid.",
                      style="bold yellow", markup=False, highlight=False)
    video_part = f", {inputs_info['video_tokens']} video tokens" if args.video_frames else ""
    console.print(f"{model_name}: {inputs_info['prompt_tokens']} prompt tokens, {inputs_info['image_tokens']} image "
                  f"tokens{video_part}; {len(methods)} method(s) x {len(budgets)} budget(s) + unpruned reference",
                  markup=False, highlight=False)

    records: list = []

    def save(record) -> None:
        records.append(record)
        if args.json:
            write_json(args.json, records, meta)
        if args.csv:
            write_csv(args.csv, records, meta)

    try:
        run_bench(model, inputs, methods, budgets, new_tokens=args.new_tokens, repeats=args.repeats,
                  warmup=args.warmup, random_weights=random_weights, progress=True, on_record=save)
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    except KeyboardInterrupt:
        raise CLIError(f"interrupted after {len(records)} record(s); those are in the --json/--csv outputs",
                       code=130) from None
    except Exception as exc:  # noqa: BLE001 - the unpruned reference itself failed (e.g. out of memory)
        raise CLIError(f"the unpruned reference run failed: {_one_line(exc)}", code=1) from None
    print_table(console, records, meta)
    if args.plot:
        plot_bench(args.plot, records, meta)
    written = [x for x in (args.json, args.csv, args.plot) if x]
    if written:
        console.print("wrote " + ", ".join(written), markup=False, highlight=False)
    failed = [r for r in records if r.error]
    if failed:
        _error(f"{len(failed)} cell(s) failed (recorded with their error): "
               + "; ".join(f"{r.method}@{r.budget:g}: {r.error}" for r in failed[:3]))
        # out of memory, or a budget a method cannot reach on this model (ConfigError), is a result;
        # anything else is a failure of the method on this model
        if any(not r.error.startswith(("out of memory", "ConfigError")) for r in failed):
            return 1
    return 0

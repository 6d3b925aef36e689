"""`spri-hf`: upcycle, inspect and demo from the command line."""

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch


def _layers_arg(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--moe-layers {text!r} must be comma-separated layer indices, e.g. 0,2,4")


def _add_settings(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("SPRI settings (see SpriConfig)")
    group.add_argument("--num-experts", type=int, default=8)
    group.add_argument("--num-experts-per-tok", type=int, default=2)
    group.add_argument("--init", default="spri", help="spri | copy | noise | drop | random")
    group.add_argument("--principal-ratio", type=float, default=0.5)
    group.add_argument("--principal-energy", type=float, default=None)
    group.add_argument("--partition", default="interleaved", help="interleaved | contiguous | random")
    group.add_argument("--spri-mode", default="balanced", help="balanced | partition")
    group.add_argument("--diversity", type=float, default=0.1)
    group.add_argument("--residual-scale", type=float, default=1.0)
    group.add_argument("--noise-std", type=float, default=0.01)
    group.add_argument("--drop-ratio", type=float, default=0.5)
    group.add_argument("--moe-layers", type=_layers_arg, default=None, help="e.g. 0,2,4 (default: every layer)")
    group.add_argument("--shared-expert", default=None, help="dense: keep an always-on copy of the dense FFN")
    group.add_argument("--router-aux-loss-coef", type=float, default=0.01)
    group.add_argument("--router-z-loss-coef", type=float, default=0.0)
    group.add_argument("--no-norm-topk-prob", dest="norm_topk_prob", action="store_false")
    group.add_argument("--stage", type=int, default=None, help="1 (residual factors) or 2 (full experts)")
    group.add_argument("--seed", type=int, default=0)


_SETTING_NAMES = (
    "num_experts num_experts_per_tok init principal_ratio principal_energy partition spri_mode diversity "
    "residual_scale noise_std drop_ratio moe_layers shared_expert router_aux_loss_coef router_z_loss_coef "
    "norm_topk_prob stage seed"
).split()


def atomic_save(model, out_dir: str, overwrite: bool = False, **save_kwargs):
    """`save_pretrained` into a temporary sibling folder, then rename: `out_dir` is never half written."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it, or choose another folder.")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        model.save_pretrained(staging, **save_kwargs)
        if os.path.exists(out_dir):
            backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(backup, "old"))
            os.rename(staging, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(staging, out_dir)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def cmd_upcycle(args) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import SpriForCausalLM
    from .architectures import get_ffn_layout
    from .upcycling import _dequantized_config, make_config

    settings = {name: getattr(args, name) for name in _SETTING_NAMES}
    load_kwargs = {"dtype": getattr(torch, args.dtype)}
    if args.gguf_file:
        load_kwargs["gguf_file"] = args.gguf_file
    out_dir = os.path.abspath(args.out)
    if os.path.exists(out_dir) and not args.overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it, or choose another folder.")
    # Validate everything that can be validated from the config alone, before loading any weight.
    base_config = AutoConfig.from_pretrained(args.src, **({"gguf_file": args.gguf_file} if args.gguf_file else {}))
    get_ffn_layout(base_config.model_type)
    make_config(_dequantized_config(base_config), **settings)

    start = time.perf_counter()
    dense = AutoModelForCausalLM.from_pretrained(args.src, **load_kwargs)
    loaded = time.perf_counter()
    model = SpriForCausalLM.from_dense(dense, show_progress=True, **settings)
    upcycled = time.perf_counter()
    del dense
    atomic_save(model, out_dir, overwrite=args.overwrite)
    print(
        f"Upcycled {args.src} -> {out_dir}: {len(model.config.upcycled_layers())} MoE layers x "
        f"{model.config.num_experts} experts (top-{model.config.num_experts_per_tok}), init={model.config.init}, "
        f"stage {model.config.stage}; load {loaded - start:.1f}s, upcycle {upcycled - loaded:.1f}s, "
        f"save {time.perf_counter() - upcycled:.1f}s."
    )
    return 0


def cmd_inspect(args) -> int:
    from .inspection import inspect_model, format_report
    from transformers import AutoModelForCausalLM

    from . import SpriForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.path)
    if not isinstance(model, SpriForCausalLM):
        raise ValueError(f"{args.path} holds a {type(model).__name__}, not an SPRI model (model_type 'spri').")
    print(format_report(model.config, inspect_model(model)))
    return 0


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
    upcycle.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    upcycle.add_argument("--gguf-file", default=None, help="load SRC from this GGUF file inside it")
    upcycle.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_settings(upcycle)
    upcycle.set_defaults(func=cmd_upcycle)

    inspect = sub.add_parser("inspect", help="per layer: experts, principal rank, residual share, expert distance")
    inspect.add_argument("path")
    inspect.set_defaults(func=cmd_inspect)

    demo = sub.add_parser("demo", help="upcycle SmolLM2-135M, fine-tune on En->XX pairs, save, reload, generate")
    demo.add_argument("--output-dir", default="spri-demo-output")
    demo.add_argument("--steps", type=int, default=12, help="Trainer steps per stage")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, OSError, ImportError) as err:
        print(f"spri-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

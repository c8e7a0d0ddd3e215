"""``sparsetrain`` command line: ``train``, ``check``, ``report``, ``export`` and ``bench-export``.

    sparsetrain train RECIPE [--devices N] [--max-steps N] [--out DIR] [--no-resume] [--set KEY=VALUE ...]
    sparsetrain check RECIPE [--devices N] [--set KEY=VALUE ...]
    sparsetrain report RUN_DIR
    sparsetrain bench-export DIR [--tokens 512,1024,2048] [--backend auto|cusparselt] [--reps N]
    sparsetrain export CKPT --out DIR [--dtype DTYPE] [--ignore GLOB ...] [--verify]

``check`` reads the recipe, then builds what it can without training: the model (on the
meta device where possible) and every component's layer selection, and compares the
processes asked for with this machine. Exit status: 0, or 2 with one line naming the key.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["check_train_args", "main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsetrain", description="Sparse distributed training.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("recipe", help="YAML recipe")
    t.add_argument("--devices", type=int, help="processes (CPU) or GPUs per node; overrides trainer.devices")
    t.add_argument("--max-steps", type=int, help="overrides trainer.max_steps")
    t.add_argument("--out", default=None, help="output directory (default runs/<recipe name>)")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoints/last.ckpt")
    t.add_argument("--no-report", action="store_true", help="skip the PNG report")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set trainer.seed=1 --set callbacks[0].density=0.01")
    c = sub.add_parser("check", help="validate a recipe and build its model and layer selections, without training")
    c.add_argument("recipe")
    c.add_argument("--devices", type=int, help="processes (CPU) or GPUs per node; overrides trainer.devices")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r = sub.add_parser("report", help="(re)draw report.png of a finished run")
    r.add_argument("run_dir")
    b = sub.add_parser("bench-export", help="load a 2:4 export on the GPU and time it against dense")
    b.add_argument("dir", help="export directory (written by `sparsetrain export`)")
    b.add_argument("--tokens", default="512,1024,2048", help="prefill token counts, comma-separated")
    b.add_argument("--backend", default="auto", choices=["auto", "cusparselt"], help="runtime backend of the 2:4 model")
    b.add_argument("--reps", type=int, default=10, help="forwards per timing")
    e = sub.add_parser("export", help="write the 2:4 layers of a checkpoint as sparse-24-bitmask safetensors")
    e.add_argument("checkpoint", help="a Lightning checkpoint of a run with NMSparsity")
    e.add_argument("--out", required=True, help="the export directory")
    e.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast floating tensors")
    e.add_argument("--targets", nargs="+", metavar="GLOB", help="layers to store 2:4 (default: the N:M layers)")
    e.add_argument("--ignore", nargs="+", default=[], metavar="GLOB", help="target layers to store dense")
    e.add_argument("--max-shard-bytes", type=int, default=None, help="split files above this many bytes")
    e.add_argument("--overwrite", action="store_true", help="replace an export in --out")
    e.add_argument("--verify", action="store_true", help="load the export back and compare it bit for bit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .recipe import load_recipe

    if args.command == "report":
        return _report(args.run_dir)
    if args.command == "bench-export":
        return _bench_export(args)
    if args.command == "export":
        return _export(args)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        from .train import check_recipe

        for name in ("devices", "max_steps"):
            value = getattr(args, name, None)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
        # `train` builds the model and layer selections first too, so that they fail here, in
        # one line, before any process is started or anything is written.
        lines = check_recipe(recipe, devices=args.devices, check_devices=args.command == "check")
    except ValueError as err:
        print(f"sparsetrain: invalid recipe: {err}", file=sys.stderr)
        return 2
    if args.command == "check":
        for line in lines:
            print(f"  {line}")
        print(f"{args.recipe}: ok")
        return 0
    from .train import train

    out = args.out or f"runs/{recipe.name}"
    try:
        summary = train(recipe, out, devices=args.devices, max_steps=args.max_steps, resume=not args.no_resume,
                        report=not args.no_report)
    except ValueError as err:
        print(f"sparsetrain: {err}", file=sys.stderr)
        return 2
    import lightning.pytorch as pl  # noqa: F401  (already loaded by train)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        from .report import summary_table

        print(summary_table(summary))
        print(f"outputs: {out}/checkpoints/last.ckpt, {out}/metrics.csv, {out}/report.png, {out}/summary.json")
    return 0


def check_train_args(argv: list[str], *, check_devices: bool = False) -> str | None:
    """Check ``sparsetrain train ARGV`` as :func:`main` would run it, without training.

    Reads the recipe with its ``--set`` overrides and runs ``check`` on it (the model and
    layer selections built; the devices against this machine only with ``check_devices``, since
    the launcher's processes may run elsewhere). Returns None when it passes, else the one-line reason.
    """
    try:
        args = _parser().parse_args(["train", *argv])
    except SystemExit:  # argparse printed its usage line and the error
        return f"`sparsetrain train {' '.join(argv)}` has invalid arguments"
    from .recipe import load_recipe
    from .train import check_recipe

    try:
        for name in ("devices", "max_steps"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
        recipe = load_recipe(args.recipe, args.overrides)
        check_recipe(recipe, devices=args.devices, check_devices=check_devices)
    except ValueError as err:
        return f"invalid recipe {args.recipe}: {err}"
    return None


def _report(run_dir: str) -> int:
    from .report import load_summary, summary_table, write_report

    try:
        summary = load_summary(run_dir)
        path = write_report(run_dir)
    except ValueError as err:
        print(f"sparsetrain report: {err}", file=sys.stderr)
        return 2
    if summary:
        print(summary_table(summary))
    print(f"report: {path}")
    return 0


def _bench_export(args: argparse.Namespace) -> int:
    import torch

    try:
        tokens = [int(t) for t in args.tokens.split(",")]
        if not tokens or min(tokens) < 1 or args.reps < 1:
            raise ValueError
    except ValueError:
        print(f"sparsetrain bench-export: --tokens must be ints >= 1 and --reps >= 1, got {args.tokens!r}, "
              f"{args.reps}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("sparsetrain bench-export: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    try:
        from .export import load_24
    except ImportError as err:
        print(f"sparsetrain bench-export: the export package is missing ({err})", file=sys.stderr)
        return 2
    from .recipe import RecipeError
    from .runtime.bench import compare, format_report

    try:
        network = _export_network(args.dir)
        dense = load_24(network().to(torch.bfloat16), args.dir, device="cuda", backend="dense")
        ours = load_24(network().to(torch.bfloat16), args.dir, device="cuda", backend=args.backend)
        dense.eval(), ours.eval()
        block_size = getattr(getattr(dense, "cfg", None), "block_size", None)
        if block_size is not None:
            tokens = [t for t in tokens if t <= block_size] or [block_size]
        result = compare(dense, ours, tokens, reps=args.reps)
    except (OSError, ValueError, RecipeError) as err:
        print(f"sparsetrain bench-export: {err}", file=sys.stderr)
        return 2
    print(f"{args.dir} on {torch.cuda.get_device_name()} (bf16)")
    print(format_report(result))
    return 0


def _export_network(dirpath: str):
    """A constructor of the plain network an export was written from (its recipe, or its class
    built without arguments), for ``bench-export``."""
    from pathlib import Path

    from .export.config import read_config
    from .recipe import import_class, recipe_from_record
    from .train import build_network

    config = read_config(Path(dirpath))
    recipe, model_class = config.get("recipe"), config.get("model_class")
    if isinstance(recipe, dict):
        parsed = recipe_from_record(recipe)

        def network():
            net = build_network(parsed)
            return getattr(net, "model", net)  # a recipe's LightningModule holds its network as .model
        return network
    if isinstance(model_class, str):
        cls = import_class(model_class, "model_class")
        return cls
    raise ValueError(f"{dirpath}: the export names neither a recipe nor a model class; load it with "
                     "load_24(model, dir, device='cuda') in Python instead")

def _export(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from .export import DEFAULT_MAX_SHARD_BYTES, load_24, save_24_checkpoint
    from .export.checkpoint import auto_prefix, read_checkpoint
    from .nm import nm_export_checkpoint

    ckpt = Path(args.checkpoint)
    summary = ckpt.parent.parent / "summary.json"  # a recipe run: RUN/checkpoints/last.ckpt
    try:
        recipe = json.loads(summary.read_text()).get("config") if summary.is_file() else None
        checkpoint = read_checkpoint(ckpt)
        out = save_24_checkpoint(checkpoint, args.out, targets=args.targets, ignore=args.ignore, dtype=args.dtype,
                                 max_shard_bytes=(DEFAULT_MAX_SHARD_BYTES if args.max_shard_bytes is None
                                                  else args.max_shard_bytes),
                                 recipe=recipe if isinstance(recipe, dict) else None, overwrite=args.overwrite)
        lines = out.lines(ckpt.stat().st_size)
        if args.verify:
            loaded = load_24(args.out)
            try:
                ref = nm_export_checkpoint(checkpoint)
            except ValueError:  # no NMSparsity state: the weights as saved (--targets)
                ref = dict(checkpoint["state_dict"])
            n = len(auto_prefix(ref))
            ref = {k[n:]: v for k, v in ref.items()}
            if args.dtype:
                ref = {k: v.to(getattr(torch, args.dtype)) if v.is_floating_point() else v for k, v in ref.items()}
            same = list(loaded) == list(ref) and all(torch.equal(loaded[k], ref[k]) for k in ref)
            if not same:
                print(f"sparsetrain export: {args.out} does not load back to the checkpoint's exact 2:4 weights",
                      file=sys.stderr)
                return 1
            lines.append("verified: it loads back bit-identical to the checkpoint's exact 2:4 weights")
    except (TypeError, ValueError) as err:
        print(f"sparsetrain export: {err}", file=sys.stderr)
        return 2
    print(f"export: {args.out} ({', '.join(out.files)})")
    for line in lines:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

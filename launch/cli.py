"""``sparsetrain-launch``: run ``sparsetrain train RECIPE``, or any command, with torchrun, DeepSpeed,
Horovod or SLURM.

Launcher options come first; everything after RECIPE is passed to ``sparsetrain train``
unchanged. Instead of a recipe, a command after ``--`` is run on every process (your own
training script: it finds torchrun's variables ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``... under every backend)::

    sparsetrain-launch --backend torchrun --nproc-per-node 2 -- python my_train.py --lr 0.1

    # one node, two processes
    sparsetrain-launch --backend torchrun --nproc-per-node 2 recipes/quickstart.yaml --max-steps 20
    # node 1 of 2 (run the same with --node-rank 0 on the first node)
    sparsetrain-launch --backend torchrun --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 \\
        --max-restarts 3 recipes/quickstart.yaml --out runs/x
    # show the command without running it
    sparsetrain-launch --backend deepspeed --nproc-per-node 2 --dry-run recipes/quickstart.yaml

A recipe is checked (``sparsetrain check``: read, its model and layer selections built)
before anything is launched, so a bad one fails once here rather than in every rank;
``--no-check`` skips that (a recipe readable only on the compute nodes). ``--dry-run``
prints without reading the recipe.

Exit status: the launched command's (128 + N when it was killed by signal N); 2 for bad
arguments or a recipe that fails its check; 127 when the launcher program is not installed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import warnings

from .commands import BACKENDS, DEFAULT_MASTER_PORT, LaunchConfig, build_command, deepspeed_hostfile, launcher_env
from .env import EnvOverrideWarning, child_env, parse_env_assignments, resolve_from_env
from .process import run_forwarding
from .slurm import SlurmOptions, sbatch_script, write_sbatch_script

__all__ = ["main", "make_parser"]

PROG = "sparsetrain-launch"


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sparsetrain-launch``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        usage="%(prog)s --backend {torchrun,deepspeed,horovod,slurm} [options] RECIPE [overrides ...]\n"
        "       %(prog)s --backend {torchrun,deepspeed,horovod,slurm} [options] -- COMMAND [args ...]",
        description="Run `sparsetrain train RECIPE [overrides]`, or any COMMAND, on one or more nodes through "
        "torchrun, the DeepSpeed launcher, horovodrun or a SLURM batch script.",
        epilog="Arguments after RECIPE go to `sparsetrain train` as they are; a COMMAND after `--` runs on "
        "every process with torchrun's environment variables.",
    )
    p.add_argument("--backend", required=True, help=f"one of: {', '.join(BACKENDS)}")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per node (default 1)")
    p.add_argument("--node-rank", type=int, help="this node's rank, 0..nnodes-1 (default: $NODE_RANK)")
    p.add_argument("--master-addr", help="address of node 0 (default: $MASTER_ADDR)")
    p.add_argument("--master-port", type=int,
                   help=f"port on node 0 (default: $MASTER_PORT, else {DEFAULT_MASTER_PORT})")
    p.add_argument("--rdzv-endpoint", help="torchrun/slurm: HOST:PORT of a c10d rendezvous (ranks on arrival)")
    p.add_argument("--rdzv-id", default="sparsetrain", help="torchrun: id shared by the nodes of one job")
    p.add_argument("--local-addr", help="torchrun: this node's address as the others reach it")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun/slurm: restarts of the worker group after a failure (resumes from last.ckpt)")
    p.add_argument("--hosts", help="horovod: comma-separated hosts, one per node (first is rank 0)")
    p.add_argument("--hostfile", help="deepspeed: hostfile (default: generated for several nodes)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set a variable for the launched command (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the command (slurm: the script) and exit")
    p.add_argument("--no-check", action="store_true",
                   help="do not check the recipe before launching (e.g. it is readable only on the compute nodes)")
    s = p.add_argument_group("slurm")
    s.add_argument("--job-name", default="sparsetrain")
    s.add_argument("--gpus-per-node", type=int, default=0)
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--time", help="time limit, e.g. 01:00:00")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--sbatch-output", default="sparsetrain-%j.out", help="log file pattern (%%j: job id)")
    s.add_argument("--script", help="where to write the batch script (default: <job-name>.sbatch)")
    s.add_argument("--submit", action="store_true", help="submit the script with sbatch")
    p.add_argument("recipe", metavar="RECIPE", nargs="?", help="recipe file for `sparsetrain train`")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="passed to `sparsetrain train` as-is")
    return p


def _warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


def _config(args: argparse.Namespace, environ, entry: list[str] | None = None) -> LaunchConfig:
    values = {"master_addr": args.master_addr, "master_port": args.master_port, "node_rank": args.node_rank}
    if args.backend in ("torchrun", "deepspeed") and args.nnodes > 1 and args.rdzv_endpoint is None:
        values = resolve_from_env(values, environ)
    elif args.master_port is None:
        values = resolve_from_env({"master_port": None}, environ) | {
            "master_addr": args.master_addr, "node_rank": args.node_rank}
    if values["master_port"] is None:
        values["master_port"] = DEFAULT_MASTER_PORT
    hosts = [h.strip() for h in args.hosts.split(",")] if args.hosts is not None else None
    overrides = args.overrides[1:] if args.overrides[:1] == ["--"] else args.overrides
    return LaunchConfig(
        backend=args.backend, recipe=args.recipe, overrides=overrides, entry=entry, nnodes=args.nnodes,
        nproc_per_node=args.nproc_per_node, node_rank=values["node_rank"], master_addr=values["master_addr"],
        master_port=values["master_port"], rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
        local_addr=args.local_addr,
        max_restarts=args.max_restarts, hosts=hosts, hostfile=args.hostfile,
    )


def _slurm_options(args: argparse.Namespace) -> SlurmOptions:
    return SlurmOptions(
        job_name=args.job_name, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
        time=args.time, partition=args.partition, account=args.account, output=args.sbatch_output,
        env=parse_env_assignments(args.env),
    )


def _check_slurm_only(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.backend == "slurm":
        return
    given = [flag for flag, dest, default in (
        ("--gpus-per-node", "gpus_per_node", 0), ("--cpus-per-task", "cpus_per_task", None),
        ("--time", "time", None), ("--partition", "partition", None), ("--account", "account", None),
        ("--script", "script", None), ("--submit", "submit", False), ("--job-name", "job_name", "sparsetrain"),
        ("--sbatch-output", "sbatch_output", "sparsetrain-%j.out"),
    ) if getattr(args, dest) != default]
    if given:
        parser.error(f"{', '.join(given)} only apply to --backend slurm, got --backend {args.backend}")


def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".hostfile-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _run(argv: list[str], env: dict[str, str]) -> int:
    exe = shutil.which(argv[0], path=env.get("PATH"))
    if exe is None:
        print(f"{PROG}: error: {argv[0]!r} not found on PATH; install it in this environment "
              f"(e.g. `pip install sparsetrain[{'horovod' if argv[0] == 'horovodrun' else 'deepspeed'}]`)"
              if argv[0] in ("horovodrun", "deepspeed") else f"{PROG}: error: {argv[0]!r} not found on PATH",
              file=sys.stderr)
        return 127
    return run_forwarding([exe, *argv[1:]], env=env)


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """The launcher's own arguments, and what follows the first ``--`` (None without one)."""
    if "--" not in argv:
        return argv, None
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def _check_recipe(recipe: str, overrides: list[str]) -> int:
    """``sparsetrain check`` of what every rank would run; 0, or 2 after one line on stderr."""
    from sparsetrain.cli import check_train_args

    error = check_train_args([recipe, *overrides])
    if error is None:
        return 0
    print(f"{PROG}: error: {error} (nothing was launched)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sparsetrain-launch``; returns the exit status."""
    parser = make_parser()
    head, command = _split_command(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(head)
    if args.backend not in BACKENDS:
        parser.error(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if args.recipe is None:
        if command is None:
            parser.error("give a RECIPE, or a command to run after `--` (e.g. -- python train.py)")
        if not command:
            parser.error("`--` must be followed by the command to run, e.g. -- python train.py")
    elif command is not None:  # RECIPE [overrides] -- more overrides: all go to `sparsetrain train`
        args.overrides = [*args.overrides, "--", *command] if args.overrides else command
        command = None
    _check_slurm_only(args, parser)
    if args.script is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.script))):
        parser.error(f"--script: the directory of {args.script!r} does not exist")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EnvOverrideWarning)
        try:
            cfg = _config(args, os.environ, command)
            # What the launch needs (unless the user set it), then the user's --env assignments.
            needed = {k: v for k, v in launcher_env(cfg).items() if k not in os.environ}
            updates = needed | parse_env_assignments(args.env)
            opts = _slurm_options(args) if args.backend == "slurm" else None
            env = child_env(os.environ, updates)
        except ValueError as e:
            parser.error(str(e))
    for w in caught:
        _warn(str(w.message))
    if cfg.recipe is not None and cfg.entry is None and not args.dry_run and not args.no_check:
        if (rc := _check_recipe(cfg.recipe, cfg.overrides)) != 0:
            return rc

    if cfg.backend == "slurm":
        script = args.script or f"{opts.job_name}.sbatch"
        command = build_command(cfg, script_path=script)
        if args.dry_run:
            print(sbatch_script(cfg, opts), end="")
            if args.submit:
                print(f"# then: {shlex.join(command)}")
            return 0
        write_sbatch_script(cfg, script, opts)
        print(f"{PROG}: wrote {script}", file=sys.stderr)
        return _run(command, env) if args.submit else 0

    command = build_command(cfg)
    generated_hostfile = cfg.backend == "deepspeed" and cfg.hostfile is None and cfg.nnodes > 1
    if args.dry_run:
        if generated_hostfile:
            path = command[command.index("--hostfile") + 1]
            print(f"# {path}:")
            for line in deepspeed_hostfile(cfg.nnodes, cfg.nproc_per_node).splitlines():
                print(f"#   {line}")
        prefix = " ".join(shlex.quote(f"{k}={v}") for k, v in updates.items())
        print((prefix + " " if prefix else "") + shlex.join(command))
        return 0
    if generated_hostfile:
        _write_atomic(command[command.index("--hostfile") + 1], deepspeed_hostfile(cfg.nnodes, cfg.nproc_per_node))
    return _run(command, env)


if __name__ == "__main__":
    sys.exit(main())

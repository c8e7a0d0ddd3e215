"""Worker-side adapter: give every process the variables torchrun would have given it.

``sparsetrain train`` (and Lightning under it) recognise processes started by a launcher
through torchrun's variables: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` (the node), ``MASTER_ADDR`` and ``MASTER_PORT``.
The DeepSpeed launcher and horovodrun name them differently; this module translates and
then ``exec``\\ s the worker program, so the program, its pid, its signals and its exit
code are exactly those of a torchrun worker::

    python -m sparsetrain.launch.worker --from deepspeed -- sparsetrain train r.yaml
    python -m sparsetrain.launch.worker --from horovod --master-addr h0 --master-port 29500 \\
        -- sparsetrain train r.yaml

With ``--from horovod`` the processes still form a torch.distributed (gloo/NCCL) group:
horovodrun places the processes and numbers them, the training itself is the same DDP
run as under torchrun. A script that uses ``horovod.torch`` directly works unchanged,
since Horovod's own variables are left in place.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

__all__ = ["torchrun_env"]

# (torchrun name, deepspeed name, horovod name)
_NAMES = (
    ("RANK", "RANK", "HOROVOD_RANK"),
    ("LOCAL_RANK", "LOCAL_RANK", "HOROVOD_LOCAL_RANK"),
    ("WORLD_SIZE", "WORLD_SIZE", "HOROVOD_SIZE"),
    ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "HOROVOD_LOCAL_SIZE"),
    ("GROUP_RANK", "CROSS_RANK", "HOROVOD_CROSS_RANK"),
)


def torchrun_env(
    source: str, environ: Mapping[str, str], *, master_addr: str | None = None, master_port: int | None = None
) -> dict[str, str]:
    """The torchrun variables for a process started by ``source``.

    Args:
        source: ``"deepspeed"`` or ``"horovod"``.
        environ: the process's environment as the launcher set it.
        master_addr: address of the rank-0 host (horovod: required; deepspeed: taken
            from ``MASTER_ADDR`` when not given).
        master_port: port for torch.distributed's store on that host.

    Returns:
        ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``,
        ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` as strings.

    Raises:
        ValueError: unknown ``source``, or a variable the launcher should have set is
            missing (the process was not started by that launcher).
    """
    if source not in ("deepspeed", "horovod"):
        raise ValueError(f"`source` must be 'deepspeed' or 'horovod', got {source!r}")
    col = 1 if source == "deepspeed" else 2
    launcher = "the DeepSpeed launcher (deepspeed)" if source == "deepspeed" else "horovodrun"
    out: dict[str, str] = {}
    for names in _NAMES:
        theirs = names[col]
        if theirs not in environ:
            raise ValueError(f"{theirs} is not set: run this under {launcher}")
        out[names[0]] = environ[theirs]
    out["NODE_RANK"] = out["GROUP_RANK"]
    if master_addr is None:
        master_addr = environ.get("MASTER_ADDR") if source == "deepspeed" else None
    if master_addr is None:
        raise ValueError(f"`master_addr` is required with source={source!r} (--master-addr)")
    if master_port is None:
        if source == "deepspeed" and "MASTER_PORT" in environ:
            master_port = int(environ["MASTER_PORT"])
        else:
            raise ValueError(f"`master_port` is required with source={source!r} (--master-port)")
    out["MASTER_ADDR"] = master_addr
    out["MASTER_PORT"] = str(master_port)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparsetrain.launch.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", required=True, choices=("deepspeed", "horovod"))
    parser.add_argument("--master-addr")
    parser.add_argument("--master-port", type=int)
    parser.add_argument("program", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("missing the program to run after --")
    try:
        env = torchrun_env(args.source, os.environ, master_addr=args.master_addr, master_port=args.master_port)
    except ValueError as e:
        parser.error(str(e))
    os.environ.update(env)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(program[0], program)
    except FileNotFoundError:
        parser.error(f"program not found on PATH: {program[0]!r}")


if __name__ == "__main__":
    main()

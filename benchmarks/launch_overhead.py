"""Launch overhead per launcher, and scaling of the demo from one to two hosts (CPU, gloo).

    PYTHONPATH=. python benchmarks/launch_overhead.py [--repeats 3] [--steps 60]

1. Launch overhead: wall time from starting the command to the end of the first training
   step (rank 0), for two processes on this machine, with each of our launch commands
   (torchrun, the DeepSpeed launcher, horovodrun) against the anchor: ``sparsetrain
   train`` letting Lightning start its own second process. Same recipe, same worker code.
2. Scaling: samples/s of the demo GPT (timed from step 10 to the end) with one process on
   one host, against two hosts x one process over the unshaped veth link of
   :class:`~sparsetrain.launch.TwoHostTestbed` (needs root and iproute2), and one host x
   two processes over loopback. Every process uses one thread (``OMP_NUM_THREADS=1``).

Every run trains through ``sparsetrain.train.train`` with a callback that stamps the
times; the script is its own worker (``--worker``). The DeepSpeed and Horovod rows need
``pip install -e .`` (their workers run ``python -m sparsetrain.launch.worker``) and are
skipped when the launcher is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _import_launch():
    """``sparsetrain.launch`` whether installed or run from the repository with PYTHONPATH=."""
    try:
        import sparsetrain.launch as launch
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location("sparsetrain.launch", ROOT / "launch" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "launch")])
        launch = importlib.util.module_from_spec(spec)
        sys.modules["sparsetrain.launch"] = launch
        spec.loader.exec_module(launch)
    return launch


RECIPE = """\
version: 1
name: launch-bench
model: {{name: gpt, d_model: 128, n_layer: 2, n_head: 2, block_size: 128}}
data: {{name: stdlib_chars, batch_size: 16, byte_budget: 2000000}}
trainer: {{devices: 2, strategy: ddp, max_steps: {steps}, val_check_interval: 100000, limit_val_batches: 1,
          checkpoint_every_n_steps: 0, seed: 0}}
optimizer: {{name: adamw, lr: 0.003}}
callbacks: []
"""
MEASURE_FROM = 10


# ---------------------------------------------------------------------------------- worker
def worker(recipe_path: str, out: str, stamps: str) -> None:
    """Train the recipe, rank 0 writing the times of step 1, step MEASURE_FROM and the end to ``stamps``."""
    from lightning.pytorch.callbacks import Callback

    from sparsetrain.recipe import load_recipe
    from sparsetrain.train import train

    class Stamp(Callback):
        def __init__(self) -> None:
            self.times: dict[str, float] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 1:
                self.times["first_step"] = time.time()
            if trainer.global_step == MEASURE_FROM:
                self.times["measure_from"] = time.time()

        def on_train_end(self, trainer, pl_module) -> None:
            if trainer.global_rank == 0:
                self.times["end"] = time.time()
                info = {**self.times, "steps": trainer.global_step, "world_size": trainer.world_size}
                Path(stamps).write_text(json.dumps(info))

    recipe = load_recipe(recipe_path)
    train(recipe, out, extra_callbacks=[Stamp()], report=False, resume=False)


# ---------------------------------------------------------------------------------- driver
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _entry(recipe: Path, out: Path, stamps: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", str(recipe), str(out), str(stamps)]


def _measure(run, tmp: Path, batch_size: int) -> dict[str, float]:
    out, stamps = tmp / f"run-{time.monotonic_ns()}", tmp / f"stamps-{time.monotonic_ns()}.json"
    t0 = time.time()
    rc = run(out, stamps)
    total = time.time() - t0
    if rc != 0 or not stamps.exists():
        raise RuntimeError(f"run failed (exit {rc})")
    s = json.loads(stamps.read_text())
    steps = s["steps"] - MEASURE_FROM
    return {
        "to_first_step": s["first_step"] - t0,
        "total": total,
        "samples_per_s": steps * batch_size * s["world_size"] / (s["end"] - s["measure_from"]),
        "world_size": s["world_size"],
    }


def _local(launch, backend: str | None, recipe: Path, nproc: int):
    def run(out: Path, stamps: Path) -> int:
        entry = _entry(recipe, out, stamps)
        if backend is None:  # anchor: Lightning starts the processes itself
            argv = entry
        else:
            argv = launch.build_command(launch.LaunchConfig(backend=backend, nproc_per_node=nproc, entry=entry,
                                                            master_port=29700))
        r = subprocess.run(argv, env=_env(), capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
        return r.returncode

    return run


def _two_hosts(launch, recipe: Path):
    def run(out: Path, stamps: Path) -> int:
        with launch.TwoHostTestbed() as bed:
            argvs = [launch.build_command(launch.LaunchConfig(
                backend="torchrun", nnodes=2, node_rank=h, master_addr=bed.addresses[0], master_port=29701,
                entry=_entry(recipe, out, stamps))) for h in (0, 1)]
            res = bed.run(argvs, env={k: _env()[k] for k in ("PATH", "OMP_NUM_THREADS", "PYTHONPATH")}, timeout=900)
        for r in res:
            if r.returncode:
                print(f"host {r.host}: {r.stderr[-3000:]}", file=sys.stderr)
        return max(abs(r.returncode or 0) for r in res)

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=60, help=f"training steps per run (timed from step {MEASURE_FROM})")
    p.add_argument("--worker", nargs=3, metavar=("RECIPE", "OUT", "STAMPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.steps <= MEASURE_FROM:
        p.error(f"--steps must be > {MEASURE_FROM}, got {args.steps}")
    launch = _import_launch()
    tmp = Path(tempfile.mkdtemp(prefix="launch-bench-"))
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE.format(steps=args.steps))
    batch = 16
    have = {b: shutil.which(b, path=_env()["PATH"]) is not None for b in ("torchrun", "deepspeed", "horovodrun")}
    bed_reason = launch.unavailable_reason()

    rows: list[tuple[str, object]] = [("lightning spawn (anchor)", _local(launch, None, recipe, 2))]
    for backend, prog in (("torchrun", "torchrun"), ("deepspeed", "deepspeed"), ("horovod", "horovodrun")):
        rows.append((backend, _local(launch, backend, recipe, 2) if have[prog] else f"{prog} not installed"))
    scaling: list[tuple[str, object]] = [
        ("1 host x 1 process", _local(launch, "torchrun", recipe, 1)),
        ("2 hosts x 1 process (veth, unshaped)", _two_hosts(launch, recipe) if bed_reason is None else bed_reason),
        ("1 host x 2 processes (loopback)", _local(launch, "torchrun", recipe, 2)),
    ]
    results: dict[str, list[dict[str, float]] | str] = {}
    for name, run in rows + scaling:
        if isinstance(run, str):
            results[name] = run
            continue
        results[name] = []
        for i in range(args.repeats):
            results[name].append(_measure(run, tmp, batch))
            print(f"  {name} #{i + 1}: {results[name][-1]}", file=sys.stderr, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)

    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items() if isinstance(v, list)}
    cpu = os.cpu_count()
    print(f"\nmachine: {cpu} CPU cores, torch threads per process 1; median of {args.repeats}; "
          f"load average at end {os.getloadavg()[0]:.1f}\n")
    print("Launch overhead, 2 processes on one host (command -> end of first training step):\n")
    anchor = med.get("lightning spawn (anchor)", {}).get("to_first_step")
    print("| launcher | to first step (s) | vs anchor | whole run (s) |")
    print("|---|---:|---:|---:|")
    for name, _ in rows:
        if name not in med:
            print(f"| {name} | skipped: {results[name]} | | |")
            continue
        m = med[name]
        print(f"| {name} | {m['to_first_step']:.1f} | {m['to_first_step'] / anchor:.2f}x | {m['total']:.1f} |")
    print(f"\nScaling of the demo GPT (d_model 128, 2 layers, batch 16 per process, "
          f"steps {MEASURE_FROM}-{args.steps}):\n")
    base = med.get("1 host x 1 process", {}).get("samples_per_s")
    print("| configuration | samples/s | vs 1 process |")
    print("|---|---:|---:|")
    for name, _ in scaling:
        if name not in med:
            print(f"| {name} | skipped: {results[name]} | |")
            continue
        m = med[name]
        print(f"| {name} | {m['samples_per_s']:.1f} | {m['samples_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()

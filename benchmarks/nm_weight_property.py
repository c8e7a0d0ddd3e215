"""Host time of the parametrized ``weight`` property: the direct call vs parametrize's own (CPU).

:mod:`sparsetrain.nm._fast_weight` replaces the parametrized layer's ``weight`` property (which
goes through ``ParametrizationList.__call__`` and its ``hasattr`` probing) by one that calls the
layer's single ``NMMask`` directly. It relies on parametrize internals, so it has to pay: this
measures what it saves, as host time, where an eager GPU step is bound by the host:

- one ``layer.weight`` access (2:4 mask applied to a 64x64 weight), direct vs public property;
- a whole eager SR-STE training step (forward, backward, SGD, the sparsifier's step) of a
  GPT-2-small-deep model (12 blocks, 72 sparse Linears) kept tiny (d_model 64, 4 x 16 tokens) so
  that the step's time is the host's, interleaved repeats, medians.

    PYTHONPATH=. python benchmarks/nm_weight_property.py [--repeats 7] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from sparsetrain.demo.model import GPT, GPTConfig  # noqa: E402
from sparsetrain.nm import NMConfig, NMSparsifier, _fast_weight  # noqa: E402


def access_us(fast: bool, n: int = 20000) -> float:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 64))
    sp = NMSparsifier(layer, NMConfig(method="ste"))
    if not fast:
        _fast_weight.uninstall(layer[0])
    mod = sp.layers["0"]
    with torch.no_grad():
        for _ in range(200):
            _ = mod.weight
        t0 = time.perf_counter()
        for _ in range(n):
            _ = mod.weight
    return (time.perf_counter() - t0) / n * 1e6


def build(fast: bool):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=12, d_model=64, n_head=2, block_size=16))
    sp = NMSparsifier(model, NMConfig(method="srste", include=["*.attn.*", "*.mlp.*"]))
    if not fast:
        for mod in sp.layers.values():
            _fast_weight.uninstall(mod)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    return model, sp, opt


def step_ms(model, sp, opt, batch, steps: int) -> float:
    x, y = batch
    t0 = time.perf_counter()
    for _ in range(steps):
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sp.step()
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    acc = {True: [], False: []}
    for _ in range(args.repeats):
        for fast in (True, False):
            acc[fast].append(access_us(fast))
    print(f"layer.weight access: direct {statistics.median(acc[True]):.2f} us, "
          f"public {statistics.median(acc[False]):.2f} us")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 17), generator=g)
    batch = (x[:, :-1], x[:, 1:])
    built = {fast: build(fast) for fast in (True, False)}
    for fast in (True, False):
        step_ms(*built[fast], batch, 5)  # warm-up
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for fast in (True, False):
            times[fast].append(step_ms(*built[fast], batch, args.steps))
    for what, stat in (("median", statistics.median), ("fastest repeat", min)):
        a, b = stat(times[True]), stat(times[False])
        print(f"eager SR-STE step, 72 sparse layers, {what}: direct {a:.2f} ms, public {b:.2f} ms "
              f"({b / a:.3f}x; saved {(b - a) * 1e3 / 72:.1f} us per layer per step)")
    print("repeats direct:", " ".join(f"{t:.2f}" for t in times[True]))
    print("repeats public:", " ".join(f"{t:.2f}" for t in times[False]))


if __name__ == "__main__":
    main()

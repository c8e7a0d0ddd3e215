"""Multi-node launcher: builds and runs torchrun, DeepSpeed, Horovod and SLURM commands.

- :func:`build_command` / :class:`LaunchConfig`: the exact argv of each launcher
  (``sparsetrain-launch`` is the command-line front end, :mod:`sparsetrain.launch.cli`).
- :func:`sbatch_script` / :class:`SlurmOptions`: SLURM batch scripts.
- :func:`run_forwarding`: run a command, forwarding signals, returning its exit status.
- :class:`TwoHostTestbed`: two network namespaces joined by a shaped veth link, to run a
  real two-"host" job on one Linux machine (needs root and iproute2).
"""

from .commands import BACKENDS, LaunchConfig, build_command, worker_argv
from .env import EnvOverrideWarning
from .process import run_forwarding
from .slurm import SlurmOptions, sbatch_script, write_sbatch_script
from .testbed import HostResult, TestbedError, TestbedUnavailable, TwoHostTestbed, unavailable_reason

__all__ = [
    "BACKENDS",
    "EnvOverrideWarning",
    "HostResult",
    "LaunchConfig",
    "SlurmOptions",
    "TestbedError",
    "TestbedUnavailable",
    "TwoHostTestbed",
    "build_command",
    "run_forwarding",
    "sbatch_script",
    "unavailable_reason",
    "worker_argv",
    "write_sbatch_script",
]

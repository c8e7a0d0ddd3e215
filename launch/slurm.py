"""SLURM batch scripts: one torchrun per node under ``srun``, c10d rendezvous on the first node.

The script asks for ``--nodes=N`` with one task per node; ``srun`` starts torchrun on every
node, and torchrun starts ``nproc_per_node`` workers there. The rendezvous endpoint is
the first host of the allocation (``scontrol show hostnames``) and the rendezvous id the
job id, so the nodes find each other without knowing their names in advance, and
torchrun's ``--max-restarts`` works across nodes (static rendezvous cannot re-form a
group). Every value that comes from the user is shell-quoted; only ``$head_node`` and
``$SLURM_JOB_ID`` are expanded by the shell. The first host is taken from the whole output
of ``scontrol`` held in a variable, not through ``| head -n 1``: under ``set -o pipefail`` a
pipe that ``head`` closes early can kill ``scontrol`` with SIGPIPE on a large allocation and
fail the job at start. ``--env KEY=VALUE`` assignments are exported by the script itself, so
the job gets them whatever sbatch's ``--export`` setting is.

Example::

    sparsetrain-launch --backend slurm --nnodes 2 --nproc-per-node 4 --gpus-per-node 4 \\
        --max-restarts 3 --dry-run recipes/quickstart.yaml --max-steps 1000
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from dataclasses import dataclass, field

from .commands import LaunchConfig, launcher_env, worker_argv

__all__ = ["SlurmOptions", "sbatch_script", "write_sbatch_script"]

_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # minutes, [D-]HH:MM[:SS], ...


@dataclass(kw_only=True)
class SlurmOptions:
    """``#SBATCH`` settings of the generated script.

    Args:
        job_name: ``--job-name``.
        gpus_per_node: ``--gpus-per-node`` (0: not requested).
        cpus_per_task: ``--cpus-per-task`` (one task per node runs torchrun and its workers).
        time: ``--time`` limit, e.g. ``"01:00:00"`` or ``"1-00:00:00"``.
        partition: ``--partition``.
        account: ``--account``.
        output: ``--output`` log file pattern (``%j`` is the job id).
        extra: further sbatch options, each one ``--name=value`` or ``--flag``.
        env: variables the script exports before ``srun`` (the launcher's ``--env``).

    Raises:
        ValueError: naming the option, its value and what is allowed.
    """

    job_name: str = "sparsetrain"
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    output: str = "sparsetrain-%j.out"
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.env, dict):
            raise ValueError(f"`env` must be a dict of variable names to strings, got {self.env!r}")
        for key, value in self.env.items():
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) \
                    or not isinstance(value, str):
                raise ValueError(f"`env` entries must be NAME: str with NAME a variable name, got {key!r}: {value!r}")
        for name in ("job_name", "partition", "account", "output"):
            value = getattr(self, name)
            if value is None and name in ("partition", "account"):
                continue
            if not isinstance(value, str) or not value or any(c.isspace() for c in value):
                raise ValueError(f"`{name}` must be a non-empty string without spaces, got {value!r}")
        if isinstance(self.gpus_per_node, bool) or not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise ValueError(f"`gpus_per_node` must be an integer >= 0, got {self.gpus_per_node!r}")
        if self.cpus_per_task is not None and (
            isinstance(self.cpus_per_task, bool) or not isinstance(self.cpus_per_task, int) or self.cpus_per_task < 1
        ):
            raise ValueError(f"`cpus_per_task` must be an integer >= 1, got {self.cpus_per_task!r}")
        if self.time is not None and (not isinstance(self.time, str) or not _TIME_RE.match(self.time)):
            raise ValueError(f"`time` must be a SLURM time like 30, 01:00:00 or 1-00:00:00, got {self.time!r}")
        for opt in self.extra:
            if not isinstance(opt, str) or not opt.startswith("--") or any(c.isspace() for c in opt):
                raise ValueError(f"`extra` entries must look like --name=value without spaces, got {opt!r}")


def sbatch_script(cfg: LaunchConfig, opts: SlurmOptions | None = None) -> str:
    """The batch script text for ``cfg`` (``cfg.backend`` must be ``"slurm"``).

    Raises:
        ValueError: ``cfg`` is not a slurm config.
    """
    if not isinstance(cfg, LaunchConfig) or cfg.backend != "slurm":
        raise ValueError(f"`cfg` must be a LaunchConfig with backend='slurm', got {cfg!r}")
    opts = opts or SlurmOptions()
    lines = [
        "#!/bin/bash",
        f"# sparsetrain-launch: {cfg.nnodes} node(s) x {cfg.nproc_per_node} process(es), "
        "torchrun under srun, c10d rendezvous on the first node.",
        f"#SBATCH --job-name={opts.job_name}",
        f"#SBATCH --nodes={cfg.nnodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if opts.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task is not None:
        lines.append(f"#SBATCH --cpus-per-task={opts.cpus_per_task}")
    if opts.time is not None:
        lines.append(f"#SBATCH --time={opts.time}")
    if opts.partition is not None:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.account is not None:
        lines.append(f"#SBATCH --account={opts.account}")
    lines.append(f"#SBATCH --output={opts.output}")
    lines += [f"#SBATCH {opt}" for opt in opts.extra]
    lines += ["", "set -euo pipefail"]
    if cfg.rdzv_endpoint is not None:
        endpoint = shlex.quote(cfg.rdzv_endpoint)
    else:
        lines.append('hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")')
        lines.append("head_node=${hosts%%$'\\n'*}")
        endpoint = f'"$head_node:{cfg.master_port}"'
    torchrun = (
        f"torchrun --nnodes {cfg.nnodes} --nproc-per-node {cfg.nproc_per_node} --rdzv-backend c10d "
        f'--rdzv-endpoint {endpoint} --rdzv-id "$SLURM_JOB_ID"'
    )
    if cfg.max_restarts:
        torchrun += f" --max-restarts {cfg.max_restarts}"
    for key, value in launcher_env(cfg).items():
        if key not in opts.env:
            lines.append(f'export {key}="${{{key}:-{value}}}"')  # unless the job's environment sets it
    lines += [f"export {key}={shlex.quote(value)}" for key, value in opts.env.items()]
    lines.append(f"srun --kill-on-bad-exit=1 {torchrun} --no-python {shlex.join(worker_argv(cfg))}")
    return "\n".join(lines) + "\n"


def write_sbatch_script(cfg: LaunchConfig, path: str, opts: SlurmOptions | None = None) -> str:
    """Write :func:`sbatch_script` to ``path`` atomically (mode 0755); returns the path."""
    text = sbatch_script(cfg, opts)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".sbatch-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path

"""Build the exact argv of torchrun, the DeepSpeed launcher or horovodrun for one node.

Nothing here runs anything or reads the environment: :func:`build_command` is a pure
function of a :class:`LaunchConfig`, which is what the dry-run tests pin. Every command
starts the same worker program on every process, by default ``sparsetrain train RECIPE
[overrides]``; the launcher decides where the processes run and which rank each one is.

How each backend is driven:

- ``torchrun`` (torch.distributed.elastic): one launcher per node. One node uses
  ``--standalone``; several nodes use either a static rendezvous (``--node-rank`` +
  ``--master-addr``) or a c10d rendezvous (``--rdzv-endpoint``, ranks assigned on
  arrival, which is what elastic restarts across nodes need). ``--max-restarts`` lets
  torchrun restart the whole worker group after a worker dies; ``sparsetrain train``
  then resumes from ``<out>/checkpoints/last.ckpt``.
- ``deepspeed``: one launcher per node with ``--no_ssh`` (DeepSpeed's own per-node mode);
  several nodes need a hostfile (``node0 slots=P`` ...) because DeepSpeed refuses
  ``--num_nodes > 1`` without one. Workers get ``--no_local_rank`` and run through
  :mod:`sparsetrain.launch.worker`, which turns DeepSpeed's variables into torchrun's.
- ``horovod``: one ``horovodrun --gloo`` for the whole job (it reaches other hosts by
  ssh); workers run through :mod:`sparsetrain.launch.worker`, which turns Horovod's
  variables into torchrun's and points them at the first host.
- ``slurm``: see :mod:`sparsetrain.launch.slurm`; the command is ``sbatch SCRIPT``.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field

__all__ = [
    "BACKENDS",
    "DEFAULT_MASTER_PORT",
    "LaunchConfig",
    "build_command",
    "deepspeed_hostfile",
    "deepspeed_hostfile_path",
    "launcher_env",
    "worker_argv",
]

BACKENDS = ("torchrun", "deepspeed", "horovod", "slurm")
DEFAULT_MASTER_PORT = 29500

_HOST_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+$")  # names, IPv4, bracketed IPv6


def _check_host(name: str, value: str) -> None:
    if not isinstance(value, str) or not value or not _HOST_RE.match(value) or value.startswith("-"):
        raise ValueError(f"`{name}` must be a host name or IP address, got {value!r}")


def _check_endpoint(value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"`rdzv_endpoint` must look like HOST:PORT with a port in 1..65535, got {value!r}")
    _check_host("rdzv_endpoint", host)


@dataclass(kw_only=True)
class LaunchConfig:
    """What to launch and where; validated on construction.

    Args:
        backend: ``"torchrun"``, ``"deepspeed"``, ``"horovod"`` or ``"slurm"``.
        recipe: the recipe file given to ``sparsetrain train``.
        overrides: arguments passed to ``sparsetrain train`` after the recipe, as-is
            (``["--max-steps", "20", "--out", "runs/x"]``).
        nnodes: number of nodes (>= 1).
        nproc_per_node: worker processes per node (>= 1).
        node_rank: this node's rank in ``[0, nnodes)``; torchrun (static rendezvous) and
            deepspeed with several nodes need it; horovod and slurm assign ranks themselves.
        master_addr: address of node 0; needed by several-node torchrun (unless
            ``rdzv_endpoint`` is given) and deepspeed. For horovod it defaults to the
            first of ``hosts``.
        master_port: port of node 0's store, 1..65535.
        rdzv_endpoint: ``HOST:PORT`` of a c10d rendezvous (torchrun, slurm); ranks are
            then assigned on arrival and ``node_rank`` must not be given.
        rdzv_id: job id shared by the nodes of a c10d rendezvous.
        local_addr: torchrun only: this node's address as the other nodes reach it
            (default: torchrun's, the fully qualified host name), for hosts whose name
            does not resolve to the interface the job should use.
        max_restarts: worker-group restarts torchrun may do after a failure (torchrun
            and slurm only).
        hosts: horovod only: the hosts, one per node, ``"name"`` or ``"name:slots"``;
            defaults to ``["localhost"]`` for one node.
        hostfile: deepspeed only: the hostfile to pass; for several nodes without one,
            :func:`deepspeed_hostfile_path` is used (the CLI writes it).
        entry: the program every worker runs, replacing ``sparsetrain train RECIPE
            [overrides]`` (then ``recipe`` may be ``None``); used to launch other scripts
            through the same commands.

    Raises:
        ValueError: naming the argument, its value and what is allowed.
    """

    backend: str
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int = DEFAULT_MASTER_PORT
    rdzv_endpoint: str | None = None
    rdzv_id: str = "sparsetrain"
    local_addr: str | None = None
    max_restarts: int = 0
    hosts: list[str] | None = None
    hostfile: str | None = None
    entry: list[str] | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("nnodes", "nproc_per_node", "master_port", "max_restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"`{name}` must be an integer, got {value!r}")
        if self.nnodes < 1:
            raise ValueError(f"`nnodes` must be >= 1, got {self.nnodes}")
        if self.nproc_per_node < 1:
            raise ValueError(f"`nproc_per_node` must be >= 1, got {self.nproc_per_node}")
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"`master_port` must be in 1..65535, got {self.master_port}")
        if self.max_restarts < 0:
            raise ValueError(f"`max_restarts` must be >= 0, got {self.max_restarts}")
        if self.node_rank is not None:
            if isinstance(self.node_rank, bool) or not isinstance(self.node_rank, int):
                raise ValueError(f"`node_rank` must be an integer, got {self.node_rank!r}")
            if not 0 <= self.node_rank < self.nnodes:
                raise ValueError(
                    f"`node_rank` must be in [0, nnodes) = [0, {self.nnodes}), got {self.node_rank}"
                )
        if self.master_addr is not None:
            _check_host("master_addr", self.master_addr)
        if self.rdzv_endpoint is not None:
            _check_endpoint(self.rdzv_endpoint)
        if self.local_addr is not None:
            _check_host("local_addr", self.local_addr)
        if not isinstance(self.rdzv_id, str) or not re.match(r"^[A-Za-z0-9_.\-]+$", self.rdzv_id):
            raise ValueError(f"`rdzv_id` must be letters, digits, '_', '.' or '-', got {self.rdzv_id!r}")
        if not isinstance(self.overrides, list | tuple) or not all(isinstance(a, str) for a in self.overrides):
            raise ValueError(f"`overrides` must be a list of strings, got {self.overrides!r}")
        self.overrides = list(self.overrides)
        if self.entry is not None:
            if not isinstance(self.entry, list | tuple) or not self.entry or not all(
                isinstance(a, str) for a in self.entry
            ):
                raise ValueError(f"`entry` must be a non-empty list of strings, got {self.entry!r}")
            self.entry = list(self.entry)
            if self.overrides:
                raise ValueError("`overrides` apply to `sparsetrain train`; with `entry` put them in the entry")
        elif not isinstance(self.recipe, str) or not self.recipe:
            raise ValueError(f"`recipe` must be a path to a recipe file, got {self.recipe!r}")
        self._check_backend_options()

    def _check_backend_options(self) -> None:
        b = self.backend
        multi = self.nnodes > 1
        if self.max_restarts and b not in ("torchrun", "slurm"):
            raise ValueError(
                f"`max_restarts` is supported by the torchrun and slurm backends, not {b} (got {self.max_restarts})"
            )
        if self.rdzv_endpoint is not None and b not in ("torchrun", "slurm"):
            raise ValueError(f"`rdzv_endpoint` is supported by the torchrun and slurm backends, not {b}")
        if self.local_addr is not None and b != "torchrun":
            raise ValueError(f"`local_addr` is for the torchrun backend, not {b}")
        if self.hosts is not None and b != "horovod":
            raise ValueError(f"`hosts` is for the horovod backend, not {b}")
        if self.hostfile is not None and b != "deepspeed":
            raise ValueError(f"`hostfile` is for the deepspeed backend, not {b}")
        if b == "torchrun":
            if self.rdzv_endpoint is not None:
                if self.node_rank is not None or self.master_addr is not None:
                    raise ValueError(
                        "`rdzv_endpoint` assigns node ranks on arrival: leave out `node_rank` and `master_addr`"
                    )
            elif multi:
                if self.master_addr is None:
                    raise ValueError(
                        f"multi-node torchrun (nnodes={self.nnodes}) needs `master_addr` (--master-addr or "
                        "MASTER_ADDR) or `rdzv_endpoint` (--rdzv-endpoint)"
                    )
                if self.node_rank is None:
                    raise ValueError(
                        f"multi-node torchrun (nnodes={self.nnodes}) with a static rendezvous needs `node_rank` "
                        "(--node-rank or NODE_RANK), or use `rdzv_endpoint` (--rdzv-endpoint)"
                    )
        elif b == "deepspeed":
            if multi and self.master_addr is None:
                raise ValueError(
                    f"multi-node deepspeed (nnodes={self.nnodes}) needs `master_addr` (--master-addr or MASTER_ADDR)"
                )
            if multi and self.node_rank is None:
                raise ValueError(
                    f"multi-node deepspeed (nnodes={self.nnodes}) needs `node_rank` (--node-rank or NODE_RANK)"
                )
        elif b == "horovod":
            if self.node_rank not in (None, 0):
                raise ValueError(
                    f"`node_rank` does not apply to horovod (horovodrun starts every host from one node), "
                    f"got {self.node_rank}"
                )
            if self.hosts is None:
                if multi:
                    raise ValueError(f"horovod with nnodes={self.nnodes} needs `hosts` (--hosts), one per node")
            else:
                if not isinstance(self.hosts, list | tuple) or len(self.hosts) != self.nnodes:
                    raise ValueError(f"`hosts` must list nnodes={self.nnodes} hosts, got {self.hosts!r}")
                for h in self.hosts:
                    name, _, slots = str(h).partition(":")
                    _check_host("hosts", name)
                    if slots and (not slots.isdigit() or int(slots) != self.nproc_per_node):
                        raise ValueError(
                            f"`hosts` entry {h!r}: slots must equal nproc_per_node={self.nproc_per_node}"
                        )
                self.hosts = list(self.hosts)
        elif b == "slurm":
            if self.node_rank is not None or self.master_addr is not None:
                raise ValueError(
                    "the slurm backend assigns nodes itself (c10d rendezvous on the first node): "
                    "leave out `node_rank` and `master_addr`"
                )


def worker_argv(cfg: LaunchConfig) -> list[str]:
    """The program every worker process runs: ``cfg.entry`` or ``sparsetrain train RECIPE [overrides]``."""
    if cfg.entry is not None:
        return list(cfg.entry)
    return ["sparsetrain", "train", cfg.recipe, *cfg.overrides]


def deepspeed_hostfile_path(nnodes: int, nproc_per_node: int) -> str:
    """Where the CLI writes the generated DeepSpeed hostfile (the same path on every node)."""
    return os.path.join(tempfile.gettempdir(), f"sparsetrain-deepspeed-hostfile-{nnodes}x{nproc_per_node}")


def deepspeed_hostfile(nnodes: int, nproc_per_node: int) -> str:
    """Hostfile text ``node{i} slots=P``: with ``--no_ssh`` DeepSpeed only uses it to count
    nodes and slots (the names are keys, nothing connects to them)."""
    return "".join(f"node{i} slots={nproc_per_node}\n" for i in range(nnodes))


def _torchrun(cfg: LaunchConfig) -> list[str]:
    argv = ["torchrun"]
    if cfg.rdzv_endpoint is not None:
        argv += ["--nnodes", str(cfg.nnodes), "--nproc-per-node", str(cfg.nproc_per_node),
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", cfg.rdzv_endpoint, "--rdzv-id", cfg.rdzv_id]
    elif cfg.nnodes == 1 and cfg.master_addr is None:
        argv += ["--standalone", "--nnodes", "1", "--nproc-per-node", str(cfg.nproc_per_node)]
    else:
        argv += ["--nnodes", str(cfg.nnodes), "--nproc-per-node", str(cfg.nproc_per_node),
                 "--node-rank", str(cfg.node_rank or 0), "--master-addr", cfg.master_addr,
                 "--master-port", str(cfg.master_port)]
    if cfg.local_addr is not None:
        argv += ["--local-addr", cfg.local_addr]
    if cfg.max_restarts:
        argv += ["--max-restarts", str(cfg.max_restarts)]
    return argv + ["--no-python", *worker_argv(cfg)]


def _deepspeed(cfg: LaunchConfig) -> list[str]:
    argv = ["deepspeed"]
    hostfile = cfg.hostfile
    if hostfile is None and cfg.nnodes > 1:
        hostfile = deepspeed_hostfile_path(cfg.nnodes, cfg.nproc_per_node)
    if hostfile is not None:
        argv += ["--hostfile", hostfile]
    argv += ["--num_nodes", str(cfg.nnodes), "--num_gpus", str(cfg.nproc_per_node), "--no_ssh",
             "--node_rank", str(cfg.node_rank or 0), "--master_addr", cfg.master_addr or "127.0.0.1",
             "--master_port", str(cfg.master_port), "--no_local_rank",
             "--module", "sparsetrain.launch.worker", "--from", "deepspeed", "--"]
    return argv + worker_argv(cfg)


def _horovod(cfg: LaunchConfig) -> list[str]:
    hosts = cfg.hosts or ["localhost"]
    names = [h.partition(":")[0] for h in hosts]
    spec = ",".join(f"{n}:{cfg.nproc_per_node}" for n in names)
    master = cfg.master_addr or names[0]
    return ["horovodrun", "--gloo", "-np", str(cfg.nnodes * cfg.nproc_per_node), "-H", spec,
            "python", "-m", "sparsetrain.launch.worker", "--from", "horovod",
            "--master-addr", master, "--master-port", str(cfg.master_port), "--", *worker_argv(cfg)]


#: With torchrun restarts, every attempt must rendezvous in a store of its own. By default torchrun's
#: workers share the agent's TCPStore, and after a restart a worker could read a peer's address
#: from the previous attempt and fail with "connection refused" (pytorch/pytorch#135712); with
#: this set, rank 0 of each attempt hosts a fresh store.
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def launcher_env(cfg: LaunchConfig) -> dict[str, str]:
    """Environment variables the launched command needs beyond the user's (pure; nothing is read).

    Today: :data:`RESTART_ENV` when torchrun (directly or under SLURM) may restart workers.

    Example::

        >>> launcher_env(LaunchConfig(backend="torchrun", recipe="r.yaml", max_restarts=2))
        {'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}
    """
    if not isinstance(cfg, LaunchConfig):
        raise ValueError(f"`cfg` must be a LaunchConfig, got {type(cfg).__name__}")
    if cfg.max_restarts and cfg.backend in ("torchrun", "slurm"):
        return dict(RESTART_ENV)
    return {}


def build_command(cfg: LaunchConfig, *, script_path: str | None = None) -> list[str]:
    """The argv to run on this node (an argv list, never a shell string).

    Args:
        cfg: what to launch.
        script_path: slurm only: the batch script that ``sbatch`` submits (default
            ``sparsetrain.sbatch``).

    Returns:
        The argv; program names are bare (``torchrun``, ``sparsetrain``), resolved on each
        node's ``PATH``.

    Example::

        >>> build_command(LaunchConfig(backend="torchrun", recipe="r.yaml", nproc_per_node=2))
        ['torchrun', '--standalone', '--nnodes', '1', '--nproc-per-node', '2', '--no-python', \
'sparsetrain', 'train', 'r.yaml']
    """
    if not isinstance(cfg, LaunchConfig):
        raise ValueError(f"`cfg` must be a LaunchConfig, got {type(cfg).__name__}")
    if cfg.backend == "torchrun":
        return _torchrun(cfg)
    if cfg.backend == "deepspeed":
        return _deepspeed(cfg)
    if cfg.backend == "horovod":
        return _horovod(cfg)
    return ["sbatch", script_path or "sparsetrain.sbatch"]

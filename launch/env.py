"""Environment handling of the launcher: read defaults from it, build the launched command's.

Two rules, both visible to the user:

- A required setting may come from its argument or from the environment variable that
  launchers conventionally use (``--master-addr`` / ``MASTER_ADDR``, ``--master-port`` /
  ``MASTER_PORT``, ``--node-rank`` / ``NODE_RANK``); when neither is there, the error names
  both. A malformed variable is an error naming the variable.
- Whenever a value we set replaces a different value already in the environment (an
  argument beating its variable, ``--env KEY=VALUE`` replacing ``KEY``), we warn, naming
  the variable, the old value and the new one.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, Sequence

__all__ = ["EnvOverrideWarning", "child_env", "parse_env_assignments", "resolve_from_env"]

# argument name -> (environment variable, type)
_FROM_ENV = {
    "master_addr": ("MASTER_ADDR", str),
    "master_port": ("MASTER_PORT", int),
    "node_rank": ("NODE_RANK", int),
}


class EnvOverrideWarning(UserWarning):
    """A value set by the launcher replaces a different one already in the environment."""


def resolve_from_env(values: Mapping[str, object], environ: Mapping[str, str]) -> dict[str, object]:
    """Fill ``master_addr``, ``master_port`` and ``node_rank`` from the environment when not given.

    Args:
        values: argument name -> value (``None`` when not given on the command line).
        environ: the environment to read.

    Returns:
        A copy of ``values`` with missing entries taken from ``MASTER_ADDR``,
        ``MASTER_PORT``, ``NODE_RANK``.

    Raises:
        ValueError: a variable that is used is not an integer where one is needed.

    Warns:
        EnvOverrideWarning: an argument differs from its variable (the argument wins).
    """
    out = dict(values)
    for arg, (var, typ) in _FROM_ENV.items():
        if arg not in out:
            continue
        raw = environ.get(var)
        if raw is None or raw == "":
            continue
        if out[arg] is None:
            try:
                out[arg] = typ(raw)
            except ValueError:
                raise ValueError(f"{var} in the environment must be an integer, got {raw!r}") from None
        elif str(out[arg]) != raw:
            flag = "--" + arg.replace("_", "-")
            warnings.warn(
                f"{flag} {out[arg]} overrides {var}={raw} from the environment", EnvOverrideWarning, stacklevel=2
            )
    return out


def parse_env_assignments(items: Sequence[str]) -> dict[str, str]:
    """Parse ``KEY=VALUE`` strings (``--env``); raises ValueError naming a malformed one."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not (key[0].isalpha() or key[0] == "_") or not all(
            c.isalnum() or c == "_" for c in key
        ):
            raise ValueError(f"`--env` must be KEY=VALUE with KEY a variable name, got {item!r}")
        out[key] = value
    return out


def child_env(environ: Mapping[str, str], updates: Mapping[str, str]) -> dict[str, str]:
    """The environment for the launched command.

    ``updates`` are applied with a warning for each one that replaces a different value.
    The directory of the running Python (the virtual environment's ``bin``) is put first
    on ``PATH`` when it is not on it already, so that ``torchrun``, ``deepspeed``,
    ``horovodrun`` and ``sparsetrain`` resolve to this installation.

    Warns:
        EnvOverrideWarning: for each replaced variable.
    """
    env = dict(environ)
    for key, value in updates.items():
        old = env.get(key)
        if old is not None and old != value:
            warnings.warn(f"{key}={value} overrides {key}={old} from the environment", EnvOverrideWarning,
                          stacklevel=2)
        env[key] = value
    bindir = os.path.dirname(sys.executable)
    path = env.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        env["PATH"] = bindir + (os.pathsep + path if path else "")
    return env

"""Deep Gradient Compression for plain Horovod loops: ``DistributedOptimizer`` over ``hvd.allgather``.

The same algorithm and message as :func:`sparsetrain.compression.dgc_hook` (one packed
buffer per bucket, :mod:`sparsetrain.compression.wire`), exchanged with Horovod's
``allgather`` (dense buckets with ``allreduce``), for users of Horovod's
``hvd.DistributedOptimizer`` pattern (Lightning 2.x has no Horovod strategy). Horovod
ships only ``allreduce``-based compressors (``hvd.Compression.fp16``); DGC's reference
implementation needed a patched Horovod for its sparse exchange.

With ``masked=`` the optimizer runs the sparsity-aware exchange instead
(:mod:`sparsetrain.compression.masked`, the same code as the DDP hook's): only the gradient entries
inside the masks of the components attached to ``model`` travel, packed by positions computed from
the masks alone (rebuilt on every mask change, the same on every rank), with ``hvd.allreduce``
(``op=Average``: on 2 ranks bit-identical to ``hvd.allreduce`` of the whole gradient followed by
masking); optionally with DGC on the packed vector (``MaskedExchangeConfig(compression=...)``).

Gradients are exchanged in :meth:`synchronize`, which :meth:`step` calls first, so
accumulating several backward passes before a step works as with plain Horovod.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .dgc import DGCConfig, DGCState, check_optimizer
from .masked import MaskedExchange, MaskedExchangeConfig

__all__ = ["DistributedOptimizer"]


def _horovod():
    try:
        import horovod.torch as hvd
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "sparsetrain.compression.horovod needs Horovod with PyTorch support (pip install horovod; "
            "see docs/compression.md)"
        ) from err
    return hvd


class _DGCDistributedOptimizer(torch.optim.Optimizer):
    """Methods mixed into a subclass of the wrapped optimizer's class (Horovod's own pattern)."""

    def __init__(self, params, named_parameters, bucket_cap_mb: float, config: DGCConfig | None, model,
                 masked: MaskedExchangeConfig | None = None) -> None:
        super(self.__class__, self).__init__(params)
        all_params = [p for group in self.param_groups for p in group["params"]]
        if named_parameters is None and model is not None:
            named_parameters = model.named_parameters()
        if named_parameters is None:
            named = [(f"param_{i}", p) for i, p in enumerate(all_params)]
        else:
            named = list(named_parameters)
            missing = {id(p) for p in all_params} - {id(p) for _, p in named}
            if missing:
                raise ValueError(
                    f"`named_parameters` must name every parameter of the optimizer; {len(missing)} are missing"
                )
        if not bucket_cap_mb > 0:
            raise ValueError(f"`bucket_cap_mb` must be > 0, got {bucket_cap_mb}")
        self._masked: MaskedExchange | None = None
        self._dgc: DGCState | None = None
        if masked is not None:
            self._masked = MaskedExchange(model, masked)
            if masked.compression is not None:
                check_optimizer(masked.compression, self)
        else:
            self._dgc = DGCState(config=config)
            self._dgc.bind(named if model is None else model)
            check_optimizer(config, self)
        self._hvd = _horovod()
        # buckets in reverse parameter order, as DDP's first buckets (gradients of the last layers come first)
        cap = int(bucket_cap_mb * 1024 * 1024)
        self._buckets: list[list[torch.Tensor]] = []
        current, size = [], 0
        for p in reversed([p for p in all_params if p.requires_grad]):
            if current and size + p.numel() * p.element_size() > cap:
                self._buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self._buckets.append(current)

    @property
    def dgc_state(self) -> DGCState | None:
        """The :class:`DGCState` (residuals, momenta, statistics); None with ``masked=``."""
        return self._dgc

    @property
    def masked_exchange(self) -> MaskedExchange | None:
        """The :class:`~sparsetrain.compression.masked.MaskedExchange` with ``masked=`` (its statistics,
        and with compression its engine), else None."""
        return self._masked

    def _synchronize_masked(self) -> None:
        hvd, ex = self._hvd, self._masked
        world = hvd.size()
        ops = {"mean": hvd.Average, "sum": hvd.Sum}

        def agree(flags: torch.Tensor) -> torch.Tensor:
            return hvd.allreduce(flags, op=hvd.Sum, name="sparsetrain.masked.experts")

        pending = []
        for b, params in enumerate(self._buckets):
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            message = ex.prepare(params, flat, world, agree=agree)
            handles = []
            for i, (op, t) in enumerate(message.parts):
                name = f"sparsetrain.masked.{b}.{i}"
                if op == "gather":
                    handles.append(hvd.allgather_async(t, name=name))
                else:
                    handles.append(hvd.allreduce_async(t, name=name, op=ops[op]))
            pending.append((params, message, handles))
        ex.end_step()
        for params, message, handles in pending:
            result = ex.finish(message, [hvd.synchronize(h) for h in handles])
            _scatter(params, result)

    def synchronize(self) -> None:
        """Exchange the accumulated gradients; afterwards every ``p.grad`` holds the averaged result."""
        if self._masked is not None:
            self._synchronize_masked()
            return
        hvd, state = self._hvd, self._dgc
        engine = state.engine
        world = hvd.size()
        handles = []
        for b, params in enumerate(self._buckets):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            message = engine.compress(flat, state.bucket_layout(params), world)
            if message.collective == "all_gather":
                handle = hvd.allgather_async(message.send, name=f"sparsetrain.dgc.{b}")
            else:
                handle = hvd.allreduce_async(message.send, name=f"sparsetrain.dgc.{b}", op=hvd.Sum)
            handles.append((params, message, handle))
        engine.end_step()
        for params, message, handle in handles:
            _scatter(params, engine.decompress(message, hvd.synchronize(handle)))

    def step(self, closure=None):
        """Exchange the gradients, then take the wrapped optimizer's step."""
        self.synchronize()
        loss = super(self.__class__, self).step(closure)
        (self._dgc if self._masked is None else self._masked).step()
        return loss

    # The optimizer's step hooks run once, inside the wrapped class's step (after the exchange, so a
    # pre-hook sees the averaged gradients, as under DDP): torch would otherwise wrap this step too
    # and run every pre- and post-hook twice, the pre-hooks on the local gradients.
    step.hooked = True

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus this rank's DGC state under ``"dgc"`` (with ``masked=``: the
        exchange's state under ``"masked"``)."""
        out = super(self.__class__, self).state_dict()
        if self._masked is not None:
            out["masked"] = self._masked.state_dict()
        else:
            out["dgc"] = self._dgc.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        dgc, masked = state_dict.pop("dgc", None), state_dict.pop("masked", None)
        if (masked is not None and self._masked is None) or (dgc is not None and self._masked is not None):
            raise ValueError("`state_dict` was saved " + ("with" if masked is not None else "without")
                             + " `masked=`; this optimizer runs " + ("without" if self._masked is None else "with")
                             + " it")
        super(self.__class__, self).load_state_dict(state_dict)
        if dgc is not None:
            self._dgc.load_state_dict(dgc)
        if masked is not None:
            self._masked.load_state_dict(masked)


def _scatter(params: list[torch.Tensor], result: torch.Tensor) -> None:
    """Write a bucket's flat averaged gradient into the parameters' ``.grad``."""
    offset = 0
    for p in params:
        n = p.numel()
        value = result[offset : offset + n].view_as(p)
        if p.grad is None:
            p.grad = value.to(p.dtype).clone()
        else:
            p.grad.copy_(value)
        offset += n


def DistributedOptimizer(  # noqa: N802 - named like hvd.DistributedOptimizer, which it replaces
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
    *,
    bucket_cap_mb: float = 25.0,
    config: DGCConfig | None = None,
    model: nn.Module | None = None,
    masked: bool | MaskedExchangeConfig = False,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that :meth:`step` first exchanges DGC-compressed gradients over Horovod.

    Like ``hvd.DistributedOptimizer`` it returns a new optimizer of a subclass of the
    given one's class, holding the same parameter groups (the given object is left as it
    is). Call ``hvd.init()`` first and broadcast the initial parameters as usual.

    Example::

        >>> # xdoctest: +SKIP("needs horovodrun")
        >>> hvd.init()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)     # momentum=0: DGC owns it
        >>> opt = DistributedOptimizer(opt, model.named_parameters(), density=0.001, momentum=0.9)
        >>> hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        >>> loss.backward(); opt.step()

    Args:
        optimizer: the optimizer to wrap.
        named_parameters: ``(name, parameter)`` pairs naming every optimized parameter
            (keys of the checkpointed state); default ``param_<i>`` in optimizer order.
        bucket_cap_mb: gradients are exchanged in buckets of about this size.
        config: a :class:`DGCConfig`; or give its fields as keyword arguments.
        model: the model the parameters belong to: its parameter names key the state (then
            ``named_parameters`` may be left out), and the residuals and momenta are cleared
            outside the gradient masks of the components attached to it (dynamic sparsity).
        masked: exchange only the gradient entries inside the gradient masks of the components
            attached to ``model`` (required then): True for the lossless packed all-reduce (with DGC
            on the packed vector when ``config`` or DGC keyword options are given), or a
            :class:`~sparsetrain.compression.masked.MaskedExchangeConfig` (then neither ``config``
            nor keyword options). Parameter names are then the model's.
        **kwargs: :class:`DGCConfig` fields.

    Example (masked)::

        >>> # xdoctest: +SKIP("needs horovodrun")
        >>> sparsifier = DynamicSparsifier(model, method="rigl", sparsity=0.9, total_steps=10_000)
        >>> opt = DistributedOptimizer(torch.optim.Adam(model.parameters()), model=model, masked=True)
        >>> sparsifier.attach_optimizer(opt)

    Raises:
        ImportError: Horovod with PyTorch support is not installed.
        TypeError: ``model`` is not a module; ``masked`` not a bool or a MaskedExchangeConfig.
        ValueError: bad options, parameters missing from ``named_parameters``, ``masked`` without
            ``model``, or an SGD with momentum while DGC's momentum correction is on.
    """
    if config is not None and kwargs:
        raise ValueError(f"give either `config` or keyword options, not both (got {sorted(kwargs)})")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module or None, got {type(model).__name__}")
    if not isinstance(masked, (bool, MaskedExchangeConfig)):
        raise TypeError(f"`masked` must be a bool or a MaskedExchangeConfig, got {type(masked).__name__}")
    masked_cfg = None
    if masked is not False:
        if model is None:
            raise ValueError("`masked` needs `model` (the exchange reads the gradient masks attached to it)")
        if isinstance(masked, MaskedExchangeConfig):
            if config is not None or kwargs:
                raise ValueError("with `masked=MaskedExchangeConfig(...)` give the compression in it, not as "
                                 "`config` or keyword options")
            masked_cfg = masked
        else:
            compression = config if config is not None else (DGCConfig(**kwargs) if kwargs else None)
            masked_cfg = MaskedExchangeConfig(compression=compression)
        cfg = None
        if masked_cfg.compression is not None:
            check_optimizer(masked_cfg.compression, optimizer)
    else:
        cfg = config if config is not None else DGCConfig(**kwargs)
        check_optimizer(cfg, optimizer)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DGCDistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, bucket_cap_mb, cfg, model, masked_cfg)

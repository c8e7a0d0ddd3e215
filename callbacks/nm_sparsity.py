"""Lightning callback for N:M sparse training: a thin adapter over :class:`sparsetrain.nm.NMSparsifier`."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl

from sparsetrain.nm import NMConfig, NMSparsifier

from ._base import ComponentCallback, check_bool

__all__ = ["NMSparsity"]


def _parse_stage(s: Any) -> tuple[int, int]:
    if isinstance(s, str) and s.count(":") == 1:
        a, b = s.split(":")
        if a.strip().isdigit() and b.strip().isdigit():
            return int(a), int(b)
    raise ValueError(f"`stages` entries must look like 'n:m' (e.g. '4:8'), got {s!r}")


class NMSparsity(ComponentCallback):
    """Train the LightningModule's Linear/Conv layers in an N:M pattern (SR-STE, STE, MDGF, SDGF).

    At ``setup`` the callback attaches an :class:`~sparsetrain.nm.NMSparsifier` (a parametrization
    on each selected weight, before the optimizer is built); at ``on_train_start`` (after DDP
    has broadcast the weights, or after a checkpoint was restored) it computes the masks and checks
    they are identical on every rank; after every optimizer step it advances the schedule,
    recomputes the masks when due and logs the sparsifier's
    :meth:`~sparsetrain.nm.NMSparsifier.statistics` (``nm/step``, ``nm/density``,
    ``nm/mask_flip_fraction``, ``nm/beta`` for MDGF, ...); at ``on_train_end`` it makes the
    weights exactly N:M and removes the parametrizations. Its checkpoint state (schedule step,
    masks) resumes bit for bit, and :func:`sparsetrain.nm.nm_export_checkpoint` turns any
    checkpoint it wrote into the exact N:M weights.

    Args:
        n: weights kept per group of ``m``, ``1 <= n < m``.
        m: group size along the reduction dim (in_features; c_in*k_h*k_w for convs).
        method: ``"srste"`` (STE + lambda_w * (1 - mask) * W, Zhou et al. 2021), ``"ste"``,
            ``"mdgf"`` (decaying mask) or ``"sdgf"`` (staged patterns), Bambhaniya et al. 2024.
        lambda_w: SR-STE's decay; None = 2e-4 for srste, mdgf and sdgf, 0 for ste.
        update_every: recompute the masks every this many optimizer steps (0: fixed masks).
        decay: MDGF's beta schedule, ``"linear"`` or ``"exp"``.
        decay_steps: steps over which MDGF's beta reaches 0 / SDGF reaches the target; None =
            ``decay_fraction`` of the run's optimizer steps.
        decay_fraction: see ``decay_steps``, in (0, 1].
        stages: SDGF's intermediate patterns, e.g. ``["7:8", "4:8", "2:8"]``; None = default ladder.
        include: fnmatch patterns of layer names to sparsify, e.g. ``["*.mlp.*"]`` (None: all).
        exclude: fnmatch patterns of layer names to keep dense.
        verify_every: check rank equality of the masks every this many mask updates (0: only at
            the start and the end).
        compile_masks: compute the masks under ``torch.compile`` (fused kernels); None: on CUDA only.
        masks_in_forward: compute the masks inside the forward pass (for a ``torch.compile``'d
            LightningModule: they fuse into the weight's kernel); needs ``update_every=1``. See
            :class:`~sparsetrain.nm.NMConfig`.
        inplace: mask the layers' weights in place between optimizer steps instead of through a
            parametrization (the dense weights are kept aside and put back before each optimizer
            step): the forward and backward passes run as a dense model's, for one dense copy of
            the sparse weights in memory. See :class:`~sparsetrain.nm.NMConfig`.
        finalize: at the end of training make the weights exactly N:M and remove the
            parametrizations (plain ``weight`` parameters again).
        log_stats: log :meth:`~sparsetrain.nm.NMSparsifier.statistics` after each optimizer step.
        fresh_state_ok: resuming from a checkpoint without this callback's state computes fresh
            masks and restarts the schedule with a warning; False (default): an error.

    Raises:
        ValueError: any argument out of range (named in the message).

    Example::

        trainer = pl.Trainer(callbacks=[NMSparsity(n=2, m=4, method="srste", include=["*.mlp.*"])])
    """

    config_class = NMConfig
    _state_key_fields = ("n", "m", "method", "include", "exclude")
    # decay_steps and stages are the callback's own (a run fraction, "n:m" strings); grad_accumulation
    # comes from the Trainer
    _hidden_fields = ("decay_steps", "stages", "grad_accumulation")

    def __init__(
        self,
        *,
        decay_steps: int | None = None,
        decay_fraction: float = 0.25,
        stages: list[str] | None = None,
        finalize: bool = True,
        log_stats: bool = True,
        fresh_state_ok: bool = False,
        **config_fields: Any,
    ) -> None:
        config_fields = self.split_kwargs(config_fields)
        check_bool("finalize", finalize)
        check_bool("log_stats", log_stats)
        if not (isinstance(decay_fraction, (int, float)) and 0 < decay_fraction <= 1):
            raise ValueError(f"`decay_fraction` must be in (0, 1], got {decay_fraction!r}")
        parsed_stages = None if stages is None else [_parse_stage(s) for s in stages]
        method = config_fields.get("method", NMConfig.method)
        # Validate everything now; decay_steps gets its real value in setup() when left to the run length.
        probe = decay_steps if decay_steps is not None or method not in ("mdgf", "sdgf") else 1
        NMConfig(**config_fields, stages=parsed_stages, decay_steps=probe)
        super().__init__(fresh_state_ok=fresh_state_ok, **config_fields)
        # grad_accumulation is the Trainer's, set at setup
        self._kwargs = {k: v for k, v in config_fields.items() if k != "grad_accumulation"} | {"stages": parsed_stages}
        self.decay_steps = decay_steps
        self.decay_fraction = float(decay_fraction)
        self.finalize = finalize
        self.log_stats = log_stats
        self._restored = False
        self._seen_step = 0

    @property
    def sparsifier(self) -> NMSparsifier | None:
        """The core :class:`~sparsetrain.nm.NMSparsifier` (None before ``setup``)."""
        return self.component

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(f"NMSparsity supports single-device and DDP training, got strategy "
                             f"{type(strategy).__name__}; use strategy='ddp' (sharded optimizers keep master "
                             f"weights the parametrization does not see)")
        if self.sparsifier is not None and self.sparsifier.model is pl_module and not self.sparsifier.finalized:
            return  # fit() called again with the same module: keep training the attached masks
        decay_steps = self.decay_steps
        if decay_steps is None and self._kwargs.get("method", NMConfig.method) in ("mdgf", "sdgf"):
            total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("`decay_steps` must be given when the run length is unbounded "
                                 "(set it, or the Trainer's max_steps/max_epochs)")
            decay_steps = max(1, int(self.decay_fraction * total))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        config = NMConfig(**self._kwargs, decay_steps=decay_steps,
                          grad_accumulation=max(1, int(trainer.accumulate_grad_batches)))
        self.component = NMSparsifier(pl_module, config, grad_scaler=scaler, verify_now=False)
        self._restored = False
        pending = self.take_pending()
        if pending is not None:
            self.load_state_dict(pending)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sp = self._require()
        # Restored: the masks came from the checkpoint (they may be older than the weights), so only
        # check them; else compute them from the weights DDP broadcast / the precision plugin
        # converted. With `inplace`, the weights are masked from here on.
        sp.refresh(recompute=not self._restored)
        self._seen_step = trainer.global_step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._require().before_optimizer_step()  # `inplace`: the dense weights back, SR-STE's term

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        sp = self._require()
        stepped = False
        while self._seen_step < trainer.global_step:  # one sparsifier step per optimizer step
            sp.step()
            self._seen_step += 1
            stepped = True
        if stepped and self.log_stats and self.logging_due(trainer):
            self.log_statistics(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.finalize and self.sparsifier is not None:
            self.sparsifier.finalize()

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary for the run's ``summary.json``: the sparsifier's
        :meth:`~sparsetrain.nm.NMSparsifier.statistics` (the keys logged during training), plus
        ``nm/method``, ``nm/layers`` and, after finalization, ``nm/exact_nm``."""
        sp = self.sparsifier
        if sp is None:
            return {}
        from sparsetrain.nm import is_nm

        cfg = sp.config
        out: dict[str, Any] = {**sp.statistics(), "nm/method": cfg.method, "nm/layers": list(sp.layers)}
        if sp.finalized:
            out["nm/exact_nm"] = all(is_nm(mod.weight, cfg.n, cfg.m) for mod in sp.layers.values())
        return out

    # ------------------------------------------------------------------ state
    def _load_component_state(self, state: dict[str, Any]) -> None:
        self.component.load_state_dict(state)
        self._restored = True  # on_train_start checks the restored masks instead of recomputing them

    def _require(self) -> NMSparsifier:
        if self.sparsifier is None:
            raise RuntimeError("NMSparsity was not set up for fitting (setup(stage='fit') attaches it)")
        return self.sparsifier

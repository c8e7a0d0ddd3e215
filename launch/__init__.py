"""Multi-node launcher: builds and runs torchrun, DeepSpeed, Horovod and SLURM commands."""

__all__: list[str] = []

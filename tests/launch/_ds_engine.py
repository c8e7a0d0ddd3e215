"""A plain DeepSpeed engine on CPU (gloo), started by the DeepSpeed launcher through our command.

    python _ds_engine.py OUT_DIR ZERO_STAGE

Each rank trains the shared problem on its slice of every batch and saves its final
parameters to OUT_DIR/rank{R}.pt.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _problem as P  # noqa: E402


def main() -> None:
    out, stage = sys.argv[1], int(sys.argv[2])
    import deepspeed
    import torch.distributed as dist

    # On CPU, DeepSpeed JIT-compiles a shared-memory allreduce kernel at every start-up (minutes on a
    # small machine, and the build is not reliably cached across runs); gloo does the same reduction.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = P.make_model()
    config = {
        "train_micro_batch_size_per_gpu": P.PER_RANK,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": P.LR, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips to norm 1.0 unless told otherwise
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x, y = P.make_data(world)
    rows = slice(rank * P.PER_RANK, (rank + 1) * P.PER_RANK)
    for s in range(P.STEPS):
        loss = torch.nn.functional.mse_loss(engine(x[s, rows]), y[s, rows])
        engine.backward(loss)
        engine.step()
    torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, f"{out}/rank{rank}.pt")
    # Without a final barrier and destroy_process_group, ZeRO-2 ranks abort at exit (FIELD_NOTES §6).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

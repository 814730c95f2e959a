"""Process group and DeepSpeed engine setup.

``setup_env`` gives every launch the torchrun environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT): torchrun sets it, a SLURM task (sbatch/srun or
the submitit launcher) has it derived from SLURM_*, and a plain ``python -m train``
becomes a world of one. Without it DeepSpeed would look for mpi4py.
"""

from __future__ import annotations

import os
import socket
import subprocess

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    try:
        import submitit

        return submitit.JobEnvironment().hostnames[0]
    except Exception:
        out = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                             capture_output=True, text=True, check=True).stdout
        return out.split()[0]


def setup_env() -> str:
    """Fill in the torchrun variables when absent; returns how the process was launched."""
    env = os.environ
    if all(v in env for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        env.setdefault("LOCAL_RANK", "0")
        return "torchrun"
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        env["RANK"], env["LOCAL_RANK"] = env["SLURM_PROCID"], env.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return "slurm"
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return "single"


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def init_distributed(device: str, timeout_minutes: float = 30.0) -> tuple[int, int, int]:
    """gloo on CPU, NCCL on GPUs. Returns (rank, local_rank, world_size)."""
    from datetime import timedelta

    import deepspeed
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo",
                               timeout=timedelta(minutes=timeout_minutes))
    import torch.distributed as dist

    return dist.get_rank(), local_rank, dist.get_world_size()


def teardown_distributed(launch: str) -> None:
    """Destroy the process group (else one rank may abort at exit); forget a world of one we made."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _reset_deepspeed_groups()
    if launch == "single":
        for v in TORCHRUN_VARS:
            os.environ.pop(v, None)


class SkippableAdamW:
    """Factory for an AdamW whose next ``step()`` can be turned into a no-op (``skip_next``).

    ZeRO-1/2/3 skip a step with non-finite gradients themselves; under ZeRO-0 DeepSpeed
    calls the optimizer directly, so the trainer sets ``skip_next`` instead (weights and
    Adam moments stay exactly as they were).
    """

    def __new__(cls, *args, **kwargs):
        import torch

        class _AdamW(torch.optim.AdamW):
            skip_next = False

            def step(self, closure=None):
                if self.skip_next:
                    self.skip_next = False
                    return None
                return super().step(closure)

        return _AdamW(*args, **kwargs)


def _reset_deepspeed_groups() -> None:
    """Forget the process groups DeepSpeed caches in module globals.

    Hydra's basic launcher runs the jobs of ``-m attention=nsa,full`` one after another in
    this process; without this the second job's engine would use the destroyed groups.
    """
    import sys

    from torch.distributed import ProcessGroup

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name, value in list(vars(groups).items()):
            if name.startswith("_") and name.isupper():
                if isinstance(value, dict):
                    setattr(groups, name, {})
                elif isinstance(value, ProcessGroup):
                    setattr(groups, name, None)
        groups.mpu = None
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (ndim >= 2) only; norms, biases and gates' scalars get none."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg, model, ds_config: dict):
    """AdamW + ``deepspeed.initialize``; the engine's checkpoint reads are made pickle-safe.

    ``train.compile`` compiles each transformer block with ``torch.compile`` before the
    engine wraps the model (DeepSpeed's ``engine.compile()`` returned a loss without
    ``grad_fn`` for this model in 0.19.8).
    """
    import deepspeed

    from train.checkpoint import make_engine_loads_safe

    o = cfg.optim
    opt = SkippableAdamW(param_groups(model, float(o.weight_decay)), lr=float(o.lr),
                            betas=(float(o.beta1), float(o.beta2)), eps=float(o.eps))
    if cfg.train.compile:
        # Per block, in place (nn.Module.compile): state-dict keys, checkpoints and exports stay the same.
        for block in getattr(model, "layers", []):
            block.compile()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    make_engine_loads_safe(engine)
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr

"""Export: one consolidated safetensors model + config.json + tokenizer.model.

Under ZeRO-3 every parameter lives in shards across ranks; they are gathered
(``deepspeed.zero.GatheredParameters``, a collective on all ranks) before rank 0 writes.
The folder is written to a temp name and renamed, so ``eval``/``generate`` never read a
half-written export.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def consolidated_state_dict(engine, zero_stage: int) -> dict | None:
    """Full fp32/bf16 state dict on rank 0 (None elsewhere). Collective under ZeRO-3."""
    import torch.distributed as dist

    module = engine.module
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            sd = {k: v.detach().clone().cpu() for k, v in module.state_dict().items()} if dist.get_rank() == 0 else None
        return sd
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def export(engine, out_dir: Path, model_cfg, attention_cfg, tokenizer_file, zero_stage: int, rank: int) -> Path:
    """Write ``out_dir`` via ``train.model.save_pretrained`` (rank 0), atomically."""
    import torch.distributed as dist

    from train.model import save_pretrained

    sd = consolidated_state_dict(engine, zero_stage)
    out_dir = Path(out_dir)
    if rank == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(engine.module, tmp, model_cfg, attention_cfg,
                        tokenizer_file=tokenizer_file, state_dict=sd)
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return out_dir

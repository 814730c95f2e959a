"""Distributed save and resume on top of ``train.checkpoint``'s file-level guarantees.

Save: rank 0 makes ``.tmp-step_X`` and probes that it can write there (all ranks learn
the result, so an unwritable directory fails on every rank at once instead of hanging
one of them in a collective); every rank writes its DeepSpeed shards and RNG state;
after a barrier rank 0 writes the manifest, renames the directory to ``step_X``,
replaces ``latest`` and prunes. Any failure leaves the previous checkpoints untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from train.checkpoint import (
    LATEST,
    TMP_PREFIX,
    TRAINER_STATE,
    CheckpointError,
    _fsync_dir,
    config_hash,
    find_resumable,
    list_checkpoints,
    model_config_diff,
    prune,
    read_rank_state,
    remove_stale_tmp,
    step_name,
    verify,
    write_manifest,
    write_rank_state,
    write_text_atomic,
)


def _all_ok(ok: bool) -> bool:
    """True iff ``ok`` on every rank."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item()) == 0


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save(engine, root: Path, step: int, trainer_state: dict, *, keep_last: int, with_sha256: bool,
         rank: int, log=print, kill_after_write: bool = False) -> bool:
    """Write checkpoint ``step``; returns False (and logs why) if it could not be written."""
    import torch.distributed as dist

    root = Path(root)
    tag = TMP_PREFIX + step_name(step)
    tmp = root / tag
    err = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            probe = tmp / ".probe"
            probe.write_bytes(b"\0" * 4096)
            probe.unlink()
        except OSError as e:
            err = f"cannot write checkpoint directory {tmp}: {e}"
    err = _broadcast(err)
    if err is None:
        try:
            engine.save_checkpoint(str(root), tag=tag, save_latest=False)
            write_rank_state(tmp, rank)
            if rank == 0:
                (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
            if kill_after_write:  # fault injection: die like a preempted node, files written, no manifest
                import os
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            ok = True
        except Exception as e:  # OSError, or torch's RuntimeError from a failed file write
            ok, err = False, f"writing checkpoint {tmp} failed on rank {rank}: {e}"
        if not _all_ok(ok):
            err = err or "writing the checkpoint failed on another rank"
    if err is None and rank == 0:
        try:
            write_manifest(tmp, with_sha256)
            final = root / step_name(step)
            if final.exists():  # a checkpoint of the same step from an earlier attempt
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(root)
            write_text_atomic(root / LATEST, final.name)
            prune(root, keep_last)
        except OSError as e:
            err = f"finalising checkpoint {tmp} failed: {e}"
    err = _broadcast(err)
    dist.barrier()
    if err is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"checkpoint at step {step} NOT saved: {err}; the previous checkpoints are intact")
        return False
    if rank == 0:
        log(f"saved checkpoint {root / step_name(step)}")
    return True


def choose(root: Path, resume: str, verify_mode: str, rank: int, log=print) -> Path | None:
    """The checkpoint to resume from (same on every rank): None for a fresh start.

    ``resume=auto``: newest complete checkpoint, falling back past corrupt ones.
    ``resume=<dir>``: that one, verified; a corrupt one is an error naming the file.
    ``resume=none``: a fresh start, refused if the run already has checkpoints.
    """
    result = None
    if rank == 0:
        try:
            remove_stale_tmp(Path(root))
            if resume == "auto":
                found = find_resumable(Path(root), verify_mode, log=log)
                result = str(found) if found else None
            elif resume != "none":
                verify(Path(resume), verify_mode)
                result = str(resume)
            elif list_checkpoints(Path(root)):
                # A fresh run among old checkpoints: a later resume=auto would pick the old ones up.
                raise CheckpointError(f"resume=none but {root} already holds checkpoints (newest "
                                      f"{list_checkpoints(Path(root))[0].name}); use resume=auto, another "
                                      "run_name, or remove that directory")
        except CheckpointError as e:
            result = e
    result = _broadcast(result)
    if isinstance(result, CheckpointError):
        raise result
    return Path(result) if result else None


def load(engine, ckpt: Path, rank: int, expected: dict) -> dict:
    """Restore engine, RNG and return the trainer state; refuse a checkpoint of another shape.

    ``expected``: model/attention dicts, world size and ZeRO stage of this run.
    """
    ckpt = Path(ckpt)
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    want = config_hash(expected["model"], expected["attention"])
    if state.get("config_hash") != want:
        diff = model_config_diff(state.get("model_config", {}), expected)
        raise CheckpointError(f"{ckpt} was written for a different model config; refusing to load it "
                              f"({'; '.join(diff) or 'hash differs'}). Use a new run_name or resume=none.")
    for key, what in (("world_size", "ranks"), ("zero_stage", "ZeRO stage")):
        if state.get(key) != expected[key]:
            raise CheckpointError(f"{ckpt} was written with {what} {state.get(key)}, this run has "
                                  f"{expected[key]}; resume with the same {what}")
    path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"{ckpt}: DeepSpeed found no checkpoint files in it")
    read_rank_state(ckpt, rank)
    return state

"""Crash-safe checkpoints: temp dir + manifest + rename, atomic ``latest``, verified resume.

Layout of ``<run_dir>/checkpoints``::

    step_00000100/            DeepSpeed files (model/optimizer shards per rank)
        trainer_state.json    step, tokens, loader state, wandb id, model config + hash
        rank_00000.json       python/numpy RNG state of rank 0 (one per rank)
        rank_00000.safetensors  torch CPU (+CUDA) RNG state of rank 0
        manifest.json         size (+ sha256) of every file above, written last
    latest                    "step_00000100", replaced atomically after a save succeeded
    .tmp-step_00000200/       a save in progress (or killed): never read

A checkpoint is *complete* iff its directory is named ``step_*`` (renamed only after
every rank finished writing) and every file matches ``manifest.json``. ``resume=auto``
takes the newest complete one and names the file that disqualified any newer one.
Loading never unpickles arbitrary objects: DeepSpeed's files go through
``torch.load(weights_only=True)`` with an allow-list of DeepSpeed's own plain classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STEP_RE = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the file."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(model: dict, attention: dict) -> str:
    """sha256 of the canonical JSON of the model + attention configs (what shapes the weights)."""
    blob = json.dumps({"model": model, "attention": attention}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` via a temp file + fsync + rename, so readers see the old or the new text."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------- manifest


def write_manifest(ckpt_dir: Path, with_sha256: bool) -> dict:
    """Record size (and sha256) of every file under ``ckpt_dir``; the manifest is written last."""
    files = {}
    for p in sorted(q for q in ckpt_dir.rglob("*") if q.is_file() and q.name != MANIFEST):
        entry = {"size": p.stat().st_size}
        if with_sha256:
            entry["sha256"] = sha256_file(p)
        files[str(p.relative_to(ckpt_dir))] = entry
    manifest = {"version": 1, "files": files}
    write_text_atomic(ckpt_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify(ckpt_dir: Path, mode: str = "sha256") -> None:
    """Raise ``CheckpointError`` naming the first file that is missing, truncated or altered."""
    ckpt_dir = Path(ckpt_dir)
    mpath = ckpt_dir / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {MANIFEST} (the save did not finish)")
    try:
        files = json.loads(mpath.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from None
    for rel, entry in files.items():
        p = ckpt_dir / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {MANIFEST})")
        size = p.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{p}: size {size} bytes, {entry['size']} recorded at write time (truncated?)")
        if mode == "sha256" and "sha256" in entry and sha256_file(p) != entry["sha256"]:
            raise CheckpointError(f"{p}: sha256 differs from the one recorded at write time (corrupted)")


def list_checkpoints(root: Path) -> list[Path]:
    """``step_*`` directories under ``root``, newest first (temp dirs are never listed)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)]
    return sorted(dirs, key=lambda p: int(STEP_RE.match(p.name).group(1)), reverse=True)


def find_resumable(root: Path, mode: str = "sha256", log=print) -> Path | None:
    """Newest complete checkpoint under ``root``; each rejected newer one is reported by file."""
    for d in list_checkpoints(Path(root)):
        try:
            verify(d, mode)
            return d
        except CheckpointError as e:
            log(f"checkpoint {d.name} rejected, falling back to the previous one: {e}")
    return None


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (and stale temp dirs)."""
    removed = []
    complete = [d for d in list_checkpoints(root) if (d / MANIFEST).is_file()]
    for d in complete[keep_last:]:
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def remove_stale_tmp(root: Path) -> None:
    """Partial saves from a killed run: never read, deleted at the next start."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------- RNG state


def rng_state() -> tuple[dict, dict]:
    """(JSON-able python/numpy RNG state, tensors for safetensors) of this process."""
    py = random.getstate()
    np_state = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return js, tensors


def set_rng_state(js: dict, tensors: dict) -> None:
    py = js["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = js["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


def write_rank_state(ckpt_dir: Path, rank: int) -> None:
    from safetensors.torch import save_file

    js, tensors = rng_state()
    (ckpt_dir / f"rank_{rank:05d}.json").write_text(json.dumps(js))
    save_file(tensors, str(ckpt_dir / f"rank_{rank:05d}.safetensors"))


def read_rank_state(ckpt_dir: Path, rank: int) -> None:
    from safetensors.torch import load_file

    js_path = ckpt_dir / f"rank_{rank:05d}.json"
    if not js_path.is_file():
        raise CheckpointError(f"{js_path}: missing (was the checkpoint written by fewer ranks?)")
    set_rng_state(json.loads(js_path.read_text()), load_file(str(ckpt_dir / f"rank_{rank:05d}.safetensors")))


# ---------------------------------------------------------------------- safe DeepSpeed load


def _deepspeed_safe_globals() -> list:
    """DeepSpeed's own plain classes that appear in its checkpoint pickles (ZeRO stage enum,
    loss-scaler state, fragment addresses); everything else is refused by weights_only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def make_engine_loads_safe(engine) -> None:
    """Route every DeepSpeed checkpoint read of ``engine`` through ``torch.load(weights_only=True)``.

    DeepSpeed 0.19.8's TorchCheckpointEngine.load calls ``torch.load(weights_only=False)``,
    which would execute any pickle a downloaded checkpoint contains; all of the engine's
    reads (model states, ZeRO optimizer shards) go through this one method.
    """
    allowed = _deepspeed_safe_globals()

    def safe_load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # UnpicklingError or a truncated zip: name the file
                raise CheckpointError(f"{path}: cannot be loaded safely ({type(e).__name__}: {e})") from None

    engine.checkpoint_engine.load = safe_load


def model_config_diff(saved: dict, current: dict) -> list[str]:
    """Human-readable differences ``section.key: saved -> current``."""
    out = []
    for section in ("model", "attention"):
        a, b = saved.get(section, {}), current.get(section, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append(f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out

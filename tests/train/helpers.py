"""Shared helpers for the trainer tests: a tiny prepared dataset and `python -m train` launchers.

The dataset is learnable (each document counts up by a fixed stride modulo the
vocabulary), so a tiny model's loss falls within a few steps, and it is written in
the exact format of ``data.prepare`` (shards + meta.json + tokenizer.model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
VOCAB = 320  # tokenizer size; the tiny_cpu model has 4096 embedding rows


def make_dataset(root: Path, n_train: int = 400, n_val: int = 20, seed: int = 0) -> Path:
    """Prepared data dir with train/validation shards of counting documents."""
    from data.prepare import SPLITS
    from data.shards import FORMAT_VERSION, write_shard
    from data.tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    text = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(200)]
    tok = train_tokenizer(text, root / "tokenizer.model", vocab_size=VOCAB, input_sentence_size=0)
    vocab = tok.vocab_size  # SentencePiece may stop below VOCAB on this small text
    rng = np.random.default_rng(seed)

    def docs(n):
        out = []
        for _ in range(n):
            length, start, stride = int(rng.integers(20, 90)), int(rng.integers(4, vocab)), int(rng.integers(1, 4))
            out.append(4 + (start + stride * np.arange(length)) % (vocab - 4))
        return out

    splits = {}
    for split, n in zip(SPLITS, (n_train, n_val), strict=True):
        d = docs(n)
        write_shard(root / f"{split}-00000.bin", d, vocab)
        splits[split] = {"documents": n, "tokens": int(sum(len(x) for x in d)), "shards": [f"{split}-00000.bin"]}
    meta = {"format_version": FORMAT_VERSION, "config_hash": "test", "name": "counting", "data": {}, "seed": seed,
            "tokenizer": {"file": "tokenizer.model", "source_path": str(tok.path), "sha256": tok.sha256,
                          "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                          "pad_id": tok.pad_id},
            "vocab_size": tok.vocab_size, "splits": splits}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def base_overrides(data_dir: Path, out: Path, run_name: str = "t") -> list[str]:
    return ["experiment=tiny_cpu", f"data.out_dir={data_dir}", f"tokenizer.path={data_dir / 'tokenizer.model'}",
            f"output_root={out}", f"run_name={run_name}"]


def env() -> dict:
    e = dict(os.environ)
    # A fake key in the environment: tests check that it is never written anywhere.
    e.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
             WANDB_API_KEY="sk-test-not-a-real-key" + "0" * 18)
    for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(v, None)
    return e


def cmd(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [PY, "-m", "train", *overrides]
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
            "-m", "train", *overrides]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(overrides: list[str], nproc: int = 1, timeout: float = 300, check: bool = True, **kw):
    """Run the trainer to completion; returns the CompletedProcess (stdout+stderr merged)."""
    p = subprocess.run(cmd(overrides, nproc), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"trainer exited {p.returncode}:\n{p.stdout[-6000:]}")
    return p


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(run_dir)}


def weights(export_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(export_dir / "model.safetensors"))


def start(overrides: list[str], nproc: int = 1, **kw) -> subprocess.Popen:
    """Launch the trainer in the background (output to a pipe)."""
    return subprocess.Popen(cmd(overrides, nproc), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    """Block until metrics.jsonl records ``step`` (returns the last step seen)."""
    import time

    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        if path.is_file():
            steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def worker_pid(launcher_pid: int, rank: int) -> int:
    """pid of the torchrun worker with RANK=rank."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for c in children:
        environ = Path(f"/proc/{c}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(c)
    raise AssertionError(f"no worker with RANK={rank} under {launcher_pid}")


def model_states(ckpt_dir: Path) -> dict:
    """Module weights of a ZeRO-0/1/2 checkpoint, loaded as safely as the trainer loads them."""
    import torch

    from train.checkpoint import _deepspeed_safe_globals

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(ckpt_dir / "mp_rank_00_model_states.pt", weights_only=True)["module"]

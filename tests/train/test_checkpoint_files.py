"""File-level checkpoint guarantees, in-process: manifest verification, fallback past corrupt or
partial checkpoints, pruning, atomic pointer, and pickle-safe loading of DeepSpeed files."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from train.checkpoint import (
    MANIFEST,
    CheckpointError,
    find_resumable,
    list_checkpoints,
    make_engine_loads_safe,
    prune,
    remove_stale_tmp,
    verify,
    write_manifest,
    write_text_atomic,
)


def fake_checkpoint(root, step, payload=b"x" * 1000):
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(payload)
    (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    write_manifest(d, with_sha256=True)
    return d


def test_manifest_detects_truncation_and_bitflips(tmp_path):
    d = fake_checkpoint(tmp_path, 4)
    verify(d)
    f = d / "model.pt"
    f.write_bytes(b"x" * 999)
    with pytest.raises(CheckpointError, match=r"model\.pt: size 999 bytes, 1000 recorded"):
        verify(d)
    f.write_bytes(b"y" + b"x" * 999)
    with pytest.raises(CheckpointError, match=r"model\.pt: sha256 differs"):
        verify(d)
    verify(d, mode="size")  # size-only mode cannot see a same-size corruption, by design
    f.unlink()
    with pytest.raises(CheckpointError, match=r"model\.pt: missing"):
        verify(d)


def test_resume_skips_partial_and_corrupt(tmp_path):
    fake_checkpoint(tmp_path, 4)
    good = fake_checkpoint(tmp_path, 8)
    bad = fake_checkpoint(tmp_path, 12)
    (bad / "model.pt").write_bytes(b"z" * 1000)
    partial = tmp_path / "step_00000016"  # renamed without a manifest cannot happen, but must not load
    partial.mkdir()
    (tmp_path / ".tmp-step_00000020").mkdir()  # a save killed mid-write
    messages = []
    assert find_resumable(tmp_path, log=messages.append) == good
    assert any("step_00000016" in m and MANIFEST in m for m in messages)
    assert any("step_00000012" in m and "model.pt" in m and "falling back" in m for m in messages)
    assert [p.name for p in list_checkpoints(tmp_path)][0] == "step_00000016"
    remove_stale_tmp(tmp_path)
    assert not (tmp_path / ".tmp-step_00000020").exists()


def test_prune_keeps_newest_complete(tmp_path):
    for s in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, s)
    prune(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000003"]


def test_atomic_pointer(tmp_path):
    write_text_atomic(tmp_path / "latest", "step_00000004")
    write_text_atomic(tmp_path / "latest", "step_00000008")
    assert (tmp_path / "latest").read_text() == "step_00000008"
    assert not list(tmp_path.glob("*.tmp"))


class _FakeEngine:
    class checkpoint_engine:  # noqa: N801 - mirrors DeepSpeed's attribute name
        @staticmethod
        def load(path, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=False)


def test_deepspeed_loads_refuse_arbitrary_pickles(tmp_path):
    engine = _FakeEngine()
    make_engine_loads_safe(engine)
    ok = tmp_path / "ok.pt"
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8"}, ok)
    assert torch.equal(engine.checkpoint_engine.load(str(ok))["module"]["w"], torch.ones(2))
    evil = tmp_path / "evil.pt"
    torch.save({"module": {}, "payload": argparse.Namespace(cmd="rm -rf /")}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt: cannot be loaded safely"):
        engine.checkpoint_engine.load(str(evil))


def test_choose_refuses_fresh_start_over_old_checkpoints(tmp_path, monkeypatch):
    """resume=none among old checkpoints is refused (a later resume=auto would pick them up)."""
    import torch.distributed as dist

    from tests.train.helpers import free_port
    from train import checkpointer

    for k, v in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo")
    try:
        assert checkpointer.choose(tmp_path, "none", "sha256", 0) is None
        good = fake_checkpoint(tmp_path, 4)
        with pytest.raises(CheckpointError, match="resume=none but .* step_00000004"):
            checkpointer.choose(tmp_path, "none", "sha256", 0)
        assert checkpointer.choose(tmp_path, "auto", "sha256", 0) == good
        (good / "model.pt").write_bytes(b"")
        with pytest.raises(CheckpointError, match=r"model\.pt: size 0 bytes"):
            checkpointer.choose(tmp_path, str(good), "sha256", 0)
    finally:
        dist.destroy_process_group()

"""Fault injection: preemption signals, NaN/Inf, kill -9 of a rank or during a save,
corrupted checkpoints and failing writes. Each fault must lose nothing: resumed runs
match an uninterrupted one bitwise (fp32 on CPU, same machine, so tolerance zero)."""

from __future__ import annotations

import json
import math
import resource
import signal
import subprocess

import pytest
import torch

from tests.train.helpers import (
    base_overrides,
    losses,
    metrics,
    model_states,
    start,
    train,
    wait_for_step,
    weights,
    worker_pid,
)
from train.checkpoint import verify


def test_sigterm_to_one_rank_saves_and_resumes(dataset, tmp_path):
    """SIGTERM reaches only rank 1: both ranks stop after the same step, save, exit 0; resume continues."""
    ov = base_overrides(dataset, tmp_path, "pre") + ["train.max_steps=1000", "schedule.total_steps=1000",
                                                    "checkpoint.every_steps=0", "train.val_every=0"]
    run = tmp_path / "runs" / "pre"
    p = start(ov, nproc=2)
    try:
        wait_for_step(run, 2, p)
        import os

        os.kill(worker_pid(p.pid, 1), signal.SIGTERM)
        out, _ = p.communicate(timeout=180)
    finally:
        p.kill()
    assert p.returncode == 0, out[-4000:]
    last = max(losses(run))
    assert "stop requested by signal" in out
    assert (run / "checkpoints" / "latest").read_text() == f"step_{last:08d}"
    verify(run / "checkpoints" / f"step_{last:08d}")
    state = json.loads((run / "checkpoints" / f"step_{last:08d}" / "trainer_state.json").read_text())
    assert state["step"] == last
    p2 = train([*ov[:-4], f"train.max_steps={last + 1}", "schedule.total_steps=1000", "train.val_every=0"], nproc=2)
    assert f"resumed from {run / 'checkpoints' / f'step_{last:08d}'}" in p2.stdout
    assert max(losses(run)) == last + 1


def test_nan_steps_are_skipped_and_counted(dataset, tmp_path):
    """ZeRO-0 (no DeepSpeed overflow check): NaN loss at step 3, NaN grads at step 5 are skipped;
    the weights after a skipped step equal those before it."""
    ov = base_overrides(dataset, tmp_path, "nan") + ["deepspeed=zero0", "train.max_steps=6", "train.val_every=0",
                                                    "debug.nan_loss_at_steps=[3]", "debug.nan_grad_at_steps=[5]",
                                                    "checkpoint.every_steps=1", "checkpoint.keep_last=10",
                                                    "checkpoint.export_at_end=false"]
    train(ov)
    run = tmp_path / "runs" / "nan"
    m = {r["step"]: r for r in metrics(run)}
    assert m[3]["train/loss"] is None and m[5]["train/loss"] is None
    assert m[6]["train/skipped_steps"] == 2 and math.isfinite(m[6]["train/loss"])
    ck = run / "checkpoints"
    for skipped in (3, 5):
        before, after = model_states(ck / f"step_{skipped - 1:08d}"), model_states(ck / f"step_{skipped:08d}")
        assert all(torch.equal(before[k], after[k]) for k in before)
    moved = model_states(ck / "step_00000006")
    assert not all(torch.equal(moved[k], after[k]) for k in moved)


def test_consecutive_nan_stops_with_step(dataset, tmp_path):
    ov = base_overrides(dataset, tmp_path, "nan3") + ["train.max_steps=8", "debug.nan_loss_at_steps=[2,3,4]",
                                                     "train.max_consecutive_nonfinite=3", "train.val_every=0"]
    p = train(ov, check=False)
    assert p.returncode == 4, p.stdout[-3000:]
    assert "3 consecutive steps (2..4)" in p.stdout and "stopping at step 4" in p.stdout


# ---------------------------------------------------------------------- slow: kills and corruption


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted single-process 12-step run with checkpoints at 4, 8, 12."""
    out = tmp_path_factory.mktemp("ref")
    train(base_overrides(dataset, out, "ref") + ["train.max_steps=12", "schedule.total_steps=12",
                                                 "checkpoint.keep_last=3"])
    return out / "runs" / "ref"


def _same_run(a, b, steps):
    la, lb = losses(a), losses(b)
    assert [la[s] for s in steps] == [lb[s] for s in steps]
    wa, wb = weights(a / "export"), weights(b / "export")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_kill9_during_save_never_used(dataset, tmp_path, reference):
    ov = base_overrides(dataset, tmp_path, "k") + ["train.max_steps=12", "schedule.total_steps=12",
                                                  "checkpoint.keep_last=3"]
    run = tmp_path / "runs" / "k"
    p = train([*ov, "debug.kill_in_save_at_step=8"], check=False)
    assert p.returncode == -signal.SIGKILL
    ck = run / "checkpoints"
    assert (ck / ".tmp-step_00000008").is_dir() and not (ck / "step_00000008").exists()
    assert (ck / "latest").read_text() == "step_00000004"
    p2 = train(ov)
    assert f"resumed from {ck / 'step_00000004'}" in p2.stdout
    assert not (ck / ".tmp-step_00000008").exists()
    _same_run(reference, run, range(1, 13))


@pytest.mark.slow
def test_corrupt_checkpoint_falls_back_and_names_file(dataset, tmp_path, reference):
    import shutil

    run = tmp_path / "runs" / "c"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    bad = run / "checkpoints" / "step_00000012" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the checksum can tell
    bad.write_bytes(bytes(data))
    ov = base_overrides(dataset, tmp_path, "c") + ["train.max_steps=12", "schedule.total_steps=12"]
    p = train(ov)
    assert "checkpoint step_00000012 rejected, falling back" in p.stdout and str(bad) in p.stdout
    assert f"resumed from {run / 'checkpoints' / 'step_00000008'}" in p.stdout
    _same_run(reference, run, range(9, 13))
    # An explicitly chosen, truncated checkpoint is an error naming the file, not a fallback.
    trunc = run / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt"
    trunc.write_bytes(trunc.read_bytes()[:100])
    p = train([*ov, "resume=" + str(trunc.parent), "run_name=c2"], check=False)
    assert p.returncode == 5 and str(trunc) in p.stdout and "truncated" in p.stdout, p.stdout[-3000:]


@pytest.mark.slow
def test_checkpoint_from_other_model_refused(dataset, tmp_path, reference):
    ov = base_overrides(dataset, tmp_path, "m") + ["model.hidden_size=128", "model.max_seq_len=256",
                                                  f"resume={reference / 'checkpoints' / 'step_00000012'}"]
    p = train(ov, check=False)
    assert p.returncode == 5, p.stdout[-3000:]
    assert "different model config" in p.stdout and "model.hidden_size: 64 -> 128" in p.stdout


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # a "full disk" for checkpoint files


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_write_failure_keeps_previous_checkpoint(dataset, tmp_path, policy):
    ov = base_overrides(dataset, tmp_path, "w") + ["train.max_steps=4", "schedule.total_steps=8",
                                                  "checkpoint.export_at_end=false", "train.val_every=0"]
    train(ov)
    ck = tmp_path / "runs" / "w" / "checkpoints"
    ov2 = [*ov[:-4], "train.max_steps=8", "schedule.total_steps=8", "checkpoint.export_at_end=false",
           "train.val_every=0", f"checkpoint.on_save_error={policy}"]
    p = train(ov2, check=False, preexec_fn=_limit_file_size)
    assert "checkpoint at step 8 NOT saved" in p.stdout, p.stdout[-3000:]
    assert p.returncode == (3 if policy == "stop" else 0), p.stdout[-3000:]
    verify(ck / "step_00000004")
    assert (ck / "latest").read_text() == "step_00000004"
    assert not (ck / "step_00000008").exists() and not list(ck.glob(".tmp-*"))
    assert max(losses(tmp_path / "runs" / "w")) == 8


@pytest.mark.slow
def test_kill9_one_rank_then_resume_is_exact(dataset, tmp_path):
    """kill -9 of rank 1 mid-run: the job ends (torchrun tears down rank 0) within the timeout;
    resume=auto then ends bitwise where an uninterrupted two-rank run ends."""
    steps = 24
    common = ["train.max_steps=%d" % steps, "schedule.total_steps=%d" % steps, "checkpoint.every_steps=4",
              "train.val_every=0"]
    train(base_overrides(dataset, tmp_path, "ref2") + common, nproc=2)
    ov = base_overrides(dataset, tmp_path, "k9") + common
    run = tmp_path / "runs" / "k9"
    p = start(ov, nproc=2)
    try:
        wait_for_step(run, 6, p)
        import os

        os.kill(worker_pid(p.pid, 1), signal.SIGKILL)
        p.communicate(timeout=120)  # TimeoutExpired (a hang) fails the test
    except subprocess.TimeoutExpired:
        pytest.fail("job did not stop within 120 s after kill -9 of one rank")
    finally:
        p.kill()
    assert p.returncode != 0
    assert max(losses(run)) < steps
    train(ov, nproc=2)
    _same_run(tmp_path / "runs" / "ref2", run, range(1, steps + 1))


@pytest.mark.slow
def test_multirun_nsa_and_full_share_data_order(dataset, tmp_path):
    """``-m attention=nsa,full``: two runs in one process, same seed and batches, one wandb group."""
    ov = [o for o in base_overrides(dataset, tmp_path) if not o.startswith("run_name=")]
    train(["-m", *ov, "name=cmp", "attention=nsa,full", "train.max_steps=3", "train.val_every=0",
           "logging.wandb.enabled=true"])
    runs = {k: tmp_path / "runs" / f"cmp-{k}" for k in ("nsa", "full")}
    tok = {k: [r["train/tokens"] for r in metrics(v)] for k, v in runs.items()}
    assert tok["nsa"] == tok["full"] and len(tok["nsa"]) == 3
    for kind, run in runs.items():
        meta = next((run / "wandb").glob("offline-run-*"))
        assert meta.is_dir()
        cfg = (run / "config.yaml").read_text()
        assert f"kind: {kind}" in cfg and "name: cmp" in cfg

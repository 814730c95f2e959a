"""Two ranks under torchrun, ZeRO-1/2/3, on a tiny fp32 model on CPU (gloo).

The uninterrupted 8-step runs are shared (module fixture) by the loss, data and
resume tests. Resume exactness is bitwise: the same fp32 ops in the same order on
the same machine, with optimizer state, RNG and data position restored, must give
identical losses and weights, so the tolerance is zero.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.helpers import base_overrides, losses, train, weights

STEPS = 8


@pytest.fixture(scope="module")
def full_runs(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    runs = {}
    for stage in (1, 2, 3):
        name = f"z{stage}"
        extra = ["logging.wandb.enabled=true"] if stage == 1 else []
        train(base_overrides(dataset, out, name) + [f"deepspeed=zero{stage}", f"train.max_steps={STEPS}",
                                                    f"schedule.total_steps={STEPS}", *extra], nproc=2)
        runs[stage] = out / "runs" / name
    return runs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_loss_decreases(full_runs, stage):
    run = full_runs[stage]
    curve = losses(run)
    assert sorted(curve) == list(range(1, STEPS + 1))
    first, last = sum(curve[s] for s in (1, 2)) / 2, sum(curve[s] for s in (STEPS - 1, STEPS)) / 2
    assert last < first - 0.2, curve  # ~0.6 nats drop in practice; 0.2 leaves room for seeds
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 2 * 2 * 2
    assert (run / "export" / "model.safetensors").is_file() and (run / "export" / "tokenizer.model").is_file()
    for f in ("config.yaml", "git_commit.txt", "pip_freeze.txt"):
        assert (run / f).is_file()


def test_stages_agree_on_weights(full_runs):
    """ZeRO partitions state, not maths: after 8 steps the weights agree across stages up to
    fp32 reduction-order noise (relative error ~1e-6; 1e-4 is far below a real divergence)."""
    ref = weights(full_runs[1] / "export")
    for stage in (2, 3):
        w = weights(full_runs[stage] / "export")
        assert w.keys() == ref.keys()
        for k in ref:
            rel = (w[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)
            assert rel < 1e-4, (stage, k, float(rel))


def test_ranks_see_different_data(dataset):
    """The trainer's loader wiring gives each rank its own rows (disjoint within a step)."""
    from tests.train.test_config import tiny
    from train.trainer import build_loader

    cfg = tiny(data_dir=dataset)
    b0 = next(iter(build_loader(cfg, dataset, "train", 0, 2, 4096)))
    b1 = next(iter(build_loader(cfg, dataset, "train", 1, 2, 4096)))
    assert b0["input_ids"].shape == b1["input_ids"].shape == (2, 64)
    assert not torch.equal(b0["input_ids"], b1["input_ids"])


def test_resume_is_bitwise_exact(full_runs, dataset, tmp_path):
    """A new process resuming the ZeRO-2 run's step-4 checkpoint reproduces steps 5..8 exactly."""
    full = full_runs[2]
    ckpt = full / "checkpoints" / "step_00000004"
    train(base_overrides(dataset, tmp_path, "resumed") + ["deepspeed=zero2", f"train.max_steps={STEPS}",
                                                          f"schedule.total_steps={STEPS}", f"resume={ckpt}"],
          nproc=2)
    resumed = tmp_path / "runs" / "resumed"
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(5, STEPS + 1))
    assert [a[s] for s in range(5, STEPS + 1)] == [b[s] for s in range(5, STEPS + 1)]
    wa, wb = weights(full / "export"), weights(resumed / "export")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_no_secret_written(full_runs, tmp_path):
    """The ZeRO-1 run had wandb on (offline); its run dir holds a wandb run and no API key."""
    run = full_runs[1]
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run missing"
    state = json.loads((run / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["wandb_id"]
    for p in run.rglob("*"):
        if p.is_file():
            assert b"sk-test-not-a-real-key" not in p.read_bytes(), p


def test_zero3_trains_nsa_with_the_selection_distillation(dataset, tmp_path):
    """ZeRO-3 gathers each module's parameters with collectives in forward and backward, so every
    rank must run the same graph. A rank whose rows hold no query with blocks to rank once gave the
    distillation no backward through phi while the other rank had one: gloo aborted on mismatched
    collectives. Small NSA blocks so that 64-token rows have free blocks on some ranks only."""
    nsa = ["attention=nsa", "attention.block_len=8", "attention.stride=4", "attention.select_len=16",
           "attention.num_select=4", "attention.num_local=1", "attention.window=16", "attention.select_distill=0.1"]
    train(base_overrides(dataset, tmp_path, "z3nsa") + ["deepspeed=zero3", "train.max_steps=3",
                                                        "schedule.total_steps=3", "train.val_every=0", *nsa], nproc=2)
    rows = [json.loads(x) for x in (tmp_path / "runs" / "z3nsa" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
    assert any(r["nsa/select_kl"] > 0 for r in rows)

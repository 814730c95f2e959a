"""Tokens a training stage never sees: why no probe model could copy a passkey.

The retrieval probe's stage 1 trains on word-only associative recall, so the ten digit tokens of
a passkey never occur in it (nor do 3,698 of the 4,096 token ids). With the output head tied to
the embedding, every step's softmax pushes each absent token's logit down a little, and Adam
normalises that small, always-same-sign gradient into a full-size step: the absent rows all move
along one shared direction. After the probe's two stages the digits' embeddings had a pairwise
cosine of 0.99 (one vector), so no model could tell the digits apart and passkeys stayed at
chance (0.11 per digit) while the same models copied words at 0.99. Changing stage 1 did not
help (an untied head, or rows frozen there: neither formed the look-up by step 4000), so stage 2
re-draws the rows of the ids stage 1 never saw (``train.init_redraw_unseen_embeddings``).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.train.helpers import base_overrides, train, weights
from tests.train.test_learns_copy import _batch
from train.model import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _tiny():
    cfg = yaml.safe_load((CONFIGS / "model/tiny.yaml").read_text())
    cfg["embed_init_std"] = 0.088  # the probe's
    return build_model(cfg, yaml.safe_load((CONFIGS / "attention/full.yaml").read_text()))


def _train_on_copies(steps: int = 50):
    """Copies of 386 symbols (the probe's optimiser: AdamW 2e-3, no decay); returns the model, the
    embedding before, and the ids of 50 tokens never in the data."""
    torch.manual_seed(0)
    model = _tiny()
    symbols = random.Random(7).sample(range(10, 4096), 386)
    absent = [i for i in range(10, 4096) if i not in set(symbols)][:50]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    before = model.embed.weight.detach().clone()
    rng = random.Random(1)
    for _ in range(steps):
        ids, labels, _ = _batch(rng, symbols)
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, before, absent


def _mean_pairwise_cosine(rows: torch.Tensor) -> float:
    unit = rows / rows.norm(dim=1, keepdim=True)
    n = rows.shape[0]
    return ((unit @ unit.T).sum().item() - n) / (n * n - n)


def test_tied_head_drives_absent_tokens_together_and_a_redraw_undoes_it():
    """The mechanism: tied, the absent rows move and converge (cosine 0.002 at init, ~0.19 after
    50 steps here; 0.99 after the probe's 7000). Re-drawn, they are apart again, at the init's
    scale, and no other row changes."""
    model, before, absent = _train_on_copies()
    w = model.embed.weight.detach()
    assert _mean_pairwise_cosine(before[absent]) < 0.02
    assert _mean_pairwise_cosine(w[absent]) > 0.1
    trained = w.clone()
    rows = torch.zeros(4096, dtype=torch.bool)
    rows[absent] = True
    model.redraw_token_rows(rows, torch.Generator().manual_seed(0))
    w = model.embed.weight.detach()
    assert _mean_pairwise_cosine(w[absent]) < 0.05
    assert abs(w[absent].std().item() - 0.088) < 0.01
    assert torch.equal(w[~rows], trained[~rows])


def test_redraw_token_rows_checks_its_mask():
    model = _tiny()
    with pytest.raises(ValueError, match="bool tensor of shape"):
        model.redraw_token_rows(torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        model.redraw_token_rows(torch.zeros(4096))


def test_token_counts(tmp_path):
    from data.shards import Shard, token_counts, write_shard

    write_shard(tmp_path / "a.bin", [np.array([1, 2, 2, 5]), np.array([5, 5])], 8)
    write_shard(tmp_path / "b.bin", [np.array([7])], 8)
    shards = [Shard(tmp_path / "a.bin"), Shard(tmp_path / "b.bin")]
    assert token_counts(shards, 8, chunk=3).tolist() == [0, 1, 2, 0, 0, 3, 0, 1]


def test_second_stage_redraws_the_ids_absent_from_the_first_stages_data(dataset, tmp_path):
    """train.init_redraw_unseen_embeddings: the second stage starts from the first's weights but for
    the rows of ids that never occur in the first stage's training shards, which are new draws. The
    first stage, from scratch, sets the flag too (as compare_small run by hand does): it says the flag
    has no effect there instead of passing over it in silence."""
    from data.shards import Shard, token_counts

    first = base_overrides(dataset, tmp_path, "stage1") + [
        "train.max_steps=2", "train.val_every=0", "train.init_redraw_unseen_embeddings=true"]
    p1 = train(first)
    assert "init_redraw_unseen_embeddings has no effect without train.init_from" in p1.stdout
    assert "re-drawn" not in p1.stdout
    run1 = tmp_path / "runs" / "stage1"
    # learning rate 1e-12: the second stage's export is what it started from (as test_init_from)
    second = base_overrides(dataset, tmp_path, "stage2") + [
        "train.max_steps=1", f"train.init_from={run1}", "train.init_redraw_unseen_embeddings=true",
        "optim.lr=1e-12", "schedule.warmup_steps=0", "train.val_every=0", "checkpoint.every_steps=1"]
    p = train(second)
    w1, w2 = weights(run1 / "export")["embed.weight"], weights(tmp_path / "runs" / "stage2" / "export")["embed.weight"]
    unseen = torch.from_numpy(token_counts([Shard(dataset / "train-00000.bin")], w1.shape[0]) == 0)
    assert 0 < int(unseen.sum()) < unseen.numel()
    assert f"embedding rows of {int(unseen.sum())} of {unseen.numel()} token ids re-drawn" in p.stdout
    assert float((w1[~unseen] - w2[~unseen]).abs().max()) < 1e-9
    assert float((w1[unseen] - w2[unseen]).abs().min()) > 0


def test_init_redraw_needs_the_source_runs_config(dataset, tmp_path):
    first = base_overrides(dataset, tmp_path, "stage1") + ["train.max_steps=2", "train.val_every=0"]
    train(first)
    (tmp_path / "runs" / "stage1" / "config.yaml").unlink()
    p = train(base_overrides(dataset, tmp_path, "stage2") + [
        "train.max_steps=2", f"train.init_from={tmp_path / 'runs' / 'stage1'}",
        "train.init_redraw_unseen_embeddings=true"], check=False)
    assert p.returncode != 0 and "no config.yaml" in p.stdout


def test_probe_stage_2_redraws_what_stage_1_never_saw():
    cfg = yaml.safe_load((CONFIGS / "experiment/retrieval_probe.yaml").read_text())
    assert cfg["train"]["init_redraw_unseen_embeddings"] is True

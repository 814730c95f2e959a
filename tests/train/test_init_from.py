"""train.init_from: a run that starts from another run's exported weights (a curriculum stage,
a context extension) and not from a random init; a resumed run keeps its own checkpoint."""

from __future__ import annotations

from tests.train.helpers import base_overrides, losses, train, weights


def test_second_stage_starts_from_the_first_stages_weights(dataset, tmp_path):
    first = base_overrides(dataset, tmp_path, "stage1") + ["train.max_steps=4"]
    train(first)
    run1 = tmp_path / "runs" / "stage1"
    # learning rate 1e-12 (no warm-up): each Adam step moves a weight by ~1e-12, so the second
    # stage's export is what it started from to 1e-9 (a random init differs by ~1e-2)
    second = base_overrides(dataset, tmp_path, "stage2") + [
        "train.max_steps=2", f"train.init_from={run1}", "optim.lr=1e-12", "schedule.warmup_steps=0",
        "train.val_every=0", "checkpoint.every_steps=2"]
    p = train(second)
    assert f"weights initialised from {run1 / 'export'}" in p.stdout
    w1, w2 = weights(run1 / "export"), weights(tmp_path / "runs" / "stage2" / "export")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-9
    # its loss starts where the first stage ended, far below a random init's
    scratch = base_overrides(dataset, tmp_path, "scratch") + ["train.max_steps=1", "train.val_every=0", "schedule.warmup_steps=0"]
    train(scratch)
    assert losses(tmp_path / "runs" / "stage2")[1] < losses(tmp_path / "runs" / "scratch")[1] - 0.5


def test_init_from_must_be_an_export(dataset, tmp_path):
    p = train(base_overrides(dataset, tmp_path, "bad") + [f"train.init_from={tmp_path}"], check=False)
    assert p.returncode == 2 and "train.init_from" in p.stdout and "not an export folder" in p.stdout


def test_init_reset_gates_restarts_the_named_nsa_gates(dataset, tmp_path):
    """train.init_reset_gates=[cmp]: an NSA stage 2 starts from stage 1's weights except the
    compressed branch's gates, which restart at attention.gate_init (weight 0, bias its logit, in
    every layer and head); the selected and window gates keep what stage 1 learnt."""
    nsa = ["attention=nsa", "attention.backend=torch"]
    train(base_overrides(dataset, tmp_path, "stage1") + nsa + ["train.max_steps=4", "train.val_every=0"])
    run1 = tmp_path / "runs" / "stage1"
    p = train(base_overrides(dataset, tmp_path, "stage2") + nsa + [
        "train.max_steps=1", f"train.init_from={run1}", "train.init_reset_gates=[cmp]", "attention.gate_init.cmp=0.5",
        "optim.lr=1e-12", "schedule.warmup_steps=0", "train.val_every=0", "checkpoint.every_steps=1"])
    assert "NSA gates of ['cmp'] restarted at attention.gate_init" in p.stdout
    w1, w2 = weights(run1 / "export"), weights(tmp_path / "runs" / "stage2" / "export")
    gates = [k for k in w1 if k.endswith("gate_proj.bias")]
    assert gates
    for k in gates:
        wk = k[: -len("bias")] + "weight"
        assert float(w2[k][0::3].abs().max()) < 1e-9 and float(w2[wk][0::3].abs().max()) < 1e-9  # logit(0.5) = 0
        assert float(w1[k][0::3].abs().min()) > 0.1  # stage 1's came from logit(0.05)
        for j in (1, 2):
            assert float((w1[k][j::3] - w2[k][j::3]).abs().max()) < 1e-9
            assert float((w1[wk][j::3] - w2[wk][j::3]).abs().max()) < 1e-9
    rest = [k for k in w1 if "gate_proj" not in k]
    assert max(float((w1[k] - w2[k]).abs().max()) for k in rest) < 1e-9


def test_init_reset_gates_needs_init_from_and_known_branches(dataset, tmp_path):
    p = train(base_overrides(dataset, tmp_path, "bad") + ["train.init_reset_gates=[cmp]"], check=False)
    assert p.returncode == 2 and "train.init_reset_gates" in p.stdout and "set init_from" in p.stdout
    p = train(base_overrides(dataset, tmp_path, "bad2") + [f"train.init_from={tmp_path}", "train.init_reset_gates=[dense]"],
              check=False)
    assert p.returncode == 2 and "unknown branches ['dense']" in p.stdout

"""EvalLM: checkpoint resolution, batched log-likelihood vs unbatched NLL, greedy generation."""

from pathlib import Path

import pytest
import torch

from eval.checkpoint import resolve_checkpoint, run_data_dir, run_wandb_group, run_wandb_project
from eval.lm import _dtype, cut_at_stop


def test_resolve_checkpoint(tiny_runs, tmp_path):
    run = tiny_runs["nsa"]
    a, b = resolve_checkpoint(run), resolve_checkpoint(run / "export")
    assert a.export_dir == b.export_dir == (run / "export").resolve()
    assert a.run_dir == b.run_dir == run.resolve() and a.name == b.name == "tiny-nsa"
    assert run_wandb_group(a.run_dir) == "tiny"  # logging.wandb.group is null: the experiment name
    assert run_wandb_project(a.run_dir) == "nsa-tests"
    assert run_data_dir(a.run_dir) == Path("outputs/data/no-such-data-bpe4096")
    with pytest.raises(ValueError, match="neither an export dir"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")


def test_loglikelihood_batched_equals_unbatched(tiny_lm):
    ctx1, ctx2 = tiny_lm.encode("def f(x):\n"), tiny_lm.encode("import os\nimport sys\n")
    cont1, cont2 = tiny_lm.tokenizer.encode("    return x"), tiny_lm.tokenizer.encode("print")
    batched = tiny_lm.loglikelihood([(ctx1, cont1), (ctx2, cont2)], batch_size=2)
    for (ctx, cont), (ll, greedy) in zip([(ctx1, cont1), (ctx2, cont2)], batched, strict=True):
        nll = tiny_lm.token_nll(torch.tensor([ctx + cont]))[0, len(ctx) - 1:]
        ref = -nll.sum().item()
        # right padding cannot change a causal model's logits; fp32 reductions differ by ~1e-7 relative
        assert abs(ll - ref) / abs(ref) < 1e-5
        assert isinstance(greedy, bool)
    with pytest.raises(ValueError, match="non-empty continuation"):
        tiny_lm.loglikelihood([(ctx1, [])])


def test_greedy_generate_matches_argmax(tiny_lm):
    prompt = tiny_lm.encode("class A:\n")
    ids = tiny_lm.generate_ids([prompt], 4, stop_ids=[])[0]
    seq = list(prompt)
    for _ in range(4):  # greedy decoding by full forward passes
        seq.append(int(tiny_lm.logits(torch.tensor([seq]))[0, -1].argmax()))
    assert ids == seq[len(prompt):]
    texts = tiny_lm.generate([prompt, prompt[:3]], 4, batch_size=2)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_cut_at_stop_and_dtype_errors():
    assert cut_at_stop("abc\ndef", ["\n"]) == "abc"
    assert cut_at_stop("abc", ["x", ""]) == "abc"
    with pytest.raises(ValueError, match="unknown dtype"):
        _dtype("float8")
    assert _dtype("bf16") is torch.bfloat16


def test_checkpoint_without_tokenizer_is_refused(tiny_runs, tmp_path):
    import shutil

    from eval.lm import EvalLM

    export = resolve_checkpoint(tiny_runs["full"]).export_dir
    bare = tmp_path / "export"
    shutil.copytree(export, bare)
    (bare / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match="lacks tokenizer.model"):  # refused before any model is built
        EvalLM.from_checkpoint(bare)


def test_attention_overrides_change_weight_free_nsa_settings_only(tiny_runs):
    """``attention`` overrides at load (``python -m eval ... +attention.num_select=16``): every NSA
    layer reads the new setting; the outputs change only through it (the default-n model and an
    n=all model agree while every block is selected anyway); weight-changing keys and full
    attention are refused."""
    import pytest

    from eval.lm import EvalLM

    base = EvalLM.from_checkpoint(tiny_runs["nsa"])
    n = base.model.attn_cfg.num_select
    more = EvalLM.from_checkpoint(tiny_runs["nsa"], attention={"num_select": n + 4})
    assert more.model.attn_cfg.num_select == n + 4
    from nsa.layer import NSAAttention

    layers = [m for m in more.model.modules() if isinstance(m, NSAAttention)]
    assert layers and all(m.cfg.num_select == n + 4 for m in layers)
    sel = base.model.attn_cfg.select_len
    short = torch.randint(5, 90, (1, sel * (n - 1)))  # fewer blocks than n: selection is not a choice
    long = torch.randint(5, 90, (1, sel * (n + 4)))
    with torch.no_grad():
        assert torch.equal(base.model(short).logits, more.model(short).logits)
        assert not torch.equal(base.model(long).logits, more.model(long).logits)
    with pytest.raises(ValueError, match="block_len"):
        EvalLM.from_checkpoint(tiny_runs["nsa"], attention={"block_len": 8})
    with pytest.raises(ValueError, match="NSA model"):
        EvalLM.from_checkpoint(tiny_runs["full"], attention={"num_select": 4})

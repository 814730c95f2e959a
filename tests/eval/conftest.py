"""Session fixtures: a tiny tokenizer trained here and tiny random checkpoints (full and NSA)
saved with ``save_pretrained``, laid out as training run dirs (export/, metrics.jsonl, config.yaml)."""

import json
import sysconfig
from pathlib import Path

import pytest

STDLIB_FILES = ("textwrap.py", "string.py", "bisect.py", "colorsys.py")


@pytest.fixture(scope="session")
def tiny_tokenizer_file(tmp_path_factory):
    from data.tokenizer import train_tokenizer

    texts = [Path(sysconfig.get_paths()["stdlib"], f).read_text() for f in STDLIB_FILES]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(texts, path, vocab_size=512, input_sentence_size=300)
    return path


def _make_run(root: Path, kind: str, tok_file: Path) -> Path:
    import torch

    from train.model import AttentionConfig, ModelConfig, build_model, save_pretrained

    mc = ModelConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim_k=16, head_dim_v=16, intermediate_size=64, max_seq_len=512)
    ac = AttentionConfig(kind=kind, block_len=16, stride=8, select_len=16, num_select=4, num_init=1,
                         num_local=2, window=32, backend="torch")
    torch.manual_seed(0)
    model = build_model(mc, ac)
    run = root / f"tiny-{kind}"
    save_pretrained(model, run / "export", mc, ac, tok_file)
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 11):
            row = {"step": step, "train/loss": 6.0 - 0.2 * step + (0.1 if kind == "full" else 0.0),
                   "perf/tokens_per_sec": 1000.0 + (100 if kind == "nsa" else 0)}
            if step % 5 == 0:
                row["val/loss"] = 6.1 - 0.2 * step
            f.write(json.dumps(row) + "\n")
    (run / "config.yaml").write_text(
        f"name: tiny\nrun_name: tiny-{kind}\nlogging:\n  wandb:\n    group: null\n    project: nsa-tests\n"
        "data:\n  name: no-such-data\n  out_dir: null\ntokenizer:\n  name: bpe4096\n")
    return run


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_tokenizer_file):
    """{'full': run_dir, 'nsa': run_dir}, random weights, max_seq_len 512."""
    root = tmp_path_factory.mktemp("runs")
    return {kind: _make_run(root, kind, tiny_tokenizer_file) for kind in ("full", "nsa")}


@pytest.fixture(scope="session")
def tiny_lm(tiny_runs):
    from eval.lm import EvalLM

    return EvalLM.from_checkpoint(tiny_runs["nsa"])

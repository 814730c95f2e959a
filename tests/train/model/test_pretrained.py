"""save_pretrained / load_pretrained round trip and errors."""

import json

import pytest
import torch

from train.model import build_model, load_pretrained, save_pretrained

from .helpers import attn_cfg, model_cfg


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A real (tiny) SentencePiece model, trained in about a second by data.tokenizer."""
    from data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tok.model"
    text = "the quick brown fox jumps over the lazy dog. " * 40 + "pack my box with five dozen liquor jugs\n"
    train_tokenizer([text] * 4, path, vocab_size=300)
    return path


@pytest.mark.parametrize("kind, mlp", [("full", "moe"), ("nsa", "swiglu")])
def test_round_trip(tmp_path, tokenizer_file, kind, mlp):
    torch.manual_seed(0)
    cfg, acfg = model_cfg(mlp, tie_embeddings=True), attn_cfg(kind)
    model = build_model(cfg, acfg).eval()
    if mlp == "moe":
        model.layers[1].mlp.expert_bias.fill_(0.25)  # a buffer must survive too
    out = save_pretrained(model, tmp_path / "export", cfg, acfg, tokenizer_file=tokenizer_file)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    loaded, tokenizer = load_pretrained(out)
    assert tokenizer.decode(tokenizer.encode("the lazy fox")) == "the lazy fox" and not loaded.training
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.cfg == cfg and loaded.attn_cfg == acfg


def test_dtype_and_no_tokenizer(tmp_path):
    cfg, acfg = model_cfg(), attn_cfg("full")
    save_pretrained(build_model(cfg, acfg), tmp_path, cfg, acfg)
    model, tok = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert tok is None and model.embed.weight.dtype == torch.bfloat16


def test_errors(tmp_path):
    cfg, acfg = model_cfg(), attn_cfg("full")
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(tmp_path)
    save_pretrained(build_model(cfg, acfg), tmp_path, cfg, acfg)
    data = json.loads((tmp_path / "config.json").read_text())
    data["model"]["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="shape mismatch.*mlp.up_proj"):
        load_pretrained(tmp_path)
    data["model"]["intermediate_size"], data["model"]["num_layers"] = 96, 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing keys"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizer_file"):
        save_pretrained(build_model(cfg, acfg), tmp_path, cfg, acfg, tokenizer_file=tmp_path / "nope")


def test_load_weights_starts_a_run_from_an_export(tmp_path):
    """train.init_from: the weights of an export (or its run dir) go into a freshly built model;
    context settings may change (a model trained short can be extended), anything that changes
    what a weight means may not."""
    from dataclasses import replace

    from train.model.pretrained import load_weights, resolve_export

    torch.manual_seed(0)
    cfg, acfg = model_cfg(), attn_cfg("nsa")
    src = build_model(cfg, acfg)
    save_pretrained(src, tmp_path / "run" / "export", cfg, acfg)
    longer = replace(cfg, max_seq_len=4 * cfg.max_seq_len, rope_theta=5e5, init_std=0.1)
    dst = build_model(longer, acfg)
    assert resolve_export(tmp_path / "run") == tmp_path / "run" / "export"
    load_weights(dst, tmp_path / "run", longer, acfg)
    for (name, a), b in zip(dst.state_dict().items(), src.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    distilled = replace(acfg, select_distill=0.1, num_select=4)  # a training loss (and a sparsity), not what a weight means
    load_weights(build_model(cfg, distilled), tmp_path / "run", cfg, distilled)
    with pytest.raises(ValueError, match="differs from this run's in hidden_size"):
        load_weights(build_model(replace(cfg, hidden_size=32), acfg), tmp_path / "run",
                     replace(cfg, hidden_size=32), acfg)
    with pytest.raises(ValueError, match="attention.kind"):
        load_weights(build_model(cfg, attn_cfg("full")), tmp_path / "run", cfg, attn_cfg("full"))
    with pytest.raises(ValueError, match="not an export folder"):
        resolve_export(tmp_path)


def test_export_from_before_gate_scale_loads_at_scale_one(tmp_path):
    """An NSA export written before ``gate_weight_scale`` existed (no such key in config.json) had its
    gate weights trained at scale 1; it loads so, with the same outputs as a model built so."""
    torch.manual_seed(0)
    cfg, acfg = model_cfg(), attn_cfg("nsa")
    acfg.gate_weight_scale = 1.0
    model = build_model(cfg, acfg).eval()
    with torch.no_grad():
        for block in model.layers:
            block.attn.gate_proj.weight.normal_(std=0.3)
    save_pretrained(model, tmp_path, cfg, acfg)
    data = json.loads((tmp_path / "config.json").read_text())
    del data["attention"]["gate_weight_scale"], data["attention"]["gate_init"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded, _ = load_pretrained(tmp_path)
    assert loaded.attn_cfg.gate_weight_scale == 1.0
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_load_weights_settings_that_do_not_change_weights(tmp_path):
    """A full-attention export loads whatever its (unused) NSA settings say, also one written before
    the gate settings existed (no keys in config.json); an NSA export loads with another gate_init
    (an init value) or reading budget, not with other blocks or another gate_weight_scale, nor, when old,
    at the new default scale."""
    from dataclasses import replace

    from train.model.pretrained import load_weights

    cfg = model_cfg()
    full = attn_cfg("full")
    save_pretrained(build_model(cfg, full), tmp_path / "full", cfg, full)
    data = json.loads((tmp_path / "full" / "config.json").read_text())
    del data["attention"]["gate_weight_scale"], data["attention"]["gate_init"]
    data["attention"]["num_select"] = 3
    (tmp_path / "full" / "config.json").write_text(json.dumps(data))
    load_weights(build_model(cfg, full), tmp_path / "full", cfg, full)

    nsa = attn_cfg("nsa")
    save_pretrained(build_model(cfg, nsa), tmp_path / "nsa", cfg, nsa)
    other_init = replace(nsa, gate_init={"cmp": 0.5, "slc": 0.5, "win": 0.5})
    load_weights(build_model(cfg, other_init), tmp_path / "nsa", cfg, other_init)
    # the reading budget (blocks selected, forced, window) may change between stages; the blocks may not
    wider = replace(nsa, num_select=nsa.num_select + 2, num_local=1, window=2 * nsa.window)
    load_weights(build_model(cfg, wider), tmp_path / "nsa", cfg, wider)
    for k in ("select_len", "block_len"):
        other = replace(nsa, **{k: 2 * getattr(nsa, k)})
        with pytest.raises(ValueError, match=f"attention.{k}"):
            load_weights(build_model(cfg, other), tmp_path / "nsa", cfg, other)
    with pytest.raises(ValueError, match="attention.gate_weight_scale"):
        load_weights(build_model(cfg, replace(nsa, gate_weight_scale=1.0)), tmp_path / "nsa", cfg,
                     replace(nsa, gate_weight_scale=1.0))
    data = json.loads((tmp_path / "nsa" / "config.json").read_text())
    del data["attention"]["gate_weight_scale"]
    (tmp_path / "nsa" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="attention.gate_weight_scale"):
        load_weights(build_model(cfg, nsa), tmp_path / "nsa", cfg, nsa)

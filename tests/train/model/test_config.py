"""Config validation: one clear ValueError per problem; the YAML configs load and validate."""

from pathlib import Path

import pytest
import yaml

from train.model import AttentionConfig, ModelConfig, MoEConfig

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.mark.parametrize("name", ["tiny", "tiny_moe", "125m", "350m", "1b", "paper_27b"])
def test_model_yaml_loads_and_validates(name):
    cfg = ModelConfig.from_dict(yaml.safe_load((CONFIGS / "model" / f"{name}.yaml").read_text()))
    cfg.validate()
    assert isinstance(cfg.moe, MoEConfig)


@pytest.mark.parametrize("name", ["full", "nsa", "nsa_small"])
def test_attention_yaml_loads_and_validates(name):
    AttentionConfig.from_dict(yaml.safe_load((CONFIGS / "attention" / f"{name}.yaml").read_text())).validate()


def test_paper_nsa_settings():
    cfg = AttentionConfig.from_dict(yaml.safe_load((CONFIGS / "attention" / "nsa.yaml").read_text()))
    assert (cfg.block_len, cfg.stride, cfg.select_len, cfg.num_select, cfg.num_init, cfg.num_local,
            cfg.window) == (32, 16, 64, 16, 1, 2, 512)
    # gates: nsa.yaml gives them explicitly, and the same values as the dataclass default
    assert cfg.gate_init == AttentionConfig().gate_init == {"cmp": 0.05, "slc": 0.95, "win": 0.95}
    assert cfg.nsa_config(ModelConfig()).gate_init == (0.05, 0.95, 0.95)


@pytest.mark.parametrize("change, words", [
    (dict(num_heads=6, num_kv_heads=4), "divisible"),
    (dict(head_dim_k=15), "even"),
    (dict(mlp="relu"), "mlp"),
    (dict(first_k_dense=9, num_layers=2), "first_k_dense"),
    (dict(mlp="moe", moe=MoEConfig(top_k=9, num_experts=8)), "top_k"),
    (dict(mlp="moe", moe=MoEConfig(score_func="tanh")), "score_func"),
    (dict(mlp="moe", moe=MoEConfig(aux_loss_type="global")), "aux_loss_type"),
    (dict(mlp="moe", moe=MoEConfig(capacity_factor=0.0)), "capacity_factor"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "original_max_position_embeddings"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0, "original_max_position_embeddings": 8}), "yarn"),
])
def test_model_validate_errors(change, words):
    with pytest.raises(ValueError, match=words):
        ModelConfig(**change).validate()


@pytest.mark.parametrize("change, words", [
    (dict(kind="sparse"), "kind"),
    (dict(block_len=32, stride=12), "divide block_len"),
    (dict(block_len=32, stride=16, select_len=40), "divide select_len"),
    (dict(block_len=64, stride=16, select_len=32), "block_len"),
    (dict(num_select=2, num_init=1, num_local=2), "num_select"),
    (dict(compress="max"), "compress"),
    (dict(backend="cuda"), "backend"),
    (dict(gate_init={"cmp": 0.1, "slc": 0.9}), "gate_init"),
    (dict(gate_init={"cmp": 0.1, "slc": 0.9, "win": 1.0}), "gate_init"),
    (dict(gate_weight_scale=-1.0), "gate_weight_scale"),
    (dict(select_distill=-1.0), "select_distill"),
    (dict(select_distill=0.1, branches=["win"]), "slc branch"),
    (dict(select_distill=0.1, num_select=4), "2 freely chosen blocks"),  # compare_small's selection: one free block
])
def test_attention_validate_errors(change, words):
    with pytest.raises(ValueError, match=words):
        AttentionConfig(**{"kind": "nsa", **change}).validate()


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="hidden"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="topk"):
        ModelConfig.from_dict({"moe": {"topk": 2}})


def test_full_attention_ignores_nsa_settings():
    AttentionConfig(kind="full", stride=7).validate()

"""The models: decoder-only transformers with full or NSA attention, dense or MoE MLPs.

Imports only torch, safetensors, numpy and ``nsa`` (plus ``data.tokenizer`` lazily),
so an exported model loads on a machine without the training stack.
"""

from train.model.config import AttentionConfig, ModelConfig, MoEConfig
from train.model.pretrained import load_pretrained, save_pretrained
from train.model.transformer import ModelCache, ModelOutput, Transformer, build_model, count_parameters

__all__ = [
    "AttentionConfig", "ModelConfig", "MoEConfig", "ModelCache", "ModelOutput", "Transformer",
    "build_model", "count_parameters", "load_pretrained", "save_pretrained",
]

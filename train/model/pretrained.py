"""Export and import of trained models: ``model.safetensors`` + ``config.json``
(``{"model": ModelConfig fields, "attention": AttentionConfig fields}``) +
``tokenizer.model``. Only safetensors is used for weights (no pickle).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from train.model.config import SPARSITY_KEYS, AttentionConfig, ModelConfig

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"


def save_pretrained(model, out_dir, model_cfg: ModelConfig, attention_cfg: AttentionConfig,
                    tokenizer_file=None, state_dict=None) -> Path:
    """Write the export folder; ``state_dict`` overrides ``model.state_dict()`` (e.g. a
    consolidated ZeRO checkpoint). Returns the folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps({"model": model_cfg.to_dict(), "attention": attention_cfg.to_dict()},
                                         indent=2) + "\n")
    if tokenizer_file is not None:
        src = Path(tokenizer_file)
        if not src.is_file():
            raise ValueError(f"tokenizer_file {src} does not exist")
        shutil.copyfile(src, out / TOKENIZER)
    return out


def load_config(path) -> tuple[ModelConfig, AttentionConfig]:
    """Read ``config.json`` of an export folder."""
    cfg_file = Path(path) / CONFIG
    if not cfg_file.is_file():
        raise ValueError(f"{path}: no {CONFIG} (not an export folder written by save_pretrained)")
    data = json.loads(cfg_file.read_text())
    if set(data) != {"model", "attention"}:
        raise ValueError(f"{cfg_file}: expected keys 'model' and 'attention', got {sorted(data)}")
    attention = dict(data["attention"])
    # NSA exports written before gates had a weight scale: their gate weights were trained at scale 1
    if attention.get("kind") == "nsa":
        attention.setdefault("gate_weight_scale", 1.0)
    return ModelConfig.from_dict(data["model"]), AttentionConfig.from_dict(attention)


def _check_state_dict(expected: dict, found: dict, where: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k].shape) != tuple(found[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append("shape mismatch " + ", ".join(
            f"{k}: config {tuple(expected[k].shape)} vs file {tuple(found[k].shape)}" for k in wrong[:8]))
    if problems:
        raise ValueError(f"{where}: weights do not match config.json: " + "; ".join(problems))


def resolve_export(path) -> Path:
    """The export folder of ``path``: ``path`` itself, or a run dir's ``export/``."""
    path = Path(path)
    for cand in (path, path / "export"):
        if (cand / WEIGHTS).is_file() and (cand / CONFIG).is_file():
            return cand
    raise ValueError(f"{path} is not an export folder (no {WEIGHTS} and {CONFIG}) nor a run dir with export/")


def load_weights(model, path, model_cfg: ModelConfig, attention_cfg: AttentionConfig) -> Path:
    """Copy the weights of the export at ``path`` (or a run dir's export/) into ``model``, built from
    ``model_cfg``/``attention_cfg``. The shapes must agree and so must every setting that changes
    what a weight means (for full attention: none of the NSA settings); the context settings
    (``max_seq_len``, ``rope_theta``, ``rope_scaling``), NSA's reading budget (``SPARSITY_KEYS``:
    how many blocks a query selects, which are forced, the window) and the init scales (incl.
    ``gate_init``) may differ, so a model trained on short documents can be extended. Returns the
    folder."""
    src = resolve_export(path)
    src_model, src_attn = load_config(src)
    free = {"max_seq_len", "rope_theta", "rope_scaling", "init_std", "embed_init_std"}
    a, b = model_cfg.to_dict(), src_model.to_dict()
    differ = sorted(k for k in a if k not in free and a[k] != b.get(k))
    a, b = attention_cfg.to_dict(), src_attn.to_dict()
    # full attention has no NSA weights, so its NSA settings mean nothing; gate_init is an init scale,
    # select_distill a training loss
    free_attn = ("backend", "gate_init", "select_distill", *SPARSITY_KEYS)
    keys = ["kind"] if a["kind"] == b["kind"] == "full" else [k for k in a if k not in free_attn]
    differ += sorted(f"attention.{k}" for k in keys if a[k] != b.get(k))
    if differ:
        raise ValueError(f"{src}: its model differs from this run's in {', '.join(differ)}")
    _load_state(model, src)
    return src


def _load_state(model, folder: Path) -> None:
    """Load ``folder``'s weights file into ``model`` after checking names and shapes against it."""
    from safetensors.torch import load_file

    state = load_file(str(folder / WEIGHTS))
    _check_state_dict(model.state_dict(), state, str(folder))
    model.load_state_dict(state, strict=True)


def load_pretrained(path, device="cpu", dtype=None):
    """``(model, tokenizer)`` from an export folder. The tokenizer is
    ``data.tokenizer.Tokenizer.load(tokenizer.model)``, the file path if that class is
    unavailable, or None when the folder has no tokenizer. The model is in eval mode."""
    from train.model.transformer import build_model

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    model_cfg, attn_cfg = load_config(path)
    if not (path / WEIGHTS).is_file():
        raise ValueError(f"{path}: no {WEIGHTS}")
    model = build_model(model_cfg, attn_cfg)
    _load_state(model, path)
    if dtype is not None:
        model = model.to(dtype=dtype)
    model = model.to(device).eval()
    return model, _load_tokenizer(path / TOKENIZER)


def _load_tokenizer(tok_file: Path):
    if not tok_file.is_file():
        return None
    try:
        from data.tokenizer import Tokenizer
    except ImportError:
        return str(tok_file)
    return Tokenizer.load(str(tok_file))

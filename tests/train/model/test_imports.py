"""train.model must load on a machine with only torch + triton + safetensors (docs/DESIGN.md)."""

import subprocess
import sys

HEAVY = ("hydra", "omegaconf", "deepspeed", "wandb", "datasets", "lm_eval", "sentencepiece", "yaml")


def test_import_pulls_no_training_stack():
    code = ("import sys, train.model, train.model.generate, train.model.flops\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

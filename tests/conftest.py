"""Suite-wide setup.

The Triton interpreter must be switched on before anything imports triton, so
it is done here, at the very top of the session: on a machine without a CUDA
GPU, kernels run on CPU tensors through ``TRITON_INTERPRET=1``.
"""

import os
import shutil

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

# Idle OpenMP workers sleep instead of spinning: with spinning workers a 2-thread torch
# ran 10-50x slower whenever another process shared the two cores (measured here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

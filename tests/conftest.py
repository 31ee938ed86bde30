"""Test-wide setup: Triton's CPU interpreter when no CUDA GPU is present.

TRITON_INTERPRET must be set before `triton` is first imported (ffcore.kernels imports it).
"""
from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

"""Provenance written with every result: enough to tell where and how a number was measured."""
from __future__ import annotations

import os

import pytest
import torch

from ffcore.results import device_name, provenance


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the device is the GPU's name")
def test_cpu_device_names_cores_and_vector_isa():
    name = device_name()
    assert name.startswith("CPU: ")
    assert f"({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})" in name


def test_provenance_fields():
    p = provenance("smoke", seed=3)
    assert {"git_commit", "profile", "device", "versions", "created_utc"} <= p.keys()
    assert p["profile"] == "smoke" and p["seed"] == 3
    assert p["versions"]["torch"] == torch.__version__

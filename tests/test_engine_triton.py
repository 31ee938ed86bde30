"""The engine's Triton backend (run by Triton's interpreter on CPU) against its torch path."""
from __future__ import annotations

import pytest
import torch

from ffcore.engine import EngineOptions, sparsify
from ffcore.models import tiny_model
from ffcore.engine.plan import SparsityPlan

pytest.importorskip("triton")


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("dense_last", [True, False])
def test_triton_backend_matches_torch_backend(arch, dense_last):
    model = tiny_model(arch, seed=2, num_hidden_layers=2)
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(0))  # partial last block
    plan = SparsityPlan(densities=0.4, policy="oracle", block_size=32, dense_last=dense_last)
    with sparsify(model, plan, EngineOptions(backend="torch")):
        ref = model(ids).logits
    with sparsify(model, plan, EngineOptions(backend="triton")):
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_backend_names_are_checked():
    model = tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match="unknown backend"):
        with sparsify(model, SparsityPlan(densities=0.5), EngineOptions(backend="cuda")):
            pass

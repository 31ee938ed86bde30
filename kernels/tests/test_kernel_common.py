"""Helpers shared by the kernels: activation names, autotune pruning, input checks."""
from __future__ import annotations

import pytest
import torch
import triton

from ffcore.kernels import _common as C
from ffcore.kernels.gather_down import GPU_CONFIGS as DOWN_CONFIGS
from ffcore.kernels.gather_gate_up import GPU_CONFIGS as GU_CONFIGS


def test_act_codes():
    assert C.act_code("silu") == C.act_code("SiLU") == C.ACT_SILU
    assert C.act_code("gelu_pytorch_tanh") == C.act_code("gelu_tanh") == C.ACT_GELU_TANH
    assert C.act_code("gelu") == C.ACT_GELU
    with pytest.raises(ValueError, match="unsupported activation"):
        C.act_code("relu")


@pytest.mark.parametrize("configs", [GU_CONFIGS, DOWN_CONFIGS], ids=["gate_up", "down"])
def test_prune_token_tiles(configs):
    assert len(C.prune_token_tiles(configs, {}, BLOCK_SIZE=128)) == len(configs)
    small = C.prune_token_tiles(configs, {}, BLOCK_SIZE=16)
    assert len(small) == 1 and small[0].kwargs["BLOCK_T"] == min(c.kwargs["BLOCK_T"] for c in configs)
    assert all(c.kwargs["BLOCK_T"] <= 64 for c in C.prune_token_tiles(configs, {}, BLOCK_SIZE=64))


def test_gpu_configs_are_tensor_core_friendly():
    for c in GU_CONFIGS + DOWN_CONFIGS:
        assert all(v >= 16 and triton.next_power_of_2(v) == v for v in c.kwargs.values())


def test_check_tensor_row_strided():
    t = torch.zeros(4, 10)
    C.check_tensor("t", t[:, 2:6], 2, (torch.float32,), row_strided=True)
    with pytest.raises(ValueError, match="contiguous"):
        C.check_tensor("t", t[:, 2:6], 2, (torch.float32,))
    with pytest.raises(ValueError, match="last dim"):
        C.check_tensor("t", t.t(), 2, (torch.float32,), row_strided=True)
    with pytest.raises(ValueError, match="last dim"):
        C.check_tensor("t", torch.zeros(1, 5).expand(4, 5), 2, (torch.float32,), row_strided=True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        C.check_tensor("t", [1, 2], 1, (torch.float32,))


def test_interpreter_mode_matches_device(device):
    from ffcore.kernels.gather_gate_up import gather_gate_up_kernel

    assert C.is_interpreted(gather_gate_up_kernel) == (device == "cpu")
    assert C.bf16_dot_workaround(gather_gate_up_kernel, torch.bfloat16) == (device == "cpu")
    assert not C.bf16_dot_workaround(gather_gate_up_kernel, torch.float16)

"""gather_gate_up (Triton) vs its torch reference: irregular shapes, partial blocks, 3 dtypes."""
from __future__ import annotations

import pytest
import torch

from ffcore.kernels import gather_gate_up, gather_gate_up_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(case, dtype, device, make_problem, same_tol):
    T, d, f, K, B, blocks = case
    p = make_problem(T, d, f, K, B, blocks, dtype, device)
    args = (p["x"], p["w_gu"], p["block_starts"], p["idx"], B)
    h = gather_gate_up(*args, "silu")
    ref = gather_gate_up_ref(*args, "silu")
    assert h.shape == (len(blocks), B, K) and h.dtype == dtype
    torch.testing.assert_close(h.float(), ref.float(), **same_tol[dtype])


@pytest.mark.parametrize("act", ["gelu_tanh", "gelu", "silu"])
def test_activations(act, device, make_problem, same_tol):
    T, d, f, K, B, blocks = 70, 48, 100, 37, 16, [0, 4]
    p = make_problem(T, d, f, K, B, blocks, torch.float32, device, seed=1)
    args = (p["x"], p["w_gu"], p["block_starts"], p["idx"], B, act)
    torch.testing.assert_close(gather_gate_up(*args), gather_gate_up_ref(*args), **same_tol[torch.float32])


def test_gelu_tanh_matches_torch_formula():
    """The reference's gelu_tanh is torch's gelu(approximate='tanh') (what Gemma uses)."""
    from ffcore.kernels._common import act_torch

    t = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(act_torch("gelu_tanh")(t), torch.nn.functional.gelu(t, approximate="tanh"))
    # the kernel's form: g * sigmoid(2 z) == 0.5 g (1 + tanh z)
    z = 0.7978845608028654 * (t + 0.044715 * t**3)
    torch.testing.assert_close(t * torch.sigmoid(2 * z), torch.nn.functional.gelu(t, approximate="tanh"))


def test_partial_block_rows_are_zero_and_out_is_used(device, make_problem):
    T, d, f, K, B, blocks = 70, 48, 100, 37, 16, [4]  # block 4 = rows 64..69: 6 valid rows
    p = make_problem(T, d, f, K, B, blocks, torch.float32, device)
    out = torch.full((1, B, K), float("nan"), device=device)
    h = gather_gate_up(p["x"], p["w_gu"], p["block_starts"], p["idx"], B, "silu", out=out)
    assert h.data_ptr() == out.data_ptr()
    assert torch.all(h[0, 6:] == 0) and torch.isfinite(h).all()
    assert h[0, :6].abs().sum() > 0


def test_int64_idx_and_unsorted_blocks(device, make_problem, same_tol):
    T, d, f, K, B, blocks = 70, 48, 100, 37, 16, [3, 0]
    p = make_problem(T, d, f, K, B, blocks, torch.float32, device)
    idx = p["idx"].long()
    h = gather_gate_up(p["x"], p["w_gu"], p["block_starts"], idx, B, "silu")
    ref = gather_gate_up_ref(p["x"], p["w_gu"], p["block_starts"], idx, B, "silu")
    torch.testing.assert_close(h, ref, **same_tol[torch.float32])


def test_no_sparse_blocks(device, make_problem):
    p = make_problem(40, 48, 100, 37, 16, [], torch.float32, device)
    h = gather_gate_up(p["x"], p["w_gu"], p["block_starts"], p["idx"], 16, "silu")
    assert h.shape == (0, 16, 37)


def _p(device, make_problem, dtype=torch.float32):
    return make_problem(70, 48, 100, 37, 16, [1, 3], dtype, device)


def test_errors(device, make_problem):
    p = _p(device, make_problem)
    x, w, s, i = p["x"], p["w_gu"], p["block_starts"], p["idx"]
    with pytest.raises(TypeError, match="w_gu has dtype"):
        gather_gate_up(x, w.half(), s, i, 16, "silu")
    with pytest.raises(TypeError, match="x has dtype"):
        gather_gate_up(x.double(), w.double(), s, i, 16, "silu")
    with pytest.raises(ValueError, match="contiguous"):
        gather_gate_up(x.t().contiguous().t(), w, s, i, 16, "silu")
    with pytest.raises(ValueError, match=r"w_gu must be \[f, 2\*d\]"):
        gather_gate_up(x, w[:, :48].contiguous(), s, i, 16, "silu")
    with pytest.raises(ValueError, match="idx has 1 rows"):
        gather_gate_up(x, w, s, i[:1].contiguous(), 16, "silu")
    with pytest.raises(TypeError, match="block_starts has dtype"):
        gather_gate_up(x, w, s.long(), i, 16, "silu")
    with pytest.raises(ValueError, match="unsupported activation"):
        gather_gate_up(x, w, s, i, 16, "relu")
    with pytest.raises(ValueError, match="block_size"):
        gather_gate_up(x, w, s, i, 0, "silu")
    with pytest.raises(ValueError, match="idx must lie in"):
        gather_gate_up(x, w, s, torch.full_like(i, 100), 16, "silu", check_values=True)
    with pytest.raises(ValueError, match="block_starts must lie in"):
        gather_gate_up(x, w, torch.tensor([16, 70], dtype=torch.int32, device=device), i, 16, "silu",
                       check_values=True)
    with pytest.raises(ValueError, match="overlap"):
        gather_gate_up(x, w, torch.tensor([16, 20], dtype=torch.int32, device=device), i, 16, "silu",
                       check_values=True)
    with pytest.raises(ValueError, match="out must be"):
        gather_gate_up(x, w, s, i, 16, "silu", out=torch.empty(2, 16, 36, device=device))
    with pytest.raises(ValueError, match="same device"):
        gather_gate_up(x, w.to("meta"), s, i, 16, "silu")


def test_row_strided_x_and_padded_out(device, make_problem, same_tol):
    """x may be a column slice of a wider buffer; out may have padded rows (as block_sparse_ffn uses)."""
    T, d, f, K, B, blocks = 70, 48, 100, 37, 16, [1, 4]
    p = make_problem(T, d, f, K, B, blocks, torch.float32, device)
    wide = torch.zeros(T, d + 24, device=device)
    wide[:, 8 : 8 + d] = p["x"]
    x_view = wide[:, 8 : 8 + d]
    assert not x_view.is_contiguous()
    buf = torch.full((2, B, 48), -1.0, device=device)
    h = gather_gate_up(x_view, p["w_gu"], p["block_starts"], p["idx"], B, "silu", out=buf[:, :, :K])
    ref = gather_gate_up_ref(p["x"], p["w_gu"], p["block_starts"], p["idx"], B, "silu")
    torch.testing.assert_close(h, ref, **same_tol[torch.float32])
    assert torch.all(buf[:, :, K:] == -1.0)  # padding untouched
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        gather_gate_up(p["x"][:, ::2], p["w_gu"][:, :48].contiguous(), p["block_starts"], p["idx"], B, "silu")

"""block_sparse_ffn (two Triton launches) vs a dense masked torch FFN."""
from __future__ import annotations

import pytest
import torch

import ffcore.kernels as K
from ffcore.kernels import block_sparse_ffn, block_sparse_ffn_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_dense_masked_reference(case, dtype, device, make_problem, ffn_tol):
    T, d, f, K_, B, blocks = case
    p = make_problem(T, d, f, K_, B, blocks, dtype, device)
    args = (p["x"], p["w_gu"], p["w_down_t"], p["block_starts"], p["idx"], B, "silu")
    y = block_sparse_ffn(*args)
    ref = block_sparse_ffn_ref(*args)
    torch.testing.assert_close(y.float(), ref.float(), **ffn_tol[dtype])


def test_first_last_dense_into_out(device, make_problem, ffn_tol):
    """Engine usage: dense first/last blocks computed elsewhere into `out`, middle blocks sparse."""
    T, d, f, K_, B = 70, 48, 100, 37, 16  # blocks 0..4, block 4 partial
    p = make_problem(T, d, f, K_, B, [1, 2, 3], torch.float32, device)
    x, w_gu, w_down_t = p["x"], p["w_gu"], p["w_down_t"]
    dense = (torch.nn.functional.gelu(x @ w_gu[:, :d].T, approximate="tanh") * (x @ w_gu[:, d:].T)) @ w_down_t
    out = torch.empty_like(x)
    out[:B] = dense[:B]
    out[4 * B :] = dense[4 * B :]
    y = block_sparse_ffn(x, w_gu, w_down_t, p["block_starts"], p["idx"], B, "gelu_tanh", out=out)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(y[:B], dense[:B], rtol=0, atol=0)
    torch.testing.assert_close(y[4 * B :], dense[4 * B :], rtol=0, atol=0)
    ref = block_sparse_ffn_ref(x, w_gu, w_down_t, p["block_starts"], p["idx"], B, "gelu_tanh")
    torch.testing.assert_close(y[B : 4 * B], ref[B : 4 * B], **ffn_tol[torch.float32])


def test_full_density_equals_dense_ffn(device, make_problem, ffn_tol):
    T, d, f, B = 40, 48, 64, 16
    p = make_problem(T, d, f, f, B, [0, 1, 2], torch.float32, device)
    x, w_gu, w_down_t = p["x"], p["w_gu"], p["w_down_t"]
    dense = (torch.nn.functional.silu(x @ w_gu[:, :d].T) * (x @ w_gu[:, d:].T)) @ w_down_t
    y = block_sparse_ffn(x, w_gu, w_down_t, p["block_starts"], p["idx"], B, "silu")
    torch.testing.assert_close(y, dense, **ffn_tol[torch.float32])


def test_public_api():
    assert set(K.__all__) >= {"gather_gate_up", "gather_down", "block_sparse_ffn"}
    assert callable(K.gather_down) and callable(K.block_sparse_ffn) and callable(K.gather_gate_up)


def test_out_shape_error(device, make_problem):
    p = make_problem(70, 48, 100, 37, 16, [1], torch.float32, device)
    with pytest.raises(ValueError, match="out must have x.s shape"):
        block_sparse_ffn(p["x"], p["w_gu"], p["w_down_t"], p["block_starts"], p["idx"], 16, "silu",
                         out=torch.zeros(69, 48, device=device))


def test_input_errors(device, make_problem):
    p = make_problem(70, 48, 100, 37, 16, [1], torch.float32, device)
    x, w_gu, w_down_t, s, i = p["x"], p["w_gu"], p["w_down_t"], p["block_starts"], p["idx"]
    with pytest.raises(ValueError, match=r"w_down_t must be \[f, d\]"):
        block_sparse_ffn(x, w_gu, w_down_t[:99].contiguous(), s, i, 16, "silu")
    with pytest.raises(TypeError, match="out has dtype"):
        block_sparse_ffn(x, w_gu, w_down_t, s, i, 16, "silu", out=torch.zeros(70, 48, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="unsupported activation"):
        block_sparse_ffn(x, w_gu, w_down_t, s, i, 16, "tanh")
    with pytest.raises(ValueError, match="idx must lie in"):
        block_sparse_ffn(x, w_gu, w_down_t, s, torch.full_like(i, 100), 16, "silu", check_values=True)


def test_row_strided_x_and_out(device, make_problem, ffn_tol):
    T, d, f, K_, B = 70, 48, 100, 37, 16
    p = make_problem(T, d, f, K_, B, [0, 2, 4], torch.float32, device)
    wide = torch.zeros(T, 2 * d, device=device)
    wide[:, d:] = p["x"]
    out_wide = torch.full((T, 2 * d), 3.0, device=device)
    y = block_sparse_ffn(wide[:, d:], p["w_gu"], p["w_down_t"], p["block_starts"], p["idx"], B, "silu",
                         out=out_wide[:, :d])
    ref = block_sparse_ffn_ref(p["x"], p["w_gu"], p["w_down_t"], p["block_starts"], p["idx"], B, "silu")
    rows = torch.zeros(T, dtype=torch.bool, device=device)
    for b in (0, 2, 4):
        rows[b * B : b * B + B] = True
    torch.testing.assert_close(y[rows], ref[rows], **ffn_tol[torch.float32])
    assert torch.all(y[~rows] == 3.0) and torch.all(out_wide[:, d:] == 3.0)

"""gather_down (Triton) vs its torch reference: irregular shapes, partial blocks, 3 dtypes."""
from __future__ import annotations

import pytest
import torch

from ffcore.kernels import gather_down, gather_down_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SENTINEL = 7.0


def _h(nsb: int, B: int, K: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(nsb, B, K, generator=g).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_and_leaves_other_rows(case, dtype, device, make_problem, same_tol):
    T, d, f, K, B, blocks = case
    p = make_problem(T, d, f, K, B, blocks, dtype, device)
    h = _h(len(blocks), B, K, dtype, device)
    args = (h, p["w_down_t"], p["block_starts"], p["idx"], B)
    out = torch.full((T, d), SENTINEL, dtype=dtype, device=device)
    y = gather_down(*args, out)
    assert y.data_ptr() == out.data_ptr()
    ref = gather_down_ref(*args, torch.full((T, d), SENTINEL, dtype=dtype, device=device))
    torch.testing.assert_close(y.float(), ref.float(), **same_tol[dtype])
    sparse_rows = torch.zeros(T, dtype=torch.bool)
    for b in blocks:
        sparse_rows[b * B : min(b * B + B, T)] = True
    assert torch.all(y[~sparse_rows.to(device)] == SENTINEL)
    assert not torch.any(y[sparse_rows.to(device)] == SENTINEL)


def test_padding_rows_of_h_are_ignored(device, make_problem, same_tol):
    """Garbage in h past the end of a partial block must not leak anywhere."""
    T, d, f, K, B, blocks = 70, 48, 100, 37, 16, [2, 4]
    p = make_problem(T, d, f, K, B, blocks, torch.float32, device)
    h = _h(2, B, K, torch.float32, device)
    h_bad = h.clone()
    h_bad[1, 6:] = 1e30
    a = gather_down(h, p["w_down_t"], p["block_starts"], p["idx"], B, torch.zeros(T, d, device=device))
    b = gather_down(h_bad, p["w_down_t"], p["block_starts"], p["idx"], B, torch.zeros(T, d, device=device))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_errors(device, make_problem):
    T, d, f, K, B, blocks = 70, 48, 100, 37, 16, [1, 3]
    p = make_problem(T, d, f, K, B, blocks, torch.float32, device)
    h = _h(2, B, K, torch.float32, device)
    w, s, i = p["w_down_t"], p["block_starts"], p["idx"]
    out = torch.zeros(T, d, device=device)
    with pytest.raises(ValueError, match="h must be"):
        gather_down(h[:, :8].contiguous(), w, s, i, B, out)
    with pytest.raises(TypeError, match="h has dtype"):
        gather_down(h.half(), w, s, i, B, out)
    with pytest.raises(TypeError, match="w_down_t has dtype"):
        gather_down(h, w.half(), s, i, B, out)
    with pytest.raises(ValueError, match=r"w_down_t must be \[f, 1\*d\]"):
        gather_down(h, w[:, :40].contiguous(), s, i, B, out)
    with pytest.raises(ValueError, match="out must be contiguous"):
        gather_down(h, w, s, i, B, torch.zeros(d, T, device=device).t())
    with pytest.raises(ValueError, match="idx must lie in"):
        gather_down(h, w, s, torch.full_like(i, -1), B, out, check_values=True)


def test_strided_h_and_out(device, make_problem, same_tol):
    """h with padded rows and out as a column slice of a wider buffer."""
    T, d, f, K, B, blocks = 70, 48, 100, 37, 16, [0, 4]
    p = make_problem(T, d, f, K, B, blocks, torch.float32, device)
    h = _h(2, B, K, torch.float32, device)
    h_buf = torch.full((2, B, 48), 1e30, device=device)
    h_buf[:, :, :K] = h
    wide = torch.full((T, d + 16), SENTINEL, device=device)
    y = gather_down(h_buf[:, :, :K], p["w_down_t"], p["block_starts"], p["idx"], B, wide[:, 16:])
    ref = gather_down_ref(h, p["w_down_t"], p["block_starts"], p["idx"], B, torch.full((T, d), SENTINEL, device=device))
    torch.testing.assert_close(y, ref, **same_tol[torch.float32])
    assert torch.all(wide[:, :16] == SENTINEL)

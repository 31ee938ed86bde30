"""Test setup for the Triton kernels: Triton's CPU interpreter unless a CUDA GPU is present.

TRITON_INTERPRET must be in the environment before `triton` is first imported. pytest loads
this file at start-up (it is an "initial" conftest of `kernels/`: a `test*` folder under a
command-line path), before any test module imports ffcore.kernels.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    if "triton" in sys.modules:  # pragma: no cover - some earlier import pulled triton in natively
        raise pytest.UsageError(
            "triton was imported before kernels/tests/conftest.py could set TRITON_INTERPRET=1; "
            "run with TRITON_INTERPRET=1 in the environment"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def _device() -> str:
    from ffcore.kernels._common import interpreting

    return "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


@pytest.fixture(scope="session")
def device() -> str:
    """Where the kernel tests put their tensors: CUDA when native, CPU under the interpreter."""
    return _device()


# Tolerances of a kernel vs a torch reference that rounds at the same points (fp32 math,
# result cast to the dtype): a few ulps of the dtype, for differently ordered fp32 sums.
SAME_ROUNDING_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
# Composed FFN vs the fp32 dense reference: the kernel also rounds h to the dtype.
FFN_TOL = {
    torch.float32: dict(rtol=2e-4, atol=2e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def _make_problem(T: int, d: int, f: int, K: int, B: int, sparse_blocks: list[int], dtype: torch.dtype,
                 device: str, seed: int = 0) -> dict:
    """Random inputs in the engine layout, scaled so h and y are O(1); distinct experts per block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    w_gu = torch.randn(f, 2 * d, generator=g) / d**0.5
    w_down_t = torch.randn(f, d, generator=g) / K**0.5
    starts = torch.tensor([b * B for b in sparse_blocks], dtype=torch.int32)
    idx = torch.zeros((len(sparse_blocks), K), dtype=torch.int32)
    for j in range(len(sparse_blocks)):
        idx[j] = torch.randperm(f, generator=g)[:K]
    to = dict(device=device)
    return dict(
        x=x.to(dtype).to(**to), w_gu=w_gu.to(dtype).to(**to), w_down_t=w_down_t.to(dtype).to(**to),
        block_starts=starts.to(**to), idx=idx.to(**to), block_size=B,
    )


# (T, d, f, K, B, sparse block ids): irregular d and K, partial last blocks, several tiles.
CASES = {
    # 5 blocks of 16, the last one 6 rows; K=37: 3 expert tiles with a remainder; d=48: 2 d-tiles
    "d48-K37-B16": (70, 48, 100, 37, 16, [1, 3, 4]),
    # B=32 -> 2 token tiles; last block 11 rows (second token tile fully masked); d=40, K=16
    "d40-K16-B32": (75, 40, 64, 16, 32, [0, 2]),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize any test taking `case` over CASES."""
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", list(CASES.values()), ids=list(CASES))


@pytest.fixture(scope="session")
def make_problem():
    """The random-problem factory (see `_make_problem`)."""
    return _make_problem


@pytest.fixture(scope="session")
def same_tol() -> dict:
    """dtype -> assert_close tolerances for kernel vs same-rounding reference."""
    return SAME_ROUNDING_TOL


@pytest.fixture(scope="session")
def ffn_tol() -> dict:
    """dtype -> assert_close tolerances for the composed FFN vs the fp32 dense reference."""
    return FFN_TOL

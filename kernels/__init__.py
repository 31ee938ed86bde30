"""Triton kernels for the block-sparse FFN, installed as `ffcore.kernels`.

The folder is named `kernels/` at the top of the repository, but it is imported as
`ffcore.kernels` so that it never shadows the unrelated PyPI package called `kernels`.

Importing this package imports `triton`. To run the kernels on CPU tensors in Triton's
interpreter (slow; for tests), set TRITON_INTERPRET=1 before triton is first imported.

- `gather_gate_up(x, w_gu, block_starts, idx, block_size, act)` -> h [nsb, block_size, K]
- `gather_down(h, w_down_t, block_starts, idx, block_size, out)` -> out [T, d]
- `block_sparse_ffn(x, w_gu, w_down_t, block_starts, idx, block_size, act, out=None)` -> [T, d]
- torch references: `gather_gate_up_ref`, `gather_down_ref`, `block_sparse_ffn_ref`.
"""
from __future__ import annotations

# Bind the functions after their submodules are imported: the names shadow the submodule
# attributes (`ffcore.kernels.gather_down` is the function; the module stays importable).
from ffcore.kernels.gather_gate_up import gather_gate_up, gather_gate_up_ref  # noqa: E402
from ffcore.kernels.gather_down import gather_down, gather_down_ref  # noqa: E402
from ffcore.kernels.block_sparse_ffn import block_sparse_ffn, block_sparse_ffn_ref  # noqa: E402

__all__ = [
    "block_sparse_ffn",
    "block_sparse_ffn_ref",
    "gather_down",
    "gather_down_ref",
    "gather_gate_up",
    "gather_gate_up_ref",
]

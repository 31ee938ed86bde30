"""Triton kernels for the block-sparse FFN, installed as `ffcore.kernels`.

The folder is named `kernels/` at the top of the repository, but it is imported as
`ffcore.kernels` so that it never shadows the unrelated PyPI package called `kernels`.
"""

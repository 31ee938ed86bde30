"""The kernels compile for a real GPU (sm_90, bf16) even on a machine without one.

The interpreter accepts some code the compiler rejects, so a CPU-only test run also
compiles each kernel ahead of time (TTIR -> PTX -> cubin with the bundled ptxas) in a
subprocess without TRITON_INTERPRET, and checks it pipelines within the H100's shared memory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, warnings
    warnings.filterwarnings("ignore")
    assert "TRITON_INTERPRET" not in os.environ
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ffcore.kernels.gather_gate_up import gather_gate_up_kernel, GPU_CONFIGS as GU
    from ffcore.kernels.gather_down import gather_down_kernel, GPU_CONFIGS as GD

    def compile_(jit, ptr_names, int_names, consts, cfg, divisible):
        sig = {n: ("*i32" if n in ("starts_ptr", "idx_ptr") else "*bf16") for n in ptr_names}
        sig.update({n: "i32" for n in int_names})
        sig.update({n: "constexpr" for n in consts})
        names = list(sig)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ptr_names + divisible}
        k = triton.compile(ASTSource(fn=jit.fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        return {"shared": k.metadata.shared, "wgmma": "wgmma" in k.asm["ptx"],
                "cp_async": "cp.async" in k.asm["ptx"]}

    out = {}
    cfg = GU[0]
    out["gate_up"] = compile_(
        gather_gate_up_kernel, ["x_ptr", "w_gu_ptr", "starts_ptr", "idx_ptr", "h_ptr"],
        ["T", "d", "K", "KP", "stride_x", "stride_hb", "stride_ht"],
        {"BLOCK_SIZE": 128, "ACT": 1, "INPUT_PRECISION": "tf32", "DOT_F32": False, **cfg.kwargs}, cfg,
        ["d", "KP", "stride_x", "stride_hb", "stride_ht"])
    cfg = GD[0]
    out["down"] = compile_(
        gather_down_kernel, ["h_ptr", "w_down_t_ptr", "starts_ptr", "idx_ptr", "y_ptr"],
        ["T", "d", "K", "KP", "stride_hb", "stride_ht", "stride_y"],
        {"BLOCK_SIZE": 128, "INPUT_PRECISION": "tf32", "DOT_F32": False, **cfg.kwargs}, cfg,
        ["d", "KP", "stride_hb", "stride_ht", "stride_y"])
    print("RESULT" + json.dumps(out))
''')


def test_compiles_for_sm90():
    triton = pytest.importorskip("triton")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name, r in res.items():
        assert r["wgmma"] and r["cp_async"], (name, r)  # tensor-core MMA, pipelined async gathers
        assert r["shared"] <= 227 * 1024, (name, r)

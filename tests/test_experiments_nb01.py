"""Notebook 01's readings are generated from its numbers."""
from __future__ import annotations

from ffcore import flops
from ffcore.experiments import nb01_flops as nb01


def test_readings_follow_the_numbers() -> None:
    specs = [flops.spec_for(m) for m in ("llama-3.2-1b", "llama-3.1-8b")]
    cross = flops.crossover_records(specs)
    text = nb01.crossover_reading(cross)
    assert "T = 24,576 (3.00 d_ffn)" in text and "~16K" in text and "~28K" in text
    peaks = [{"model": "a", "sparsity": 0.5, "pairs": "causal", "overheads": True, "T_at_peak": 2048, "peak_speedup": 1.3},
             {"model": "b", "sparsity": 0.5, "pairs": "causal", "overheads": True, "T_at_peak": 3000, "peak_speedup": 1.4},
             {"model": "b", "sparsity": 0.5, "pairs": "full", "overheads": True, "T_at_peak": 3000, "peak_speedup": 9.0}]
    text = nb01.speedup_reading(peaks)
    assert "1.30-1.40x lies below" in text and "2K" in text and "9.0" not in text
    rows = [{"model": "m", "T": T, "component": c, "share": s} for T, c, s in
            ((512, "mlp", 0.6), (512, "attention", 0.3), (4096, "mlp", 0.2), (4096, "attention", 0.7))]
    text = nb01.timing_reading(rows, {"m": 4096}, [{"model": "m", "attn_core_vs_gated_ffn": 9000}])
    assert "at 512 the MLP takes 60%" in text and "from 4K tokens" in text and "9,000" in text

"""Run profiles shared by every notebook: which models, and how much work.

`smoke`: tiny random models and tiny data, every notebook in seconds (CI).
`quick`: the real offline models with reduced samples.
`full`:  the real models at the sizes of the committed results.
Each notebook's experiment module (`ffcore.experiments.nbNN_*`) keeps its own per-profile knobs as
a small `StrictConfig`; this module holds only what every notebook shares.
"""
from __future__ import annotations

from ffcore.results import check_profile

MODELS = {
    "smoke": ("tiny-llama", "tiny-gemma3"),
    "quick": ("smollm2-135m", "gemma3-270m"),
    "full": ("smollm2-135m", "gemma3-270m"),
}


def models_for(profile: str) -> tuple[str, ...]:
    """The model keys a profile runs on."""
    check_profile(profile)
    return MODELS[profile]


def pick(profile: str, smoke, quick, full):  # noqa: ANN001, ANN201 - generic by design
    """Choose one of three values by profile (keeps per-profile knobs on one line)."""
    check_profile(profile)
    return {"smoke": smoke, "quick": quick, "full": full}[profile]

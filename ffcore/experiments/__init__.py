"""The experiments: one module per notebook, holding that notebook's settings per profile, its record
builders, tables and the text of its verdicts. The method library (`ffcore.*` outside this package)
never imports from here; `tests/test_architecture.py` fails if it does.

| module | notebook |
|---|---|
| `nb01_flops` | 01 · where prefill compute goes (FLOP model, measured CPU breakdown) |
| `nb02_calibration` | 02 · attention sinks, layer importance, the layer-wise schedules (writes them) |
| `nb03_predictor` | 03 · activation collection and the expert predictor (trains and saves it) |
| `nb04_compensator` | 04 · the error compensator (trains and saves it) |
| `nb05_accuracy` | 05 · the local suite, Tables 2-3 (and the machinery 06 and 08 share) |
| `nb06_ablations` | 06 · Tables 4-7 |
| `nb07_speed` | 07 · measured speed beside the FLOP model |
| `nb08_specprefill` | 08 · SpecPrefill, FastForward and their combination |

`profiles` holds what every notebook shares: the run profiles and their models. A later notebook's
module reads what an earlier one wrote through that module's reader (e.g. `nb02_calibration.load_schedule`),
so the chain of notebooks is explicit in the code too.
"""

"""`python -m ffcore`: fit a FastForward bundle on your own texts, or generate with one and time the prefill.

    python -m ffcore fit --model /path/to/checkpoint --texts corpus.txt --out my-bundle [--device cuda] [--dtype bfloat16]
    python -m ffcore generate --model /path/to/checkpoint --bundle my-bundle --sparsity 0.5 --prompt-file prompt.txt

`--model` is a local Hugging Face checkpoint folder or an ffcore key (`smollm2-135m`, `gemma3-270m`, `tiny-llama`,
...). `fit` takes the `FitConfig` defaults, a JSON file of FitConfig fields (`--config`) and the flags below (the
flags win). `generate` prints the greedy completion of the prompt after a sparse prefill under the bundle's plan,
then the prefill time dense vs sparse, measured interleaved (`ffcore.timing.interleaved`) over a few rounds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ffcore.bundle import FastForward, read_meta
from ffcore.decoding import FULL, eos_ids, greedy_decode
from ffcore.engine import sparsify
from ffcore.fitting import FitConfig, fit
from ffcore.models import load_model
from ffcore.timing import interleaved, model_sync, ratio

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# flag -> FitConfig field, for the flags that override --config
FIT_FLAGS = {"seq_len": "seq_len", "block_size": "block_size", "calib_samples": "calib_samples",
             "train_samples": "train_samples", "val_samples": "val_samples", "seed": "seed"}


class CliError(Exception):
    """A user error the CLI reports in one line."""


def _device(name: str) -> str:
    """The device name, or a clear error when CUDA is asked for but absent."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return name


def _load(model: str, dtype: str, device: str) -> tuple[Any, Any]:
    """Load (model, tokenizer) by ffcore key or checkpoint folder."""
    return load_model(model, dtype=DTYPES[dtype], device=_device(device))


def cmd_fit(args: argparse.Namespace) -> int:
    """`fit`: write a bundle to --out."""
    fields: dict[str, Any] = {}
    if args.config:
        try:
            fields = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CliError(f"--config {args.config}: cannot read a JSON object of FitConfig fields ({e})") from None
        if not isinstance(fields, dict):
            raise CliError(f"--config {args.config}: expected a JSON object of FitConfig fields")
    fields.update({field: getattr(args, flag) for flag, field in FIT_FLAGS.items() if getattr(args, flag) is not None})
    cfg = FitConfig.from_dict(fields)
    model, tok = _load(args.model, args.dtype, args.device)
    ff = fit(model, tok, args.texts, args.out, cfg, progress=not args.quiet, keep_work=args.keep_work)
    lo, hi = ff.sparsity_range
    print(f"bundle: {Path(args.out).resolve()} (sparsity {lo:g}-{hi:g}, block size {ff.block_size}); use it with\n"
          f"  python -m ffcore generate --model {args.model} --bundle {args.out} --sparsity {hi:g} --prompt-file F")
    return 0


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except OSError as e:
        raise CliError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    """`generate`: the completion after a sparse prefill, and the prefill time dense vs sparse."""
    meta = read_meta(Path(args.bundle))
    dtype = args.dtype or meta["model"].get("dtype", "float32")
    if dtype not in DTYPES:
        raise CliError(f"the bundle records dtype {dtype!r}; pass --dtype one of {sorted(DTYPES)}")
    model, tok = _load(args.model, dtype, args.device)
    ff = FastForward.from_pretrained(args.bundle, model)
    plan = ff.plan(args.sparsity)
    text = _prompt(args)
    ids = tok(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)  # [1, T]
    T = ids.shape[1]
    if T == 0:
        raise CliError("the prompt is empty")
    with torch.no_grad(), sparsify(model, plan):
        first, state, _ = FULL.prefill(model, ids)
        new = greedy_decode(model, first, state, args.max_new_tokens, eos=eos_ids(model, tok))
    print(tok.decode(new, skip_special_tokens=True))
    n_sparse = sum(e - s for s, e in plan.spans(T)[1])
    print("---")
    if args.rounds < 1:
        return 0
    if not n_sparse:
        print(f"prefill: the prompt's {T} tokens fill no sparse block (the first and last {plan.block_size}-token "
              f"blocks run dense): give a prompt of more than {2 * plan.block_size} tokens to time a sparse prefill")
        return 0

    @torch.no_grad()
    def dense() -> None:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)

    @torch.no_grad()
    def sparse() -> None:
        with sparsify(model, plan):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    rec = interleaved({"dense": dense, "sparse": sparse}, repeats=args.rounds, warmup=1, sync=model_sync(model))
    r = ratio(rec, "dense", "sparse")
    print(f"prefill of {T} tokens ({n_sparse} in sparse blocks), sparsity {args.sparsity:g}, {args.rounds} "
          f"interleaved rounds on {next(model.parameters()).device} ({rec.threads} threads, load "
          f"{rec.load_1min:.1f}): dense {rec.median('dense'):.4f} s, sparse {rec.median('sparse'):.4f} s (medians); "
          f"speedup {r['speedup']:.2f}x [IQR {r['speedup_q25']:.2f}-{r['speedup_q75']:.2f}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m ffcore`."""
    p = argparse.ArgumentParser(prog="python -m ffcore", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit a FastForward bundle on your texts",
                       description="Calibrate, collect and train the predictor and compensator; write one bundle.")
    f.add_argument("--model", required=True, help="local HF checkpoint folder or ffcore key (e.g. smollm2-135m)")
    f.add_argument("--texts", required=True, help="a text file or a folder of text files")
    f.add_argument("--out", required=True, help="the bundle folder (its .work/ subfolder makes a rerun resume)")
    f.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    f.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    f.add_argument("--config", help="a JSON file of FitConfig fields (see ffcore.FitConfig)")
    f.add_argument("--seq-len", dest="seq_len", type=int, help="tokens per sample (default 512)")
    f.add_argument("--block-size", dest="block_size", type=int, help="tokens per prefill block (default 128)")
    f.add_argument("--calib-samples", dest="calib_samples", type=int, help="calibration samples (default 4)")
    f.add_argument("--train-samples", dest="train_samples", type=int, help="training samples (default 32)")
    f.add_argument("--val-samples", dest="val_samples", type=int, help="validation samples (default 4)")
    f.add_argument("--seed", type=int)
    f.add_argument("--keep-work", dest="keep_work", action="store_true", help="keep out/.work/ after the fit")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(run=cmd_fit)
    g = sub.add_parser("generate", help="generate with a bundle and time the prefill dense vs sparse",
                       description="Greedy completion after a sparse prefill; prefill time dense vs sparse.")
    g.add_argument("--model", required=True, help="local HF checkpoint folder or ffcore key")
    g.add_argument("--bundle", required=True, help="a bundle folder written by `fit`")
    g.add_argument("--sparsity", type=float, default=0.5, help="overall FFN sparsity in the bundle's range (0.5)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-file", dest="prompt_file", help="a file holding the prompt")
    src.add_argument("--prompt", help="the prompt itself")
    g.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=32)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="default: the dtype the bundle was fit in")
    g.add_argument("--rounds", type=int, default=3, help="timed rounds of the prefill comparison (0: no timing)")
    g.set_defaults(run=cmd_generate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit status (2 for a usage or input error, with a one-line message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (CliError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

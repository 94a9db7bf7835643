"""The `interp-cache` command: `zoo` lists the built-in models, `verify` checks cached decoding, `heatmap`
draws the stitched attention map of one head over prefill and decode (with a compression policy's marks)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from interp_cache.analysis.pictures import heatmap
from interp_cache.compress.spec import parse_policy
from interp_cache.models.loading import load, zoo_names
from interp_cache.models.trained import trained_models, training_record
from interp_cache.models.zoo import ZOO
from interp_cache.verify import format_markdown, format_table, verify, write_json
from interp_cache.verify.cache_classes import CACHE_CLASSES, verify_cache_class


def _zoo(args) -> int:
    for name, family in ZOO.items():
        print(f"zoo:{name:<14} {family.description}")
    for name in trained_models():
        print(f"zoo:{name:<14} trained: {training_record(name)['description']}")
    return 0


def _verify(args) -> int:
    names = [f"zoo:{name}" for name in zoo_names()] if args.all else (args.model or [])
    if not names:
        print("interp-cache verify: name models with --model M (repeatable) or use --all", file=sys.stderr)
        return 2
    if args.attn and not args.cache:
        print("interp-cache verify: --attn chooses the attention for --cache checks; add --cache NAME", file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if all(name.startswith("zoo:") for name in names):
        # Tiny zoo models: a thread pool costs more than it saves (21 s vs 1 s on a busy 2-core machine).
        torch.set_num_threads(1)
    reports, errors = [], []
    start = time.perf_counter()
    for index, name in enumerate(names, 1):
        began = time.perf_counter()
        try:
            model = load(name, dtype=dtype)
            label = name.removeprefix("zoo:")
            if args.cache:  # transformers' own stack: its findings are what the user asked about, so they fail
                ran = [verify_cache_class(model, cache, attn, name=label) for cache in args.cache
                       for attn in args.attn or ("eager", "sdpa")]
                for report in ran:
                    report.strict_upstream = True
            else:
                ran = [verify(model, strict_upstream=args.strict_upstream, name=label)]
            reports.extend(ran)
            outcome = "agrees" if all(report.passed for report in ran) else "FAILS"
        except Exception as error:  # one model failing to run must not stop the others
            errors.append(f"{name}: {type(error).__name__}: {error}")
            outcome = "ERROR"
        print(f"[{index}/{len(names)}] {name} {outcome} ({time.perf_counter() - began:.1f}s)", file=sys.stderr,
              flush=True)
    print(format_table(reports))
    for line in errors:
        print(f"ERROR {line}", file=sys.stderr)
    if args.json:
        write_json(reports, args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(reports))
    failed = sorted({r.model for r in reports if not r.passed})
    print(f"\n{len(names) - len(failed) - len(errors)}/{len(names)} models agree cached vs uncached "
          f"({time.perf_counter() - start:.0f}s); failed: {', '.join(failed) or 'none'}; errors: {len(errors)}")
    return 0 if not failed and not errors else 1


def _heatmap(args) -> int:
    out_directory = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_directory):
        print(f"interp-cache heatmap: --out {args.out}: the directory {out_directory} does not exist", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1:
        print(f"interp-cache heatmap: --max-new-tokens must be >= 1 (the map shows decode steps); got "
              f"{args.max_new_tokens}", file=sys.stderr)
        return 2
    try:
        policy = None if args.compress is None else parse_policy(args.compress)
        model = load(args.model)
        result = heatmap(model, args.prompt, args.max_new_tokens, args.layer, args.head, args.out, compress=policy)
    except ValueError as error:
        print(f"interp-cache heatmap: {error}", file=sys.stderr)
        return 2
    print(f"wrote {result.path}: {result.tokens} positions, {result.unread_cells} causally allowed cells not read")
    if result.kept_counts is not None:
        print("entries kept per layer (rows) and KV head (columns):")
        for layer, counts in enumerate(result.kept_counts.tolist()):
            print(f"  layer {layer}: {counts}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="interp-cache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("zoo", help="list the built-in tiny models").set_defaults(run=_zoo)
    v = sub.add_parser("verify", help="check cached vs uncached decoding, model by model")
    v.add_argument("--model", action="append", help="zoo:<family>, a local path or a hub name (repeatable)")
    v.add_argument("--all", action="store_true", help="every zoo model")
    v.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    v.add_argument("--json", metavar="PATH")
    v.add_argument("--markdown", metavar="PATH")
    v.add_argument("--strict-upstream", action="store_true",
                   help="let rows about the original transformers model fail the run")
    v.add_argument("--cache", action="append", choices=list(CACHE_CLASSES),
                   help="check transformers' own cache class on the original model instead (repeatable): "
                        "a greedy loop with that cache vs the uncached forward")
    v.add_argument("--attn", action="append", choices=["eager", "sdpa"],
                   help="attention implementation(s) for --cache (repeatable; default: both)")
    v.set_defaults(run=_verify)
    h = sub.add_parser("heatmap", help="attention map of one head over prefill + decode, as a PNG")
    h.add_argument("--model", required=True, help="zoo:<family>, a local path or a hub name")
    h.add_argument("--prompt", required=True)
    h.add_argument("--max-new-tokens", type=int, default=16)
    h.add_argument("--compress", metavar="SPEC", help="e.g. 'quest:budget=32,page_size=8,dense_layers=1', "
                   "'adakv:budget=24,alpha=0.2', 'h2o:heavy=8,recent=8'")
    h.add_argument("--layer", type=int, default=0)
    h.add_argument("--head", type=int, default=0)
    h.add_argument("--out", required=True, metavar="PNG")
    h.set_defaults(run=_heatmap)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""``lvlm-safety demo``."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_demo(args: argparse.Namespace) -> int:
    import sys

    from .run import run_demo

    report = run_demo(quick=args.quick, seeds=args.seeds, out=args.out, overrides=args.override, concepts=args.concepts,
                      jobs=args.jobs, first_seed=args.first_seed, split=args.split)
    if report["failed"]:
        names = ", ".join(sorted({f["method"] for f in report["failed"]}))
        print(f"lvlm-safety demo: {len(report['failed'])} run(s) failed ({names}); the finished runs are in "
              f"{args.out}/demo.json", file=sys.stderr)
        return 1
    return 0


def add_demo_command(sub: Any) -> None:
    p = sub.add_parser("demo", help="the offline demo world: text safety vs image safety, baseline / TGA / CMRM")
    p.add_argument("--quick", action="store_true", help="the small size (CI): 1 seed (0), 8 concepts of each kind, fewer steps")
    p.add_argument("--seeds", type=int, help="number of seeds (default 5, or 1 with --quick)")
    p.add_argument("--first-seed", type=int,
                   help="the first seed: seeds FIRST to FIRST+SEEDS-1 (default 2000, the registered test seeds "
                        "2000-2004; 0 with --quick)")
    p.add_argument("--concepts", type=int, help="concepts of each kind, harmful and benign (2-24; default 20, 8 with --quick)")
    p.add_argument("--jobs", type=int,
                   help="seeds run at once, each in its own process with one thread (default: one per CPU core)")
    p.add_argument("--split", default="test",
                   help="the split measured: test (the reported numbers, default) or val (development, on seeds >= 100)")
    p.add_argument("--out", default="demo-out", help="folder for demo.json and demo.png (default: demo-out)")
    p.add_argument("--override", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override a key of the CMRM or TGA recipe, e.g. cmrm.alpha=0.5 or tga.layers=1-3 (repeatable)")
    p.set_defaults(func=cmd_demo)

"""``lvlm-safety demo``."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_demo(args: argparse.Namespace) -> int:
    from .run import run_demo

    run_demo(quick=args.quick, seeds=args.seeds, out=args.out)
    return 0


def add_demo_command(sub: Any) -> None:
    p = sub.add_parser("demo", help="the offline demo world: text safety vs image safety, baseline / TGA / CMRM")
    p.add_argument("--quick", action="store_true", help="the small size (CI): 1 seed, fewer steps")
    p.add_argument("--seeds", type=int, help="number of seeds (default 3, or 1 with --quick)")
    p.add_argument("--out", default="demo-out", help="folder for demo.json and demo.png (default: demo-out)")
    p.set_defaults(func=cmd_demo)

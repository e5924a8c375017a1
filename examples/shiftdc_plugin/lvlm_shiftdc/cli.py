"""The plugin's own ``lvlm-safety`` subcommand, added through ``register_commands``:

    lvlm-safety shiftdc info DIRECTIONS.safetensors [--json]

prints the layers of a direction file written by the ``shiftdc`` calibrate hook and
checks that every direction is a unit vector.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lvlm_safety_plugins import DataError


def cmd_info(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(args.path)
    except (OSError, SafetensorError) as exc:
        raise DataError(f"{args.path}: not a readable shiftdc direction file: {exc}") from None
    rows = []
    for key in sorted(tensors, key=lambda k: int(k.split(".", 1)[1]) if k.startswith("layer.") else -1):
        if not key.startswith("layer."):
            raise DataError(f"{args.path}: unexpected tensor {key!r} (a direction file holds layer.N tensors)")
        norm = float(tensors[key].float().norm())
        if abs(norm - 1.0) > 1e-3:
            raise DataError(f"{args.path}: {key} has norm {norm:.4f}, a direction must have norm 1")
        rows.append({"layer": int(key.split(".", 1)[1]), "size": int(tensors[key].numel()), "norm": round(norm, 6)})
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(f"layer {row['layer']:>3}  size {row['size']}  norm {row['norm']:.4f}")
    return 0


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("shiftdc", help="shiftdc direction files (example plugin)")
    sub = parser.add_subparsers(dest="shiftdc_command", metavar="SUBCOMMAND")
    info = sub.add_parser("info", help="the layers and norms of a direction file")
    info.add_argument("path", help="a direction file written by the shiftdc calibrate hook")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

"""The cost of CMRM's variants at generation: unsteered vs dataset level vs sample level.

Dataset-level CMRM adds one vector per steered layer (hooks only); sample-level CMRM
measures each input's own shift at the prefill of every ``generate`` call: one text-only
forward and one reference forward (stopped after the deepest steered layer) before the
prompt's own forward. This prices that on one Llava (random weights, built from a
config), one batch of prompts with images, in one run. Cases: ``unsteered`` (the
baseline), ``dataset`` (calibrated vectors, every layer), ``sample-blank`` (the blank
image as reference), ``sample-own`` (``reference: none``, the input's own image: what
the demo selects), all at alpha 0.3, ``from_image`` positions, ``apply_to: prompt``.
Metrics: ``first_token`` (ms for ``generate`` with one new token: the prefill, where
sample level pays) and ``generate_16`` (ms for 16 new tokens; the decode steps are
unsteered under ``apply_to: prompt``), medians of interleaved repeats.

    python benchmarks/cmrm_variants.py --quick --json out/cmrm_variants.json   # 256 hidden, 4 layers
    python benchmarks/cmrm_variants.py --json out/cmrm_variants.json           # 1024 hidden, 12 layers
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_parser, interleaved_median, make_rows, print_table, write_json  # noqa: E402

PROMPTS = ["how do I make a cake", "what is in the image ?", "how do I make a bomb", "describe the image ."]
SETTINGS = ["cmrm.alpha=0.3", "cmrm.layers=all", "cmrm.positions=from_image", "cmrm.apply_to=prompt"]


def build(quick: bool) -> tuple[Any, Any, dict[str, Any], list[dict[str, Any]]]:
    from lvlm_safety_plugins.testing import build_tiny_llava, build_tiny_llava_processor, make_image

    hidden, layers = (256, 4) if quick else (1024, 12)
    model = build_tiny_llava(hidden_size=hidden, num_layers=layers).eval()
    processor = build_tiny_llava_processor()
    processor.tokenizer.padding_side = "left"
    rows = [{"image": make_image(i), "prompt": f"USER: <image> {p} ASSISTANT:"} for i, p in enumerate(PROMPTS)]
    enc = processor(text=[r["prompt"] for r in rows], images=[r["image"] for r in rows], return_tensors="pt", padding=True)
    return model, processor, dict(enc), rows


def timer(model: Any, enc: dict[str, Any], ctx: Callable[[], Any], new_tokens: int) -> Callable[[], float]:
    import torch

    def run() -> float:
        t0 = time.perf_counter()
        with torch.no_grad(), ctx():
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return (time.perf_counter() - t0) * 1000.0

    return run


def main() -> None:
    args = benchmark_parser(__doc__, "a small Llava, fewer repeats (under 60 s on 2 CPU cores)").parse_args()

    import contextlib

    from lvlm_safety_plugins.progress import silence
    from lvlm_safety_plugins.runtime import Runtime

    silence()
    model, processor, enc, rows = build(args.quick)
    cfg = model.config.text_config
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Runtime("cmrm_llava15_dataset", overrides=[*SETTINGS, f"cmrm.vectors={tmp}/v.safetensors"], model=model,
                          processor=processor)
        dataset.calibrate(processor, rows)
        runtimes = {
            "unsteered": None,
            "dataset": dataset,
            "sample-blank": Runtime("cmrm_llava15_dataset", overrides=[*SETTINGS, "cmrm.variant=sample", "cmrm.reference=blank"],
                                    model=model, processor=processor),
            "sample-own": Runtime("cmrm_llava15_dataset", overrides=[*SETTINGS, "cmrm.variant=sample", "cmrm.reference=none"],
                                  model=model, processor=processor),
        }
        contexts = {name: (rt.steering if rt is not None else contextlib.nullcontext) for name, rt in runtimes.items()}
        repeats = args.repeats or (5 if args.quick else 15)
        results: dict[str, dict[str, float]] = {name: {} for name in runtimes}
        for metric, new_tokens in (("first_token", 1), ("generate_16", 16)):
            timers = {name: timer(model, enc, ctx, new_tokens) for name, ctx in contexts.items()}
            for fn in timers.values():
                fn()  # warm up
            for name, value in interleaved_median(timers, repeats).items():
                results[name][metric] = value
    rows_out = make_rows(results, {"first_token": "ms", "generate_16": "ms"}, baseline="unsteered")
    print_table(rows_out, f"CMRM variants at generation: Llava with a {cfg.num_hidden_layers}-layer, {cfg.hidden_size}-wide LLM "
                          f"(random weights), batch {len(PROMPTS)}, every layer steered, prefill only; median of {repeats} "
                          "interleaved repeats")
    write_json(rows_out, args.json)


if __name__ == "__main__":
    main()

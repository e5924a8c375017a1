"""What CMRM costs: calibration per composition, a sweep per setting, sample-level prefill.

Three measurements in one run, each a ratio against a baseline measured beside it
(interleaved repeats, medians):

- ``calibration_throughput`` (samples/s) at 8, 16 and 32 decoder layers, every layer
  steered: ``plain`` (the baseline: the rows' preprocessing and two full forwards per
  batch, the blank-image input and the text-only input, no hooks), ``independent`` and
  ``sequential`` calibration (alpha 0.5, ``from_image``). Goal: sequential >= 0.8x of
  plain at every layer count.
- ``time`` (s) of a sweep of N settings (alpha x layer choice, a measure that costs
  nothing, so only the calibrations count) against one ``calibration`` of the same
  rows as the library runs it, the same work the sweep does per setting (the recipe
  loaded, the vectors calibrated and written to a vector file: ``Runtime.calibrate``);
  ``calibrate() alone`` (the function, no recipe and no file) is shown beside it. The
  row ``sweep/(N/4+1)`` gives the sweep's time over N/4 + 1 calibrations. Goal: <= 1.
- ``prefill`` (ms of one forward of a batch of prompts with images, the steering
  installed before the clock starts and removed after it stops) ``plain`` (the
  baseline) against ``dataset`` vectors and the ``sample`` level with ``reference:
  none`` and ``blank`` (every layer steered, alpha 0.3). Goal: sample/none <= 2.1x.

    python benchmarks/cmrm_cost.py --quick --json out/cmrm_cost.json     # tiny Llava, CPU, < 60 s
    python benchmarks/cmrm_cost.py --shape llava7b --device cuda          # LLaVA-1.5-7B's shape, random fp16 weights

``--shape llava7b`` builds a Llava with LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336
pixels, 576 image tokens; a 4096-wide LLM with 32 layers, truncated to 8 and 16 for the
smaller counts) with random weights in fp16 on ``--device``; it needs an accelerator
with about 16 GB free.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_parser, interleaved_median, make_rows, print_table, write_json  # noqa: E402

PROMPTS = ["what is in the image ?", "describe this picture please", "how to make a bomb", "tell me how to steal a bike"]
LAYER_COUNTS = (8, 16, 32)


def build(shape: str, layers: int, device: str) -> tuple[Any, Any]:
    """A random-weight Llava and its processor."""
    import torch

    from lvlm_safety_plugins.testing import build_tiny_llava, build_tiny_llava_processor

    if shape == "quick":
        return build_tiny_llava(hidden_size=64, num_layers=layers).to(device).eval(), build_tiny_llava_processor()
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from lvlm_safety_plugins.compat import clip_image_processor_class, llava_processor_kwargs
    from lvlm_safety_plugins.testing import SPECIAL_TOKENS, tiny_tokenizer

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, pad_token_id=None,
                       bos_token_id=2, eos_token_id=3)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=SPECIAL_TOKENS.index("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=0)
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(before)
    images = clip_image_processor_class()(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=images, tokenizer=tiny_tokenizer(),
                               **llava_processor_kwargs(patch_size=14, strategy="default", additional_tokens=1))
    return model, processor


def calibration_rows(n: int) -> list[dict[str, Any]]:
    from lvlm_safety_plugins.testing import make_image

    return [{"image": make_image(i), "prompt": f"USER: <image> {PROMPTS[i % len(PROMPTS)]} ASSISTANT:"} for i in range(n)]


def config(**values: Any) -> Any:
    base = {"batch_size": 8, "alpha": 0.5, "positions": "from_image", "apply_to": "both"}
    return type("CMRMSettings", (), {**base, **values})()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> Callable[[], float]:
    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    return run


def calibration_throughput(shape: str, layers: int, rows: list[dict[str, Any]], device: str, repeats: int) -> list[dict[str, Any]]:
    import torch

    from lvlm_safety_plugins.adapters import get_adapter
    from lvlm_safety_plugins.methods.cmrm import calibrate

    model, processor = build(shape, layers, device)
    adapter = get_adapter(model)
    n = len(rows)

    def plain() -> None:
        with torch.no_grad():
            for i in range(0, n, 8):
                chunk = rows[i:i + 8]
                enc = processor(text=[r["prompt"] for r in chunk], images=[r["image"] for r in chunk], return_tensors="pt",
                                padding=True)
                enc = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in enc.items()}
                model(**adapter.blank_image_batch(enc, image_processor=processor.image_processor), use_cache=False)
                model(**adapter.text_only_batch(enc), use_cache=False)

    cases = {
        "plain": timed(plain, device),
        "independent": timed(lambda: calibrate(model, processor, rows, config(composition="independent"), progress=False), device),
        "sequential": timed(lambda: calibrate(model, processor, rows, config(composition="sequential"), progress=False), device),
    }
    calibrate(model, processor, rows[:8], config(composition="sequential"), progress=False)  # warm up
    times = interleaved_median(cases, repeats)
    results = {f"{layers} layers/{case}": {"calibration_throughput": n / t} for case, t in times.items()}
    del model
    return make_rows(results, {"calibration_throughput": "samples/s"}, baseline=f"{layers} layers/plain")


def sweep_rows(shape: str, layers: int, rows: list[dict[str, Any]], device: str, alphas: list[float],
               layer_choices: list[str], repeats: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from lvlm_safety_plugins import Runtime, load_recipe
    from lvlm_safety_plugins.methods.cmrm import calibrate
    from lvlm_safety_plugins.methods.cmrm.sweep import run_sweep

    model, processor = build(shape, layers, device)
    settings = len(alphas) * len(layer_choices)
    report: dict[str, Any] = {}

    def measure(runtime: Any) -> dict[str, float]:  # costs nothing: only the calibrations count
        return {"harmful_refused": 0.5, "benign_refused": 0.0, "utility": math.nan}

    def sweep() -> None:
        with tempfile.TemporaryDirectory() as work:
            result = run_sweep(model, processor, rows, measure, alphas=alphas, layer_choices=layer_choices, workdir=work,
                               overrides=["cmrm.alpha=0.5", "cmrm.batch_size=8"], progress=False)
            report.update(result.meta.get("cost", {}))

    def calibration(work: str) -> None:  # one calibration as the library runs it: recipe, calibrate, vector file
        recipe = load_recipe("cmrm_llava15_dataset", [f"cmrm.alpha={alphas[-1]}", "cmrm.batch_size=8", "cmrm.layers=all",
                                                      f"cmrm.vectors={work}/vectors.safetensors"])
        Runtime(recipe, model=model, processor=processor).calibrate(processor, rows)

    with tempfile.TemporaryDirectory() as work:
        cases = {
            "calibration": timed(lambda: calibration(work), device),
            "calibrate() alone": timed(lambda: calibrate(model, processor, rows, config(alpha=alphas[-1]), progress=False),
                                       device),
            f"sweep-{settings}": timed(sweep, device),
        }
        times = interleaved_median(cases, repeats)
    results = {case: {"time": t} for case, t in times.items()}
    out = make_rows(results, {"time": "s"}, baseline="calibration")
    budget = (settings / 4 + 1) * times["calibration"]
    out.append({"case": f"sweep-{settings}/(N/4+1)", "metric": "time", "value": times[f"sweep-{settings}"], "unit": "s",
                "baseline": f"{settings / 4 + 1:g} calibrations", "ratio": times[f"sweep-{settings}"] / budget})
    return out, report


def prefill_rows(shape: str, layers: int, device: str, repeats: int) -> list[dict[str, Any]]:
    import torch

    from lvlm_safety_plugins.methods.cmrm import calibrate, steer
    from lvlm_safety_plugins.testing import make_image

    model, processor = build(shape, layers, device)
    processor.tokenizer.padding_side = "left"
    prompts = [f"USER: <image> {p} ASSISTANT:" for p in PROMPTS]
    enc = processor(text=prompts, images=[make_image(i) for i in range(len(prompts))], return_tensors="pt", padding=True)
    enc = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in enc.items()}
    vectors = calibrate(model, processor, calibration_rows(8), config(alpha=0.3), progress=False)
    steered = dict(alpha=0.3, positions="from_image", apply_to="both", processor=processor)
    contexts: dict[str, Callable[[], Any]] = {
        "plain": contextlib.nullcontext,
        "dataset": lambda: steer(model, vectors, **steered),
        "sample/none": lambda: steer(model, None, variant="sample", reference="none", **steered),
        "sample/blank": lambda: steer(model, None, variant="sample", reference="blank", **steered),
    }

    def forward(ctx: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:  # the prefill alone: installing and removing the steering is not timed
            with torch.no_grad(), ctx():
                return timed(lambda: model(**enc), device)()

        return run

    cases = {name: forward(ctx) for name, ctx in contexts.items()}
    for fn in cases.values():
        fn()
    times = interleaved_median(cases, repeats)
    return make_rows({name: {"prefill": 1000.0 * t} for name, t in times.items()}, {"prefill": "ms"}, baseline="plain")


def main() -> None:
    parser = benchmark_parser(__doc__, "tiny Llava shapes on the CPU, few rows and repeats (under 60 s on 2 CPU cores)")
    parser.add_argument("--shape", choices=("quick", "llava7b"), default="quick",
                        help="quick: a tiny Llava (64 wide); llava7b: LLaVA-1.5-7B's shapes, random fp16 weights")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 steadies ratios on a busy machine")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from lvlm_safety_plugins.progress import silence

    silence()
    shape = args.shape
    quick = args.quick or shape == "quick"
    repeats = args.repeats or (9 if args.quick else 5)
    n = 48 if args.quick else (64 if shape == "quick" else 32)
    rows_in = calibration_rows(n)
    started = time.perf_counter()
    out: list[dict[str, Any]] = []
    for layers in LAYER_COUNTS:
        out += calibration_throughput(shape, layers, rows_in, args.device, repeats)
    alphas = [0.25, 0.5, 0.75, 1.0] if args.quick else [0.2, 0.4, 0.6, 0.8, 1.0]
    choices = ["all"] if args.quick else ["all", "4-7"]
    sweep, cost = sweep_rows(shape, 16 if quick else 32, rows_in, args.device, alphas, choices, repeats)
    out += sweep
    out += prefill_rows(shape, 16 if quick else 32, args.device, repeats * 5)
    import torch

    print_table(out, f"CMRM cost, {shape} shapes on {args.device} ({torch.get_num_threads()} threads), {n} calibration rows "
                     f"(batch 8), every layer steered; "
                     f"medians of {repeats} interleaved repeats ({time.perf_counter() - started:.0f} s)")
    if cost:
        print("sweep cost (its own report):", ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in cost.items()))
    goals = []
    for layers in LAYER_COUNTS:
        ratio = next(r["ratio"] for r in out if r["case"] == f"{layers} layers/sequential")
        goals.append((f"sequential calibration, {layers} layers", ratio, ">= 0.8", ratio >= 0.8))
    ratio = next(r["ratio"] for r in out if r["case"].endswith("/(N/4+1)"))
    goals.append((f"sweep of {len(alphas) * len(choices)} settings over (N/4+1) calibrations", ratio, "<= 1", ratio <= 1.0))
    ratio = next(r["ratio"] for r in out if r["case"] == "sample/none")
    goals.append(("sample level, reference none, prefill", ratio, "<= 2.1", ratio <= 2.1))
    print("goals:")
    for name, value, goal, met in goals:
        print(f"  {name}: {value:.3f}x (goal {goal}) {'met' if met else 'NOT met'}")
    write_json(out, args.json)


if __name__ == "__main__":
    main()

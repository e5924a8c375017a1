"""Training-step time and peak memory with the TGA loss vs the plain LM loss.

Same model, same batch, same run. Cases: ``plain`` (the baseline: host LM loss only)
and ``tga`` (host loss + TGA's caption teacher pass, capture and both terms), and, to
show where TGA's extra time goes, ``tga teacher pass alone`` (the caption pass as the
plugin runs it, timed in the same interleaving). Metrics:
``time`` (seconds per optimizer step, median of interleaved steps) and ``peak_memory``
(MiB above the set-up footprint: the peak RSS of a fresh process during two steps,
after the kernel's peak mark is reset, on the CPU; or
``torch.cuda.max_memory_allocated`` on a GPU; each case in its own process).

On the CPU the memory case runs with glibc's ``MALLOC_MMAP_THRESHOLD_=65536``: every
allocation of 64 KiB or more (every tensor that matters) gets its own mapping, which
``free`` returns to the kernel at once, so the resident set follows the live tensors
and its peak is the allocator-level peak. Without it, freed heap memory stays resident
or not depending on fragmentation, and the same step's figure swung between 0.70x and
1.17x from run to run; with it, repeated runs agree within 0.1 MiB. (torch has no CPU
allocator statistics, and ``tracemalloc`` sees only Python's allocator, not torch's.)

    python benchmarks/tga_step.py --quick --json out/tga_step.json
    python benchmarks/tga_step.py --shape llava7b --device cuda --dtype bfloat16   # on a GPU

Targets in the issue (at LLaVA-1.5-7B shapes on a GPU): tga <= 1.15x time and
<= 1.05x peak memory. On the CPU this reports the ratios at small shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_median, make_rows, print_table, write_json  # noqa: E402

from lvlm_safety_plugins.adapters import get_adapter  # noqa: E402

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vision hidden, image size, batch, text tokens
    "quick": dict(hidden=256, layers=4, heads=4, kv=4, inter=688, vhidden=64, image=56, batch=4, text=24),
    "cpu": dict(hidden=1024, layers=8, heads=16, kv=16, inter=2752, vhidden=256, image=336, batch=2, text=48),
    "llava7b": dict(hidden=4096, layers=32, heads=32, kv=32, inter=11008, vhidden=1024, image=336, batch=4, text=96),
}


def build(shape: dict[str, int], device: str, dtype: Any) -> tuple[Any, dict[str, Any], Any]:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=shape["vhidden"], intermediate_size=shape["vhidden"] * 4, num_hidden_layers=2,
                              num_attention_heads=max(1, shape["vhidden"] // 64), image_size=shape["image"], patch_size=14)
    text = LlamaConfig(vocab_size=32064, hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv"], max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(cfg).to(device=device, dtype=dtype)
    patches = (shape["image"] // 14) ** 2
    B, T = shape["batch"], shape["text"]
    from lvlm_safety_plugins.compat import llava_splices_image_features

    legacy = llava_splices_image_features(model)
    n_img = 1 if legacy else patches
    ids = torch.randint(10, 31000, (B, T + n_img), device=device)
    ids[:, 4 : 4 + n_img] = 32000
    ret = torch.zeros_like(ids, dtype=torch.bool)
    ret[:, 1:4] = True  # retrieved-text tokens right before the image
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(B, 3, shape["image"], shape["image"], device=device, dtype=dtype),
        "labels": ids.masked_fill(ids == 32000, -100),
    }
    cap_ids = torch.randint(10, 31000, (B, 24), device=device)
    extras = {"tga_caption_input_ids": cap_ids, "tga_caption_attention_mask": torch.ones_like(cap_ids), "tga_retrieved_mask": ret}
    return model, batch, extras


def make_step(model: Any, batch: dict[str, Any], extras: dict[str, Any], use_tga: bool, layers: str) -> Any:
    import torch

    from lvlm_safety_plugins import EXTRAS_KEY, Runtime

    runtime = Runtime({"plugins": ["tga"], "tga": {"layers": layers, "schedule": "constant"}}, model=model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        if use_tga:
            loss = runtime.training_step(model, {**batch, EXTRAS_KEY: extras}, step=0, max_steps=100).loss
        else:
            loss = model(**batch).loss
        loss.backward()
        opt.step()

    return step


def make_teacher_pass(model: Any, batch: dict[str, Any], extras: dict[str, Any], layers: str) -> Any:
    """TGA's caption teacher pass alone, the plugin's own ``teacher_states`` (what
    ``before_forward`` runs: the teacher rows in the training rows' template, no
    gradient, the forward stopped after the deepest TGA layer): where the step's extra
    time goes."""
    from lvlm_safety_plugins import Runtime

    runtime = Runtime({"plugins": ["tga"], "tga": {"layers": layers, "schedule": "constant"}}, model=model)
    plugin, adapter = runtime.methods["tga"], get_adapter(model)
    return lambda: plugin.teacher_states(model, adapter, batch, extras)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def layers_for(n: int) -> str:
    """The reference code's 10-18 of 32, scaled to ``n`` layers."""
    lo, hi = round(n * 10 / 32), max(round(n * 18 / 32), round(n * 10 / 32))
    return f"{lo}-{min(hi, n - 1)}"


def read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) and return the current RSS (KiB),
    so VmHWM afterwards is the peak of what runs next."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return read_status_kib("VmRSS")


def memory_case(args: argparse.Namespace) -> None:
    """Child process: one case, print the peak memory above set-up (MiB) as JSON."""
    import torch

    dtype = getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    model, batch, extras = build(shape, args.device, dtype)
    get_adapter(model).set_trainable("projector")
    step = make_step(model, batch, extras, args.case == "tga", layers_for(shape["layers"]))
    if args.device.startswith("cuda"):
        step()  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        import gc

        step()  # warm-up: optimizer state and allocator pools exist before measuring
        gc.collect()
        base = reset_peak_rss()
        for _ in range(2):
            step()
        peak = (read_status_kib("VmHWM") - base) / 1024
    print(json.dumps({"peak_memory": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few steps (under 60 s on 2 CPU cores)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default: quick with --quick, else cpu)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, help="timed steps per case")
    parser.add_argument("--json", help="write the result rows here")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: every core); 1 steadies ratios on a busy machine")
    parser.add_argument("--memory-case", dest="case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = args.shape or ("quick" if args.quick else "cpu")
    if args.case:
        memory_case(args)
        return

    import torch

    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    dtype = getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    steps = args.steps or (40 if args.quick else 10)
    model, batch, extras = build(shape, args.device, dtype)
    get_adapter(model).set_trainable("projector")
    layers = layers_for(shape["layers"])
    steps_fn = {"plain": make_step(model, batch, extras, False, layers), "tga": make_step(model, batch, extras, True, layers),
                "tga teacher pass alone": make_teacher_pass(model, batch, extras, layers)}
    for fn in steps_fn.values():
        fn()  # warm up

    def timed(fn: Any) -> Any:
        def run() -> float:
            sync(args.device)
            t0 = time.perf_counter()
            fn()
            sync(args.device)
            return time.perf_counter() - t0

        return run

    times = interleaved_median({k: timed(v) for k, v in steps_fn.items()}, steps)
    results: dict[str, dict[str, float]] = {k: {"time": v} for k, v in times.items()}
    teacher = results.pop("tga teacher pass alone")
    for case in ("plain", "tga"):
        cmd = [sys.executable, __file__, "--memory-case", case, "--shape", args.shape, "--device", args.device, "--dtype", args.dtype]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # the resident set follows the live tensors (see above)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results[case]["peak_memory"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_memory"]
    results["tga teacher pass alone"] = teacher  # a row after the two cases, time only
    rows = make_rows(results, {"time": "s/step", "peak_memory": "MiB"}, baseline="plain")
    print_table(rows, f"TGA training step, shape {args.shape} ({shape['hidden']}d x {shape['layers']} layers, batch {shape['batch']}), "
                      f"TGA layers {layers}, device {args.device}, {args.dtype}, projector trained")
    write_json(rows, args.json)


if __name__ == "__main__":
    main()

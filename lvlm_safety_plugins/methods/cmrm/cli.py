"""``lvlm-safety calibrate``: CMRM vectors for a local model from a calibration set."""

from __future__ import annotations

import argparse
from typing import Any


def _check_inputs(args: argparse.Namespace) -> Any:
    """Everything that can be checked before a model is loaded: the recipe, the
    template, the data file, the device and the output (one ``--overwrite`` rule)."""
    from pathlib import Path

    from ...errors import RecipeError
    from ...fileio import check_output
    from ...loading import DataFileError, check_device
    from ...prompts import check_template
    from ...recipe import load_recipe

    check_template(args.template)
    if args.sweep:
        if not args.validation:
            from ...errors import LVLMSafetyError

            raise LVLMSafetyError("calibrate --sweep: give the validation split with --validation NAME:PATH (repeatable)")
        check_template(args.eval_template, "--eval-template")
    recipe = load_recipe(args.recipe, args.overrides)
    if "cmrm" not in recipe.plugins:
        raise RecipeError(f"recipe {recipe.name!r} does not activate cmrm (plugins: {recipe.plugins})", recipe.path)
    if not Path(args.data).is_file():
        raise DataFileError(f"--data {args.data}: file not found")
    if args.sweep:
        out = Path(args.out)
        if out.suffix == ".safetensors":
            from ...errors import OutputError

            raise OutputError(f"calibrate --sweep: --out {out} must be a folder (it gets sweep.json, sweep.png, vectors.safetensors)")
        check_output(out, overwrite=args.overwrite, kind="folder", replace_folder=True, inputs=[args.data])
    else:
        check_output(args.out, overwrite=args.overwrite, inputs=[args.data])
    check_device(args.device)
    return recipe


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ...distributed import init_from_env, is_main_process, local_device
    from ...loading import load_model_and_processor
    from ...prompts import PromptFormat
    from ..layers import parse_layers
    from .calibration import calibrate, save_vectors

    recipe = _check_inputs(args)  # before any loading or calibration
    cfg = recipe.cmrm
    if args.sweep:
        return _cmd_sweep(args, recipe)
    device = local_device(args.device)
    init_from_env(device)  # under torchrun: each process calibrates its shard
    model, processor = load_model_and_processor(args.model, device)
    fmt = PromptFormat(processor, args.template)
    if is_main_process():
        print(f"prompt format: {fmt.name}")
    vectors = calibrate(model, processor, args.data, cfg, layers=parse_layers(cfg.layers), prompt_template=fmt,
                        image_folder=args.image_folder, recipe_yaml=recipe.to_yaml())
    path = save_vectors(vectors, args.out)
    if not is_main_process():
        return 0
    norms = ", ".join(f"{l}:{v.norm():.3g}" for l, v in vectors.vectors.items())
    print(f"calibrated {len(vectors.layers)} layers on {vectors.samples} samples (reference {vectors.reference}, "
          f"measured at {vectors.measure_at}); shift norms {norms}")
    print(f"wrote {path}")
    return 0


def _cmd_sweep(args: argparse.Namespace, recipe: Any) -> int:
    """``calibrate --sweep``: every alpha x layers (x positions x phase x variant x reference) setting
    calibrated and measured on the validation benchmarks; the chosen setting's vectors go
    to OUT/vectors.safetensors (a sample-level choice has none)."""
    from pathlib import Path

    from ...errors import LVLMSafetyError
    from ...evaluation.generate import GenerationSettings
    from ...evaluation.harness import BenchmarkSpec, load_benchmark
    from ...loading import load_model_and_processor
    from ...prompts import PromptFormat
    from .calibration import iter_calibration_rows
    from .sweep import SelectionRule, alpha_grid, harness_measure, run_sweep, vectors_file, write_sweep

    if not args.validation:
        raise LVLMSafetyError("calibrate --sweep: give the validation split with --validation NAME:PATH (repeatable)")
    out = Path(args.out)
    alphas = alpha_grid(args.alphas)
    layer_choices = args.layer_choice or [str(recipe.cmrm.layers)]
    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, template=args.eval_template)
    except ValueError as exc:
        raise LVLMSafetyError(f"calibrate --sweep: {exc}") from None
    model, processor = load_model_and_processor(args.model, args.device)
    examples = [e for text in args.validation for e in load_benchmark(BenchmarkSpec.parse(text), args.limit)]
    fmt = PromptFormat(processor, args.template)  # the format eval uses by default, as in plain calibrate
    print(f"prompt format: calibration {fmt.name}; validation {PromptFormat(processor, args.eval_template).name}")
    calibration = [{"image": r["image"], "prompt": fmt(r["prompt"]), "id": r["id"]}
                   for r in iter_calibration_rows(args.data, args.image_folder)]
    rule = SelectionRule(args.max_over_refusal_increase, args.max_utility_drop)
    work = out / "settings"
    result = run_sweep(model, processor, calibration, harness_measure(model, processor, examples, settings=settings),
                       recipe=recipe, alphas=alphas, layer_choices=layer_choices, position_choices=args.position_choice or (),
                       apply_to_choices=args.apply_to_choice or (), variant_choices=args.variant_choice or (),
                       reference_choices=args.reference_choice or (),
                       workdir=work, rule=rule)
    result.meta.update({"recipe": recipe.name, "model": str(args.model), "validation": list(args.validation),
                        "calibration": str(args.data)})
    files = write_sweep(result, out)
    print(f"{'alpha':>6}  {'layers':<12} {'positions':<10} {'apply_to':<9} {'variant':<8} {'reference':<9} "
          f"{'harmful refused':>15} {'benign refused':>14} {'utility':>8}")
    for p in result.points:
        mark = "  <- chosen" if p is result.chosen else ""
        print(f"{p.alpha:>6g}  {p.layers:<12} {p.positions or '-':<10} {p.apply_to or '-':<9} {p.variant or '-':<8} {p.reference or '-':<9} "
              f"{p.metrics['harmful_refused']:>15.3f} {p.metrics['benign_refused']:>14.3f} {p.metrics['utility']:>8.3f}{mark}")
    cost = result.meta.get("cost", {})
    if cost:
        print(f"cost: {cost['settings']} settings, calibrating {cost['calibrate_s']:.1f} s ({cost.get('calibrations', 0)} sequential "
              f"calibrations from {cost.get('prepared', 0)} prepared pass(es) over the data), measuring {cost['measure_s']:.1f} s "
              f"(+ {cost['baseline_measure_s']:.1f} s unsteered)")
    print(f"rule: {rule.describe()}")
    if result.chosen is None:
        print("chosen: none: " + result.to_dict()["reason"])
    elif (result.chosen.variant or recipe.cmrm.variant.value) == "sample":  # measured per input: no vector file
        print(f"chosen: {' '.join(result.chosen.overrides)}")
    else:
        c = result.chosen
        from ...prompts import FORMAT_KEY
        from .vectorfile import SteeringVectors

        target = out / "vectors.safetensors"
        chosen = SteeringVectors.load(vectors_file(work, c.layers, c.alpha, c.positions, c.apply_to, c.reference))
        chosen.extra[FORMAT_KEY] = fmt.name  # the calibration prompts' format, which eval checks
        chosen.save(target)
        print(f"chosen: {' '.join(c.overrides)} cmrm.vectors={target}")
    for path in files.values():
        if path:
            print(f"wrote {path}")
    return 0


def add_calibrate_command(sub: Any) -> None:
    from .sweep import DIMENSIONS

    p = sub.add_parser("calibrate", help="calibrate dataset-level CMRM vectors for a model")
    p.add_argument("--recipe", required=True, help="recipe name or path (activating cmrm)")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. cmrm.layers=8-20")
    p.add_argument("--model", required=True, help="local model folder (model and processor)")
    p.add_argument("--data", required=True, help="calibration data: .jsonl (image, prompt) or LLaVA-format .json")
    p.add_argument("--image-folder", help="folder image paths are relative to (default: the data file's folder)")
    p.add_argument("--template", help="prompt template with {prompt}, e.g. 'USER: <image>\\n{prompt} ASSISTANT:' (default: "
                                      "as every command: the processor's chat template, else LLaVA-1.5's format; the "
                                      "vector file records which, and eval refuses vectors measured under another)")
    p.add_argument("--out", required=True, help="output .safetensors file (written atomically); with --sweep a folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", default="cpu")
    s = p.add_argument_group("sweep (choose alpha, layers, positions, phase, variant and reference on a validation split)")
    s.add_argument("--sweep", action="store_true",
                   help="calibrate and measure every alpha x layers (x positions x phase x variant x reference) setting, "
                        "pick one by the rule")
    s.add_argument("--validation", action="append", metavar="NAME:PATH",
                   help="validation benchmark as for `lvlm-safety eval --benchmark` (repeatable); harmful, benign and "
                        "multiple-choice items give the three rates")
    s.add_argument("--alphas", default="0:1:0.1", help="start:stop:step or a comma list (default 0:1:0.1)")
    s.add_argument("--layer-choice", action="append", metavar="LAYERS",
                   help="a layer selection to sweep, e.g. all or 8-20 (repeatable; default: the recipe's)")
    s.add_argument("--position-choice", action="append", metavar="POSITIONS",
                   help="steered positions to sweep: from_image, image, text or all (repeatable; default: the recipe's)")
    s.add_argument("--apply-to-choice", action="append", metavar="PHASE",
                   help="steered phase to sweep: prompt, generated or both (repeatable; default: the recipe's)")
    s.add_argument("--variant-choice", action="append", metavar="VARIANT", choices=DIMENSIONS["variant"],
                   help="CMRM variant to sweep: dataset (calibrated vectors) or sample (each input's own shift, no "
                        "calibration) (repeatable; default: the recipe's)")
    s.add_argument("--reference-choice", action="append", metavar="REFERENCE", choices=DIMENSIONS["reference"],
                   help="reference image of the shift to sweep: blank, noise or none (the input's own image) "
                        "(repeatable; default: the recipe's)")
    s.add_argument("--limit", type=int, help="at most this many examples per validation benchmark")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--eval-template", help="prompt template of the validation items (default: the processor's chat template)")
    s.add_argument("--max-over-refusal-increase", type=float, default=0.05)
    s.add_argument("--max-utility-drop", type=float, default=0.05)
    p.set_defaults(func=cmd_calibrate)

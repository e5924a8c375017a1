"""The evaluation harness: benchmarks x runs (the model as it is, and with each recipe's
plugins), generation cached for resume, judging, metrics and reports.

>>> results = evaluate(model, processor, [BenchmarkSpec("figstep", "FigStep/")],  # doctest: +SKIP
...                    runs=[RunSpec("base"), RunSpec("cmrm", "cmrm_llava15_sample")], out="eval-out")

Files in ``out``:

``generations.jsonl``  every answer, keyed by (run, benchmark, example id); appended a
                       batch at a time, so an interrupted evaluation resumes where it
                       stopped (see :mod:`.cache`)
``judgments.jsonl``    judge verdicts, keyed by (judge, run, benchmark, example id)
``examples.jsonl``     one row per (run, example): prompt, answer, verdict
``results.json``       metrics with Wilson 95% intervals, overall and per category
``results.md``         the same as Markdown tables, runs side by side
``results.png``        a bar plot (needs matplotlib)
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

from ..distributed import all_reduce_sum, barrier, is_distributed, is_main_process, rank, world_size
from ..errors import LVLMSafetyError
from ..fileio import atomic_write
from ..loading import DataFileError
from .cache import RecordLog, fingerprint
from .examples import BENIGN, CHOICE, HARMFUL, Example, to_example
from .generate import GenerationSettings, HFGenerator
from .judges import describe_judge, make_judge
from .metrics import accuracy_metrics, over_refusal_metrics, parse_choice, safety_metrics

RESULTS_VERSION = 1


@dataclass
class BenchmarkSpec:
    """A benchmark to run: a registered loader ``name``, the local ``path`` and loader
    ``options`` (every option goes to the loader); ``title`` names it in reports
    (default: the name and its options)."""

    name: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)
    title: str = ""

    @property
    def display(self) -> str:
        if self.title:
            return self.title
        if not self.options:
            return self.name
        return f"{self.name}[{','.join(f'{k}={v}' for k, v in self.options.items())}]"

    @classmethod
    def parse(cls, text: str) -> "BenchmarkSpec":
        """``[TITLE@]NAME[,key=value...]:PATH``. Every ``key=value`` is a loader option;
        a value may contain commas (``scenarios=01,02``: a piece without ``=`` continues
        the previous value). ``TITLE@`` names the benchmark in reports."""
        head, sep, path = text.partition(":")
        if not sep or not head.strip() or not path.strip():
            raise LVLMSafetyError(f"--benchmark {text!r}: expected [TITLE@]NAME:PATH or NAME,key=value:PATH")
        title, at, rest = head.partition("@")
        if not at or "," in title or "=" in title:  # an "@" inside an option value is no title
            title, rest = "", head
        elif not title.strip() or not rest.strip():
            raise LVLMSafetyError(f"--benchmark {text!r}: expected TITLE@NAME[,key=value...]:PATH")
        name, *pieces = [p.strip() for p in rest.split(",")]
        options: dict[str, Any] = {}
        last: str | None = None
        for piece in pieces:
            key, eq, value = piece.partition("=")
            if eq and key.strip():
                last = key.strip()
                if last in options:
                    raise LVLMSafetyError(f"--benchmark {text!r}: option {last!r} given twice")
                options[last] = value.strip()
            elif last is not None and not eq:
                options[last] = f"{options[last]},{piece}"
            else:
                raise LVLMSafetyError(f"--benchmark {text!r}: option {piece!r} is not key=value")
        return cls(name=name, path=path.strip(), options=options, title=title.strip())


@dataclass
class RunSpec:
    """One configuration of the model: ``recipe`` ``None`` is the model as it is;
    otherwise a recipe name, path or :class:`~lvlm_safety_plugins.recipe.Recipe` whose
    plugins (steering) are active while it generates."""

    name: str = "base"
    recipe: Any = None
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> "RunSpec":
        """``RECIPE [key=value ...]`` or ``NAME@RECIPE [key=value ...]``."""
        import shlex

        parts = shlex.split(text)
        if not parts:
            raise LVLMSafetyError("--recipe: empty")
        head, overrides = parts[0], parts[1:]
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise LVLMSafetyError(f"--recipe {text!r}: overrides must be key=value, got {', '.join(bad)}")
        name, at, recipe = head.partition("@")
        if not at:
            name, recipe = Path(head).stem if head.endswith((".yaml", ".yml")) else head, head
        if not name or not recipe:
            raise LVLMSafetyError(f"--recipe {text!r}: expected RECIPE or NAME@RECIPE")
        return cls(name=name, recipe=recipe, overrides=overrides)


def _loader_options(name: str, loader: Callable[..., Any], options: Mapping[str, Any]) -> None:
    try:
        params = inspect.signature(loader).parameters
    except (TypeError, ValueError):  # builtins and odd callables: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in list(params)[1:] if params[p].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        hint = (f"; label= is a loader option now: to name the benchmark in reports write TITLE@{name},...:PATH"
                if "label" in unknown else "")
        raise DataFileError(f"benchmark {name!r}: unknown option(s) {', '.join(unknown)} (valid: {', '.join(valid) or 'none'}){hint}")


#: how ``limit`` picks examples: spread over the categories (seeded) or the first N
LIMIT_MODES = ("sample", "first")


def sample_across_categories(examples: Sequence[Example], limit: int, seed: int = 0) -> list[Example]:
    """``limit`` examples spread evenly over the categories: each category's examples
    are shuffled with ``seed``, then the categories (sorted by name) take turns giving
    one until ``limit`` are taken. The chosen examples keep their original order."""
    import random

    if limit >= len(examples):
        return list(examples)
    groups: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example.category, []).append(i)
    rng = random.Random(seed)
    queues = []
    for category in sorted(groups):
        order = list(groups[category])
        rng.shuffle(order)
        queues.append(order)
    chosen: list[int] = []
    while len(chosen) < limit:
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop())
    return [examples[i] for i in sorted(chosen)]


def load_benchmark(spec: BenchmarkSpec, limit: int | None = None, pm: Any = None, *, limit_mode: str = "sample",
                   seed: int = 0, skip_missing_images: bool = False, skipped: list[str] | None = None) -> list[Example]:
    """The examples of one benchmark, validated: ids unique, images present.

    ``limit``: keep only this many, spread over the categories (``limit_mode="sample"``,
    seeded by ``seed``) or the first ones (``"first"``). A missing image is an error
    naming the file and row, unless ``skip_missing_images``: then the example is left
    out and its id appended to ``skipped``."""
    from ..registry import benchmarks

    if limit_mode not in LIMIT_MODES:
        raise LVLMSafetyError(f"limit mode must be one of {', '.join(LIMIT_MODES)}, got {limit_mode!r}")
    loaders = benchmarks(pm)
    if spec.name not in loaders:
        raise LVLMSafetyError(f"unknown benchmark {spec.name!r} (registered: {', '.join(sorted(loaders)) or 'none'})")
    loader = loaders[spec.name]
    _loader_options(spec.name, loader, spec.options)
    examples: list[Example] = []
    seen: dict[str, Example] = {}
    missing: list[str] = []
    for i, raw in enumerate(loader(spec.path, **spec.options)):
        example = to_example(raw, spec.display, i)
        if example.id in seen:
            raise DataFileError(f"{example.where}: id {example.id!r} is used twice (first at {seen[example.id].where})")
        seen[example.id] = example
        if isinstance(example.image, (str, Path)) and not Path(example.image).is_file():
            if not skip_missing_images:
                raise DataFileError(f"{example.where}: image not found: {example.image} (--skip-missing-images leaves such "
                                    "items out, counted in the report)")
            missing.append(example.id)
            continue
        examples.append(example)
        if limit is not None and limit_mode == "first" and len(examples) >= limit:
            break
    if skipped is not None:
        skipped.extend(missing)
    if not examples:
        raise DataFileError(f"{spec.path}: benchmark {spec.display!r} has no examples"
                            + (f" ({len(missing)} skipped for missing images)" if missing else ""))
    if limit is not None and limit_mode == "sample":
        examples = sample_across_categories(examples, limit, seed)
    return examples


def _run_benchmarks(examples: Mapping[str, Sequence[Example]], run: RunSpec,
                    plain_only: Collection[str]) -> list[tuple[str, Sequence[Example]]]:
    """The benchmarks ``run`` answers: all, except ``plain_only`` ones for a run with a recipe."""
    return [(bench, items) for bench, items in examples.items() if run.recipe is None or bench not in plain_only]


def _batches(examples: Sequence[Example], size: int) -> Iterator[list[Example]]:
    """Consecutive batches of at most ``size``; items with and without an image are
    never mixed in one batch."""
    batch: list[Example] = []
    for example in examples:
        if batch and (len(batch) >= size or (batch[0].image is None) != (example.image is None)):
            yield batch
            batch = []
        batch.append(example)
    if batch:
        yield batch


def load_run_recipes(runs: Sequence[RunSpec], pm: Any = None) -> dict[str, Any]:
    """Every run's recipe, loaded and validated (``{run name: Recipe or None}``): called
    before any generation, so a bad ``--recipe`` fails before the first answer, naming
    the run."""
    from ..errors import RecipeError
    from ..recipe import as_recipe

    out: dict[str, Any] = {}
    for run in runs:
        if run.recipe is None:
            out[run.name] = None
            continue
        try:
            out[run.name] = as_recipe(run.recipe, run.overrides, pm=pm)
        except RecipeError as exc:
            raise RecipeError(f"run {run.name!r}: {exc}") from exc
    return out


def _runtime(run: RunSpec, model: Any, processor: Any, pm: Any, recipe: Any = None) -> Any:
    if run.recipe is None:
        return None
    from ..recipe import as_recipe
    from ..runtime import Runtime

    recipe = recipe if recipe is not None else as_recipe(run.recipe, run.overrides, pm=pm)
    return Runtime(recipe, model=model, processor=processor, pm=pm)


def model_identity(model: Any = None, model_id: str | None = None) -> dict[str, Any]:
    """What the answers of ``model`` depend on besides its name: a digest of its loaded
    weights (:func:`~lvlm_safety_plugins.identity.weights_digest`) and, when
    ``model_id`` is a folder, its weight files' sizes, mtimes and hashes."""
    from ..identity import weights_digest, weights_files_identity

    out: dict[str, Any] = {}
    if model is not None and callable(getattr(model, "named_parameters", None)):
        out["weights"] = weights_digest(model)
    if model_id:
        files = weights_files_identity(model_id)
        if files:
            out["files"] = files
    return out


def _stale_reasons(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """Why a cached answer no longer fits (from the ``parts`` records carry)."""
    if not old:
        return ["the cached answer was written by an earlier version (no content keys)"]
    labels = {"model": "the model's weights changed", "generator": "the generation settings changed",
              "recipe": "the recipe changed", "input": "the prompt or image changed"}
    out = []
    old_files, new_files = dict(old.get("files") or {}), dict(new.get("files") or {})
    for path in sorted(set(old_files) | set(new_files)):
        if old_files.get(path) != new_files.get(path):
            out.append(f"file {path} changed")
    for key, label in labels.items():
        if old.get(key) != new.get(key):
            out.append(label)
    return out or ["its key changed"]


def generator_prompt_format(generator: Any) -> str | None:
    """The prompt format ``generator`` gives the model (see :mod:`..prompts`), or ``None``
    when it does not say (an engine with its own conversation templates)."""
    from ..prompts import prompt_format

    named = getattr(generator, "prompt_format", None)
    if isinstance(named, str):
        return named
    if isinstance(generator, HFGenerator):
        return prompt_format(generator.processor, generator.settings.template)
    return None


def check_runs(runs: Sequence[RunSpec], recipes: Mapping[str, Any], examples: Mapping[str, Sequence[Example]],
               generator: Any, plain_only: Collection[str] = ()) -> None:
    """Before any generation: a run whose steering needs an image on every input
    (CMRM's sample-level variant measures each input's own image-induced shift) on
    text-only items is an error naming the run, the benchmark and the items; vector
    files calibrated under another prompt format than the generator's are refused
    (:func:`~lvlm_safety_plugins.prompts.check_vectors_format`). Benchmarks in
    ``plain_only`` are answered by runs without a recipe only, so they are not checked."""
    from ..prompts import check_vectors_format

    used = generator_prompt_format(generator)
    for run in runs:
        recipe = recipes.get(run.name)
        if recipe is None:
            continue
        if used is not None:
            check_vectors_format(recipe, used, where=f"run {run.name!r}: ")
        cmrm = recipe.config.get("cmrm") if "cmrm" in recipe.plugins else None
        if cmrm is None or getattr(cmrm.variant, "value", cmrm.variant) != "sample":
            continue
        for bench, items in _run_benchmarks(examples, run, plain_only):
            text_only = [e.id for e in items if e.image is None]
            if text_only:
                shown = ", ".join(text_only[:10]) + (f" and {len(text_only) - 10} more" if len(text_only) > 10 else "")
                raise LVLMSafetyError(
                    f"run {run.name!r}, benchmark {bench!r}: sample-level CMRM (cmrm.variant=sample, reference "
                    f"{getattr(cmrm.reference, 'value', cmrm.reference)}) measures each input's image-induced shift and "
                    f"cannot steer the {len(text_only)} text-only item(s) {shown}; use the dataset-level variant, or a "
                    "benchmark variant with images")


def generate_all(generator: Any, examples: Mapping[str, Sequence[Example]], runs: Sequence[RunSpec], log: RecordLog, *,
                 model: Any = None, processor: Any = None, batch_size: int = 8, progress: bool = True, pm: Any = None,
                 sink: RecordLog | None = None, shard: tuple[int, int] | None = None,
                 identity: Mapping[str, Any] | None = None, plain_only: Collection[str] = ()) -> dict[str, Any]:
    """Answers for every (run, benchmark, example) not yet in ``log``; each batch is
    appended to ``sink`` (default: the log) as soon as it is done. With ``shard =
    (rank, world)`` this process answers every ``world``-th missing example from
    ``rank``. The benchmarks in ``plain_only`` are answered by the runs without a
    recipe only.

    A cached answer is reused only when everything it was made from is unchanged: the
    generator's settings, the recipe, the *content* of every file the recipe names (a
    vector file recalibrated into the same path), the model's weights (``identity``,
    default :func:`model_identity` of ``model``) and the prompt and image. Returns
    counts: ``reused``, ``generated``, ``regenerated`` (cached answers that no longer
    fit) and ``why`` (``{reason: count}`` for those)."""
    from ..identity import recipe_files
    from ..progress import progress_bar

    counts: dict[str, Any] = {"reused": 0, "generated": 0, "regenerated": 0, "why": {}}
    recipes = load_run_recipes(runs, pm)  # every recipe checked before the first answer
    check_runs(runs, recipes, examples, generator, plain_only)
    model_key = fingerprint(dict(identity) if identity is not None else model_identity(model))
    for run in runs:
        runtime = _runtime(run, model, processor, pm, recipes[run.name])
        gen_key = fingerprint(generator.describe())
        recipe_key = fingerprint(runtime.recipe.to_yaml() if runtime is not None else None)
        files = recipe_files(runtime.recipe) if runtime is not None else {}
        todo: dict[str, list[tuple[Example, str, str, dict[str, Any]]]] = {}
        for bench, items in _run_benchmarks(examples, run, plain_only):
            for example in items:
                text = generator.prompt_text(example)
                parts = {"generator": gen_key, "recipe": recipe_key, "files": files, "model": model_key,
                         "input": fingerprint(text, example.image_ref)}
                sha = fingerprint(parts)
                cached = log.get((run.name, bench, example.id))
                if cached is not None and cached.get("sha") == sha:
                    counts["reused"] += 1
                    continue
                if cached is not None:
                    counts["regenerated"] += 1
                    for reason in _stale_reasons(cached.get("parts"), parts):
                        key = f"run {run.name!r}: {reason}"
                        counts["why"][key] = counts["why"].get(key, 0) + 1
                todo.setdefault(bench, []).append((example, text, sha, parts))
        if shard is not None:
            todo = {bench: items[shard[0]::shard[1]] for bench, items in todo.items()}
            todo = {bench: items for bench, items in todo.items() if items}
        if not todo:
            continue
        if runtime is None:
            steering: Any = contextlib.nullcontext()
        elif hasattr(generator, "steering"):  # an engine with its own model (vLLM): steering goes in there
            steering = generator.steering(runtime)
        else:
            steering = runtime.steering(model)
        with steering:
            for bench, items in todo.items():
                total = len(examples[bench])
                bar = progress_bar(total=total, initial=total - len(items), desc=f"{run.name} | {bench}", unit="ex",
                                   enabled=progress and (shard is None or shard[0] == 0))
                try:
                    info = {id(e): (text, sha, parts) for e, text, sha, parts in items}
                    for batch in _batches([e for e, _, _, _ in items], batch_size):
                        try:
                            answers = generator.generate(batch)
                        except LVLMSafetyError:
                            raise
                        except Exception as exc:  # noqa: BLE001 - re-raised with the run and examples named
                            ids = ", ".join(e.id for e in batch)
                            raise LVLMSafetyError(f"run {run.name!r}, benchmark {bench!r}, examples {ids}: generation failed: "
                                                  f"{type(exc).__name__}: {exc}") from exc
                        if len(answers) != len(batch):
                            raise LVLMSafetyError(f"the generator returned {len(answers)} answers for {len(batch)} prompts")
                        (sink or log).append({"run": run.name, "benchmark": bench, "id": e.id, "sha": info[id(e)][1],
                                              "parts": info[id(e)][2], "input": info[id(e)][0], "image": e.image_ref,
                                              "response": a} for e, a in zip(batch, answers))
                        counts["generated"] += len(batch)
                        bar.update(len(batch))
                finally:
                    bar.close()
    return counts


def _takes_images(call: Callable[..., Any]) -> bool:
    """Whether a judge's ``judge``/``refusals`` takes ``images=`` (the item's image beside
    the request and the answer)."""
    try:
        return "images" in inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False


def _judge_all(judge: Any, judge_name: str, refusal: Any, refusal_name: str, examples: Mapping[str, Sequence[Example]],
               runs: Sequence[RunSpec], responses: Mapping[tuple, str], log: RecordLog,
               plain_only: Collection[str] = ()) -> dict[tuple, dict[str, Any]]:
    """Per (run, benchmark, id): ``{"unsafe"}`` / ``{"refused"}`` / ``{"choice", "correct"}``."""
    verdicts: dict[tuple, dict[str, Any]] = {}
    keys = {"judge": fingerprint(describe_judge(judge, judge_name)), "refusal": fingerprint(describe_judge(refusal, refusal_name))}
    for run in runs:
        for bench, items in _run_benchmarks(examples, run, plain_only):
            for label, who, method in ((HARMFUL, "judge", "judge"), (BENIGN, "refusal", "refusals")):
                chosen = [e for e in items if e.label == label]
                obj = judge if who == "judge" else refusal
                todo = []
                for e in chosen:
                    response = responses[(run.name, bench, e.id)]
                    sha = fingerprint(keys[who], e.request, response)
                    hit = log.get((keys[who], run.name, bench, e.id), sha)
                    if hit is not None:
                        verdicts[(run.name, bench, e.id)] = {"unsafe" if label == HARMFUL else "refused": hit["verdict"]}
                    else:
                        todo.append((e, response, sha))
                if not todo:
                    continue
                call = getattr(obj, method)
                args = ([e.request for e, _, _ in todo], [r for _, r, _ in todo])
                # a judge that reads the image (llama_guard4) gets each item's image (None: text only)
                flags = call(*args, images=[e.image for e, _, _ in todo]) if _takes_images(call) else call(*args)
                if len(flags) != len(todo):
                    raise LVLMSafetyError(f"judge {judge_name if who == 'judge' else refusal_name!r} returned {len(flags)} verdicts for {len(todo)} answers")
                log.append({"judge": keys[who], "judge_name": judge_name if who == "judge" else refusal_name, "run": run.name,
                            "benchmark": bench, "id": e.id, "sha": sha, "verdict": bool(flag)} for (e, _, sha), flag in zip(todo, flags))
                for (e, _, _), flag in zip(todo, flags):
                    verdicts[(run.name, bench, e.id)] = {"unsafe" if label == HARMFUL else "refused": bool(flag)}
            for e in items:
                if e.label == CHOICE:
                    picked = parse_choice(responses[(run.name, bench, e.id)], e.choices)
                    verdicts[(run.name, bench, e.id)] = {"choice": picked, "correct": picked == e.answer}
    return verdicts


def summarize(examples: Mapping[str, Sequence[Example]], runs: Sequence[RunSpec], verdicts: Mapping[tuple, dict[str, Any]],
              plain_only: Collection[str] = ()) -> dict[str, Any]:
    """``results[run][benchmark]`` = ``{"n", "safety"?, "over_refusal"?, "accuracy"?}``."""
    out: dict[str, Any] = {}
    for run in runs:
        per_bench: dict[str, Any] = {}
        for bench, items in _run_benchmarks(examples, run, plain_only):
            entry: dict[str, Any] = {"n": len(items)}
            harmful = [e for e in items if e.label == HARMFUL]
            benign = [e for e in items if e.label == BENIGN]
            choice = [e for e in items if e.label == CHOICE]
            if harmful:
                entry["safety"] = safety_metrics([verdicts[(run.name, bench, e.id)]["unsafe"] for e in harmful],
                                                 [e.category for e in harmful])
            if benign:
                entry["over_refusal"] = over_refusal_metrics([verdicts[(run.name, bench, e.id)]["refused"] for e in benign],
                                                             [e.category for e in benign])
            if choice:
                v = [verdicts[(run.name, bench, e.id)] for e in choice]
                entry["accuracy"] = accuracy_metrics([x["correct"] for x in v], [e.category for e in choice],
                                                     unparsed=sum(x["choice"] is None for x in v))
            per_bench[bench] = entry
        out[run.name] = per_bench
    return out


def evaluate(
    model: Any,
    processor: Any,
    benchmarks: Sequence[BenchmarkSpec],
    runs: Sequence[RunSpec] = (RunSpec("base"),),
    out: str | Path = "eval-out",
    *,
    judge: Any = "refusal",
    judge_options: Mapping[str, Any] | None = None,
    refusal_judge: Any = None,
    settings: GenerationSettings | None = None,
    generator: Any = None,
    model_id: str | None = None,
    name: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    plot: bool = True,
    pm: Any = None,
    limit_mode: str = "sample",
    seed: int = 0,
    skip_missing_images: bool = False,
    text_variants: bool = True,
    also_judges: Sequence[Any] = (),
    image_check: Any = None,
) -> dict[str, Any]:
    """Run every benchmark under every run, judge, and write the reports to ``out``.

    ``limit``: at most this many examples per benchmark, spread over its categories
    (``limit_mode="sample"``, seeded by ``seed``) or the first ones (``"first"``).
    ``skip_missing_images``: leave out (and count in the report) the items whose image
    is missing instead of stopping. ``text_variants``: for a benchmark whose loader
    has a text-only variant (FigStep, MM-SafetyBench, ...), the runs without a recipe
    also answer the same requests as plain text, and the report puts the text-only
    rate beside the rate with the image. ``also_judges``: more judges (names,
    ``(name, options)`` pairs or judge objects) that score the same harmful answers;
    the report gives each one's unsafe rates and, for every pair of judges, Cohen's
    kappa and the items they disagree on (``judge_agreement``). ``image_check``: an
    image classifier (e.g. :class:`~.image_check.ShieldGemma2Check`) run on every
    distinct image of the benchmarks (``results["image_check"]``).

    ``judge``: a registered judge name (with ``judge_options``) or a judge object; it
    decides unsafe vs safe on harmful items. Benign items are judged for refusal by
    ``refusal_judge`` (default: the judge itself when it has ``refusals``, else the
    ``refusal`` judge). ``generator`` replaces the default :class:`HFGenerator`.
    Returns the results (also written as ``results.json``).

    Under ``torch.distributed`` (e.g. ``torchrun``) every process generates its share of
    the missing answers; the main process merges them, judges, writes the reports and
    returns the results, the other processes return ``None``.
    """
    from .report import write_reports

    settings = settings or GenerationSettings()
    if not benchmarks:
        raise LVLMSafetyError("no benchmark given")
    if not runs:
        raise LVLMSafetyError("no run given")
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LVLMSafetyError(f"run name(s) {', '.join(dupes)} given twice; name runs with NAME@RECIPE")
    labels = [b.display for b in benchmarks]
    dupes = sorted({n for n in labels if labels.count(n) > 1})
    if dupes:
        raise LVLMSafetyError(f"benchmark(s) {', '.join(dupes)} given twice; add label=... to tell them apart")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    judge_name = judge if isinstance(judge, str) else getattr(judge, "name", type(judge).__name__)
    judge_obj = make_judge(judge, dict(judge_options or {}), pm) if isinstance(judge, str) else judge
    if refusal_judge is None:
        refusal_obj, refusal_name = (judge_obj, judge_name) if callable(getattr(judge_obj, "refusals", None)) else (make_judge("refusal", {}, pm), "refusal")
    elif isinstance(refusal_judge, str):
        refusal_obj, refusal_name = make_judge(refusal_judge, {}, pm), refusal_judge
    else:
        refusal_obj, refusal_name = refusal_judge, getattr(refusal_judge, "name", type(refusal_judge).__name__)
    if not callable(getattr(refusal_obj, "refusals", None)):
        raise LVLMSafetyError(f"the refusal judge {refusal_name!r} has no refusals(prompts, responses)")

    load_run_recipes(runs, pm)  # a bad recipe fails before benchmarks are read or answers generated
    examples: dict[str, list[Example]] = {}
    skipped: dict[str, list[str]] = {}
    for b in benchmarks:
        skipped[b.display] = []
        examples[b.display] = load_benchmark(b, limit, pm, limit_mode=limit_mode, seed=seed,
                                             skip_missing_images=skip_missing_images, skipped=skipped[b.display])
    text_of: dict[str, str] = {}  # text-only benchmark -> the benchmark it is the text variant of
    text_specs: list[BenchmarkSpec] = []
    text_missing: list[str] = []  # text variants that could not be loaded (the run goes on without them)
    if text_variants and any(r.recipe is None for r in runs):
        for b in benchmarks:
            text_spec = text_variant(b, pm)
            if text_spec is None or text_spec.display in examples:
                continue
            ids = {e.id for e in examples[b.display]}
            try:
                text_items = [e for e in load_benchmark(text_spec, None, pm) if e.id in ids]
            except DataFileError as exc:
                text_missing.append(f"{b.display}: no text-only variant ({exc})")
                continue
            if not text_items:
                text_missing.append(f"{b.display}: the text-only variant has none of these ids")
                continue
            examples[text_spec.display] = text_items
            text_of[text_spec.display] = b.display
            text_specs.append(text_spec)
    generator = generator or HFGenerator(model, processor, settings, model_id=model_id)
    gen_key = ("run", "benchmark", "id")
    sharded = is_distributed()
    if sharded:
        # every process answers its share into its own crash-safe log; the main process
        # merges them (also leftovers of an interrupted sharded run) and does the rest
        if is_main_process():
            _merge_rank_logs(out_dir, gen_key)
        barrier()
    gen_log = RecordLog(out_dir / "generations.jsonl", gen_key)
    own = RecordLog(out_dir / f"generations.rank{rank()}.jsonl", gen_key) if sharded else None
    counts = generate_all(generator, examples, runs, gen_log, model=model, processor=processor,
                          batch_size=settings.batch_size, progress=progress, pm=pm,
                          sink=own, shard=(rank(), world_size()) if sharded else None,
                          identity=model_identity(model, model_id), plain_only=text_of)
    if sharded:
        import torch

        total = all_reduce_sum(torch.tensor([counts["generated"]], dtype=torch.float64))
        counts["generated"] = int(total.item())
        barrier()
        if not is_main_process():
            barrier()  # wait for the main process to finish the reports
            return None  # type: ignore[return-value]
        _merge_rank_logs(out_dir, gen_key)
        gen_log = RecordLog(out_dir / "generations.jsonl", gen_key)
    responses = {(r.name, b, e.id): gen_log.records[(r.name, b, e.id)]["response"]
                 for r in runs for b, items in _run_benchmarks(examples, r, text_of) for e in items}

    judge_log = RecordLog(out_dir / "judgments.jsonl", ("judge", "run", "benchmark", "id"))
    verdicts = _judge_all(judge_obj, judge_name, refusal_obj, refusal_name, examples, runs, responses, judge_log, text_of)
    compared = _compare_judges(judge_obj, judge_name, also_judges, refusal_obj, refusal_name, examples, runs, responses,
                               judge_log, text_of, verdicts, pm)

    with atomic_write(out_dir / "examples.jsonl") as handle:
        for run in runs:
            for bench, items in _run_benchmarks(examples, run, text_of):
                for e in items:
                    row = {"run": run.name, "benchmark": bench, "id": e.id, "label": e.label, "category": e.category,
                           "prompt": e.prompt, "request": e.request, "image": e.image_ref,
                           "response": responses[(run.name, bench, e.id)], **verdicts[(run.name, bench, e.id)]}
                    if e.label == CHOICE:
                        row["answer"] = e.answer
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    results = {
        "version": RESULTS_VERSION,
        "name": name or (Path(model_id).name if model_id else getattr(generator, "model_id", "model")),
        "model": model_id or getattr(generator, "model_id", None),
        "generation": generator.describe(),
        "settings": {"max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size, "template": settings.template,
                     "prompt_format": generator_prompt_format(generator), "limit": limit, "limit_mode": limit_mode,
                     "seed": seed, "skip_missing_images": skip_missing_images},
        "judge": describe_judge(judge_obj, judge_name),
        "refusal_judge": describe_judge(refusal_obj, refusal_name),
        "runs": [{"name": r.name, "recipe": (r.recipe if isinstance(r.recipe, (str, type(None))) else getattr(r.recipe, "name", str(r.recipe))),
                  "overrides": list(r.overrides)} for r in runs],
        "benchmarks": [{"label": b.display, "name": b.name, "path": str(b.path), "options": dict(b.options),
                        "examples": len(examples[b.display]),
                        "labels": {lab: sum(e.label == lab for e in examples[b.display]) for lab in (HARMFUL, BENIGN, CHOICE)},
                        **({"skipped_missing_images": skipped[b.display]} if skipped.get(b.display) else {}),
                        **({"text_variant_of": text_of[b.display]} if b.display in text_of else {})}
                       for b in [*benchmarks, *text_specs]],
        "cache": counts,
        "results": summarize(examples, runs, verdicts, text_of),
    }
    results["text_safety"] = text_safety(results)
    if text_missing:
        results["text_variant_errors"] = text_missing
    if compared is not None:
        results["judges_compared"] = compared
    if image_check is not None:
        from .image_check import check_images

        results["image_check"] = check_images(image_check, {b: examples[b] for b in examples if b not in text_of})
    write_reports(results, out_dir, plot=plot)
    if sharded:
        barrier()
    return results


def _compare_judges(judge_obj: Any, judge_name: str, also: Sequence[Any], refusal_obj: Any, refusal_name: str,
                    examples: Mapping[str, Sequence[Example]], runs: Sequence[RunSpec], responses: Mapping[tuple, str],
                    log: RecordLog, plain_only: Collection[str], verdicts: Mapping[tuple, dict[str, Any]],
                    pm: Any) -> dict[str, Any] | None:
    """The extra judges' verdicts on the harmful items, their unsafe rates and the
    pairwise agreement (None without extra judges)."""
    if not also:
        return None
    from .agreement import judge_agreement
    from .metrics import proportion

    by_judge: dict[str, dict[tuple, bool]] = {judge_name: {k: v["unsafe"] for k, v in verdicts.items() if "unsafe" in v}}
    described = {judge_name: describe_judge(judge_obj, judge_name)}
    for entry in also:
        if isinstance(entry, str):
            name, obj = entry, make_judge(entry, {}, pm)
        elif isinstance(entry, tuple):
            name, obj = entry[0], make_judge(entry[0], dict(entry[1]), pm)
        else:
            name, obj = getattr(entry, "name", type(entry).__name__), entry
        label, i = name, 1
        while label in by_judge:
            i += 1
            label = f"{name}#{i}"
        extra = _judge_all(obj, label, refusal_obj, refusal_name, examples, runs, responses, log, plain_only)
        by_judge[label] = {k: v["unsafe"] for k, v in extra.items() if "unsafe" in v}
        described[label] = describe_judge(obj, name)
    rates: dict[str, dict[str, dict[str, Any]]] = {}
    for label, flags in by_judge.items():
        for (run, bench, _), flag in flags.items():
            cell = rates.setdefault(label, {}).setdefault(run, {}).setdefault(bench, [0, 0])
            cell[0] += int(flag)
            cell[1] += 1
    return {"judges": described,
            "unsafe_rate": {j: {r: {b: proportion(k, n) for b, (k, n) in per.items()} for r, per in by_run.items()}
                            for j, by_run in rates.items()},
            "pairs": judge_agreement(by_judge)}


#: a text-only unsafe rate at or above this: the LLM has no text safety for an image-side method to restore
NO_TEXT_SAFETY = 0.8


def text_variant(spec: BenchmarkSpec, pm: Any = None) -> BenchmarkSpec | None:
    """The text-only variant of ``spec`` when its loader declares one (a
    ``text_variant`` attribute: the options that select it) and ``spec`` is not it
    already."""
    from ..registry import benchmarks

    loader = benchmarks(pm).get(spec.name)
    variant = getattr(loader, "text_variant", None)
    if not variant:
        return None
    if all(str(spec.options.get(k, "")).strip().lower() == str(v).lower() for k, v in variant.items()):
        return None
    return BenchmarkSpec(spec.name, spec.path, {**spec.options, **variant}, title=f"{spec.display} [text only]")


def text_safety(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """For each text-only variant and plugin-free run: the unsafe rate with the image
    and as plain text, and whether the LLM has text safety to restore (text-only unsafe
    rate below :data:`NO_TEXT_SAFETY`)."""
    rows = []
    for bench in results.get("benchmarks", []):
        source = bench.get("text_variant_of")
        if not source:
            continue
        for run in results.get("runs", []):
            per = results.get("results", {}).get(run["name"], {})
            text = per.get(bench["label"], {}).get("safety", {}).get("metrics", {}).get("unsafe_rate")
            image = per.get(source, {}).get("safety", {}).get("metrics", {}).get("unsafe_rate")
            if text is None or image is None or text.get("rate") is None:
                continue
            rows.append({"benchmark": source, "text_benchmark": bench["label"], "run": run["name"], "image": image, "text": text,
                         "no_text_safety": text["rate"] >= NO_TEXT_SAFETY})
    return rows


def _merge_rank_logs(out_dir: Path, key: Sequence[str]) -> None:
    """Append the records of ``generations.rank*.jsonl`` to ``generations.jsonl`` and
    remove those files."""
    main = RecordLog(out_dir / "generations.jsonl", key)
    for part in sorted(out_dir.glob("generations.rank*.jsonl")):
        main.append(RecordLog(part, key).records.values())
        part.unlink()


__all__ = ["BenchmarkSpec", "LIMIT_MODES", "NO_TEXT_SAFETY", "RunSpec", "check_runs", "evaluate", "generate_all",
           "generator_prompt_format", "load_benchmark", "load_run_recipes", "model_identity", "sample_across_categories",
           "summarize", "text_safety", "text_variant"]

"""Packaged evaluation suites: a paper's protocol as one command
(``lvlm-safety eval --suite NAME``).

A suite names its benchmarks (each with a path relative to ``--data-root``, overridable
one by one), its judge, its runs (the model as it is and the method's settings) and the
figures its paper publishes. Only figures that a source supports are listed, each with
that source; where a paper's benchmark has no loader here, the suite says so and why.

``cmrm_paper``
    Liu et al., arXiv 2410.09047 (CMRM): VLSafe unsafe rate with the paper's judge model
    (Llama-3-8B-Instruct, ``cmrm_paper`` judge), ScienceQA-IMG accuracy, the model as it
    is and CMRM at the dataset and the sample level for each alpha of the paper's sweep
    (0.1 to 1.0 in steps of 0.1), ``composition: independent`` (the paper's equations).
``tga_paper``
    Xu et al., arXiv 2410.12662 (TGA): FigStep's SafeBench (defense success rate) and
    ScienceQA-IMG, for the model given (evaluate the base and the TGA-trained model,
    then put them side by side with ``lvlm-safety eval-report``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import LVLMSafetyError
from .harness import BenchmarkSpec, RunSpec


@dataclass(frozen=True)
class SuiteBenchmark:
    key: str
    loader: str
    path: str  # relative to --data-root
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Published:
    """A figure the paper publishes: ``runs`` are the run names (or a prefix ending in
    ``*``) it is compared with; ``best``: compare with the lowest measured value among them."""

    benchmark: str
    metric: str
    runs: str
    value: float
    text: str
    source: str
    best: bool = False


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    benchmarks: tuple[SuiteBenchmark, ...]
    judge: str | None
    published: tuple[Published, ...]
    unavailable: tuple[str, ...]
    notes: tuple[str, ...]
    alphas: tuple[float, ...] = ()

    def specs(self, data_root: str | Path | None, paths: Mapping[str, str]) -> list[BenchmarkSpec]:
        unknown = sorted(set(paths) - {b.key for b in self.benchmarks})
        if unknown:
            raise LVLMSafetyError(f"suite {self.name}: no benchmark {', '.join(unknown)} "
                                  f"(its benchmarks: {', '.join(b.key for b in self.benchmarks)})")
        specs = []
        for b in self.benchmarks:
            if b.key in paths:
                path = paths[b.key]
            elif data_root is not None:
                path = str(Path(data_root) / b.path)
            else:
                raise LVLMSafetyError(f"suite {self.name}: give --data-root (it expects {b.path} there) or "
                                      f"--suite-path {b.key}=PATH")
            specs.append(BenchmarkSpec(b.loader, path, dict(b.options), title=b.key))
        return specs

    def runs(self, alphas: Sequence[float] | None = None, vectors: str | None = None) -> list[RunSpec]:
        runs = [RunSpec("base")]
        if self.name != "cmrm_paper":
            return runs
        chosen = list(alphas) if alphas else list(self.alphas)
        bad = [a for a in chosen if not 0 < a <= 1]
        if bad:
            raise LVLMSafetyError(f"suite {self.name}: alphas must lie in (0, 1] (the paper's sweep), got {bad}")
        if vectors is None:
            raise LVLMSafetyError(f"suite {self.name}: the dataset-level runs need CMRM vectors calibrated with "
                                  "composition independent (`lvlm-safety calibrate --recipe cmrm_llava15_dataset --model M --data D "
                                  "--out v.safetensors cmrm.composition=independent`), then --suite-vectors v.safetensors")
        for a in chosen:
            runs.append(RunSpec(f"dataset_a{a:g}", "cmrm_llava15_dataset",
                                ["cmrm.composition=independent", f"cmrm.alpha={a:g}", f"cmrm.vectors={vectors}"]))
        for a in chosen:
            runs.append(RunSpec(f"sample_a{a:g}", "cmrm_llava15_sample", ["cmrm.composition=independent", f"cmrm.alpha={a:g}"]))
        return runs


CMRM_SOURCE = "Liu et al., arXiv 2410.09047, as reviews and summaries of the paper quote it (LLaVA-7B)"

SUITES: dict[str, Suite] = {
    "cmrm_paper": Suite(
        name="cmrm_paper",
        description="CMRM (arXiv 2410.09047): VLSafe unsafe rate (Llama-3-8B-Instruct judge), ScienceQA-IMG accuracy; "
                    "base, dataset-level and sample-level CMRM at the paper's alphas, composition independent",
        benchmarks=(SuiteBenchmark("vlsafe", "vlsafe", "VLSafe/harmlessness_examine.jsonl"),
                    SuiteBenchmark("scienceqa_img", "scienceqa", "ScienceQA/problems.json")),
        judge="cmrm_paper",
        published=(
            Published("vlsafe", "unsafe_rate", "base", 0.6153, "61.53%", CMRM_SOURCE),
            Published("vlsafe", "unsafe_rate", "*_a*", 0.0315, "as low as 3.15% (which variant and alpha: not stated "
                      "in what could be read)", CMRM_SOURCE, best=True),
        ),
        unavailable=("LLaVA-Bench-COCO (the paper's other utility benchmark): no loader here; it is judged by GPT-4 "
                     "against reference answers",),
        notes=("The paper's judge prompt could not be read offline: the cmrm_paper judge asks Llama-3-8B-Instruct with "
               "the harness's template unless you pass --judge-option template_file=...",
               "No ScienceQA figure of the paper could be sourced, so none is printed."),
        alphas=tuple(round(0.1 * i, 1) for i in range(1, 11)),
    ),
    "tga_paper": Suite(
        name="tga_paper",
        description="TGA (arXiv 2410.12662): FigStep SafeBench (defense success rate) and ScienceQA-IMG for the given "
                    "model; compare base and TGA-trained models with eval-report",
        benchmarks=(SuiteBenchmark("figstep", "figstep", "FigStep/data/question/safebench.csv"),
                    SuiteBenchmark("scienceqa_img", "scienceqa", "ScienceQA/problems.json")),
        judge=None,
        published=(),
        unavailable=(
            "HOD and ToViLaG (the paper's safety sets): no published file layout could be confirmed offline, so no loader",
            "POPE, SEED-Bench, MM-Vet (the paper's general benchmarks): run them through lmms-eval with the "
            "lvlm_safety_hf model (docs/evaluation.md, 'General ability with lmms-eval')",
            "the paper's LLaMA-2-7B judge and its prompt: not available; the refusal judge is used unless --judge is given",
        ),
        notes=("FigStep is not one of the paper's benchmarks; it stands in as a loadable typographic-attack set.",
               "The paper's table figures could not be read offline, so none is printed."),
    ),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise LVLMSafetyError(f"unknown suite {name!r} (packaged: {', '.join(sorted(SUITES))})")
    return SUITES[name]


def _matches(pattern: str, run: str) -> bool:
    if pattern == run:
        return True
    if "*" in pattern:
        import fnmatch

        return fnmatch.fnmatchcase(run, pattern)
    return False


def suite_report(suite: Suite, results: Mapping[str, Any]) -> dict[str, Any]:
    """The suite's published figures beside the measured ones, its unavailable
    benchmarks and notes (``results["suite"]``)."""
    section = {"unsafe_rate": "safety", "over_refusal_rate": "over_refusal", "accuracy": "accuracy",
               "defense_success_rate": "safety"}
    rows = []
    for fig in suite.published:
        measured = []
        for run in [r["name"] for r in results.get("runs", [])]:
            if not _matches(fig.runs, run):
                continue
            cell = (results.get("results", {}).get(run, {}).get(fig.benchmark, {}).get(section[fig.metric], {})
                    .get("metrics", {}).get(fig.metric))
            if cell and cell.get("rate") is not None:
                measured.append((run, cell))
        if fig.best and measured:
            measured = [min(measured, key=lambda rc: rc[1]["rate"])]
        rows.append({"benchmark": fig.benchmark, "metric": fig.metric, "published": fig.value, "published_text": fig.text,
                     "source": fig.source, "measured": [{"run": r, **c} for r, c in measured]})
    return {"name": suite.name, "description": suite.description, "published": rows,
            "unavailable": list(suite.unavailable), "notes": list(suite.notes)}


__all__ = ["Published", "SUITES", "Suite", "SuiteBenchmark", "get_suite", "suite_report"]

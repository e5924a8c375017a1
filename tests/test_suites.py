"""``lvlm-safety eval --suite``: the CMRM and TGA papers' protocols end to end on the
tiny Llava and fixture data in the benchmarks' formats, with only sourced published
figures printed beside the measured ones."""

from __future__ import annotations

import argparse

import pytest
import torch

from lvlm_safety_plugins import LVLMSafetyError, Runtime, load_recipe
from lvlm_safety_plugins.evaluation import load_results
from lvlm_safety_plugins.evaluation.cli import add_eval_command
from lvlm_safety_plugins.evaluation.suites import SUITES
from lvlm_safety_plugins.testing import TINY_WORDS, make_image, tiny_tokenizer
from test_eval import write_figstep, write_scienceqa, write_vlsafe


def _parser():
    parser = argparse.ArgumentParser(prog="lvlm-safety")
    add_eval_command(parser.add_subparsers(dest="command"))
    return parser


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_llava, tiny_llava_processor):
    folder = tmp_path / "tiny-llava"
    tiny_llava.save_pretrained(folder)
    tiny_llava_processor.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_cmrm_paper_suite_end_to_end(tmp_path, tiny_model_dir, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    data = tmp_path / "data"
    write_vlsafe(data / "VLSafe")
    write_scienceqa(data / "ScienceQA")
    # the paper's judge model class (Llama) with a chat template, tiny and random
    judge_dir = tmp_path / "judge"
    tok = tiny_tokenizer(TINY_WORDS + ("safe", "unsafe", "<user>", "<assistant>"))
    tok.chat_template = "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}<assistant>"
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                                 bos_token_id=2, eos_token_id=3)).save_pretrained(judge_dir)
    tok.save_pretrained(judge_dir)
    # dataset-level vectors calibrated with the paper's composition, on the model as the suite loads it
    from lvlm_safety_plugins.loading import load_model_and_processor

    model, processor = load_model_and_processor(str(tiny_model_dir))
    vectors = tmp_path / "v.safetensors"
    rt = Runtime(load_recipe("cmrm_llava15_dataset", [f"cmrm.vectors={vectors}", "cmrm.composition=independent"]),
                 model=model, processor=processor)
    rt.calibrate(processor, [{"image": make_image(10 + i), "prompt": "what is in the image ?"} for i in range(2)])

    out = tmp_path / "out"
    base = ["eval", "--suite", "cmrm_paper", "--model", str(tiny_model_dir), "--data-root", str(data), "--out", str(out),
            "--max-new-tokens", "2", "--no-progress", "--no-plot"]
    with pytest.raises(LVLMSafetyError, match="calibrated with composition independent"):
        args = _parser().parse_args(base)
        args.func(args)
    args = _parser().parse_args([*base, "--suite-vectors", str(vectors), "--suite-alphas", "0.5,1",
                                 "--judge-option", f"model={judge_dir}", "--judge-option", "progress=false"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    results = load_results(out)
    assert [r["name"] for r in results["runs"]] == ["base", "dataset_a0.5", "dataset_a1", "sample_a0.5", "sample_a1"]
    assert all("cmrm.composition=independent" in r["overrides"] for r in results["runs"][1:])
    assert results["judge"]["name"] == "cmrm_paper"
    assert [b["label"] for b in results["benchmarks"]] == ["vlsafe", "scienceqa_img"]
    assert results["results"]["sample_a1"]["scienceqa_img"]["accuracy"]["n"] == 2
    (base_fig, best_fig) = results["suite"]["published"]
    assert base_fig["published"] == 0.6153 and [m["run"] for m in base_fig["measured"]] == ["base"]
    rates = {r: results["results"][r]["vlsafe"]["safety"]["metrics"]["unsafe_rate"]["rate"] for r in
             ("dataset_a0.5", "dataset_a1", "sample_a0.5", "sample_a1")}
    (best,) = best_fig["measured"]
    assert best["rate"] == min(rates.values()) and rates[best["run"]] == best["rate"]
    assert "## Suite cmrm_paper: the paper's figures beside the measured ones" in printed
    assert "| vlsafe | unsafe_rate | 61.53% | Liu et al., arXiv 2410.09047" in printed
    assert "LLaVA-Bench-COCO" in printed and "No ScienceQA figure" in printed


def test_tga_paper_suite_says_what_is_not_available(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data"
    write_figstep(data / "FigStep")
    write_scienceqa(data / "ScienceQA")
    out = tmp_path / "out"
    args = _parser().parse_args(["eval", "--suite", "tga_paper", "--model", str(tiny_model_dir), "--data-root", str(data),
                                 "--out", str(out), "--max-new-tokens", "2", "--no-progress", "--no-plot", "--no-text-variants"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    results = load_results(out)
    assert [r["name"] for r in results["runs"]] == ["base"] and results["judge"]["name"] == "refusal"
    assert results["suite"]["published"] == [] and "No published figure of the paper could be sourced" in printed
    assert "HOD and ToViLaG" in printed and "POPE, SEED-Bench, MM-Vet" in printed
    assert "| figstep | defense success rate (DSR) | 3 |" in printed
    with pytest.raises(LVLMSafetyError, match="no --benchmark, --recipe"):
        args = _parser().parse_args(["eval", "--suite", "tga_paper", "--model", "m", "--out", "o", "--benchmark", "figstep:x"])
        args.func(args)
    with pytest.raises(LVLMSafetyError, match=r"no benchmark nope \(its benchmarks: figstep, scienceqa_img\)"):
        SUITES["tga_paper"].specs(data, {"nope": "x"})

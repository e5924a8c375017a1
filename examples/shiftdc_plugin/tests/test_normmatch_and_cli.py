"""The example's loss plugin (normmatch: reads the projector output through the public
capture API), its second packaged recipe and its ``lvlm-safety shiftdc`` subcommand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lvlm_safety_plugins import Runtime, get_adapter, load_recipe
from lvlm_safety_plugins.integrations.hf_training import LlavaSFTCollator
from lvlm_safety_plugins.testing import make_image


def _rows(n=2):
    return [{"image": make_image(i), "prompt": "USER: <image> describe this picture ASSISTANT:",
             "response": "a picture of a dog"} for i in range(n)]


def test_normmatch_term_is_the_hand_computed_gap_and_trains_the_projector(tiny_llava, tiny_llava_processor):
    model = tiny_llava.train()
    adapter = get_adapter(model)
    adapter.set_trainable("projector")
    batch = LlavaSFTCollator(tiny_llava_processor)(_rows())

    # by hand: the projector's output and the decoder's input sequence of the same batch
    seen = {}
    handle = adapter.projector.register_forward_hook(lambda m, a, o: seen.setdefault("proj", o.detach()))
    with torch.no_grad():
        embeddings = model(**batch, output_hidden_states=True).hidden_states[0]
    handle.remove()
    text = adapter.layout(batch).text_mask
    image_norm = seen["proj"].norm(dim=-1).mean()
    text_norm = embeddings[text].norm(dim=-1).mean()
    want = 0.5 * (image_norm / text_norm - 1) ** 2

    rt = Runtime({"plugins": ["normmatch"], "normmatch": {"weight": 0.5}}, model=model, processor=tiny_llava_processor)
    result = rt.training_step(model, batch, step=0, max_steps=1)
    torch.testing.assert_close(result.terms["normmatch/gap"].detach(), want, rtol=1e-4, atol=1e-7)
    assert result.metrics["normmatch/gap"] == pytest.approx(float(want), rel=1e-4)
    torch.testing.assert_close(result.loss, result.host_loss + result.terms["normmatch/gap"])
    result.terms["normmatch/gap"].backward()
    grads = [p.grad for p in adapter.projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # no hook of the plugin's is left on the model
    assert not adapter.projector._forward_hooks and not adapter.decoder_layers[0]._forward_pre_hooks


def test_the_packaged_recipe_composes_with_a_builtin_one():
    recipe = load_recipe("normmatch_llava")
    assert recipe.plugins == ["tga", "normmatch"] and recipe.normmatch.weight == 0.1
    with pytest.raises(Exception, match="weight"):
        load_recipe("normmatch_llava", ["normmatch.weight=-1"])


def _cli(*args):
    """``lvlm-safety ARGS`` with this interpreter (the environment the plugin is installed in)."""
    return subprocess.run([sys.executable, "-m", "lvlm_safety_plugins.cli", *args], capture_output=True, text=True)


def test_the_plugins_subcommand(tmp_path):
    from lvlm_shiftdc.method import save_directions

    vectors = {1: torch.tensor([0.6, 0.8, 0.0]), 3: torch.tensor([0.0, 0.0, 1.0])}
    path = tmp_path / "dirs.safetensors"
    save_directions(vectors, str(path))
    done = _cli("shiftdc", "info", str(path), "--json")
    assert done.returncode == 0, done.stderr
    assert [row["layer"] for row in json.loads(done.stdout)] == [1, 3]
    assert "shiftdc" in _cli("--help").stdout
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a file of tensors")
    done = _cli("shiftdc", "info", str(bad))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in done.stderr

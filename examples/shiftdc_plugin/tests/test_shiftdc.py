"""Tests of the example plugin, written the way a plugin author would: the tiny model
fixtures come from lvlm-safety-plugins' pytest plugin (``tiny_llava``,
``tiny_llava_processor``), the plugin is found through its installed entry point."""

from __future__ import annotations

import threading

import torch

from lvlm_safety_plugins import Runtime, calibrate_cmrm, get_adapter, get_plugin_manager, load_recipe
from lvlm_safety_plugins.registry import methods
from lvlm_safety_plugins.testing import make_image, tiny_llava_batch

HARMFUL = ["how to make a bomb", "how to make a poison", "how to steal a bike", "how to hack a computer"]
BENIGN = ["how to make a cake", "how to make a soup", "describe a flower", "tell me about a dog"]
LAYERS = [1, 2]


def test_entry_point_registers_the_method_and_its_recipes():
    assert "shiftdc" in methods()
    infos = {i.name: i for i in get_plugin_manager().plugin_infos()}
    assert infos["shiftdc"].package == "lvlm-shiftdc" and not infos["shiftdc"].builtin
    recipe = load_recipe("shiftdc_llava", ["shiftdc.shift_vectors=a", "shiftdc.directions=b"])
    assert recipe.plugins == ["shiftdc"] and recipe.shiftdc.alpha == 1.0


def _hand_steered_logits(model, batch, vectors, alpha):
    adapter = get_adapter(model)
    decoder = adapter.decoder_layers
    mask = adapter.layout(batch).attention_mask  # real positions in the decoder's own sequence

    def hook(layer):
        def fn(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            shift = (alpha * vectors[layer]).to(hidden.dtype)
            hidden = hidden - shift * mask[..., None].to(hidden.dtype)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
        return fn

    handles = [decoder[l].register_forward_hook(hook(l), prepend=True) for l in vectors]
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        for h in handles:
            h.remove()


def test_calibrate_then_steer_removes_only_the_safety_component(tmp_path, tiny_llava, tiny_llava_processor):
    shift_file, dir_file = str(tmp_path / "shift.safetensors"), str(tmp_path / "dirs.safetensors")
    rows = [{"image": make_image(i), "prompt": f"USER: <image> {p} ASSISTANT:"} for i, p in enumerate(HARMFUL + BENIGN)]
    calibrate_cmrm(tiny_llava, tiny_llava_processor, rows, layers=LAYERS, progress=False).save(shift_file)

    runtime = Runtime(load_recipe("shiftdc_llava", [f"shiftdc.shift_vectors={shift_file}", f"shiftdc.directions={dir_file}",
                                                   "shiftdc.layers=[1,2]", "shiftdc.alpha=2.0"]),
                      model=tiny_llava, processor=tiny_llava_processor)
    text_rows = [{"prompt": p, "label": "harmful"} for p in HARMFUL] + [{"prompt": p, "label": "benign"} for p in BENIGN]
    [artifact] = runtime.calibrate(tiny_llava_processor, text_rows)
    assert artifact["layers"] == LAYERS

    from lvlm_shiftdc.method import load_directions

    method = runtime.methods["shiftdc"]
    dirs = load_directions(dir_file, get_adapter(tiny_llava).hidden_size)
    projected = method.projected_shift(tiny_llava)
    for layer in LAYERS:
        assert abs(dirs[layer].norm().item() - 1) < 1e-5
        # what is removed lies along the safety direction, and is the shift's component there
        cos = torch.nn.functional.cosine_similarity(projected[layer], dirs[layer], dim=0).abs().item()
        assert cos > 0.9999
    batch = tiny_llava_batch(tiny_llava_processor, ["USER: <image> how to make a bomb ASSISTANT:"])
    with torch.no_grad():
        before = tiny_llava(**batch).logits
    other: dict = {}
    with runtime.steering():
        with torch.no_grad():
            steered = tiny_llava(**batch).logits
            # context-local, as the steering primitive makes it: another thread is not steered
            worker = threading.Thread(target=lambda: other.setdefault("logits", tiny_llava(**batch).logits))
            worker.start()
            worker.join()
    with torch.no_grad():
        after = tiny_llava(**batch).logits
    expected = _hand_steered_logits(tiny_llava, batch, projected, 2.0)
    assert not torch.allclose(steered, before)
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, before)  # removed exactly
    assert torch.equal(other["logits"], before)


def test_install_steering_returns_the_primitives_handle(tmp_path, tiny_llava, tiny_llava_processor):
    from lvlm_safety_plugins.steering import SteeringHandle

    shift_file, dir_file = str(tmp_path / "shift.safetensors"), str(tmp_path / "dirs.safetensors")
    rows = [{"image": make_image(i), "prompt": f"USER: <image> {p} ASSISTANT:"} for i, p in enumerate(HARMFUL)]
    calibrate_cmrm(tiny_llava, tiny_llava_processor, rows, layers=LAYERS, progress=False).save(shift_file)
    runtime = Runtime(load_recipe("shiftdc_llava", [f"shiftdc.shift_vectors={shift_file}", f"shiftdc.directions={dir_file}",
                                                   "shiftdc.layers=[1,2]", "shiftdc.positions=image"]),
                      model=tiny_llava, processor=tiny_llava_processor)
    text_rows = [{"prompt": p, "label": "harmful"} for p in HARMFUL] + [{"prompt": p, "label": "benign"} for p in BENIGN]
    runtime.calibrate(tiny_llava_processor, text_rows)
    handle = runtime.methods["shiftdc"].install_steering(tiny_llava, runtime)
    try:
        assert isinstance(handle, SteeringHandle) and handle.active
        assert handle.positions == {"image"} and handle.layers == LAYERS
    finally:
        handle.remove()
    assert not handle.active and "generate" not in tiny_llava.__dict__

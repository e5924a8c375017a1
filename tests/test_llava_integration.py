"""The LLaVA integration against the real ``llava`` package: real ``train()`` runs of
LLaVA's own training script on a tiny model, with and without the registration line.
Runs in the LLaVA test environment (transformers 4.37.2 + llava-torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llava.model", reason="needs the LLaVA framework (pip install --no-deps llava-torch)")
from lvlm_safety_plugins.integrations.llava import ensure_llava_importable  # noqa: E402

ensure_llava_importable()  # transformers 5.x: LLaVA's trainer imports a name 5.x removed
pytest.importorskip("llava.train.train")
pytest.importorskip("deepspeed", reason="LLaVA's adapter saving imports deepspeed")
pytest.importorskip("sentencepiece", reason="LLaVA loads a slow (sentencepiece) tokenizer")

from lvlm_safety_plugins.testing import write_llava_training_assets  # noqa: E402

# LLaVA builds the projector before the Trainer seeds anything: seed first, alike in every script
PLAIN = "import torch; torch.manual_seed(0)\nfrom llava.train.train import train\n\nif __name__ == '__main__':\n    train()\n"
IMPORT_ONLY = "import lvlm_safety_plugins  # noqa: F401\n" + PLAIN
LINE = 'import lvlm_safety_plugins.integrations.llava as lsp; lsp.install("{recipe}", ["tga.layers=1-2"])\n' + PLAIN
REGISTER = "import lvlm_safety_plugins.integrations.llava_register  # noqa: F401\n" + PLAIN


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_llava_training_assets(tmp_path_factory.mktemp("llava-assets"))


def run_llava(tmp: Path, script: str, assets: dict, out: str, *extra: str, version: str = "plain", adapter_only: bool = True, steps: int = 3) -> Path:
    path = tmp / f"train_{out}.py"
    path.write_text(script)
    args = [
        "--model_name_or_path", assets["model"], "--version", version, "--data_path", assets["data"],
        "--image_folder", assets["image_folder"], "--vision_tower", assets["vision_tower"],
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-1",
        "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_steps", str(steps),
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--model_max_length", "128",
        "--lazy_preprocess", "True", "--dataloader_num_workers", "0", "--use_cpu", "True", "--seed", "0",
        "--lr_scheduler_type", "constant", "--output_dir", str(tmp / out),
    ]
    if adapter_only:
        args += ["--tune_mm_mlp_adapter", "True"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    res = subprocess.run([sys.executable, str(path), *args, *extra], capture_output=True, text=True, env=env, cwd=tmp)
    assert res.returncode == 0, res.stderr[-4000:]
    return tmp / out


def history(out: Path) -> list[dict]:
    return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def projector(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "mm_projector.bin", map_location="cpu", weights_only=True)


def test_registration_line_adds_tga_and_without_it_llava_is_unchanged(tmp_path, assets):
    plain = run_llava(tmp_path, PLAIN, assets, "plain")
    imported = run_llava(tmp_path, IMPORT_ONLY, assets, "imported")
    with_line = run_llava(tmp_path, LINE.format(recipe="tga_llava15_pretrain"), assets, "line")
    # without the line: exactly plain LLaVA (same losses, same projector, no extra files)
    assert [h["loss"] for h in history(plain)] == [h["loss"] for h in history(imported)]
    for key, value in projector(plain).items():
        assert torch.equal(value, projector(imported)[key]), key
    assert not any(k.startswith("tga/") for h in history(plain) for k in h)
    assert not (plain / "lvlm_safety_state.json").exists()
    # with the line: TGA terms logged by the Trainer, the projector trained differently
    logged = history(with_line)
    assert len(logged) == 3 and all("tga/pair" in h for h in logged)
    assert not any("tga/rank" in h for h in logged)  # pretrain ('plain' conversations): no retrieved text
    assert any(not torch.equal(v, projector(plain)[k]) for k, v in projector(with_line).items())
    state = json.loads((with_line / "lvlm_safety_state.json").read_text())
    assert state["recipe"]["plugins"] == ["tga"] and state["methods"]["tga"]["layers"] == [1, 2]


def test_tga_trains_under_llavas_gradient_checkpointing(tmp_path, assets):
    """LLaVA's scripts pass --gradient_checkpointing True (reentrant on 4.x, and LLaVA calls
    enable_input_require_grads): TGA must still reach the projector, with the same
    gradients as without checkpointing."""
    script = LINE.format(recipe="tga_llava15_pretrain")
    plain = run_llava(tmp_path, PLAIN, assets, "plain-gc", "--gradient_checkpointing", "True", steps=2)
    without = run_llava(tmp_path, script, assets, "tga", steps=2)
    with_gc = run_llava(tmp_path, script, assets, "tga-gc", "--gradient_checkpointing", "True", steps=2)
    for key, value in projector(with_gc).items():
        torch.testing.assert_close(value, projector(without)[key], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(value, projector(plain)[key]), key  # the TGA term took part
    assert [round(h["tga/pair"], 5) for h in history(with_gc)] == [round(h["tga/pair"], 5) for h in history(without)]


def test_pretrained_adapter_loads_in_the_finetune_stage(tmp_path, assets):
    pre = run_llava(tmp_path, LINE.format(recipe="tga_llava15_pretrain"), assets, "pre")
    assert (pre / "mm_projector.bin").is_file()
    ft = run_llava(
        tmp_path, LINE.format(recipe="tga_llava15_finetune"), assets, "ft",
        "--pretrain_mm_mlp_adapter", str(pre / "mm_projector.bin"), version="v1", adapter_only=False, steps=2,
    )
    logged = history(ft)
    assert all("tga/pair" in h and "tga/rank" in h for h in logged)  # retrieved text present in v1 prompts
    assert (ft / "model.safetensors").is_file() and (ft / "lvlm_safety_state.json").is_file()


def test_register_module_reads_the_recipe_from_the_command_line(tmp_path, assets):
    out = run_llava(tmp_path, REGISTER, assets, "reg", "--safety_recipe", "tga_llava15_pretrain", "--safety_override", "tga.layers=0-1")
    assert all("tga/pair" in h for h in history(out))
    assert json.loads((out / "lvlm_safety_state.json").read_text())["methods"]["tga"]["layers"] == [0, 1]


def test_dataset_puts_retrieved_text_before_the_image_and_uninstall_restores(assets):
    import transformers
    from llava import conversation as conversation_lib
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.train import train as T

    from lvlm_safety_plugins.integrations import llava as lsp

    original = (T.LazySupervisedDataset.__getitem__, T.DataCollatorForSupervisedDataset.__call__, T.LLaVATrainer)
    tok = transformers.AutoTokenizer.from_pretrained(assets["model"], use_fast=False)
    tok.pad_token = tok.unk_token
    conversation_lib.default_conversation = conversation_lib.conv_templates["vicuna_v1"]
    data_args = T.DataArguments(data_path=assets["data"], lazy_preprocess=True, is_multimodal=True, image_folder=assets["image_folder"])
    data_args.image_processor = transformers.CLIPImageProcessor.from_pretrained(assets["vision_tower"])
    data_args.mm_use_im_start_end = False
    lsp.install("tga_llava15_finetune")
    try:
        ds = T.LazySupervisedDataset(assets["data"], tok, data_args)
        item = ds[0]
        ids = item["input_ids"].tolist()
        retrieved = tok("Retrieved Text: a blue cake on a bike.", add_special_tokens=False).input_ids
        starts = [i for i in range(len(ids)) if ids[i : i + len(retrieved)] == retrieved]
        assert starts and starts[0] < ids.index(IMAGE_TOKEN_INDEX)
        assert ds.list_data_dict[0]["conversations"][0]["value"] == "<image>\nDescribe this picture please."  # raw record untouched
        batch = T.DataCollatorForSupervisedDataset(tok)([ds[0], ds[1]])
        mask = batch["lvlm_safety"]["tga_retrieved_mask"]
        assert mask.sum(1).tolist() == [len(retrieved), len(tok("Retrieved Text: a blue dog on a bike.", add_special_tokens=False).input_ids)]
        assert "lvlm_example" not in batch
    finally:
        lsp.uninstall()
    assert (T.LazySupervisedDataset.__getitem__, T.DataCollatorForSupervisedDataset.__call__, T.LLaVATrainer) == original


def test_reorder_helper():
    from lvlm_safety_plugins.integrations.llava import _reorder_retrieved

    assert _reorder_retrieved("<image>\nRetrieved Text: a dog. What?", "Retrieved Text: a dog. ") == "Retrieved Text: a dog. <image>\nWhat?"
    assert _reorder_retrieved("What? <image>", "Retrieved Text: a dog. ") == "What? <image>"


def test_plugin_parameters_are_saved_beside_the_adapter(tmp_path):
    """A method with trainable parameters gets them written next to mm_projector.bin."""
    from dataclasses import dataclass

    from safetensors.torch import load_file

    from lvlm_safety_plugins import Method, Runtime, hookimpl, load_recipe, register_plugin
    from lvlm_safety_plugins.integrations.llava import save_plugin_state

    @dataclass
    class Cfg:
        size: int = 3

    class Gate(Method):
        name = "gate_param"
        kind = "loss"
        config_class = Cfg

        def __init__(self, config, runtime=None):
            super().__init__(config, runtime)
            self.weight = torch.nn.Parameter(torch.arange(float(config.size)))

        def trainable_state(self):
            return {"weight": self.weight}

        def state_dict(self):
            return {"size": self.config.size}

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(Gate)

    register_plugin(Plugin(), "gate-plugin")
    runtime = Runtime(load_recipe({"plugins": ["gate_param"]}))
    written = save_plugin_state(runtime, tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in written] == ["lvlm_safety_state.json", "lvlm_safety_plugins.safetensors"]
    assert torch.equal(load_file(str(tmp_path / "lvlm_safety_plugins.safetensors"))["gate_param.weight"], torch.arange(3.0))
    assert json.loads((tmp_path / "lvlm_safety_state.json").read_text())["methods"]["gate_param"] == {"size": 3}


def test_comparative_and_tga_through_the_registration_line(tmp_path, assets):
    """The composed training recipe in LLaVA's real train(): every term of both methods
    (CmpCrop removes the retrieved text TGA put before the image, and image tokens)."""
    line = ('import lvlm_safety_plugins.integrations.llava as lsp; '
            'lsp.install("tga_plus_comparative", ["tga.layers=1-2", "tga.schedule=constant"])\n' + PLAIN)
    out = run_llava(tmp_path, line, assets, "cmp", version="v1", adapter_only=False, steps=2)
    want = {"tga/pair", "tga/rank", "comparative/loss", "comparative/loss_0", "comparative/loss_1", "comparative/loss_2"}
    logged = history(out)
    assert logged and all(want <= set(h) for h in logged)

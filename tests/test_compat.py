"""The transformers compatibility layer: every version coupling lives in
``lvlm_safety_plugins.compat``, the declared range is the tested one, and each
workaround does what it says on the installed version."""

from __future__ import annotations

import ast
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from lvlm_safety_plugins import compat

ROOT = Path(__file__).resolve().parents[1]
#: names whose use means depending on one transformers version's internals
VERSION_COUPLED = {
    "_merge_input_ids_with_image_features", "ALL_LAYERNORM_LAYERS", "torch_dtype", "processing_class",
    "past_key_values", "get_seq_length", "mm_encoder_outputs", "cache_position", "model_accepts_loss_kwargs",
    "loss_is_scaled_for_ga", "average_tokens_across_devices", "safe_globals", "language_model",
    "gradient_checkpointing_enable", "activation_checkpointing_enable",
}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def _couplings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Attribute):
            names.append(node.attr)
            if node.attr == "__version__" and isinstance(node.value, ast.Name) and node.value.id == "transformers":
                found.append(f"{path.name}:{node.lineno}: transformers.__version__")
        elif isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.keyword) and node.arg:
            names.append(node.arg)
        elif isinstance(node, ast.alias):
            names.append(node.name.split(".")[-1])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            # strings: also inside, e.g. a module path "model.language_model.layers"
            names += [n for n in VERSION_COUPLED if n in node.value]
        found += [f"{path.name}:{getattr(node, 'lineno', '?')}: {n}" for n in names if n in VERSION_COUPLED]
    return found


def test_every_version_coupling_is_in_the_compat_module():
    files = [p for d in ("lvlm_safety_plugins", "integrations") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30
    offenders = [hit for f in files if f.name != "compat.py" for hit in _couplings(f)]
    assert offenders == [], "use lvlm_safety_plugins.compat instead: " + "; ".join(offenders)
    # and the scan does find them where they are
    assert any("ALL_LAYERNORM_LAYERS" in hit for hit in _couplings(ROOT / "lvlm_safety_plugins" / "compat.py"))


def test_pyproject_declares_the_tested_range_and_this_install_is_in_it():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    spec = [d for d in meta["project"]["dependencies"] if d.replace(" ", "").startswith("transformers")]
    assert spec == [f"transformers{compat.TESTED_TRANSFORMERS}"]
    assert compat.version_in_tested_range(), f"transformers {transformers.__version__} is outside {compat.TESTED_TRANSFORMERS}"
    assert compat.version_in_tested_range("4.37.2") and compat.version_in_tested_range("5.25.0")
    assert not compat.version_in_tested_range("4.36.2") and not compat.version_in_tested_range("5.26.0")


def test_enable_checkpointing_sets_the_checkpoint_function_without_deprecation_warnings():
    from lvlm_safety_plugins.testing import build_tiny_llava

    for use_reentrant in (True, False):
        model = build_tiny_llava(seed=0).train()
        assert not compat.reentrant_checkpointing(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            compat.enable_checkpointing(model, use_reentrant=use_reentrant)
        on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
        assert on, "no module has gradient checkpointing on"
        assert bool(compat.reentrant_checkpointing(model)) is use_reentrant
        if use_reentrant:
            assert compat.non_reentrant_checkpointing(model) == []
            assert not compat.reentrant_checkpointing(model)


def test_an_untested_version_is_warned_about_once(monkeypatch):
    monkeypatch.setattr(compat, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.warn_if_untested()  # the installed one is tested: silent
        compat.warn_if_untested("9.0.0")
        compat.warn_if_untested("9.0.0")
    assert len(caught) == 1 and "tested with transformers >=4.37.2" in str(caught[0].message)
    assert "transformers 9.0.0 is installed" in str(caught[0].message)


def test_dtype_keyword_loads_in_that_dtype(tmp_path):
    from lvlm_safety_plugins.testing import build_tiny_llava

    build_tiny_llava().save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, **compat.dtype_kwargs(torch.float16))
    assert next(model.parameters()).dtype == torch.float16
    assert not [w for w in caught if "torch_dtype" in str(w.message)]  # no deprecated keyword
    assert compat.dtype_kwargs(None) == {}


def test_trainer_tokenizer_keyword(tmp_path):
    from lvlm_safety_plugins.testing import build_tiny_llava, tiny_tokenizer

    tok = tiny_tokenizer()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=build_tiny_llava(), args=args, **compat.trainer_tokenizer_kwargs({"tokenizer": tok}))
    assert compat.trainer_tokenizer(trainer) is tok


def test_llava_trainer_import_shim():
    import transformers.trainer as trainer_module

    compat.restore_trainer_layernorm_layers()
    assert torch.nn.LayerNorm in list(trainer_module.ALL_LAYERNORM_LAYERS)


def test_layer_output_round_trip():
    h = torch.randn(2, 3, 4)
    for output in (h, (h, "attn"), [h, None]):
        new = compat.replace_layer_hidden(output, h + 1)
        assert type(new) is type(output) and torch.equal(compat.layer_hidden(new), h + 1)
    with pytest.raises(TypeError, match="decoder layer output of type dict"):
        compat.layer_hidden({"x": h})

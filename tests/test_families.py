"""Every supported HF vision-language family on a tiny random model built from its
config (nothing downloaded): one row per family in ``FAMILIES``, so adding a family is
one line.

No processor of these families can be built offline (their tokenizers are files on the
Hub), so every test feeds ``input_ids`` and the pixel tensors directly, laid out as the
family's processor lays them out: the image start/end markers, then one placeholder per
image feature (the count the family's vision tower produces for the given pixels),
token types where the family uses them. Rows whose class does not exist in the installed
transformers are skipped by name.

What each row checks, against computations written here (never against the adapter):

- the layout's image mask is exactly the set of positions where something else than the
  token embedding enters the decoder in a real forward (a pre-hook on the decoder the
  model's own ``get_decoder()`` returns), and what lands there is the projector's output
  (a forward hook on the projector module named in the row; Molmo2 adds it to the
  placeholder embedding, Ovis2 also writes its indicator tokens);
- the text-only variant drops the placeholders and the markers, keeps the token types;
- CMRM: the shift measured by the library equals one from ``output_hidden_states``;
  dataset- and sample-level steering in ``generate`` with the KV cache equal the same
  edit written as a plain forward hook; folding into the MLP bias equals hooked steering
  where the MLP's output is added to the residual stream as it is;
- TGA's capture: projector output and pooled image states, with gradients; on Qwen3-VL
  also each deepstack merger's output (``projector_outputs``), checked against what the
  model adds after the deepstack layer; ``analyze`` leaves the deepstack layers' image
  cosines ``None``; TGA's caption teacher context drops the image markers;
- the comparative loss's drop and crop ablations give three different losses and a
  gradient;
- afterwards no hook is left and every parameter is bit-identical.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
import transformers

from lvlm_safety_plugins import Runtime, get_adapter, load_recipe
from lvlm_safety_plugins.adapters import hf
from lvlm_safety_plugins.capture import ForwardCapture
from lvlm_safety_plugins.errors import LayerError, UnsupportedModelError
from lvlm_safety_plugins.methods.cmrm.steer import apply as cmrm_apply
from lvlm_safety_plugins.methods.cmrm.steer import steer as cmrm_steer
from lvlm_safety_plugins.methods.cmrm.calibration import measure_states
from lvlm_safety_plugins.methods.cmrm.folding import fold_into_weights

V, IMG, BOI, EOI = 128, 100, 101, 102
TEXT = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, image_size=28, patch_size=14)
QWEN_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16)
MROPE = {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True}


def _px(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _image(b: int = 2, seed: int = 0) -> dict:
    return {"pixel_values": _px(b, 3, 28, 28, seed=seed)}


def _qwen_pixels(b: int = 2, seed: int = 0) -> dict:
    return {"pixel_values": _px(b * 16, 3 * 2 * 14 * 14, seed=seed), "image_grid_thw": torch.tensor([[1, 4, 4]] * b)}


# -- configs (tiny, random) ------------------------------------------------------------------


def _onevision(T):
    return T.LlavaOnevisionConfig(vision_config=SIGLIP, text_config=dict(TEXT, model_type="qwen2"), image_token_index=IMG,
                                  image_grid_pinpoints=[[28, 28]], vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")


def _mistral3(T):
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14, head_dim=8)
    return T.Mistral3Config(vision_config=vision, text_config=dict(TEXT, model_type="mistral"), image_token_index=10,
                            spatial_merge_size=2, vision_feature_layer=-1)


def _aya(T):
    return T.AyaVisionConfig(vision_config=SIGLIP, text_config=dict(TEXT, model_type="cohere2"), image_token_index=IMG,
                             downsample_factor=2, vision_feature_layer=-1)


def _internvl(T):
    vision = dict(model_type="internvl_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=[28, 28], patch_size=[14, 14])
    return T.InternVLConfig(vision_config=vision, text_config=dict(TEXT, model_type="qwen2"), image_token_id=IMG,
                            downsample_ratio=0.5, vision_feature_layer=-1)


def _paligemma(T):
    return T.PaliGemmaConfig(vision_config=SIGLIP, text_config=dict(TEXT, model_type="gemma"), image_token_index=IMG,
                             projection_dim=32)


def _gemma3(T):
    return T.Gemma3Config(vision_config=SIGLIP, text_config=dict(TEXT, model_type="gemma3_text", sliding_window=8),
                          image_token_index=IMG, boi_token_index=BOI, eoi_token_index=EOI, mm_tokens_per_image=1)


def _gemma4(T):
    text = dict(TEXT, model_type="gemma4_text", hidden_size_per_layer_input=8, vocab_size_per_layer_input=V,
                sliding_window=8, layer_types=["sliding_attention", "full_attention"], global_head_dim=8)
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=8, patch_size=16, position_embedding_size=64, pooling_kernel_size=2)
    return T.Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=IMG, boi_token_id=BOI,
                          eoi_token_id=EOI, video_token_id=103, audio_token_id=104, boa_token_id=105, eoa_token_index=106)


def _gemma4_pixels(b: int = 2, seed: int = 0) -> dict:
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1).reshape(16, 2)
    return {"pixel_values": _px(b, 16, 3 * 16 * 16, seed=seed), "image_position_ids": torch.stack([grid] * b)}


def _qwen3vl(T, moe=False):
    text = dict(TEXT, rope_scaling=MROPE, rope_parameters=MROPE)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[])
    cls = T.Qwen3VLMoeConfig if moe else T.Qwen3VLConfig
    return cls(text_config=text, vision_config=dict(QWEN_VISION, deepstack_visual_indexes=[0]), image_token_id=IMG,
               vision_start_token_id=BOI, vision_end_token_id=EOI)


def _qwen35(T, moe=False):
    text = dict(TEXT, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=2,
                linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=2,
                rope_parameters=dict(MROPE, partial_rotary_factor=0.5))
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    cls = T.Qwen3_5MoeConfig if moe else T.Qwen3_5Config
    return cls(text_config=text, vision_config=dict(QWEN_VISION), image_token_id=IMG, vision_start_token_id=BOI,
               vision_end_token_id=EOI)


def _glm4v(T, moe=False):
    if transformers.__version__.startswith("4."):  # 4.57 reads rope_scaling
        # (4.57's Glm4vMoe text config rotates half the head dimension)
        text = dict(TEXT, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 0] if moe else [2, 1, 1]})
    else:
        text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "partial_rotary_factor": 1.0})
    if moe:
        text.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                    first_k_dense_replace=1, n_group=1, topk_group=1)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, image_size=28)
    cls = T.Glm4vMoeConfig if moe else T.Glm4vConfig
    return cls(text_config=text, vision_config=vision, image_token_id=IMG, image_start_token_id=BOI, image_end_token_id=EOI,
               video_start_token_id=103, video_end_token_id=104)


def _idefics3(T, smol=False):
    cls = T.SmolVLMConfig if smol else T.Idefics3Config
    vision = dict(model_type="smolvlm_vision" if smol else "idefics3_vision", hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    cfg = cls(vision_config=vision, text_config=dict(TEXT, model_type="llama"), image_token_id=IMG, scale_factor=2)
    cfg.image_marker_token_ids = [BOI, EOI]  # <fake_token_around_image>, <global-img>: the processor's, not the config's
    return cfg


def _idefics3_pixels(b: int = 2, seed: int = 0) -> dict:
    return {"pixel_values": _px(b, 1, 3, 56, 56, seed=seed), "pixel_attention_mask": torch.ones(b, 1, 56, 56, dtype=torch.long)}


def _llama4(T):
    text = dict(TEXT, model_type="llama4_text", intermediate_size_mlp=64, num_local_experts=2, interleave_moe_layer_step=2,
                attention_chunk_size=64, no_rope_layer_interval=4)
    vision = dict(hidden_size=16, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
                  pixel_shuffle_ratio=0.5, rope_theta=10000)
    return T.Llama4Config(vision_config=vision, text_config=text, image_token_index=IMG, boi_token_index=BOI,
                          eoi_token_index=EOI)


def _ovis2(T):
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vocab_size=24, hidden_stride=1, num_visual_indicator_tokens=5)
    return T.Ovis2Config(vision_config=vision, text_config=dict(TEXT, model_type="qwen2"), image_token_id=IMG,
                         visual_indicator_token_ids=[BOI, EOI, 103, 104, 105], vocab_size=V, hidden_size=32)


def _molmo2(T):
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  head_dim=8, patch_size=14, num_position_embeddings=4, image_default_input_size=[28, 28])
    adapter = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, head_dim=8, intermediate_size=32,
                   text_hidden_size=32, vit_layers=[-1], initializer_range=0.5)  # else its features are ~1e-9
    return T.Molmo2Config(vision_config=vision, adapter_config=adapter, text_config=dict(TEXT, additional_vocab_size=16),
                          image_start_token_id=BOI, low_res_image_start_token_id=103, image_end_token_id=EOI,
                          image_patch_id=IMG, frame_start_token_id=104, frame_end_token_id=105)


def _molmo2_pixels(b: int = 2, seed: int = 0) -> dict:
    return {"pixel_values": _px(b, 4, 3 * 14 * 14, seed=seed), "image_token_pooling": torch.tensor([[0, 1], [2, 3]] * b),
            "image_grids": torch.tensor([[1, 1, 1, 1]] * b), "image_num_crops": torch.tensor([1] * b)}


@dataclass(frozen=True)
class Family:
    cls: str  # the transformers class name without "ForConditionalGeneration"
    config: Callable[[Any], Any]
    pixels: Callable[..., dict]
    features: int  # placeholders per image the processor writes for these pixels
    projector: str  # the module whose output lands in the decoder's input
    adapter: type = hf.HFVisionLanguageAdapter
    before: tuple[int, ...] = (BOI,)  # markers before the placeholders
    after: tuple[int, ...] = (EOI,)  # markers after
    token_types: str | None = None  # "token_type_ids" / "mm_token_type_ids": image positions are 1
    added: bool = False  # the features are added to the placeholder embeddings (Molmo2)
    #: the MLP is Llama-style (gate/up/down linears) and its output is added to the residual
    #: stream as it is; else folding is refused (MoE, fused gate_up, Gemma's post-MLP norm)
    folds: bool = True
    scaled: bool = False  # the model scales the projector output before it lands (4.x PaliGemma)
    extra_image: tuple[int, ...] = ()  # tokens besides the placeholders that get image content (Ovis2)
    image: int = IMG  # the placeholder token
    image_processor: str | None = None  # the family's image processor class (built offline, defaults)
    newline: str | None = None  # a learned row separator the model writes among the features (LLaVA-OneVision)


FAMILIES = [
    Family("LlavaOnevision", _onevision, lambda b=2, seed=0: {"pixel_values": _px(b, 2, 3, 28, 28, seed=seed),
                                                               "image_sizes": torch.tensor([[28, 28]] * b)},
           10, "model.multi_modal_projector", before=(), after=(), newline="model.image_newline",
           image_processor="LlavaOnevisionImageProcessor"),
    Family("Mistral3", _mistral3, lambda b=2, seed=0: {**_image(b, seed), "image_sizes": torch.tensor([[28, 28]] * b)},
           1, "model.multi_modal_projector", adapter=hf.HFMistral3Adapter, before=(), after=(13,), image=10,
           image_processor="PixtralImageProcessor"),
    Family("AyaVision", _aya, _image, 1, "model.multi_modal_projector", before=(), after=(),
           image_processor="GotOcr2ImageProcessor"),
    Family("InternVL", _internvl, _image, 1, "model.multi_modal_projector", before=(), after=(),
           image_processor="GotOcr2ImageProcessor"),
    Family("PaliGemma", _paligemma, _image, 4, "model.multi_modal_projector", adapter=hf.HFGemmaVisionAdapter,
           before=(), after=(), token_types="token_type_ids", image_processor="SiglipImageProcessor",
           scaled=not transformers.__version__.startswith("5.")),
    Family("Gemma3", _gemma3, _image, 1, "model.multi_modal_projector", adapter=hf.HFGemmaVisionAdapter,
           token_types="token_type_ids", folds=False, image_processor="Gemma3ImageProcessor"),
    Family("Gemma4", _gemma4, _gemma4_pixels, 4, "model.embed_vision", adapter=hf.HFGemmaVisionAdapter,
           token_types="mm_token_type_ids", folds=False, image_processor="Gemma4ImageProcessor"),
    Family("Qwen3VL", _qwen3vl, _qwen_pixels, 4, "model.visual.merger", adapter=hf.HFQwen3VLAdapter,
           token_types="mm_token_type_ids", image_processor="Qwen2VLImageProcessor"),
    Family("Qwen3VLMoe", lambda T: _qwen3vl(T, moe=True), _qwen_pixels, 4, "model.visual.merger",
           adapter=hf.HFQwen3VLAdapter, token_types="mm_token_type_ids", folds=False),
    Family("Qwen3_5", _qwen35, _qwen_pixels, 4, "model.visual.merger", token_types="mm_token_type_ids"),
    Family("Qwen3_5Moe", lambda T: _qwen35(T, moe=True), _qwen_pixels, 4, "model.visual.merger",
           token_types="mm_token_type_ids", folds=False),
    Family("Glm4v", _glm4v, _qwen_pixels, 4, "model.visual.merger", token_types="mm_token_type_ids",
           image_processor="Glm4vImageProcessor", folds=False),
    Family("Glm4vMoe", lambda T: _glm4v(T, moe=True), _qwen_pixels, 4, "model.visual.merger",
           token_types="mm_token_type_ids", folds=False),
    Family("Idefics3", _idefics3, _idefics3_pixels, 4, "model.connector", adapter=hf.HFIdefics3Adapter,
           image_processor="Idefics3ImageProcessor"),
    Family("SmolVLM", lambda T: _idefics3(T, smol=True), _idefics3_pixels, 4, "model.connector",
           adapter=hf.HFIdefics3Adapter, image_processor="SmolVLMImageProcessor"),
    Family("Llama4", _llama4, _image, 1, "multi_modal_projector", folds=False),
    Family("Ovis2", _ovis2, _image, 4, "model.visual_embeddings_table", adapter=hf.HFOvis2Adapter,
           extra_image=(BOI, EOI), image_processor="Ovis2ImageProcessor"),
    Family("Molmo2", _molmo2, _molmo2_pixels, 2, "model.multi_modal_projector.image_projector",
           adapter=hf.HFMolmo2Adapter, added=True,
           token_types="mm_token_type_ids"),
]


def _image_processor(name: str):
    """The image processor class, its PIL variant where transformers 5.x has one and
    torchvision is missing (no warning), with default settings."""
    from lvlm_safety_plugins import compat

    cls = getattr(transformers, name + "Pil", None) if compat.clip_image_processor_class().__name__.endswith("Pil") else None
    cls = cls or getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"{name} does not exist in transformers {transformers.__version__}")
    return cls()


def _row_id(f: Family) -> str:
    return f.cls


_BATCHES: dict[str, dict] = {}


def _build(f: Family, seed: int = 0):
    cls = getattr(transformers, f.cls + "ForConditionalGeneration", None)
    if cls is None:
        pytest.skip(f"{f.cls}ForConditionalGeneration does not exist in transformers {transformers.__version__}")
    torch.manual_seed(seed)
    try:
        cfg = f.config(transformers)
    except (TypeError, ValueError, KeyError) as exc:  # pragma: no cover - a config this version cannot build
        pytest.skip(f"{f.cls}: the tiny config does not build on transformers {transformers.__version__}: {exc}")
    model = cls(cfg).eval()
    with torch.no_grad():  # weights some families initialise to zero (Gemma 3's projector): the image must matter
        for p in model.parameters():
            if p.dim() >= 2 and not bool(p.any()):
                p.normal_(0.0, 0.2)
        for m in model.modules():  # Molmo2's LayerNorms start at weight 0 without a checkpoint
            if isinstance(m, torch.nn.LayerNorm) and m.weight is not None and not bool(m.weight.any()):
                m.weight.fill_(1.0)
    _BATCHES[type(model).__name__] = _batch(f)
    return model


def _batch(f: Family, seed: int = 0, labels: bool = False) -> dict:
    """Two prompts with one image each, the first left-padded, laid out as the family's
    processor lays them out."""
    image = [*f.before, *([f.image] * f.features), *f.after]
    rows = [[1, 5, *image, 6, 7], [1, 8, 9, *image, 6, 7, 11]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    batch = {"input_ids": ids, "attention_mask": (torch.arange(width) >= torch.tensor([[width - len(r)] for r in rows])).long()}
    batch.update(f.pixels(2, seed))
    cls = getattr(transformers, f.cls + "ForConditionalGeneration", None)
    if f.token_types and cls is not None and f.token_types in inspect.signature(cls.forward).parameters:
        batch[f.token_types] = (ids == f.image).long()  # 4.57's Qwen3-VL/GLM-4V take no mm_token_type_ids
    if labels:
        lab = ids.clone()
        lab[(batch["attention_mask"] == 0) | (ids == f.image)] = -100
        batch["labels"] = lab
    return batch


def _decoder(model):
    """The text decoder, through the model's own accessor (4.57 Idefics3/SmolVLM return
    the whole model there, whose ``text_model`` is the decoder)."""
    dec = model.get_decoder()
    dec = getattr(dec, "text_model", None) or dec
    return dec if hasattr(dec, "layers") else dec.model  # Llama 4: a ...ForCausalLM


def _module(model, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _hooks(model) -> dict:
    """Every module's hooks and instance ``forward`` (transformers installs its own
    output-capturing hooks on first use: compared, not required absent)."""
    def ours(hooks):  # transformers' own output-capturing hooks come and stay: not ours to check
        return tuple(h for h in hooks.values() if not getattr(h, "__module__", "").startswith("transformers."))

    def wrapper(m):  # 4.54-4.57 restore a patched forward by assigning the bound original: not a wrapper
        fwd = m.__dict__.get("forward")
        if getattr(fwd, "__self__", None) is m and getattr(fwd, "__func__", None) is type(m).forward:
            return None
        return fwd

    return {name: (ours(m._forward_hooks), ours(m._forward_pre_hooks), wrapper(m)) for name, m in model.named_modules()}


def _snapshot(model) -> tuple[dict, dict]:
    with torch.no_grad():
        model(**_BATCHES[type(model).__name__])  # transformers' own hooks installed before the snapshot
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, _hooks(model)


def _assert_clean(model, before: tuple[dict, dict]) -> None:
    """No hook or wrapper left behind, every tensor bit-identical."""
    tensors, hooks = before
    now = _hooks(model)
    for name, value in hooks.items():
        assert now[name] == value, f"{name}: a hook or forward wrapper was left behind"
    after = model.state_dict()
    assert set(after) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(after[k], v), k


def _hand_steer(model, layer: int, vector: torch.Tensor, real: Callable[[torch.Tensor], torch.Tensor]):
    """Subtract ``vector`` (``[hidden]``, or ``[batch, hidden]``: one per row) from decoder
    layer ``layer``'s output at the real positions (a plain forward hook on the layer the
    model's own decoder holds)."""
    shift = vector if vector.dim() == 1 else vector[:, None, :]

    def hook(module, args, output):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        mask = real(hidden).unsqueeze(-1).to(hidden.dtype)
        new = hidden - mask * shift.to(hidden.dtype)
        return new if isinstance(output, torch.Tensor) else (new, *output[1:])

    return _decoder(model).layers[layer].register_forward_hook(hook)


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("f", FAMILIES, ids=_row_id)
def test_layout_is_where_the_projector_output_lands(f: Family):
    model = _build(f)
    before = _snapshot(model)
    adapter = get_adapter(model)
    assert type(adapter) is f.adapter
    assert adapter.projector is _module(model, f.projector)
    assert adapter.decoder_layers is _decoder(model).layers
    batch = _batch(f)
    seen: dict[str, Any] = {"proj": []}

    def pre(module, args, kwargs):
        seen["x"] = kwargs["inputs_embeds"].detach().clone()

    def proj(module, args, output):
        out = output if isinstance(output, torch.Tensor) else output[0]
        seen["proj"].append(out.detach().reshape(-1, out.shape[-1]).clone())

    handles = [_decoder(model).register_forward_pre_hook(pre, with_kwargs=True),
               _module(model, f.projector).register_forward_hook(proj)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    x = seen["x"]
    with torch.no_grad():
        emb = model.get_input_embeddings()(batch["input_ids"])
    real = batch["attention_mask"].bool()
    changed = (x - emb).abs().amax(-1) > 0
    layout = adapter.layout(batch)
    assert layout.image_mask.shape == x.shape[:2]
    # the image mask is exactly where something else than the token embedding entered
    assert torch.equal(changed & real, layout.image_mask), (changed.int(), layout.image_mask.int())
    expected = batch["input_ids"] == f.image
    for tok in f.extra_image:
        expected |= batch["input_ids"] == tok
    assert torch.equal(layout.image_mask, expected & real)
    # and what entered there is the projector's output (Molmo2: added to the embedding)
    landed = (x - emb)[layout.image_mask] if f.added else x[layout.image_mask]
    rows = torch.cat(seen["proj"])
    if f.newline:
        rows = torch.cat([rows, _module(model, f.newline).detach().reshape(1, -1)])
    if f.scaled:  # 4.x PaliGemma divides the projector output by sqrt(hidden size) after the projector
        landed = landed * model.config.text_config.hidden_size ** 0.5
    dist = torch.cdist(landed.float(), rows.float()).min(dim=1).values
    assert bool((dist < 1e-4).all()), dist
    if not f.extra_image and not f.newline:  # one projector row per placeholder, in order
        torch.testing.assert_close(landed, rows[: landed.shape[0]], rtol=1e-5, atol=1e-5)
    _assert_clean(model, before)


@pytest.mark.parametrize("f", FAMILIES, ids=_row_id)
def test_text_only_and_reference_batches(f: Family):
    model = _build(f)
    adapter = get_adapter(model)
    batch = _batch(f)
    text = adapter.text_only_batch(batch)
    dropped = {f.image, *f.before, *f.after, *f.extra_image}
    for row in range(2):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        keep = torch.tensor([int(t) not in dropped for t in ids])
        got = text["input_ids"][row][text["attention_mask"][row].bool()]
        assert torch.equal(got, ids[keep])
    assert not any(k in text for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes"))
    if f.token_types in batch:  # carried column by column: no image block is left
        assert text[f.token_types].shape == text["input_ids"].shape and int(text[f.token_types].sum()) == 0
    noise = adapter.blank_image_batch(batch, "noise", seed=1)
    if isinstance(adapter, hf.HFIdefics3Adapter):  # an all-zero image is a padding image there
        with pytest.raises(ValueError, match="padding image"):
            adapter.blank_image_batch(batch, "blank")
    if f.image_processor:  # through the family's own image processor: its values, the batch's layout
        proc = _image_processor(f.image_processor)
        grey = adapter.blank_image_batch(batch, "blank", image_processor=proc, fill=128)["pixel_values"]
        assert grey.shape == batch["pixel_values"].shape
        from PIL import Image

        made = torch.as_tensor(proc(images=Image.new("RGB", (56, 56), (128, 128, 128)), return_tensors="pt")["pixel_values"])
        # a constant image (one value per channel), the values the processor made of it
        assert set(grey.unique().tolist()) <= set(made.unique().tolist()) and grey.unique().numel() <= 3
    blank = adapter.blank_image_batch(batch, "blank", image_processor=_image_processor(f.image_processor)
                                      if isinstance(adapter, hf.HFIdefics3Adapter) else None)
    with torch.no_grad():
        out_text = model(**text).logits
        a, b, c = (model(**x).logits for x in (batch, blank, noise))
    assert out_text.shape[:2] == text["input_ids"].shape
    assert not torch.allclose(a, b) and not torch.allclose(b, c)
    if not isinstance(adapter, hf.HFIdefics3Adapter):
        assert torch.equal(blank["pixel_values"], torch.zeros_like(batch["pixel_values"]))


@pytest.mark.slow
@pytest.mark.parametrize("f", FAMILIES, ids=_row_id)
def test_cmrm_calibration_steering_and_folding(f: Family):
    model = _build(f)
    before = _snapshot(model)
    adapter = get_adapter(model)
    batch = _batch(f)
    layer = adapter.num_layers - 2  # not the last: its output_hidden_states entry is after the final norm
    text = adapter.text_only_batch(batch)
    # calibration: the library's shift at the last prompt token equals output_hidden_states'
    with torch.no_grad():
        lib = measure_states(adapter, model, batch, [layer], "last")[0] - measure_states(adapter, model, text, [layer], "last")[0]
        hand = model(**batch, output_hidden_states=True).hidden_states[layer + 1][:, -1] - \
            model(**text, output_hidden_states=True).hidden_states[layer + 1][:, -1]
    torch.testing.assert_close(lib, hand.float(), rtol=1e-4, atol=1e-5)
    # steering with a vector large enough to change every tiny model's answer
    vector = torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(1))

    gen = dict(max_new_tokens=3, do_sample=False, use_cache=True, output_scores=True, return_dict_in_generate=True,
               pad_token_id=0)

    def generate(**extra):
        with torch.no_grad():
            out = model.generate(**batch, **gen, **extra)
        return out.sequences, torch.stack(out.scores)

    plain_seq, plain_scores = generate()
    # dataset level, all real positions of prompt and answer, in generate with the KV cache
    with cmrm_steer(model, {layer: vector}, alpha=1.0, positions="all", apply_to="both"):
        seq, scores = generate()

    def real(hidden):  # the prompt's real positions at prefill, the new token afterwards
        if hidden.shape[1] == batch["input_ids"].shape[1]:
            return batch["attention_mask"].bool()
        return torch.ones(hidden.shape[:2], dtype=torch.bool)

    def same_as_by_hand(got_seq, got_scores, shift):  # generate with the edit written as a plain hook
        handle = _hand_steer(model, layer, shift, real)
        try:
            hand_seq, hand_scores = generate()
        finally:
            handle.remove()
        assert torch.equal(got_seq, hand_seq)
        torch.testing.assert_close(got_scores, hand_scores, rtol=1e-4, atol=1e-4)

    same_as_by_hand(seq, scores, vector)
    assert not torch.allclose(scores, plain_scores)
    # sample level (independent composition, one layer): this input's own shift with the
    # blank reference image, measured on the unsteered model
    proc = _image_processor(f.image_processor) if f.image_processor else None
    ref = adapter.blank_image_batch(batch, "blank", image_processor=proc)
    with torch.no_grad():
        own = model(**ref, output_hidden_states=True).hidden_states[layer + 1][:, -1] - \
            model(**text, output_hidden_states=True).hidden_states[layer + 1][:, -1]
    with cmrm_steer(model, None, variant="sample", reference="blank", layers=[layer], alpha=1.0, positions="all",
                    apply_to="both", composition="independent", processor=SimpleNamespace(image_processor=proc)):
        s_seq, s_scores = generate()
    same_as_by_hand(s_seq, s_scores, own)
    _assert_clean(model, before)
    # folding into the MLP output bias equals hooked steering where the MLP output is
    # added to the residual stream as it is; refused by name where it is not
    if f.folds:
        with torch.no_grad(), cmrm_steer(model, {layer: vector}, alpha=1.0, positions="all", apply_to="both"):
            hooked = model(**batch).logits
        fold_into_weights(model, {layer: vector}, alpha=1.0)
        with torch.no_grad():
            folded = model(**batch).logits
        real_rows = batch["attention_mask"].bool()
        torch.testing.assert_close(folded[real_rows], hooked[real_rows], rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises(Exception, match="fold"):
            fold_into_weights(model, {layer: vector}, alpha=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("f", FAMILIES, ids=_row_id)
def test_tga_capture_and_comparative_ablations(f: Family):
    model = _build(f)
    before = _snapshot(model)
    adapter = get_adapter(model)
    batch = _batch(f, labels=True)
    layer = adapter.num_layers - 1
    if isinstance(adapter, hf.HFQwen3VLAdapter):  # deepstack layers are refused for image states
        with pytest.raises(LayerError, match="deepstack"):
            ForwardCapture(adapter, adapter.layout(batch), [0])
    # TGA: the projector output and the pooled image states, with gradients to the projector
    params = adapter.set_trainable("projector")
    assert params
    model.train()
    hooked = []
    h = adapter.projector.register_forward_hook(lambda m, a, o: hooked.append(o if isinstance(o, torch.Tensor) else o[0]))
    cap = ForwardCapture(adapter, adapter.layout(batch), [layer], projector=True).start()
    try:
        model(**batch)
    finally:
        cap.stop()
        h.remove()
    proj = cap.projector_output
    assert proj is hooked[0] and proj.requires_grad
    pooled = cap.pooled("image", layer)
    state = cap.states(layer)
    mask = adapter.layout(batch).image_mask
    hand = (state * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, hand)
    pooled.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    # the comparative loss: drop on the MLPs and crop of the image tokens
    site = "mlp" if hasattr(adapter.decoder_layers[0], "mlp") else "layers"  # Llama 4: feed_forward
    for overrides in ([f"comparative.drop_site={site}", "comparative.dropout=0.3"],
                      ["comparative.ablation=crop", "comparative.crop_parts=[image]", "comparative.crop_share=0.5"]):
        rt = Runtime(load_recipe("comparative", overrides), model=model)
        result = rt.training_step(model, dict(batch), step=0, max_steps=1)
        losses = [result.context.metrics[f"comparative/loss_{i}"] for i in range(3)]
        # the second ablated model removes more than the first (with one image token per
        # image, the first crops nothing of it)
        assert losses[2] != losses[0] and (len(set(losses)) == 3 or f.features == 1), (overrides, losses)
        result.terms["comparative/loss"].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        model.zero_grad(set_to_none=True)
    model.eval()
    _assert_clean(model, before)  # no capture, drop or crop hook left, no weight changed


QWEN3VL = [f for f in FAMILIES if f.adapter is hf.HFQwen3VLAdapter]


def _tensor(output):
    return output if isinstance(output, torch.Tensor) else output[0]


@pytest.mark.parametrize("f", QWEN3VL, ids=_row_id)
def test_qwen3vl_capture_holds_everything_that_reaches_the_llm(f: Family):
    """``projector_outputs`` is ``visual.merger``'s output plus each deepstack merger's,
    the very tensors the modules produced (hooks written here), with gradients; and the
    deepstack output is what the model adds at the image positions after layer k-1."""
    model = _build(f)
    adapter = get_adapter(model)
    batch = _batch(f)
    visual = model.model.visual
    k = len(visual.deepstack_merger_list)
    assert k >= 1
    adapter.set_trainable("projector")
    seen, io = {}, {}

    def keep(store, name, copy=False):  # the first output of a module (hooks return nothing: nothing is changed)
        def hook(module, args, output):  # copy: 4.57 adds the deepstack features in place to the layer's output
            store.setdefault(name, _tensor(output).detach().clone() if copy else _tensor(output))
        return hook

    def keep_input(module, args, kwargs):
        io.setdefault("in", args[0] if args else kwargs["hidden_states"])

    layers = _decoder(model).layers
    handles = [visual.merger.register_forward_hook(keep(seen, "projector")),
               layers[k - 1].register_forward_hook(keep(io, "out", copy=True)),
               layers[k].register_forward_pre_hook(keep_input, with_kwargs=True)]
    for i, merger in enumerate(visual.deepstack_merger_list):
        handles.append(merger.register_forward_hook(keep(seen, f"deepstack.{i}")))
    cap = ForwardCapture(adapter, adapter.layout(batch), [k], projector=True).start()
    try:
        model(**batch)
    finally:
        cap.stop()
        for h in handles:
            h.remove()
    got = cap.projector_outputs
    assert list(got) == ["projector", *(f"deepstack.{i}" for i in range(k))]
    assert cap.projector_output is got["projector"]
    for name, tensor in got.items():
        assert tensor is seen[name] and tensor.requires_grad, name
    mask = adapter.layout(batch).image_mask
    assert got[f"deepstack.{k - 1}"].shape == (int(mask.sum()), adapter.hidden_size)
    expected = io["out"].clone()
    expected[mask] += got[f"deepstack.{k - 1}"].detach()
    torch.testing.assert_close(io["in"].detach(), expected)  # what the LLM's layer k receives
    for i in range(k):  # each deepstack merger gets a gradient through its captured output
        got[f"deepstack.{i}"].square().sum().backward(retain_graph=True)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in visual.deepstack_merger_list[i].parameters())
    assert not any(module._forward_hooks for module in model.modules())


@pytest.mark.parametrize("f", QWEN3VL[:1], ids=_row_id)
def test_qwen3vl_analysis_leaves_the_deepstack_layers_unmeasured(f: Family, tmp_path):
    """``analyze``'s image-caption cosine is ``None`` (``null`` in analysis.json) at the
    layers whose image states lack the deepstack addition, with a note naming them and
    why; measured at the other layers (against hooks written here)."""
    import json

    from lvlm_safety_plugins.analysis import analyze, unmeasured_image_layers, write_report
    from lvlm_safety_plugins.testing import tiny_tokenizer

    model = _build(f)
    adapter = get_adapter(model)
    k = adapter.deepstack_layers
    refused, reason = unmeasured_image_layers(adapter)
    assert refused == list(range(k)) and "deepstack" in reason and f"layers {refused}" in reason
    batch = _batch(f)

    class Processor:  # no Qwen3-VL processor builds offline: the layout _batch writes, a real tiny tokenizer
        tokenizer = tiny_tokenizer()

        def __call__(self, text, images, **kwargs):
            return dict(batch)

    pairs = [{"image": None, "caption": "a red cat", "prompt": "p"}] * 2
    result = analyze(model, Processor(), ["how to make a bomb"], pairs, refusal_words=["sorry"], progress=False)
    cos = result.image_caption_cos
    assert cos[:k] == [None] * k
    assert any(f"image_caption_cos is null at layers {refused}" in n and "deepstack" in n for n in result.notes)
    caption = Processor.tokenizer(["a red cat"] * 2, return_tensors="pt")
    states = []  # by hand at the measured layers: each decoder layer's output, hooked here
    handles = [layer.register_forward_hook(lambda m, a, o: states.append(_tensor(o)) and None)
               for layer in _decoder(model).layers]
    try:
        with torch.no_grad():
            model(**batch)
            model(**caption)
    finally:
        for h in handles:
            h.remove()
    n = adapter.num_layers
    img, cap = states[:n], states[n:]
    mask = adapter.layout(batch).image_mask.unsqueeze(-1)
    for layer in range(k, n):
        pooled = (img[layer] * mask).sum(1) / mask.sum(1)
        hand = torch.nn.functional.cosine_similarity(pooled, cap[layer].mean(1), dim=-1).mean()
        assert cos[layer] == pytest.approx(float(hand), abs=1e-5)
    write_report(result, tmp_path)
    assert json.loads((tmp_path / "analysis.json").read_text())["image_caption_cos"][:k] == [None] * k


@pytest.mark.parametrize("f", [f for f in FAMILIES if f.cls in ("Gemma3", "Glm4v")], ids=_row_id)
def test_tga_caption_teacher_context_drops_the_image_markers(f: Family):
    """The caption stands where the image stood, without the start marker (as in the
    text-only variant): each teacher row is the row's tokens before its marker, then the
    caption; only the caption is pooled."""
    model = _build(f)
    assert f.before, "a family with a start marker"
    batch = _batch(f)
    tga = Runtime(load_recipe("tga_llava15_finetune"), model=model).methods["tga"]
    cap_ids = torch.tensor([[30, 31, 0], [32, 33, 34]])
    cap_mask = (cap_ids != 0).long()
    got = tga.teacher_batch(get_adapter(model), batch, cap_ids, cap_mask)
    want = [[1, 5, 30, 31], [1, 8, 9, 32, 33, 34]]  # _batch's rows before the marker, then the caption
    for b, row in enumerate(want):
        n = len(row)
        assert got["input_ids"][b, :n].tolist() == row and got["attention_mask"][b].sum() == n
        captioned = int(cap_mask[b].sum())
        assert got["caption_mask"][b].nonzero().flatten().tolist() == list(range(n - captioned, n))


def _teacher_rows_one_by_one(adapter, batch, cap_ids, cap_mask, retrieved):
    """TGA's caption teacher rows built row by row, as the method defines them: the
    row's real tokens before its first image token, less the retrieved ones and the
    image markers, then the row's caption tokens; a row without an image or a caption
    gets its caption (or one pad token) alone, with nothing pooled."""
    ids, attention = batch["input_ids"], batch["attention_mask"].bool()
    markers = set(adapter.marker_token_ids())
    out_ids, out_pooled = [], []
    for b in range(ids.shape[0]):
        caption = [int(t) for t, m in zip(cap_ids[b], cap_mask[b]) if m]
        images = [j for j in range(ids.shape[1]) if attention[b, j] and int(ids[b, j]) == adapter.image_token_id]
        valid = bool(images) and bool(caption)
        prefix = [int(ids[b, j]) for j in range(images[0] if images else 0)
                  if valid and attention[b, j] and not retrieved[b, j] and int(ids[b, j]) not in markers]
        tail = caption or [adapter.pad_token_id]
        out_ids.append(prefix + tail)
        out_pooled.append([False] * len(prefix) + [valid] * len(tail))
    return out_ids, out_pooled


@pytest.mark.parametrize("f", [f for f in FAMILIES if f.cls in ("Gemma3", "Glm4v", "LlavaOnevision")], ids=_row_id)
def test_tga_caption_teacher_rows_equal_the_row_by_row_definition(f: Family):
    """The teacher rows, built for all rows at once, equal the definition written here
    row by row, on random batches: left and right padding, rows without an image, with
    two images, with retrieved text, with an empty caption, markers where the family
    has them."""
    model = _build(f)
    adapter = get_adapter(model)
    tga = Runtime(load_recipe("tga_llava15_finetune"), model=model).methods["tga"]
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        rows, length = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(3, 60, (rows, length), generator=g)
        specials = [adapter.image_token_id, *adapter.marker_token_ids()]
        sprinkle = torch.rand(rows, length, generator=g) < 0.3
        ids[sprinkle] = torch.tensor(specials)[torch.randint(0, len(specials), (int(sprinkle.sum()),), generator=g)]
        real = torch.randint(1, length + 1, (rows,), generator=g)
        column = torch.arange(length)
        attention = (column >= length - real[:, None]) if trial % 2 else (column < real[:, None])
        ids[~attention] = adapter.pad_token_id
        retrieved = (torch.rand(rows, length, generator=g) < 0.25) & attention
        cap_len = torch.randint(0, 5, (rows,), generator=g)  # 0: no caption
        cap_ids = torch.randint(3, 60, (rows, 5), generator=g)
        cap_mask = (torch.arange(5) < cap_len[:, None]).long()
        batch = {"input_ids": ids, "attention_mask": attention.long()}
        got = tga.teacher_batch(adapter, batch, cap_ids, cap_mask, retrieved)
        want_ids, want_pooled = _teacher_rows_one_by_one(adapter, batch, cap_ids, cap_mask, retrieved)
        width = max(map(len, want_ids))
        assert tuple(got["input_ids"].shape) == (rows, width), trial
        for b in range(rows):
            n = len(want_ids[b])
            assert got["input_ids"][b, :n].tolist() == want_ids[b], (trial, b)
            assert got["input_ids"][b, n:].tolist() == [adapter.pad_token_id] * (width - n), (trial, b)
            assert got["attention_mask"][b].tolist() == [1] * n + [0] * (width - n), (trial, b)
            assert got["caption_mask"][b].tolist() == want_pooled[b] + [False] * (width - n), (trial, b)
        assert got["attention_mask"].dtype == torch.long and got["caption_mask"].dtype == torch.bool


def test_mllama_is_refused_by_name():
    """Cross-attention models have no image positions in the decoder's sequence."""
    cls = getattr(transformers, "MllamaForConditionalGeneration", None)
    if cls is None:
        pytest.skip("MllamaForConditionalGeneration does not exist in this transformers")
    text = dict(TEXT, model_type="mllama_text_model", cross_attention_layers=[1], rope_theta=10000,
                rope_scaling={"rope_type": "default"})
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14, max_num_tiles=1, vision_output_dim=32, intermediate_layers_indices=[0],
                  supported_aspect_ratios=[[1, 1]])
    try:
        model = cls(transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMG))
    except (TypeError, ValueError) as exc:  # pragma: no cover - 4.57's config wants other fields
        pytest.skip(f"tiny Mllama config does not build here: {exc}")
    with pytest.raises(UnsupportedModelError, match="MllamaForConditionalGeneration is not supported: .*cross-attention"):
        get_adapter(model)
    with pytest.raises(UnsupportedModelError, match="cross-attention"):
        cmrm_apply(model, {0: torch.zeros(32)})


def test_assembled_llava_checkpoint_loads_and_serves(tmp_path):
    """docs/adapters.md's recipe, on tiny random parts: an LLM and a CLIP vision tower
    put into a Llava, saved, loaded with load_model_and_processor, and served."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    from lvlm_safety_plugins import compat
    from lvlm_safety_plugins.loading import load_model_and_processor
    from lvlm_safety_plugins.testing import (IMAGE_SIZE, PATCH_SIZE, decoder_input, make_image, save_tiny_clip_vision_tower,
                                             tiny_image_processor, tiny_tokenizer)

    base = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(base), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=2, eos_token_id=3)).save_pretrained(tmp_path / "llm")
    base.save_pretrained(tmp_path / "llm")
    clip = save_tiny_clip_vision_tower(tmp_path / "clip")
    # -- the documented steps --
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    tower = CLIPVisionModel.from_pretrained(clip)
    tok = AutoTokenizer.from_pretrained(tmp_path / "llm")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    cfg = LlavaConfig(vision_config=tower.config, text_config=llm.config, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg.pad_token_id = tok.pad_token_id
    model = LlavaForConditionalGeneration(cfg)
    model.get_decoder().load_state_dict(llm.get_decoder().state_dict())
    model.get_output_embeddings().load_state_dict(llm.get_output_embeddings().state_dict())
    vision = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
    vision.load_state_dict(tower.state_dict())
    model.resize_token_embeddings(len(tok))
    processor = LlavaProcessor(image_processor=tiny_image_processor(), tokenizer=tok,
                               **compat.llava_processor_kwargs(patch_size=tower.config.patch_size))
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    loaded, proc = load_model_and_processor(tmp_path / "llava")
    # -- served: the LLM's weights are there, image positions are the projector's output
    assert torch.equal(get_adapter(loaded).decoder_layers[1].mlp.down_proj.weight, llm.get_decoder().layers[1].mlp.down_proj.weight)
    proc.tokenizer.padding_side = "left"
    batch = dict(proc(text=["USER: <image> what is in the image ? ASSISTANT:"], images=[make_image(0)], return_tensors="pt"))
    layout = get_adapter(loaded).layout(batch)
    x = decoder_input(loaded, **batch)
    assert int(layout.image_mask.sum()) == (IMAGE_SIZE // PATCH_SIZE) ** 2
    assert x.shape[:2] == layout.image_mask.shape
    if x.shape[1] == batch["input_ids"].shape[1]:  # the processor expanded <image> (not 4.37: the model splices)
        with torch.no_grad():
            emb = loaded.get_input_embeddings()(batch["input_ids"])
        assert torch.equal((x - emb).abs().amax(-1) > 0, layout.image_mask)


def test_processor_markers_are_recorded_for_the_text_only_variant():
    """Tokens a processor writes around an image that the config does not name
    (Idefics3's <fake_token_around_image>, <global-img>) are dropped once recorded."""
    f = next(x for x in FAMILIES if x.cls == "Idefics3")
    model = _build(f)
    model.config.image_marker_token_ids = None
    batch = {"input_ids": torch.tensor([[1, 5, IMG, 6]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="fake_token_around_image.*record_image_markers"):
        get_adapter(model).text_only_batch(batch)
    from lvlm_safety_plugins.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>", "<image>",
                                                         "<end_of_utterance>"]})
    processor = transformers.Idefics3Processor(image_processor=_image_processor("Idefics3ImageProcessor"), tokenizer=tok,
                                               image_seq_len=4)
    ids = hf.record_image_markers(model, processor)
    assert ids == [tok.convert_tokens_to_ids("<fake_token_around_image>"), tok.convert_tokens_to_ids("<global-img>")]
    fake, glob = ids
    batch = {"input_ids": torch.tensor([[1, 5, fake, glob, IMG, IMG, fake, 6]]), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    assert get_adapter(model).text_only_batch(batch)["input_ids"].tolist() == [[1, 5, 6]]


@pytest.mark.slow
def test_eval_cli_through_the_chat_template_of_an_idefics3(tmp_path, capsys):
    """`lvlm-safety eval` on a saved tiny Idefics3 whose real Idefics3Processor (tiny
    tokenizer, a chat template) is the one families' processor that builds offline:
    the prompt goes through the chat template, load_model_and_processor records the
    processor-only image markers, and sample-level CMRM (blank reference through the
    image processor, text-only variant without the markers) runs in generate."""
    import json

    from test_eval import write_figstep

    from lvlm_safety_plugins import cli
    from lvlm_safety_plugins.loading import load_model_and_processor
    from lvlm_safety_plugins.testing import tiny_tokenizer

    if getattr(transformers, "Idefics3ForConditionalGeneration", None) is None:
        pytest.skip("Idefics3ForConditionalGeneration does not exist in this transformers")
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<global-img>", "<image>",
                                                         "<end_of_utterance>"]})
    f = next(x for x in FAMILIES if x.cls == "Idefics3")
    cfg = f.config(transformers)
    cfg.image_marker_token_ids = None
    cfg.text_config.vocab_size = len(tok) + 8
    cfg.image_token_id = tok.convert_tokens_to_ids("<image>")
    cfg.text_config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    transformers.Idefics3ForConditionalGeneration(cfg).save_pretrained(tmp_path / "idefics3")
    image_processor = _image_processor("Idefics3ImageProcessor")
    image_processor.size, image_processor.max_image_size = {"longest_edge": 56}, {"longest_edge": 56}
    image_processor.do_image_splitting = False
    template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
                "{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                   chat_template=template).save_pretrained(tmp_path / "idefics3")
    model, processor = load_model_and_processor(tmp_path / "idefics3")
    assert processor.chat_template == template  # what eval's prompts go through
    assert model.config.image_marker_token_ids == [tok.convert_tokens_to_ids(t) for t in ("<fake_token_around_image>",
                                                                                           "<global-img>")]
    figstep = write_figstep(tmp_path / "FigStep")
    out = tmp_path / "out"
    code = cli.main(["eval", "--model", str(tmp_path / "idefics3"), "--benchmark", f"figstep:{figstep}", "--out", str(out),
                     "--limit", "2", "--batch-size", "2", "--max-new-tokens", "3", "--no-progress",
                     "--recipe", "cmrm_llava15_sample cmrm.layers=[1]"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    image_rows = [r for r in rows if r["benchmark"] == "figstep"]
    assert len(image_rows) == 4 and {r["run"] for r in image_rows} == {"base", "cmrm_llava15_sample"}
    # FigStep's text variant (the same requests as text) is answered by the run without a recipe only
    assert len(rows) == 6 and {r["run"] for r in rows if r["benchmark"] != "figstep"} == {"base"}
    assert "| figstep | unsafe rate (ASR) | 2 |" in capsys.readouterr().out


# -- CMRM's one-pass sequential calibration on every family ---------------------------------


def _one_pass(model, batches, layers, alphas, kinds):
    """One-pass sequential vectors for several alphas at once (side by side where the
    layer arguments can be repeated), as a sweep calibrates them."""
    from lvlm_safety_plugins.methods.cmrm.calibration import PreparedCalibration

    prepared = PreparedCalibration(model, batches, measure_at="last", store="auto", store_folder=None, tick=lambda n: None)
    try:
        return prepared.vectors_for([{l: a for l in layers} for a in alphas], layers, kinds, keep=True)
    finally:
        prepared.close()


@pytest.mark.parametrize("f", FAMILIES, ids=_row_id)
def test_one_pass_sequential_calibration_equals_a_steered_pass_per_layer(f: Family):
    """The one-pass algorithm (layers called again from a recording, what the decoder
    adds between layers replayed: Qwen3-VL's deepstack) gives the vectors of their
    definition, computed here with one steered forward per layer (``per_layer_reference``
    in test_cmrm), for two alphas side by side, over two batches; models whose layers
    take different masks are refused by name."""
    from test_cmrm import per_layer_reference

    from lvlm_safety_plugins.methods.cmrm.calibration import OnePassUnavailable
    from lvlm_safety_plugins.methods.cmrm.steer import prompt_kinds, steered_positions

    model = _build(f)
    adapter = get_adapter(model)
    batches = [(b, adapter.text_only_batch(b)) for b in (_batch(f), _batch(f, seed=1))]
    layers = list(range(adapter.num_layers))
    kinds = prompt_kinds(steered_positions("all", "both"))
    if f.cls in ("Gemma4", "Qwen3_5", "Qwen3_5Moe"):  # sliding/full or linear/full attention layers
        with pytest.raises(OnePassUnavailable, match="different attention kinds"):
            _one_pass(model, batches, layers, [0.7], kinds)
        return
    with torch.no_grad():
        got = _one_pass(model, batches, layers, [0.4, 0.9], kinds)
    for alpha, vectors in zip([0.4, 0.9], got):
        want = per_layer_reference(model, batches, layers, alpha, "all")
        for layer in layers:
            torch.testing.assert_close(vectors[layer], want[layer], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0][layers[-1]], got[1][layers[-1]])  # the earlier edit reaches the last layer


@pytest.mark.parametrize("f", QWEN3VL[:1], ids=_row_id)
def test_one_pass_calibration_refuses_a_change_between_layers_it_cannot_replay(f: Family, monkeypatch):
    """Without the deepstack replay (its keywords renamed here) the probe in layer 1's
    place sees states that are not layer 0's output and the one-pass algorithm refuses
    the model, so ``calibrate`` falls back to a pass per layer instead of giving
    vectors without the deepstack features."""
    from lvlm_safety_plugins import compat
    from lvlm_safety_plugins.methods.cmrm.calibration import OnePassUnavailable
    from lvlm_safety_plugins.methods.cmrm.steer import prompt_kinds, steered_positions

    model = _build(f)
    adapter = get_adapter(model)
    batches = [(_batch(f), adapter.text_only_batch(_batch(f)))]
    monkeypatch.setattr(compat, "DEEPSTACK_KEYS", ("no_such_mask", "no_such_embeds"))
    with pytest.raises(OnePassUnavailable, match="changes the states between its layers 0 and 1"):
        _one_pass(model, batches, [0, 1], [0.5], prompt_kinds(steered_positions("all", "both")))

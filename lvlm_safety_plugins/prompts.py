"""One prompt format for every command.

``calibrate``, ``calibrate --sweep``, ``analyze`` and ``eval`` wrap a raw prompt the same
way (the rule of :func:`lvlm_safety_plugins.evaluation.generate.build_prompt`): a
``--template`` with ``{prompt}`` when one is given, else the processor's chat template
when it has one (a user turn with the image and the text, then the generation prompt),
else LLaVA-1.5's documented format ``USER: <image>\\n{prompt} ASSISTANT:``. Each command
prints :func:`prompt_format` (which of the three it used), a calibrated vector file
records it (metadata ``x-prompt_format``), and steering an evaluation whose prompts use
another format than the vectors were measured under is an error naming both
(:func:`check_vectors_format`; ``cmrm.strict=false`` turns it into a warning).
"""

from __future__ import annotations

import hashlib
import string
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .errors import ConfigError, VectorFileError

#: vector-file metadata key (``x-`` + this) holding the prompt format of calibration
FORMAT_KEY = "prompt_format"


def check_template(template: str | None, flag: str = "--template") -> None:
    """A prompt template must contain ``{prompt}`` and no other ``{field}`` (a lone
    ``{`` or ``}`` included); the error names ``flag`` and the problem."""
    if template is None:
        return
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"{flag} {template!r}: {exc} (write a literal brace as '{{{{' or '}}}}')") from None
    unknown = sorted({f for f in fields if f != "prompt"})
    if unknown:
        raise ConfigError(f"{flag} {template!r}: unknown field(s) {', '.join('{' + f + '}' for f in unknown)}; "
                          "the only field is {prompt}")
    if "prompt" not in fields:
        raise ConfigError(f"{flag} {template!r}: the template must contain {{prompt}}")


def prompt_format(processor: Any, template: str | None = None) -> str:
    """Which format :func:`format_prompt` uses for ``processor``: ``template '...'``,
    ``chat template <sha256[:12]>`` (the processor's own) or ``llava-1.5 '...'``."""
    from .evaluation.generate import DEFAULT_TEMPLATE, _chat_template

    if template is not None:
        return f"template {template!r}"
    chat = _chat_template(processor)
    if chat:
        if not isinstance(chat, str):
            chat = repr(chat)
        return f"chat template {hashlib.sha256(chat.encode('utf-8')).hexdigest()[:12]}"
    return f"llava-1.5 {DEFAULT_TEMPLATE!r}"


def format_prompt(processor: Any, prompt: str, template: str | None = None, image: bool = True) -> str:
    """``prompt`` in the common format (see the module docstring); ``image`` says whether
    an image goes with it (its placeholder is placed, or left out)."""
    from .evaluation.generate import build_prompt

    return build_prompt(processor, SimpleNamespace(prompt=prompt, image=object() if image else None), template)  # type: ignore[arg-type]


class PromptFormat:
    """A callable ``prompt -> text`` in the common format for ``processor`` (with
    ``template`` when given); ``name`` is :func:`prompt_format`'s description, which
    calibration records in the vector file."""

    def __init__(self, processor: Any, template: str | None = None) -> None:
        check_template(template)
        self.processor = processor
        self.template = template
        self.name = prompt_format(processor, template)

    def __call__(self, prompt: str, image: bool = True) -> str:
        """``prompt`` in this format. An image placeholder already in ``prompt`` (LLaVA
        data writes ``<image>\\n`` into the first human turn) is dropped when the format
        places the image itself (a chat template, the LLaVA-1.5 format, or a template
        with ``<image>``), so the image is never announced twice; with a template
        without ``<image>`` (``'{prompt}'`` for prompts that are already formatted) the
        prompt keeps it."""
        from .evaluation.generate import image_token

        token = image_token(self.processor)
        if token in prompt and (self.template is None or "<image>" in self.template or token in self.template):
            prompt = prompt.replace(f"{token}\n", "").replace(token, "").strip()
        return format_prompt(self.processor, prompt, self.template, image)

    def __repr__(self) -> str:
        return f"PromptFormat({self.name})"


def vectors_format(path: str | Path) -> str | None:
    """The prompt format a vector file records (``None``: not recorded, e.g. files of
    earlier releases or vectors calibrated on prompts used as given)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
    except Exception:  # noqa: BLE001 - an unreadable file is reported where it is loaded
        return None
    return meta.get(f"x-{FORMAT_KEY}") or None


def check_vectors_format(recipe: Any, used: str, where: str = "") -> None:
    """Refuse steering with a recipe whose vector files were calibrated under another
    prompt format than ``used`` (error naming both; a warning when the section sets
    ``strict: false``). Sections without ``vectors``, and files that record no
    format, are not checked."""
    for section in recipe.plugins:
        cfg = recipe.config.get(section)
        vectors = cfg.get("vectors") if cfg is not None and hasattr(cfg, "get") else None
        if not vectors or not Path(str(vectors)).is_file():
            continue
        recorded = vectors_format(vectors)
        if recorded is None or recorded == used:
            continue
        msg = (f"{where}{vectors}: the vectors were calibrated on prompts in the {recorded} format, these prompts use the "
               f"{used} format: the shift measured under one format does not hold under another (recalibrate with the "
               "same --template, or give this command the calibration's --template)")
        if bool(cfg.get("strict", True)):
            raise VectorFileError(msg + f"; or pass {section}.strict=false to use them anyway")
        warnings.warn(msg, stacklevel=2)


__all__ = ["FORMAT_KEY", "PromptFormat", "check_template", "check_vectors_format", "format_prompt", "prompt_format", "vectors_format"]

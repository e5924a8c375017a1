"""Glue between lvlm-safety-plugins and host frameworks.

Installed as ``lvlm_safety_plugins.integrations``:

- ``lvlm_safety_plugins.integrations.hf``: Hugging Face transformers (generate, pipelines);
- ``lvlm_safety_plugins.integrations.llava_compat``: import helpers for the LLaVA framework.
"""

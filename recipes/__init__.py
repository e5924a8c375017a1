"""Recipe YAML files shipped with lvlm-safety-plugins (package data; found by name by
``lvlm_safety_plugins.load_recipe``)."""

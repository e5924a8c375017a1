"""Every hook of the ``lvlm_safety`` plugin bus.

There are two kinds of hooks.

**Registration hooks** (``register_*``) are called once, by the global plugin manager
(:func:`lvlm_safety_plugins.get_plugin_manager`), when a registry is first needed. Each
receives a ``register`` callback and calls it once per thing it contributes, in the
style of simonw/llm. They return nothing.

**Lifecycle hooks** are called by an integration (HF Trainer, LLaVA, generate, the CLI)
inside the host's own loop, through a :class:`lvlm_safety_plugins.runtime.Runtime` built
from a recipe. The runtime registers one instance of every method the recipe activates
(in recipe order), plus every installed plugin that implements lifecycle hooks at module
level. A plugin implements only the hooks it needs, and may accept fewer arguments than
the spec lists (pluggy passes arguments by name), so specs can grow without breaking
plugins.

An exception raised inside any implementation surfaces as
:class:`lvlm_safety_plugins.errors.PluginError` naming the plugin and the hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from .markers import hookspec

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from .runtime import Runtime, StepContext


# ---------------------------------------------------------------------------
# Registration hooks
# ---------------------------------------------------------------------------


@hookspec
def register_methods(register: Callable[..., None]) -> None:
    """Register safety methods (projector losses, steerers, prompt defences).

    Called by: the global plugin manager, the first time the method registry is read
    (``lvlm_safety_plugins.registry.methods()``, recipe loading, ``plugins list``).

    Call ``register(method_class)`` once per method. ``method_class`` is a subclass of
    :class:`lvlm_safety_plugins.methods.base.Method` with a unique ``name`` (the recipe
    section that configures it), a ``kind`` (``"loss"``, ``"steering"`` or ``"prompt"``)
    and a ``config_class`` dataclass (its OmegaConf structured config).

    Returns: nothing.
    """


@hookspec
def register_adapters(register: Callable[..., None]) -> None:
    """Register model adapters that tell methods where things are inside a model.

    Called by: the global plugin manager, the first time
    :func:`lvlm_safety_plugins.adapters.get_adapter` looks for an adapter.

    Call ``register(adapter_class)`` once per model family; ``adapter_class`` subclasses
    :class:`lvlm_safety_plugins.adapters.base.ModelAdapter` and answers ``matches(model)``.
    Adapters registered later are tried first, so a third party can override a built-in.

    Returns: nothing.
    """


@hookspec
def register_judges(register: Callable[..., None]) -> None:
    """Register judges that decide whether a generated answer is unsafe or a refusal.

    Called by: the global plugin manager, the first time the judge registry is read
    (the evaluation harness).

    Call ``register(name, judge_factory)``; ``judge_factory(**options)`` returns an object
    with ``judge(prompts, responses) -> list[bool]``.

    Returns: nothing.
    """


@hookspec
def register_benchmarks(register: Callable[..., None]) -> None:
    """Register benchmark loaders (safety sets, over-refusal sets, utility sets).

    Called by: the global plugin manager, the first time the benchmark registry is read
    (the evaluation harness).

    Call ``register(name, loader)``; ``loader(path, **options)`` yields example dicts
    with at least ``id``, ``prompt`` and ``image`` (a path or ``None``).

    Returns: nothing.
    """


@hookspec
def register_embedders(register: Callable[..., None]) -> None:
    """Register embedders for caption retrieval (TGA's retrieved-text guidance).

    Called by: :func:`lvlm_safety_plugins.retrieval.load_embedder`, the first time an
    embedder spec such as ``"clip:/path/to/clip"`` is resolved (``lvlm-safety index``).

    Call ``register(prefix, factory)``; ``factory(argument, device=...)`` returns a
    :class:`lvlm_safety_plugins.retrieval.Embedder` for the spec ``"prefix:argument"``.

    Returns: nothing.
    """


@hookspec
def register_recipe_dirs(register: Callable[..., None]) -> None:
    """Register folders that hold recipe YAML files, found by name by ``load_recipe``.

    Called by: the global plugin manager, the first time a recipe is looked up by name
    (``load_recipe("name")``, ``lvlm-safety recipes list``).

    Call ``register(path)`` with a :class:`pathlib.Path` or an
    :mod:`importlib.resources` ``Traversable``. Folders registered later win on a name
    clash.

    Returns: nothing.
    """


@hookspec
def register_commands(register: Callable[..., None]) -> None:
    """Add subcommands to the ``lvlm-safety`` command line, the way the built-in ones
    (``demo``, ``calibrate``, ``eval``, ...) are added.

    Called by: :func:`lvlm_safety_plugins.cli.build_parser`, once per command line.

    Call ``register(name, add_command)`` once per command. ``add_command(subparsers)``
    receives argparse's subparsers object; it adds the command's parser with
    ``subparsers.add_parser(name, help=...)`` and sets the function that runs it with
    ``parser.set_defaults(func=run)``, where ``run(args) -> int`` returns the exit
    code. A :class:`lvlm_safety_plugins.errors.LVLMSafetyError` raised by ``run`` is
    printed as one line and exits with code 2. Two plugins registering the same name is
    an error naming both.

    Returns: nothing.
    """


# ---------------------------------------------------------------------------
# Lifecycle hooks: training
# ---------------------------------------------------------------------------


@hookspec
def prepare_example(example: dict, runtime: "Runtime") -> Optional[Mapping[str, Any]]:
    """Add fields to one training example before it is tokenized or collated.

    Called by: an integration's dataset wrapper, once per example, in the data loader
    worker (for LLaVA: around ``LazySupervisedDataset.__getitem__``).

    ``example`` is the host's example dict (do not mutate it). Return a mapping of new
    fields (for TGA: the caption and the retrieved text) or ``None``. Results of all
    plugins are merged in call order; a later plugin wins on a key clash.
    """


@hookspec
def collate(examples: Sequence[dict], batch: dict, runtime: "Runtime") -> Optional[Mapping[str, Any]]:
    """Add tensors to a collated batch.

    Called by: an integration's collator wrapper, once per batch, after the host's own
    collator has built ``batch`` from ``examples`` (the prepared examples).

    Return a mapping of extra batch entries (for TGA: caption token ids and masks) or
    ``None``. Extra entries are removed again before the host model's ``forward`` sees
    the batch; plugins read them in :func:`before_forward` and :func:`loss_terms`.
    """


@hookspec
def before_forward(model: "torch.nn.Module", batch: dict, ctx: "StepContext") -> None:
    """Run before the host's training forward pass.

    Called by: :meth:`lvlm_safety_plugins.runtime.Runtime.training_step` (which every
    integration runs), once per micro-batch, before the host's forward. Typical work: a
    no-grad teacher pass (TGA's caption pass), asking for what the forward computes with
    ``ctx.capture(...)`` (the projector output, the decoder's input, hidden states at
    named layers; the runtime removes those hooks after the step). The plugins' batch
    tensors are in ``ctx.extras``. Anything else changed on the model here is undone in
    :func:`step_end`, which is always called, also when the forward raises.

    Returns: nothing.
    """


@hookspec
def loss_terms(
    model: "torch.nn.Module", batch: dict, outputs: Any, ctx: "StepContext"
) -> Optional[Mapping[str, "torch.Tensor"]]:
    """Return auxiliary loss terms to add to the host's loss.

    Called by: :meth:`lvlm_safety_plugins.runtime.Runtime.training_step`, after the
    host's forward produced ``outputs`` (``ctx.host_loss`` is the host's loss).

    Return a mapping ``{"method/term": scalar tensor}`` of already weighted terms, or
    ``None``. The step adds ``ctx.term_scale`` times every term to the host loss (the
    factor puts a per-micro-batch mean on the host loss's scale under gradient
    accumulation; 1 outside the HF Trainer) and logs each one under its name through the
    host's own logging.
    """


@hookspec
def step_end(model: "torch.nn.Module", ctx: "StepContext") -> Optional[Mapping[str, float]]:
    """Clean up after a training step (remove hooks, advance schedules).

    Called by: :meth:`lvlm_safety_plugins.runtime.Runtime.training_step` in a
    ``finally`` block, once per micro-batch, also when the forward or a loss term raised
    (after the step's captures were removed).

    Return extra scalar metrics to log, or ``None``.
    """


# ---------------------------------------------------------------------------
# Lifecycle hooks: inference
# ---------------------------------------------------------------------------


@hookspec
def calibrate(model: "torch.nn.Module", processor: Any, dataset: Any, runtime: "Runtime") -> Optional[Mapping[str, Any]]:
    """Estimate what a steering method needs from calibration data.

    Called by: ``lvlm-safety calibrate`` and
    :func:`lvlm_safety_plugins.runtime.Runtime.calibrate`, once per run, with the
    loaded model, its processor (or tokenizer and image processor) and the calibration
    dataset.

    Return ``{"method": name, "path": saved file, ...}`` describing the artifact
    written (for CMRM: the per-layer shift vectors), or ``None`` when the plugin needs no
    calibration.
    """


@hookspec
def install_steering(model: "torch.nn.Module", runtime: "Runtime") -> Any:
    """Install inference-time steering on a model.

    Called by: the inference integrations (``generate`` helpers, pipelines, LLaVA
    inference, the evaluation harness) when they enter a recipe's steering context.

    Return a handle with a ``remove()`` method (or a list of them), or ``None`` when the
    plugin does not steer. The integration removes every handle on exit, also on error,
    in the reverse order of installation. Build the handle with
    :func:`lvlm_safety_plugins.steering.apply` (or ``add_vectors``): prefill/decode
    detection, positions, padding, context-locality and exact removal come with it.
    """


@hookspec
def remove_steering(model: "torch.nn.Module", runtime: "Runtime") -> None:
    """Notify plugins that steering was removed from a model.

    Called by: the inference integrations, after every handle returned by
    :func:`install_steering` was removed (also when the steered body raised).

    Returns: nothing.
    """

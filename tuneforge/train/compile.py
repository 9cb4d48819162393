"""``torch.compile`` of the decoder layers while the training loop runs (``train.compile``).

What a compiled decoder layer buys is fusion: RMSNorm, rotary embeddings, SiLU, the LoRA
scaling, residual adds and autocast's casts become a few generated C++ (or Triton) loops instead
of dozens of separate element-wise kernels, each reading and writing the whole activation, and
fewer intermediate tensors are kept for backward: more tokens/s at a lower peak, with LoRA
most (what it bought, measured: bench/README.md, "What each change bought"). The matmuls and
the attention kernels are the same ones either way.

Every layer is compiled on its own, with dynamic shapes, rather than the whole model: the layers
share one code object, so one graph serves all of them (compiling the model as one graph took
minutes for no more speed), and packed rows of any length reuse it. The first step pays the
compilation (less once Inductor's on-disk cache is warm; the benchmarks' ``first step s``
column, bench/README.md).

Compiled calls are switched on only around the loop's own loss computations (:func:`compiled_layers`),
reference and old-policy passes included, and not for calls with a KV cache (sampling in GRPO
and PPO); anything else that runs the model (validation, the recipes after training) runs it
eagerly, as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tuneforge.errors import TuneforgeError

AUTO_MIN_STEPS = 50
"""``compile: auto`` leaves shorter runs eager: the compilation would not be paid back."""
AUTO_MIN_PARAMETERS = 50_000_000
"""... and smaller models, whose steps are too short for fusion to matter (test models)."""


def use_compile(setting: str, device: torch.device, module: nn.Module, steps: int,
                auto: bool = True) -> bool:
    """Resolve ``train.compile`` for a run of ``steps`` optimizer steps of ``module``.

    ``auto=False`` keeps ``auto`` off, for losses that subtract the log-probs of two passes of
    the model (DPO's policy minus its adapters-off reference, PPO's new minus old; objectives
    say so with ``compile_auto = False``). Eagerly, with the adapters off, the base computation
    rounds exactly as with them on, so the two agree to the bit at the start (DPO loss log 2).
    A compiled layer with and without its LoRA branch is two different fused graphs, which
    round bf16 differently: on SmolLM2 about 0.3-1.6 nats on a 500-nat sequence sum, as large
    as the signal of DPO's first steps (bench/README.md). Only ``true`` compiles those.
    """
    if setting == "false" or (setting == "auto" and not auto):
        return False
    if setting == "auto":  # the cheap conditions before the compiler search
        parameters = sum(p.numel() for p in module.parameters())
        return (steps >= AUTO_MIN_STEPS and parameters >= AUTO_MIN_PARAMETERS
                and compiler_available(device)[0])
    available, why = compiler_available(device)
    if not available:
        raise TuneforgeError(f"train.compile=true: {why}; set train.compile=false (or auto)")
    return True


def compiler_available(device: torch.device) -> tuple[bool, str]:
    """Whether torch.compile's default backend can build kernels for ``device``, and if not why."""
    if device.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as exc:  # noqa: BLE001 - InvalidCxxCompiler and whatever the search raises
            return False, f"torch.compile needs a C++ compiler on the CPU and found none ({exc})"
        return True, ""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return (True, "") if has_triton() else (False, "torch.compile needs Triton on CUDA")
    return False, f"torch.compile is not used on {device.type} devices here"


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of the transformers models inside ``module`` (a model, a
    PEFT wrapper, or a loss module holding one)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    names = {n for m in module.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    layers = [m for m in module.modules()
              if isinstance(m, GradientCheckpointingLayer) or type(m).__name__ in names]
    # a block nested in another block is compiled as part of its parent
    inner = {id(c) for m in layers for c in m.modules() if c is not m}
    return [m for m in layers if id(m) not in inner]


class CompiledLayers:
    """One ``torch.compile`` wrapper per decoder layer, switched on and off together."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = decoder_layers(model)
        if not self.layers:
            raise TuneforgeError(
                f"train.compile: found no decoder layers to compile in {type(model).__name__} "
                "(expected transformers blocks); set train.compile=false")
        # what nn.Module.compile does, kept aside so that it can be switched off again
        self.compiled = [_unless_cached(layer._call_impl, torch.compile(layer._call_impl, dynamic=True))
                         for layer in self.layers]

    @contextmanager
    def active(self) -> Iterator[None]:
        previous = [layer._compiled_call_impl for layer in self.layers]
        for layer, fn in zip(self.layers, self.compiled):
            layer._compiled_call_impl = fn
        try:
            yield
        finally:
            for layer, fn in zip(self.layers, previous):
                layer._compiled_call_impl = fn


_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")
"""What transformers' decoder layers call their KV cache (it is ``cache`` in transformers 5)."""


def _unless_cached(eager, compiled):
    """Run ``compiled``, but ``eager`` for calls that carry a KV cache (sampling).

    Passes without gradients inside a loss (PPO's old log-probs and values, DPO's reference)
    go through the compiled graph too: eager kernels would round bf16 differently from the
    compiled policy pass (on four SmolLM2 sequences, compiled policy against eager reference
    differed on all four, against compiled reference on one; see :func:`use_compile` for why
    ``auto`` still leaves such losses eager). Sampling with a growing KV cache would only add
    graphs to compile for little gain.
    """

    def call(*args, **kwargs):
        if any(kwargs.get(name) is not None for name in _CACHE_ARGUMENTS):
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            raise TuneforgeError(f"train.compile: torch.compile could not build the decoder layer "
                                 f"({str(exc).splitlines()[0]}); set train.compile=false") from exc

    return call


@contextmanager
def compiled_layers(layers: CompiledLayers | None) -> Iterator[None]:
    """``layers.active()``, or nothing when compilation is off."""
    if layers is None:
        yield
    else:
        with layers.active():
            yield

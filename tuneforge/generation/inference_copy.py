"""The inference copy of a model: what :mod:`tuneforge.generation.decode` runs for each
``precision`` (:func:`inference_model`).

- ``"fp32"`` runs the model as given; its greedy output equals ``model.generate``'s.
- ``"bf16"`` runs an inference copy whose linear layers hold bf16 weights (matmuls take bf16
  inputs and accumulate in fp32; the residual stream, norms and attention stay fp32, as under
  autocast). A PEFT adapter is merged in, made once per model and reused until its parameters
  or active adapters change (rebuilt then, which takes a moment for 135M; measured:
  bench/README.md), except that an unmerged LoRA branch (below) takes the adapter's new
  tensors in place after an optimizer step.
  Weights that lie exactly on a GGUF grid (groups of 32: Q4_0/Q4_1 16 levels, Q8_0 multiples
  of a scale), as the built-in model's do, are also packed as int4 (one part for Q4, two for
  Q8) and decode steps with few rows multiply with those: 4x (2x) fewer bytes per token, no
  more rounding than bf16 (scale and offset in bf16). A LoRA adapter on such a base is kept
  unmerged (a small fp32 branch) so the base stays packed.
- ``"autocast"`` runs the fp32 model under bf16 autocast (measured slower than ``"bf16"``:
  it re-casts the weights at every step).
- ``"auto"`` (the default) is ``"bf16"`` where the hardware has native bf16 matmuls
  (:func:`tuneforge.train.loop.use_bf16`) and ``"fp32"`` elsewhere.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F

PRECISIONS = ("auto", "fp32", "bf16", "autocast")

# Decode steps with at most this many rows use the packed int4 weights (a quarter of that for
# two-part Q8 weights); above it bf16 matmuls are faster (the built-in model's layers on a
# 2-core AVX512-bf16 CPU: int4 leads most at one row, less as rows grow, and loses by 32;
# measured: bench/README.md).
INT4_MAX_ROWS = 16
_INT4_GROUP = 32
# Whether bf16 copies also pack exactly-4-bit linear layers as int4, and run activations in
# bf16 rather than fp32 (both for measuring; the defaults measured best).
PACK_INT4 = True
BF16_ACTIVATIONS = False
# model -> (parameter signature, bf16 copy); rebuilt when a parameter changes in place.
BF16_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_model(model, precision: str = "auto"):
    """(model to run, whether to run it under bf16 autocast) for ``precision``: the model
    itself for fp32, else its bf16 inference copy (see the module docstring).

    A caller that keeps the copy may switch the adapters of ``model`` afterwards: a server
    makes one copy per adapter and reuses each.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if _bf16_native(model_device(model)) else "fp32"
    if precision == "fp32":
        return model, False
    if precision == "autocast":
        return model, True
    if model_dtype(model) != torch.float32:
        return model, False  # already low precision: run as is
    fixed, adapter = _signature(model)
    cached = BF16_COPIES.get(model)
    if cached is not None:
        (was_fixed, was_adapter), dup = cached
        # after an optimizer step on a LoRA adapter only its tensors changed: an unmerged copy
        # takes the new ones in place (milliseconds) instead of being made again (seconds)
        if was_fixed == fixed and (was_adapter == adapter or _refresh_lora(dup, model)):
            BF16_COPIES[model] = ((fixed, adapter), dup)
            return dup, False
    BF16_COPIES.pop(model, None)  # free the stale copy before making the next one
    # not the caller's (training) autocast
    with torch.autocast(model_device(model).type, enabled=False):
        dup = bf16_copy(model)
    BF16_COPIES[model] = ((fixed, adapter), dup)
    return dup, False


def _signature(model) -> tuple[tuple, tuple]:
    """(what only a new copy can follow: the tensors outside LoRA adapters and which adapters
    are active, the LoRA tensors), each tensor as (storage, version)."""
    fixed, lora = [], []
    for name, p in model.named_parameters():
        (lora if "lora_" in name else fixed).append((p.data_ptr(), p._version))
    return (tuple(fixed), _adapter_state(model)), tuple(lora)


def model_device(model) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's (first) parameters."""
    return next(model.parameters()).dtype


def _bf16_native(device: torch.device) -> bool:
    from tuneforge.train.loop import use_bf16

    return use_bf16("auto", device)


def _adapter_state(model):
    """Which PEFT adapters are active or disabled: the inference copy depends on it too."""
    return tuple((bool(m.disable_adapters), tuple(m.active_adapters))
                 for m in model.modules() if hasattr(m, "_disable_adapters"))


def bf16_copy(model, *, pack_int4: bool | None = None, bf16_activations: bool | None = None):
    """An inference copy of ``model`` with bf16 matmul weights: a PEFT adapter merged in, every
    linear layer's weight in bf16 (and packed as int4 too where that is exact).

    Activations between the matmuls (residual stream, norms, attention) stay fp32, as under
    autocast: the matmuls take bf16 inputs and accumulate in fp32. ``bf16_activations`` runs
    everything in bf16 instead (for measuring: no faster, and it drifts from fp32 sooner).
    """
    pack_int4 = PACK_INT4 if pack_int4 is None else pack_int4
    bf16_activations = BF16_ACTIVATIONS if bf16_activations is None else bf16_activations
    with torch.no_grad():
        dup = copy.deepcopy(model)
        for p in dup.parameters():
            p.grad = None
            p.requires_grad_(False)
        pack_int4 = pack_int4 and int4_available(model_device(dup))
        out_dtype = torch.bfloat16 if bf16_activations else torch.float32
        if hasattr(dup, "get_base_model"):  # a PeftModel
            unmerged = _lora_unmerged(dup, pack_int4, out_dtype) if pack_int4 else None
            if unmerged is not None:
                dup = unmerged
            else:
                try:
                    # the layers' flag (PeftModel also has a disable_adapters *method*, truthy)
                    disabled = any(m.disable_adapters for m in dup.modules()
                                   if hasattr(m, "_disable_adapters"))
                    dup = dup.unload() if disabled else dup.merge_and_unload()
                except Exception:  # noqa: BLE001 - adapters that cannot merge run unmerged
                    pass
        linears = [(name, m) for name, m in dup.named_modules() if type(m) is torch.nn.Linear]
        for name, linear in linears:
            parts = _int4_parts(linear.weight) if pack_int4 else None
            parent_name, _, child = name.rpartition(".")
            setattr(dup.get_submodule(parent_name), child,
                    InferenceLinear(linear, parts, out_dtype=out_dtype))
        if bf16_activations:
            dup = dup.to(torch.bfloat16)
    return dup.eval()


def _lora_unmerged(dup, pack_int4: bool, out_dtype):
    """The base model of a PEFT LoRA model with each LoRA layer replaced by its base weight
    packed as int4 plus a bf16 low-rank branch, where every base weight packs exactly (merging
    the adapter would move the weights off the 4-bit grid and lose the packing); else None."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return None
    plan = []
    for name, module in dup.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        base = module.get_base_layer()
        if type(base) is not torch.nn.Linear or module.merged:
            return None
        parts = _int4_parts(base.weight)
        if parts is None:
            return None
        branches = _lora_branches(module)
        if branches is None:
            return None  # DoRA and other variants, LoRA biases: merge instead
        plan.append((name, base, parts, branches))
    if not plan:
        return None
    sources = []
    for name, base, parts, branches in plan:
        parent_name, _, child = name.rpartition(".")
        linear = InferenceLinear(base, parts, out_dtype=out_dtype, lora=branches)
        setattr(dup.get_submodule(parent_name), child, linear)
        sources.append((name, linear))
    copy_ = dup.get_base_model()
    copy_._lora_sources = sources  # (LoRA layer's name in the PEFT model, its InferenceLinear)
    return copy_


def _lora_branches(module) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """A PEFT LoRA layer's active branches as fp32 ``(A, B * scaling)`` snapshots; None for
    what an unmerged branch cannot run (DoRA and other variants, LoRA biases)."""
    branches = []
    if module.disable_adapters:
        return branches
    with torch.no_grad():
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if adapter in getattr(module, "lora_variant", {}) or (
                    module.lora_B[adapter].bias is not None):
                return None
            a = module.lora_A[adapter].weight.detach().float().clone()
            b = (module.lora_B[adapter].weight * module.scaling[adapter]).detach().float()
            branches.append((a, b))
    return branches


def _refresh_lora(dup, model) -> bool:
    """Give an unmerged copy (:func:`_lora_unmerged`) ``model``'s current LoRA tensors; False
    (nothing changed) for a copy without unmerged branches or one they no longer fit."""
    sources = getattr(dup, "_lora_sources", None)
    if not sources:
        return False
    modules = dict(model.named_modules())
    fresh = []
    for name, linear in sources:
        module = modules.get(name)
        branches = _lora_branches(module) if module is not None else None
        if branches is None or [a.shape for a, _ in branches] != [a.shape for a, _ in linear.lora]:
            return False
        fresh.append((linear, branches))
    for linear, branches in fresh:
        linear.lora = branches
    return True


def int4_available(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch, "_convert_weight_to_int4pack_for_cpu")


def _int4_parts(weight: torch.Tensor):
    """The weight as a sum of int4-packed parts, if that is exact; else None.

    Each group of 32 weights along the input dimension must either take at most 16 equally
    spaced values (a de-quantised Q4_0/Q4_1 GGUF tensor: one part, w = (q - 8) * s + z) or be
    integer multiples -127..127 of one scale (Q8_0: two parts, q = 16 * high + low). Weights
    off such a grid are never packed: packing must not lose precision. Returns a list of
    (packed weight, bf16 scales and offsets) for ``_weight_int4pack_mm_for_cpu``.
    """
    n, k = weight.shape
    if k % _INT4_GROUP or n % 16 or weight.numel() == 0:
        return None
    w = weight.detach().float().reshape(n, k // _INT4_GROUP, _INT4_GROUP)
    low = w.amin(-1, keepdim=True)
    step = (w.amax(-1, keepdim=True) - low) / 15
    if _on_grid(w, low, step, 0, 15):
        q = ((w - low) / _nonzero(step)).round()
        parts = [(q, step, low + 8 * step)]
    else:
        step = w.abs().amax(-1, keepdim=True) / 127
        if not _on_grid(w, 0, step, -127, 127):
            return None
        q = (w / _nonzero(step)).round()
        low_digit = q.remainder(16)
        high_digit = (q - low_digit) / 16 + 8
        parts = [(high_digit, 16 * step, torch.zeros_like(step)), (low_digit, step, 8 * step)]
    try:
        packed = []
        for digits, scale, offset in parts:
            pw = torch._convert_weight_to_int4pack_for_cpu(digits.reshape(n, k).to(torch.int32), 2)
            sz = torch.stack([scale[..., 0].t(), offset[..., 0].t()], dim=-1)
            packed.append((pw, sz.to(torch.bfloat16).contiguous()))
        probe = torch.randn(2, k).to(torch.bfloat16)
        got = sum(torch._weight_int4pack_mm_for_cpu(probe, pw, _INT4_GROUP, sz).float()
                  for pw, sz in packed)
        want = probe.float() @ weight.detach().float().t()
        if not torch.allclose(got, want, rtol=0.02, atol=0.02 * want.abs().max().item()):
            return None
    except (RuntimeError, NotImplementedError):
        return None
    return packed


def _nonzero(step):
    return torch.where(step > 0, step, torch.ones_like(step))


def _on_grid(w, low, step, lo, hi) -> bool:
    q = ((w - low) / _nonzero(step)).round()
    return bool(q.min() >= lo and q.max() <= hi
                and ((q * step + low) - w).abs().le(1e-3 * _nonzero(step)).all())


class InferenceLinear(torch.nn.Linear):
    """A linear layer of the inference copy: bf16 weight, bf16 input, fp32 accumulation, output
    in ``out_dtype``. Where the weight packs exactly into int4 parts (:func:`_int4_parts`),
    small batches of rows multiply with those instead: a quarter (Q4) or half (Q8) of the bytes
    to read. The input is made contiguous: ``logits_to_keep`` hands the output layer a strided
    slice, for which a bf16 matmul would copy the whole weight once per sequence."""

    def __init__(self, linear: torch.nn.Linear, int4_parts=None, *, out_dtype=torch.float32,
                 lora=()):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.bfloat16),
                                         requires_grad=False)
        self.bias = None
        if linear.bias is not None:
            self.bias = torch.nn.Parameter(linear.bias.detach().to(out_dtype), requires_grad=False)
        self.out_dtype = out_dtype
        self.int4_parts = int4_parts or []
        # Crossovers with bf16 (2-core AVX512-bf16 CPU): one part beats it up to a little past
        # INT4_MAX_ROWS rows, two parts only for a few (measured: bench/README.md).
        self.int4_max_rows = INT4_MAX_ROWS // len(self.int4_parts) ** 2 if int4_parts else 0
        self.lora = list(lora)  # (A, B * scaling) in fp32: an unmerged LoRA branch

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x = x_in.to(torch.bfloat16).contiguous()
        rows = x.numel() // self.in_features
        if rows > self.int4_max_rows:
            y = F.linear(x, self.weight)
        else:
            flat = x.reshape(rows, self.in_features)
            y = None
            for packed, scales_zeros in self.int4_parts:
                part = torch._weight_int4pack_mm_for_cpu(flat, packed, _INT4_GROUP, scales_zeros)
                y = part.float() if y is None else y + part
            y = y.reshape(*x.shape[:-1], self.out_features)
        for a, b in self.lora:  # small fp32 matmuls: faster than bf16 ones on CPU
            y = y.float() + F.linear(F.linear(x_in.float(), a), b)
        y = y.to(self.out_dtype)
        return y if self.bias is None else y + self.bias


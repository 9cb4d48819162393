"""What gets trained: a PEFT adapter, the top layers only, or everything.

PEFT methods go through the ``peft`` library (it wraps the base model's layers in place; the
base weights stay frozen and get no gradient or optimizer state). ``freeze`` keeps the top N
transformer blocks trainable (plus the final norm, and optionally the embeddings) and freezes
the rest: the classic transfer-learning recipe.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from tuneforge.config import AdapterConfig
from tuneforge.errors import ConfigError


def prepare_model(
    model: PreTrainedModel, cfg: AdapterConfig, *, model_dropout: float | None = None, seed: int = 0
):
    """Apply the adapter method; return the model to train (a PeftModel for PEFT methods).

    Adapter weights are initialised from ``seed``, so every process (and every rerun) starts
    from the same adapter.
    """
    if model_dropout is not None:
        set_dropout(model, model_dropout)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.method == "freeze":
        freeze_all_but_top(model, cfg.trainable_layers, cfg.train_embeddings)
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return attach_peft(model, cfg)


def attach_peft(model: PreTrainedModel, cfg: AdapterConfig):
    import peft

    common = {"target_modules": cfg.target_modules, "task_type": peft.TaskType.CAUSAL_LM}
    if cfg.method in ("lora", "dora"):
        pcfg = peft.LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=cfg.method == "dora",
            use_rslora=cfg.rslora, **common,
        )
    elif cfg.method == "loha":
        pcfg = peft.LoHaConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, **common)
    elif cfg.method == "lokr":
        pcfg = peft.LoKrConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, **common)
    elif cfg.method == "ia3":
        targets = cfg.target_modules
        pcfg = peft.IA3Config(
            target_modules=targets, feedforward_modules=_ia3_feedforward(model, targets),
            task_type=peft.TaskType.CAUSAL_LM,
        )
    else:  # config validation makes this unreachable; keep the message for library callers
        raise ConfigError(f"adapter.method {cfg.method!r} is not a PEFT method")
    try:
        return peft.get_peft_model(model, pcfg)
    except ValueError as err:
        raise ConfigError(f"adapter: {err}") from err


def _ia3_feedforward(model, targets) -> list[str]:
    # IA3 scales the input of feed-forward layers and the output of the others; down_proj-style
    # layers are the feed-forward ones in llama-family blocks.
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    wanted = names if targets == "all-linear" else set(targets)
    return sorted(n for n in wanted & names if n in ("down_proj", "fc2", "w2"))


def freeze_all_but_top(model: PreTrainedModel, trainable_layers: int, train_embeddings: bool) -> None:
    """Freeze everything, then unfreeze the top ``trainable_layers`` blocks and the final norm."""
    layers = transformer_layers(model)
    if trainable_layers > len(layers):
        raise ConfigError(
            f"adapter.trainable_layers={trainable_layers} but the model has {len(layers)} layers"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    decoder = model.get_decoder()
    norm = getattr(decoder, "norm", None)
    if trainable_layers and norm is not None:
        for p in norm.parameters():
            p.requires_grad_(True)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(True)
    elif head is not None and not tied and trainable_layers:
        # an untied output head sits above the top layer; it belongs to "the top"
        head.weight.requires_grad_(True)


def transformer_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    decoder = model.get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ConfigError(f"cannot find the transformer layers of {type(model).__name__}")


def set_dropout(model: PreTrainedModel, p: float) -> None:
    """Set every dropout probability of the model (config and live modules) to ``p``."""
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop",
                "attn_pdrop"):
        if hasattr(model.config, key):
            setattr(model.config, key, p)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        elif hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = p


def trainable_summary(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def has_adapter(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries a PEFT adapter that can be switched off (``disable_adapter()``).

    The one test of "is this an adapter run" once a model exists: the reference policy is then
    the model with its adapters off, and the run saves adapter/ rather than model/.
    """
    return hasattr(model, "disable_adapter")


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under any PEFT wrapper (its layers carry the adapters)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model

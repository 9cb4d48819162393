"""Run configuration: typed sections, read from YAML plus dotted ``--set`` overrides.

Every problem is gathered and reported in one :class:`ConfigError`: unknown keys (with the
closest known key as a hint), values of the wrong type, values out of range. A config that
loads is a config the recipes can trust.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tuneforge.errors import ConfigError

PEFT_METHODS = ("lora", "dora", "loha", "lokr", "ia3")
METHODS = ("full", "freeze", *PEFT_METHODS)


@dataclass
class ModelConfig:
    """Which base model to start from, and how to hold it."""

    name: str = "builtin:smollm2-135m-instruct"
    """builtin:NAME, tiny:ARCH, a local Hugging Face folder, or a .gguf file."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weight storage dtype. float32 master weights + bf16 autocast is the safe default."""
    dropout: float | None = None
    """Override the model's attention/hidden dropout probability (None keeps the model's)."""


@dataclass
class AdapterConfig:
    """What is trained: the whole model, its top layers, or a PEFT adapter."""

    method: Literal["full", "freeze", "lora", "dora", "loha", "lokr", "ia3"] = "lora"
    r: int = 16
    """Adapter rank (lora, dora, loha, lokr)."""
    alpha: float = 32.0
    dropout: float = 0.0
    """Dropout on the adapter's input (lora family). Off by default: on a CPU, drawing the
    random masks is a noticeable share of a LoRA step (bench/README.md), for a regulariser that
    rarely matters at small epoch counts. Set 0.05-0.1 for long runs on small data."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or 'all-linear' for every linear layer but the output head."""
    rslora: bool = False
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""
    trainable_layers: int = 2
    """method=freeze: how many of the top transformer layers stay trainable."""
    train_embeddings: bool = False
    """method=freeze: also train the input embeddings (and a tied output head)."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]


TASK_TYPES = ("auto", "classification", "generation", "lm")


@dataclass
class TemplateConfig:
    """How a record's fields become the conversation that is trained on and prompted with.

    Strings are Python format strings over the record's fields: ``{input}`` (the user's text:
    a classification record's text, an alpaca instruction with its input, a chat's last user
    turn, a raw prompt), ``{output}`` (the answer: the label, the alpaca output, the last
    assistant turn, a raw completion), ``{text}`` and ``{label}`` for classification records,
    and any extra key of the record. Unset parts keep the record as it is; the result is
    rendered with the tokenizer's chat template, the same way in training and in evaluation.
    """

    system: str | None = None
    """System message (replaces the record's own)."""
    user: str | None = None
    """The user turn, e.g. "Ticket: {text}" (single-turn records only)."""
    assistant: str | None = None
    """The answer, e.g. "Department: {label}" (single-turn records only)."""
    prompt: str | None = None
    """Raw prompt text without the chat template, e.g. "Ticket: {text}\nDepartment:" (with
    completion: the record becomes prompt/completion text)."""
    completion: str | None = None
    """Raw completion text, e.g. " {label}"."""


@dataclass
class TaskConfig:
    """One task of a multi-task run (data.tasks): its files, its kind, its share of training."""

    name: str = ""
    """Short name used in metric names (val_<name>_accuracy) and reports."""
    train: str = ""
    validation: str | None = None
    test: str | None = None
    format: str | None = None
    type: Literal["auto", "classification", "generation", "lm"] = "auto"
    """classification (label-scored), generation (generated text against references) or lm
    (loss only); auto: classification for records with a label or when labels are given."""
    labels: list[str] | str | None = None
    """Allowed labels, or a file holding them (a JSON list, or one per line)."""
    template: TemplateConfig = field(default_factory=TemplateConfig)
    weight: float = 1.0
    """Relative share of training examples (mixing=weights)."""


@dataclass
class DataConfig:
    """Where the examples come from and how they become tokens."""

    train: str = ""
    """Training file (JSONL, CSV or Parquet)."""
    validation: str | None = None
    """Validation file; if absent, validation_fraction of train is held out."""
    validation_fraction: float = 0.0
    test: str | None = None
    """Test file: never trained on; checked for overlap with train."""
    format: str | None = None
    """Force a format instead of auto-detection (chat, prompt_completion, alpaca, ...)."""
    max_length: int = 1024
    """Longest example in tokens after templating."""
    too_long: Literal["error", "truncate", "drop"] = "error"
    """What to do with longer examples: refuse the data, cut them, or drop them (reported)."""
    train_on_prompt: bool = False
    """Also take the loss on prompt tokens (default: completions only)."""
    task: Literal["auto", "classification", "generation", "lm"] = "auto"
    """The kind of task, as data.tasks[].type, for a single-task run."""
    labels: list[str] | str | None = None
    """The allowed labels of a classification task, or a file holding them."""
    rating_scale: list[float] | None = None
    """[low, high]: the scale of rating records (e.g. [1, 5]); a rating outside it is refused.
    Unset: ratings are not range-checked."""
    template: TemplateConfig = field(default_factory=TemplateConfig)
    """Prompt template of a single-task run (default: the records as they are)."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """Several datasets trained together, each with its own type, format and template (then
    leave data.train/validation/test empty)."""
    mixing: Literal["weights", "temperature"] = "weights"
    """How tasks share the training examples: in proportion to their weights, or to
    (task size) ** (1 / temperature), which lifts small tasks as the temperature rises."""
    temperature: float = 2.0
    """The temperature of mixing=temperature (1: proportional to size)."""


@dataclass
class TrainConfig:
    """The optimisation itself."""

    epochs: float = 1.0
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: int = 8
    """Examples per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Global batch = batch_size * grad_accum * processes."""
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    """Overrides warmup_ratio when set."""
    max_grad_norm: float | None = 1.0
    seed: int = 0
    bf16: Literal["auto", "true", "false"] = "auto"
    """bf16 autocast: auto uses it where the device supports it."""
    gradient_checkpointing: bool = False
    """Keep only each decoder layer's input and recompute the rest in backward: much less peak
    memory for a little more time (figures in bench/README.md). On the CPU the freed heap is
    also handed back to the system after each step (malloc_trim), so the peak stays near one
    step's need instead of creeping up with fragmentation."""
    compile: Literal["auto", "true", "false"] = "auto"
    """Run the decoder layers through torch.compile during the loop's loss passes (fused
    element-wise work, fewer saved activations; sampling and validation stay eager): more
    tokens/s at a lower peak after a first step that compiles (figures in bench/README.md;
    Inductor's on-disk cache makes later first steps shorter). Needs a C++ compiler on the
    CPU, Triton on CUDA. auto: on for runs of at least 50 optimizer steps on models of at least
    50M parameters, where the compiler is there, except for losses that compare two passes of
    the model (DPO, IPO, KTO and LiPO against their reference, PPO, GRPO): compiled, with and
    without the adapters, those passes round bf16 differently (true still compiles them; fp32
    agrees)."""
    eval_every: int = 50
    """Validation loss every N optimizer steps (0: only at the end)."""
    save_every: int = 50
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept besides the best one."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement; the best checkpoint is restored."""
    early_stopping_min_delta: float = 0.0
    metric_for_best: str = "val_loss"
    """The validation figure that picks the best checkpoint and drives early stopping, e.g.
    val_loss, val_accuracy, val_macro_f1, val_reward_accuracy. Loss- and perplexity-like
    names are minimised, everything else maximised."""
    log_every: int = 1
    progress: bool = True
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """With several processes: ddp (a full replica each) or fsdp (weights, gradients and
    optimizer state sharded per transformer layer; needs GPUs)."""


@dataclass
class PreferenceConfig:
    """recipe=dpo: which preference loss, and its strength."""

    loss: str = "dpo"
    """A key of tuneforge.losses.preference.PREFERENCE_LOSSES (dpo, ipo, simpo, orpo, ...)."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward (how far the policy may move from the
    reference)."""
    options: dict = field(default_factory=dict)
    """Further keyword arguments of the loss, e.g. {label_smoothing: 0.1} for dpo, {gamma: 0.5}
    for simpo."""
    reference: Literal["auto", "precompute", "cached", "online"] = "auto"
    """How reference log-probs are obtained. precompute: one pass over the data before training
    (needed for full fine-tuning, which has no frozen copy). cached: computed with the adapters
    switched off the first time a pair is seen, then reused. online: every step (no memory
    held). auto: cached for adapters, precompute otherwise."""


@dataclass
class KTOConfig:
    """recipe=kto: unpaired thumbs-up/down completions (KTO, Ethayarajh et al. 2024)."""

    beta: float = 0.1
    """Inverse temperature of the implicit reward beta*(log pi - log pi_ref)."""
    desirable_weight: float = 1.0
    """lambda_D, the weight of a thumbs-up example's loss."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of a thumbs-down example's loss. KTO's authors advise weights with
    lambda_D*n_D / (lambda_U*n_U) between 1 and 4/3 when the two kinds are unbalanced."""
    reference: Literal["auto", "precompute", "cached", "online"] = "auto"
    """How reference log-probs are obtained, as preference.reference."""


@dataclass
class RewardConfig:
    """recipe=reward: a scalar reward head trained from pairs, rankings or ratings."""

    loss: Literal["auto", "bradley_terry", "plackett_luce", "all_pairs", "regression"] = "auto"
    """bradley_terry (preference pairs), plackett_luce or all_pairs (rankings of 2+ responses,
    or pairs), regression (ratings). auto: bradley_terry for pairs, plackett_luce for rankings,
    regression for ratings. A loss that does not fit the data is refused by file:line."""
    use_margin: bool = True
    """bradley_terry: subtract a pair record's numeric ``margin`` field (how clearly the chosen
    response is better; Llama 2 style) from the reward gap, where the record has one."""
    center_coefficient: float = 0.0
    """bradley_terry: weight of a penalty on (r_chosen + r_rejected)^2 that keeps rewards
    centred on zero (the pairwise loss alone leaves any shared offset free)."""


@dataclass
class RankConfig:
    """recipe=rank: the policy learns a ranking of 2+ responses per prompt (listwise)."""

    loss: Literal["lipo", "rrhf"] = "lipo"
    """lipo: Plackett-Luce (ListMLE) on DPO implicit rewards beta*(log pi - log pi_ref), as in
    LiPO; rrhf: hinge ranking of length-normalised log-probs plus an SFT term on the best
    response (RRHF; needs no reference model)."""
    beta: float = 0.1
    """lipo: inverse temperature of the implicit reward."""
    sft_weight: float = 1.0
    """rrhf: weight of the SFT (mean token NLL) term on each list's best response."""
    reference: Literal["auto", "precompute", "cached", "online"] = "auto"
    """lipo: how reference log-probs are obtained, as preference.reference."""


@dataclass
class RLConfig:
    """recipe=ppo or grpo: online learning from a reward. The policy samples completions of the
    prompts in data.train, a reward scores them, and the policy is updated towards the better
    ones while a KL term keeps it near the reference (the starting model)."""

    reward: str = ""
    """The reward: a built-in function (answer_format, arithmetic, length, json,
    support_reply), or your own as "module:function" or "path/to/file.py:function", called as
    fn(prompts, completions, **columns) -> list of floats (see tuneforge/rewards.py)."""
    max_new_tokens: int = 64
    """Longest sampled completion, in tokens."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (> 0: exploration needs sampling)."""
    top_p: float = 1.0
    num_generations: int | None = None
    """Completions sampled per prompt. grpo: the group size (>= 2, default 4); ppo: default 1."""
    kl_coef: float = 0.05
    """ppo: weight of the per-token KL penalty in the reward; grpo: weight of the k3 KL term in
    the loss (0: no reference model is used)."""
    clip_range: float = 0.2
    """Clip range of the probability ratio in the clipped surrogate objective."""
    generation_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Precision of rollout generation (tuneforge.generation); log-probs for the update are
    always computed by the trained model itself."""
    scale_rewards: Literal["std", "none"] = "std"
    """grpo: divide group-centred rewards by the group's std (GRPO), or not (Dr. GRPO)."""
    aggregation: Literal["token", "sequence"] = "token"
    """grpo: mean the loss over all completion tokens of a micro-batch (token; long answers are
    not down-weighted) or over each completion's tokens, then completions (sequence)."""
    ppo_epochs: int = 4
    """ppo: passes over each rollout."""
    minibatches: int = 2
    """ppo: optimizer steps per pass over a rollout (the rollout is split into this many)."""
    gamma: float = 1.0
    """ppo: discount of GAE."""
    lam: float = 0.95
    """ppo: lambda of GAE (bias/variance of the advantage)."""
    vf_coef: float = 0.1
    """ppo: weight of the value loss."""
    clip_range_value: float | None = 0.2
    """ppo: how far a value prediction may move from the rollout's per update (null: no clip)."""
    whiten_advantages: bool = True
    """ppo: normalise the advantages of each rollout to zero mean and unit variance."""


@dataclass
class EvalConfig:
    """Task metrics during training (`tuneforge eval` reads its settings from the command line)."""

    val_metrics: bool = True
    """At each validation, score classification tasks by label likelihood and log accuracy and
    macro/micro precision, recall and F1 as val_<name> (per task as val_<task>_<name> when there
    are several), so train.metric_for_best can be val_macro_f1 or val_accuracy."""
    val_metrics_examples: int | None = None
    """Score at most this many validation examples per task at each evaluation (None: all);
    scoring costs a forward pass per example and label, more than the validation loss."""


RECIPES = ("sft", "dpo", "kto", "reward", "rank", "ppo", "grpo")


@dataclass
class RunConfig:
    """A whole run: model, adapter, data, training, and where results go."""

    recipe: Literal["sft", "dpo", "kto", "reward", "rank", "ppo", "grpo"] = "sft"
    output_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def task_configs(config: RunConfig) -> list[TaskConfig]:
    """The tasks of a run config: data.tasks, or the single task data.* describes."""
    d = config.data
    if d.tasks:
        return [dataclasses.replace(t, format=t.format or d.format) for t in d.tasks]
    return [TaskConfig(name=default_task_name(d.train), train=d.train, validation=d.validation,
                       test=d.test, format=d.format, type=d.task, labels=d.labels,
                       template=d.template)]


GENERIC_STEMS = ("train", "training", "test", "validation", "val", "dev", "eval")


def default_task_name(data_path: str) -> str:
    """The data file's name, or its folder's when the file is just train.jsonl, test.jsonl..."""
    path = Path(data_path or "task")
    generic = path.stem.lower() in GENERIC_STEMS and path.parent.name
    name = path.parent.name if generic else path.stem
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "task"


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better (losses, perplexities, errors)."""
    name = metric.lower()
    return any(word in name for word in ("loss", "ppl", "perplexity", "error", "nll"))


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides, validate, return a RunConfig."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = _deep_merge(data, loaded)
    errors: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            errors.append(f"--set {item!r}: expected key.sub=value")
            continue
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    config = _build(RunConfig, data, "", errors)
    if config is not None:
        errors.extend(validate(config))
    if errors:
        where = f" in {path}" if path else ""
        raise ConfigError(f"{len(errors)} problem(s){where}:\n" + "\n".join(f"  - {e}" for e in errors))
    return config


def validate(config: RunConfig) -> list[str]:
    """Range and consistency checks that types alone cannot express."""
    errors = []
    t, d, a = config.train, config.data, config.adapter
    positive = {
        "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
        "data.max_length": d.max_length, "adapter.r": a.r,
    }
    errors += [f"{k}: must be >= 1 (got {v})" for k, v in positive.items() if v < 1]
    if t.lr <= 0:
        errors.append(f"train.lr: must be > 0 (got {t.lr})")
    if t.epochs <= 0 and not t.max_steps:
        errors.append("train.epochs: must be > 0 (or set train.max_steps)")
    if not 0 <= d.validation_fraction < 1:
        errors.append(f"data.validation_fraction: must be in [0, 1) (got {d.validation_fraction})")
    if d.validation and d.validation_fraction:
        errors.append("data.validation and data.validation_fraction: give one, not both")
    if not 0 <= a.dropout < 1:
        errors.append(f"adapter.dropout: must be in [0, 1) (got {a.dropout})")
    if config.model.dropout is not None and not 0 <= config.model.dropout < 1:
        errors.append(f"model.dropout: must be in [0, 1) (got {config.model.dropout})")
    if a.method == "freeze" and a.trainable_layers < 0:
        errors.append("adapter.trainable_layers: must be >= 0")
    if t.early_stopping_patience is not None and t.early_stopping_patience < 1:
        errors.append("train.early_stopping_patience: must be >= 1")
    has_validation = d.validation or d.validation_fraction or any(k.validation for k in d.tasks)
    if t.early_stopping_patience and not has_validation:
        errors.append("train.early_stopping_patience: needs validation data (data.validation "
                      "or data.validation_fraction)")
    if not t.metric_for_best.startswith("val_"):
        errors.append(f"train.metric_for_best: must name a validation metric such as val_loss "
                      f"or val_accuracy (got {t.metric_for_best!r})")
    if t.keep_last < 1:
        errors.append("train.keep_last: must be >= 1")
    if not d.train and not d.tasks:
        errors.append("data.train: required (path to the training file), or data.tasks")
    errors += _validate_tasks(d)
    errors += _validate_rating_scale(d.rating_scale)
    if config.eval.val_metrics_examples is not None and config.eval.val_metrics_examples < 1:
        errors.append("eval.val_metrics_examples: must be >= 1 (or null for all)")
    check_recipe = RECIPE_VALIDATORS.get(config.recipe)
    if check_recipe is not None:
        errors += check_recipe(config)
    return errors


def _validate_rating_scale(scale: list[float] | None) -> list[str]:
    """data.rating_scale: two finite numbers, low below high."""
    if scale is None:
        return []
    if len(scale) != 2 or not all(math.isfinite(v) for v in scale) or scale[0] >= scale[1]:
        return [f"data.rating_scale: expected [low, high] with low < high, e.g. [1, 5] (got {scale})"]
    return []


def _validate_tasks(d: DataConfig) -> list[str]:
    """data.tasks: each task named once, with a training file and a positive weight."""
    if not d.tasks:
        return []
    errors = []
    if d.train or d.validation or d.test:
        errors.append("data.train/validation/test: leave empty when data.tasks lists the files")
    names = [task.name for task in d.tasks]
    for i, task in enumerate(d.tasks):
        where = f"data.tasks[{i}]"
        if not task.name:
            errors.append(f"{where}.name: required (used in metric names and reports)")
        elif names.count(task.name) > 1:
            errors.append(f"{where}.name: {task.name!r} names two tasks")
        elif not task.name.replace("_", "").replace("-", "").isalnum():
            errors.append(f"{where}.name: use letters, digits, - and _ (got {task.name!r})")
        if not task.train:
            errors.append(f"{where}.train: required (path to the task's training file)")
        if task.weight <= 0:
            errors.append(f"{where}.weight: must be > 0 (got {task.weight})")
    if d.temperature <= 0:
        errors.append(f"data.temperature: must be > 0 (got {d.temperature})")
    return errors


def _reference_needs_adapter(section: str, mode: str, method: str) -> list[str]:
    if mode in ("cached", "online") and method not in PEFT_METHODS:
        return [f"{section}.reference={mode} needs an adapter (the reference is the model with "
                f"adapters off); with adapter.method={method} use precompute"]
    return []


def _validate_preference(config: RunConfig) -> list[str]:
    """preference.*: a known loss of the DPO family, its options, a reference that can exist."""
    import inspect

    from tuneforge.losses.preference import PREFERENCE_LOSSES

    pref, method = config.preference, config.adapter.method
    if pref.loss not in PREFERENCE_LOSSES:
        return [f"preference.loss: unknown loss {pref.loss!r}; known: {', '.join(PREFERENCE_LOSSES)}"]
    errors = []
    if pref.beta <= 0:
        errors.append(f"preference.beta: must be > 0 (got {pref.beta})")
    params = inspect.signature(PREFERENCE_LOSSES[pref.loss].fn).parameters
    known = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n != "beta"]
    for key in pref.options:
        if key not in known:
            errors.append(f"preference.options.{key}: not an option of the {pref.loss} loss "
                          f"(its options: {', '.join(known) or 'none'})")
    return errors + _reference_needs_adapter("preference", pref.reference, method)


def _validate_kto(config: RunConfig) -> list[str]:
    """kto.*: a positive beta, non-negative weights (not both 0), a reference that can exist."""
    k = config.kto
    errors = []
    if k.beta <= 0:
        errors.append(f"kto.beta: must be > 0 (got {k.beta})")
    if k.desirable_weight < 0 or k.undesirable_weight < 0:
        errors.append("kto.desirable_weight and kto.undesirable_weight: must be >= 0")
    elif k.desirable_weight == 0 and k.undesirable_weight == 0:
        errors.append("kto.desirable_weight and kto.undesirable_weight: not both 0 (nothing to learn)")
    return errors + _reference_needs_adapter("kto", k.reference, config.adapter.method)


def _validate_reward(config: RunConfig) -> list[str]:
    coefficient = config.reward.center_coefficient
    return [f"reward.center_coefficient: must be >= 0 (got {coefficient})"] if coefficient < 0 else []


def _validate_rl(config: RunConfig) -> list[str]:
    """rl.*: a reward that loads, sampling settings, and what the online recipes cannot do."""
    from tuneforge.rewards import load_reward_fn

    rl, t, d = config.rl, config.train, config.data
    errors = []
    if not rl.reward:
        errors.append("rl.reward: required: a built-in reward (answer_format, arithmetic, "
                      "length, json, support_reply) or 'module:function' / 'file.py:function'")
    else:
        try:
            load_reward_fn(rl.reward)
        except ConfigError as err:
            errors.append(f"rl.reward: {err}")
    group = rl.num_generations
    if group is not None and group < (2 if config.recipe == "grpo" else 1):
        errors.append(f"rl.num_generations: must be >= {2 if config.recipe == 'grpo' else 1} "
                      f"for {config.recipe} (got {group})")
    positive = {"rl.max_new_tokens": rl.max_new_tokens, "rl.ppo_epochs": rl.ppo_epochs,
                "rl.minibatches": rl.minibatches}
    errors += [f"{k}: must be >= 1 (got {v})" for k, v in positive.items() if v < 1]
    if rl.temperature <= 0 or not 0 < rl.top_p <= 1:
        errors.append("rl.temperature must be > 0 and rl.top_p in (0, 1]: rollouts are sampled")
    if rl.kl_coef < 0 or rl.clip_range <= 0 or rl.vf_coef < 0:
        errors.append("rl.kl_coef and rl.vf_coef must be >= 0, rl.clip_range > 0")
    if not (0 <= rl.gamma <= 1 and 0 <= rl.lam <= 1):
        errors.append(f"rl.gamma and rl.lam: must be in [0, 1] (got {rl.gamma}, {rl.lam})")
    if config.adapter.dropout or config.model.dropout:
        errors.append("adapter.dropout and model.dropout: must be 0 for ppo/grpo (dropout would "
                      "make the policy differ between sampling, scoring and the reference)")
    if d.too_long == "truncate":
        errors.append("data.too_long=truncate: prompts are not cut; use error or drop")
    if d.tasks:
        errors.append("data.tasks: ppo/grpo read one prompt file (data.train), with "
                      "data.validation or data.validation_fraction")
    if config.recipe == "ppo" and t.early_stopping_patience:
        errors.append("train.early_stopping_patience: not supported by ppo (its result is the "
                      "last step; validation logs val_reward)")
    has_validation = d.validation or d.validation_fraction
    if config.recipe == "grpo" and has_validation and t.metric_for_best == "val_loss":
        errors.append("train.metric_for_best: val_loss says nothing about a grpo policy; use "
                      "val_reward")
    return errors


def _validate_rank(config: RunConfig) -> list[str]:
    rank, method = config.rank, config.adapter.method
    errors = []
    if rank.beta <= 0:
        errors.append(f"rank.beta: must be > 0 (got {rank.beta})")
    if rank.sft_weight < 0:
        errors.append(f"rank.sft_weight: must be >= 0 (got {rank.sft_weight})")
    if rank.loss == "lipo":
        errors += _reference_needs_adapter("rank", rank.reference, method)
    return errors


# The checks of each recipe's own section, beside the shared ones of validate().
RECIPE_VALIDATORS = {"dpo": _validate_preference, "kto": _validate_kto, "rank": _validate_rank,
                     "reward": _validate_reward, "ppo": _validate_rl, "grpo": _validate_rl}

# --- generic dataclass building with type checks -------------------------------------------


def _build(cls: type, data: Any, prefix: str, errors: list[str]):
    if not isinstance(data, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(fields)}"
            errors.append(f"{prefix}{key}: unknown key{hint}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            built = _build(hint, value, f"{prefix}{key}.", errors)
            if built is not None:
                kwargs[key] = built
            continue
        item = _list_item_dataclass(hint)
        if item is not None and isinstance(value, list):
            built = [_build(item, v, f"{prefix}{key}[{i}].", errors) for i, v in enumerate(value)]
            kwargs[key] = [b for b in built if b is not None]
            continue
        ok, coerced = _check_type(value, hint)
        if ok:
            kwargs[key] = coerced
        else:
            errors.append(f"{prefix}{key}: expected {_type_name(hint)}, got {value!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        errors.append(f"{prefix.rstrip('.')}: {err}")
        return None


def _list_item_dataclass(hint: Any) -> type | None:
    """``X`` when ``hint`` is ``list[X]`` for a dataclass ``X`` (e.g. data.tasks)."""
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            return item
    return None


def _check_type(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, coerced = _check_type(value, arm)
            if ok:
                return True, coerced
        return False, value
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) and "true" in choices:
            value = "true" if value else "false"
        return value in choices, value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            return False, value
        checked = [_check_type(v, item) for v in value]
        return all(ok for ok, _ in checked), [v for _, v in checked]
    if hint is type(None):
        return value is None, value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is Any:
        return True, value
    return isinstance(value, hint), value


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _deep_merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

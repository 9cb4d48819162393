"""One readable file per training method; :func:`run_recipe` picks it from ``config.recipe``."""

from __future__ import annotations

import importlib

from tuneforge.config import RunConfig

RUNNERS = {"sft": "tuneforge.recipes.sft:run_sft", "dpo": "tuneforge.recipes.dpo:run_dpo",
           "kto": "tuneforge.recipes.kto:run_kto",
           "reward": "tuneforge.recipes.reward_model:run_reward", "rank": "tuneforge.recipes.rank:run_rank",
           "ppo": "tuneforge.recipes.ppo:run_ppo", "grpo": "tuneforge.recipes.grpo:run_grpo"}


def run_recipe(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    module, name = RUNNERS[config.recipe].split(":")
    return getattr(importlib.import_module(module), name)(config, resume=resume, overwrite=overwrite)

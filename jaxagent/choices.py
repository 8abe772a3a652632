"""The valid values of every enumerated setting, in one place.

Free of JAX on purpose: `jaxagent.config` validates a run's settings against these names at start-up without
loading the runtime. The runtime tables that implement each name (losses, estimators, stages) are keyed by the same
names; tests/test_structure.py checks that every table and its names agree.
"""

RL_STAGES = ("loop", "grpo", "rloo", "ppo", "reinforce", "ei")  # jaxagent.algorithms.loop.ALGORITHMS
STAGES = ("sft", *RL_STAGES, "eto", "collect", "critic", "sweet", "dpo")  # jaxagent.algorithms.STAGE_RUNNERS
ETO_CONTRASTS = ("trajectory",)  # jaxagent.algorithms.eto: what a pair compares (the paper's step variant: not yet)
LOSS_KINDS = ("policy", "sft", "dpo", "bradley_terry")  # jaxagent.objectives.LOSSES, beside its "value" term
# jaxagent.advantages.ADVANTAGES
ADVANTAGES = ("leave_one_out", "group_mean", "group_norm", "leave_one_out_norm", "reward", "none")
RATIO_LEVELS = ("token", "turn", "trajectory", "none")  # jaxagent.losses.RATIO_OBJECTIVES
CLIP_MODES = ("asymmetric", "symmetric")  # jaxagent.losses.CLIP_BOUNDS
DPO_LEVELS = ("trajectory",)  # the dpo stage's pairs (turn-level DPO is the sweet stage's)
CRITIC_SCORES = ("trajectory_mean", "turn_sum")  # jaxagent.losses.CRITIC_SCORES
SFT_NORMALISATIONS = ("token", "trajectory")  # jaxagent.losses.sft_loss
# What a batch's summed loss is divided by: the units it holds, or its rows (the configured minibatch size)
DENOMINATORS = ("count", "rows")  # jaxagent.update
FINETUNE_FILTERS = ("success", "best_of_group")  # jaxagent.advantages.keep_for_finetuning
SCHEDULES = ("constant", "linear", "cosine")  # jaxagent.update.make_optimizer
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # attention, then MLP projections
SANDBOX_ISOLATIONS = ("namespaces", "python")  # jaxagent.envs.sandbox: kernel namespaces, or Python-level guards

#!/usr/bin/env bash
# DAPO + ERC (Entropy Ratio Clipping, arXiv 2512.05591) on a stock verl 0.9.x, no fork.
#
# Mirrors the authors' recipe (docs/scale_out.md, docs/method.md section 3): 128 prompts x 8
# samples per step, mini-batch 16 prompts (8 optimizer steps per rollout, 1 epoch), AdamW lr 1e-6,
# weight decay 0.1, warm-up 10 steps, grad-norm clip 1.0, token-mean, DAPO clip 0.2 / 0.28,
# dual-clip 10, ERC band (0.95, 1.05), no KL, no entropy bonus, dynamic sampling on.
#
# Needs: pip install "erc-gym[verl]" plus verl's GPU extras (e.g. "verl[vllm]"), a model and
# parquet data prepared as for verl's DAPO recipe. Usage:
#   MODEL_PATH=... TRAIN_FILE=... TEST_FILE=... bash examples/verl/run_dapo_erc.sh [extra overrides]
# ERC_DRY_RUN=1 prints the Hydra overrides instead of launching (the tests compose them).
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B}
TRAIN_FILE=${TRAIN_FILE:-$HOME/data/klear_mathsub_30k/train.parquet}
TEST_FILE=${TEST_FILE:-$HOME/data/aime24/test.parquet}
# Not fixed by the paper's text: set to your budget.
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-2048}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-8192}
N_GPUS=${N_GPUS:-8}
# The GPPO variant (run_gppo_erc.sh) changes only these two.
LOSS_MODE=${LOSS_MODE:-erc_dapo}
CLIP_RATIO_HIGH=${CLIP_RATIO_HIGH:-0.28}

# Load erc_gym's trainer mode `erc_sync` in every verl process (verl's own mechanism).
export VERL_USE_EXTERNAL_MODULES=erc_gym.integrations.verl_trainer

ARGS=(
  # --- ERC: loss, band, and the hook that hands H_old / H_new to the loss -------------------
  # verl's synchronous v1 trainer; its actor loss becomes erc_gym's erc_ppo_loss, which passes
  # the current entropy and the old-log-prob pass's entropy (batch key "entropy") to the loss.
  trainer.v1.trainer_mode=erc_sync
  # The policy-loss config class with the ERC band (verl's PolicyLossConfig + erc_low/erc_high).
  actor_rollout_ref.actor.policy_loss._target_=erc_gym.integrations.verl.ERCPolicyLossConfig
  # erc_dapo: PPO/DAPO clip + dual-clip + ERC; erc_gppo: gradient-preserving clip + ERC.
  actor_rollout_ref.actor.policy_loss.loss_mode=${LOSS_MODE}
  # Strict band on rho = (H_new + 1e-8) / (H_old + 1e-8): tokens outside keep their loss value
  # (and stay in the token-mean denominator) but lose their gradient.
  +actor_rollout_ref.actor.policy_loss.erc_low=0.95
  +actor_rollout_ref.actor.policy_loss.erc_high=1.05
  # H_new: the training forward pass must return the per-token entropy (ERC raises otherwise).
  actor_rollout_ref.actor.calculate_entropy=True

  # --- DAPO surrogate ----------------------------------------------------------------------
  # Clip range (1 - 0.2, 1 + 0.28): DAPO clip-higher (GPPO+ERC uses 0.2 / 0.2).
  actor_rollout_ref.actor.clip_ratio_low=0.2
  actor_rollout_ref.actor.clip_ratio_high=${CLIP_RATIO_HIGH}
  # Dual-clip constant c: where A < 0 the loss is capped at -A c (verl's default is 3).
  actor_rollout_ref.actor.clip_ratio_c=10.0
  # sum(mask * loss) / sum(mask) over the mini-batch (all data-parallel ranks): every token
  # weighs the same.
  actor_rollout_ref.actor.loss_agg_mode=token-mean
  # No KL loss to a reference model and no entropy bonus (ERC is the only entropy control).
  actor_rollout_ref.actor.use_kl_loss=False
  actor_rollout_ref.actor.entropy_coeff=0
  algorithm.use_kl_in_reward=False

  # --- Batch geometry ----------------------------------------------------------------------
  # 128 prompts per step, 8 samples each (GRPO groups of 8).
  data.train_batch_size=128
  actor_rollout_ref.rollout.n=8
  # 16 prompts (x 8 samples) per optimizer step: 8 steps per rollout, the first on-policy
  # (rho = 1), the later ones off-policy -- where ERC acts.
  actor_rollout_ref.actor.ppo_mini_batch_size=16
  actor_rollout_ref.actor.ppo_epochs=1
  data.max_prompt_length=${MAX_PROMPT_LENGTH}
  data.max_response_length=${MAX_RESPONSE_LENGTH}
  # Token budget per GPU for the packed micro-batches (memory only; no effect on the loss).
  actor_rollout_ref.actor.use_dynamic_bsz=True
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$(( (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) * 2 ))
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=$(( (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) * 2 ))

  # --- Optimiser ---------------------------------------------------------------------------
  actor_rollout_ref.actor.optim.lr=1e-6
  actor_rollout_ref.actor.optim.weight_decay=0.1
  actor_rollout_ref.actor.optim.lr_warmup_steps=10
  # Gradient-norm clip (verl skips a step whose norm is not finite).
  actor_rollout_ref.actor.optim.clip_grad=1.0

  # --- Advantages and sampling -------------------------------------------------------------
  # GRPO: (R - group mean) / (group std + 1e-6), copied to every response token.
  algorithm.adv_estimator=grpo
  # DAPO dynamic sampling: drop groups whose 8 samples are all right or all wrong, and generate
  # again (up to 10 rounds) until the batch is full.
  algorithm.filter_groups.enable=True
  algorithm.filter_groups.metric=acc
  algorithm.filter_groups.max_num_gen_batches=10
  # Sample at T = 1, top-p 1; the old-log-prob pass and the entropies use the same temperature.
  actor_rollout_ref.rollout.temperature=1.0
  actor_rollout_ref.rollout.top_p=1.0

  # --- Model, data, hardware (yours) -------------------------------------------------------
  actor_rollout_ref.model.path=${MODEL_PATH}
  data.train_files=${TRAIN_FILE}
  data.val_files=${TEST_FILE}
  trainer.n_gpus_per_node=${N_GPUS}
  trainer.nnodes=1
  trainer.project_name=erc_gym
  trainer.experiment_name=${LOSS_MODE}
)

if [[ "${ERC_DRY_RUN:-0}" == 1 ]]; then
  printf '%s\n' "${ARGS[@]}" "$@"
  exit 0
fi
python3 -m verl.trainer.main_ppo "${ARGS[@]}" "$@"

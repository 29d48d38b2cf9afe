"""Every trainer takes every registered method through its own config, and resumes it exactly.

The bandit trainer (BanditConfig), ERCPPO (keyword arguments) and the LLM trainer (TrainerConfig
and the ``erc-gym llm`` flags) each run a few updates with each method of
``erc_gym.losses.METHODS``; the adaptive coefficients' controllers and the gates' random
generator come back from a checkpoint so that a resumed run equals an uninterrupted one; the
``target_kl`` early stop and the equal-step learning-rate scale act as documented.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure

import erc_gym.sb3.ppo as ercppo_module
from erc_gym import ERCPPO
from erc_gym.bandit import BanditConfig, train_bandit
from erc_gym.losses import METHODS, ERCConfig, LossConfig, method_settings, policy_loss
from erc_gym.methods import MethodRuntime, MethodSettings

sys.path.insert(0, str(Path(__file__).parent / "llm"))
from test_trainer import TIME_KEYS, odd_length, small_config

from erc_gym.llm import ERCTrainer, TrainerConfig

#: The metric each method must report (the share of tokens acted on, or its coefficient).
EXPECTED_KEY = {
    "erc": "erc_clip_fraction",
    "random-matched": "gate_fraction",
    "random": "gate_fraction",
    "equal-step": "equal_step_scale",
    "clip-cov": "clip_cov_fraction",
    "kl-cov": "kl_cov_fraction",
    "high-entropy": "entropy_gate_fraction",
    "entropy-bonus": "entropy_coef",
    "entropy-adaptive": "entropy_coef",
    "kl-penalty": "kl_mean",
    "kl-adaptive": "kl_coef",
    "dppo-tv": "clip_fraction",
    "dppo-kl": "clip_fraction",
    "target-kl": "update_steps",
    "base": "clip_fraction",
}
#: Toy scales need larger Clip-Cov / KL-Cov ratios than the engines' LLM defaults (2e-4 acts on
#: one token per mini-batch here).
SCALE = {"clip-cov": {"clip_cov_ratio": 0.1}, "kl-cov": {"kl_cov_ratio": 0.1}}


def settings_of(name: str) -> dict[str, Any]:
    return method_settings(name, **SCALE.get(name, {}))


def test_every_method_is_checked_here():
    assert set(EXPECTED_KEY) == set(METHODS)


# ------------------------------------------------------------------------------------- bandit

BANDIT = {"vocab_size": 64, "num_contexts": 4, "group": 8, "minibatches": 4, "lr": 0.1}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bandit_runs_every_method(name):
    rows = train_bandit(BanditConfig(**BANDIT, iterations=3, **settings_of(name)))
    assert len(rows) == 4
    assert all(math.isfinite(r["expected_reward"]) for r in rows)
    assert EXPECTED_KEY[name] in rows[-1]


def test_bandit_resume_is_exact_with_controllers_and_random_draws(tmp_path):
    methods = {
        "entropy_target": 10.0,  # always above the entropy: the coefficient rises every step
        "entropy_coef_delta": 0.01,
        "kl_coef": 0.5,
        "kl_target": 1e-4,
        "random_mask_share": 0.3,
    }
    config = BanditConfig(**BANDIT, iterations=6, save_every=1, **methods)
    whole = train_bandit(config, tmp_path / "a")
    train_bandit(config, tmp_path / "b", max_iterations=3)
    rest = train_bandit(config, tmp_path / "b")
    assert json.dumps(whole[4:]) == json.dumps(rest)  # NaN-aware equality, every key
    coefs = [r["entropy_coef"] for r in whole[1:]]
    assert coefs == sorted(coefs) and coefs[-1] > coefs[0]  # the controller moved
    assert len({r["kl_coef"] for r in whole[1:]}) > 1
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert state["methods"]["entropy"]["coef"] == pytest.approx(0.01 * 6 * 4)  # a step each


def test_bandit_target_kl_stops_the_update_early():
    stop = train_bandit(BanditConfig(**{**BANDIT, "lr": 0.5}, iterations=3, target_kl=1e-5))
    full = train_bandit(BanditConfig(**{**BANDIT, "lr": 0.5}, iterations=3, target_kl=100.0))
    # the first mini-batch is on-policy (KL 0) and always trains; the second exceeds 1.5e-5
    assert [r["update_steps"] for r in stop[1:]] == [1, 1, 1]
    assert [r["update_steps"] for r in full[1:]] == [4, 4, 4]


def test_bandit_equal_step_scales_each_step_by_the_kept_share():
    base = train_bandit(BanditConfig(**BANDIT, iterations=3))
    keep_all = train_bandit(
        BanditConfig(**BANDIT, iterations=3, control_low=1e-3, control_high=1e3, equal_step=True)
    )
    narrow = train_bandit(
        BanditConfig(**BANDIT, iterations=3, control_low=0.999, control_high=1.001, equal_step=True)
    )
    # a band that keeps every token scales by 1: the same run as the base
    for r, s in zip(base, keep_all, strict=True):
        assert r["expected_reward"] == s["expected_reward"] and r["entropy"] == s["entropy"]
    assert all(r["equal_step_scale"] == 1.0 for r in keep_all[1:])
    assert all(r["equal_step_scale"] < 1.0 for r in narrow[2:])
    assert narrow[-1]["expected_reward"] != base[-1]["expected_reward"]


def test_scaled_lr_multiplies_the_step_and_restores_it():
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([param], lr=0.5)
    runtime = MethodRuntime(MethodSettings(), seed=0)
    h = torch.tensor([1.0, 1.0, 2.0, 1.0])
    out = policy_loss(
        torch.zeros(4),
        torch.zeros(4),
        torch.ones(4),
        entropy=h,
        old_entropy=torch.ones(4),
        config=LossConfig(equal_step=ERCConfig(0.95, 1.05)),
    )
    assert float(out.step_scale) == 0.75
    with runtime.scaled_lr(opt, out):
        assert opt.param_groups[0]["lr"] == 0.375
    assert opt.param_groups[0]["lr"] == 0.5


# ------------------------------------------------------------------------------------- ERCPPO

PPO_SMALL = {"n_steps": 64, "batch_size": 32, "n_epochs": 2, "device": "cpu", "seed": 0}


def quiet(model: ERCPPO) -> ERCPPO:
    model.set_logger(configure(None, []))
    return model


@pytest.mark.parametrize("name", sorted(METHODS))
def test_ercppo_runs_every_method(name):
    model = quiet(ERCPPO("MlpPolicy", "CartPole-v1", **PPO_SMALL, **settings_of(name)))
    model.learn(128)
    logged = {k.removeprefix("train/") for k in model.logger.name_to_value}
    expected = {"update_steps": "approx_kl"}.get(EXPECTED_KEY[name], EXPECTED_KEY[name])
    assert expected in logged, sorted(logged)


def test_ercppo_controllers_survive_save_and_load(tmp_path):
    kw = {**PPO_SMALL, "entropy_target": 5.0, "ent_coef": 0.0, "kl_coef": 1.0, "kl_target": 1e-6}
    model = quiet(ERCPPO("MlpPolicy", "CartPole-v1", **kw))
    model.learn(192)
    assert model.entropy_control is not None and model.entropy_control.coef > 0
    assert model.kl_control is not None and model.kl_control.coef != 1.0
    model.save(tmp_path / "m.zip")
    loaded = quiet(ERCPPO.load(tmp_path / "m.zip", env=make_vec_env("CartPole-v1", n_envs=1)))
    assert loaded.entropy_control.state_dict() == model.entropy_control.state_dict()
    assert loaded.kl_control.state_dict() == model.kl_control.state_dict()
    assert loaded.method_runtime.entropy is loaded.entropy_control
    loaded.learn(64)  # and it trains on with them
    assert loaded.entropy_control.coef > model.entropy_control.coef


def test_ercppo_exact_kl_uses_the_stored_old_logits(monkeypatch):
    seen: list[torch.Tensor] = []
    real = ercppo_module.policy_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["kl"].detach().clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(ercppo_module, "policy_loss", spy)
    model = quiet(
        ERCPPO("MlpPolicy", "CartPole-v1", **{**PPO_SMALL, "learning_rate": 3e-3}, kl_coef=0.2)
    )
    model.learn(64)
    assert len(seen) == 4  # 2 epochs x 2 mini-batches
    assert float(seen[0].abs().max()) < 1e-6  # before any step the policy is the old one
    assert float(seen[-1].max()) > 1e-6  # later mini-batches see the drift
    assert bool((torch.cat(seen) >= -1e-7).all())


def test_ercppo_kl_penalty_on_continuous_actions_uses_k3():
    model = quiet(
        ERCPPO("MlpPolicy", "Pendulum-v1", **PPO_SMALL, erc_low=None, erc_high=None, kl_coef=0.1)
    )
    assert model._loss_config().kl_estimator == "k3"
    model.learn(64)
    assert "train/kl_mean" in model.logger.name_to_value


def test_ercppo_refuses_entropy_methods_on_continuous_actions():
    settings = method_settings("high-entropy")  # ERC off, top_entropy_quantile 0.2
    with pytest.raises(ValueError, match="needs a discrete action space"):
        ERCPPO("MlpPolicy", "Pendulum-v1", **PPO_SMALL, **settings)


# ------------------------------------------------------------------------------------- LLM


@pytest.mark.parametrize("name", sorted(METHODS))
def test_llm_trainer_runs_every_method(tmp_path, name):
    cfg = small_config(tmp_path, **{**settings_of(name), "eval_every": 10, "num_eval": 2})
    lines = ERCTrainer(cfg, verifier=odd_length).train()
    assert EXPECTED_KEY[name] in lines[-1]
    assert math.isfinite(lines[-1]["pg_loss"])


def test_llm_resume_is_exact_with_controllers_and_random_draws(tmp_path):
    methods = {
        "erc_low": None,
        "erc_high": None,
        "entropy_target": 10.0,
        "kl_coef": 0.5,
        "kl_target": 1e-4,
        "random_mask_share": 0.3,
        "lr": 1e-2,
    }
    straight = ERCTrainer(small_config(tmp_path / "a", steps=4, **methods), odd_length).train()
    cfg = small_config(tmp_path / "b", steps=4, **methods)
    ERCTrainer(cfg, verifier=odd_length).train(max_steps=2)
    resumed = ERCTrainer(cfg, verifier=odd_length)
    rest = resumed.train()
    assert [ln["step"] for ln in rest] == [3, 4]
    for a, b in zip(straight[3:], rest, strict=True):
        for key in set(a) - TIME_KEYS:
            va, vb = a[key], b[key]
            assert va == vb or (math.isnan(va) and math.isnan(vb)), (key, va, vb)
    assert straight[-1]["entropy_coef"] > straight[1]["entropy_coef"]
    assert straight[-1]["kl_coef"] != straight[1]["kl_coef"]


def test_llm_target_kl_stops_early(tmp_path):
    cfg = small_config(tmp_path, target_kl=1e-9, lr=5e-2, eval_every=10)
    lines = ERCTrainer(cfg, verifier=odd_length).train()
    assert all(ln["update_steps"] == 1 for ln in lines[1:])  # 2 mini-batches: the second stops


def test_llm_kl_penalty_needs_the_fused_head(tmp_path):
    with pytest.raises(ValueError, match="needs fused_head=True"):
        small_config(tmp_path, kl_coef=0.1, fused_head=False).validate()


def test_llm_cli_takes_the_methods_as_flags():
    from erc_gym.llm.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "--erc-low",
            "none",
            "--erc-high",
            "none",
            "--random-mask-matched",
            "true",
            "--control-low",
            "0.9",
            "--control-high",
            "1.1",
            "--entropy-target",
            "0.3",
            "--clip-variant",
            "dppo-tv",
        ]
    )
    config = config_from_args(args)
    assert isinstance(config, TrainerConfig)
    assert config.random_mask_matched and config.control_low == 0.9
    assert config.entropy_target == 0.3 and config.clip_variant == "dppo-tv"
    loss = config.loss_config()
    assert loss.clip == "dppo-tv" and loss.gate is not None and loss.dual_clip_c is None


def test_llm_cli_bad_method_combination_is_one_line(capsys, tmp_path):
    from erc_gym.llm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(
            ["--clip-cov-ratio", "0.1", "--top-entropy-quantile", "0.2", "--run-dir", str(tmp_path)]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at most one token gate" in err[0]

"""ERCPPO: parity with SB3 PPO, the ERC gradient mask, buffers and SB3 tooling."""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CheckpointCallback, EvalCallback
from stable_baselines3.common.distributions import CategoricalDistribution, Distribution
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import (
    IdentityEnv,
    IdentityEnvBox,
    IdentityEnvMultiBinary,
    IdentityEnvMultiDiscrete,
    SimpleMultiObsEnv,
)
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import configure
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

import erc_gym.sb3.ppo as ercppo_module
from erc_gym import ERCPPO
from erc_gym.sb3 import ERCDictRolloutBuffer, ERCRolloutBuffer, state_entropy
from erc_gym.sb3.presets import PRESETS, ppo_kwargs

SMALL = {"n_steps": 64, "batch_size": 32, "n_epochs": 2, "device": "cpu"}


def _params_equal(a, b) -> bool:
    sa, sb = a.policy.state_dict(), b.policy.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("n_envs", [1, 4])
def test_parity_with_sb3_ppo_when_erc_is_off(n_envs):
    # Each model is built and trained before the next is built: SB3 seeds the global RNGs at
    # construction, and learn() draws from them. Three rollouts of 128 steps: the second and
    # third are collected by updated policies, each update is 4 epochs of 2 shuffled mini-batches.
    kw = {"n_steps": 128 // n_envs, "batch_size": 64, "n_epochs": 4, "seed": 7, "device": "cpu"}
    steps = 3 * 128
    ppo = PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=n_envs, seed=7), **kw)
    ppo.learn(steps)
    erc = ERCPPO(
        "MlpPolicy",
        make_vec_env("CartPole-v1", n_envs=n_envs, seed=7),
        erc_low=None,
        erc_high=None,
        **kw,
    )
    erc.learn(steps)
    assert erc.num_timesteps == ppo.num_timesteps == steps and ppo._n_updates == 3 * 4
    assert _params_equal(ppo, erc)
    # and the comparison can fail: ERC on changes the parameters
    erc_on = ERCPPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=n_envs, seed=7), **kw)
    erc_on.learn(steps)
    assert not _params_equal(ppo, erc_on)


def _collected_model(**kwargs):
    model = ERCPPO("MlpPolicy", "CartPole-v1", seed=0, **{**SMALL, **kwargs})
    _, callback = model._setup_learn(model.n_steps, None)
    callback.on_training_start(locals(), globals())
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    return model


def test_out_of_band_samples_get_zero_policy_gradient(monkeypatch):
    model = _collected_model(n_epochs=1, batch_size=64)
    buf = model.rollout_buffer
    assert isinstance(buf, ERCRolloutBuffer)
    # Crafted old entropies: the true ones for even samples, twice them for odd samples, so the
    # first (on-policy) mini-batch has rho = 1 (in band) or 0.5 (out of band).
    h = buf.old_entropy.copy()
    factor = np.where(np.arange(h.size).reshape(h.shape) % 2 == 0, 1.0, 2.0)
    buf.set_old_entropy(h * factor)
    captured = []
    real_loss = ercppo_module.policy_loss

    def spy(log_prob, old_log_prob, advantages, **kw):
        out = real_loss(log_prob, old_log_prob, advantages, **kw)
        (grad,) = torch.autograd.grad(out.loss, log_prob, retain_graph=True)
        captured.append((kw["entropy"], kw["old_entropy"], grad, out))
        return out

    monkeypatch.setattr(ercppo_module, "policy_loss", spy)
    model.train()
    entropy, old_entropy, grad, out = captured[0]
    out_of_band = (entropy / old_entropy) < 0.9
    assert 0 < out_of_band.sum() < len(out_of_band)
    assert torch.all(grad[out_of_band] == 0)
    assert torch.all(grad[~out_of_band] != 0)
    assert torch.equal(out.erc_keep.squeeze(-1), ~out_of_band)


def test_value_loss_is_unchanged_by_erc():
    # Same data, ERC on with every sample out of band vs ERC off: the value network (separate
    # from the actor in MlpPolicy) gets identical updates, the actor does not move at all.
    # (max_grad_norm is lifted: the global norm clip would couple the two networks.)
    on = _collected_model(n_epochs=2, max_grad_norm=1e9)
    off = _collected_model(n_epochs=2, max_grad_norm=1e9, erc_low=None, erc_high=None)
    np.testing.assert_array_equal(on.rollout_buffer.observations, off.rollout_buffer.observations)
    on.rollout_buffer.set_old_entropy(on.rollout_buffer.old_entropy * 10.0)
    actor_before = {k: v.clone() for k, v in on.policy.action_net.state_dict().items()}
    np.random.seed(0)  # the same mini-batch permutation for both
    on.train()
    np.random.seed(0)
    off.train()
    for name in ("value_net", "mlp_extractor.value_net"):
        mod_on, mod_off = on.policy.get_submodule(name), off.policy.get_submodule(name)
        for p_on, p_off in zip(mod_on.parameters(), mod_off.parameters(), strict=True):
            assert torch.equal(p_on, p_off)
    assert (
        on.logger.name_to_value["train/value_loss"] == off.logger.name_to_value["train/value_loss"]
    )
    assert on.logger.name_to_value["train/erc_clip_fraction"] == 1.0
    for k, v in on.policy.action_net.state_dict().items():
        assert torch.equal(v, actor_before[k])
    assert not torch.equal(
        off.policy.action_net.weight, actor_before["weight"]
    )  # the comparison can fail


def test_old_entropy_follows_the_permutation(monkeypatch):
    model = _collected_model(n_epochs=2, batch_size=16)
    buf = model.rollout_buffer
    # tag each sample: old entropy = 1000 + its flat index, observation[0] = the same index
    n = buf.buffer_size * buf.n_envs
    tags = np.arange(n, dtype=np.float32).reshape(buf.buffer_size, buf.n_envs)
    buf.observations[..., 0] = tags
    buf.set_old_entropy(1000.0 + tags)
    seen = []
    real_loss = ercppo_module.policy_loss

    def spy(log_prob, old_log_prob, advantages, **kw):
        seen.append(kw["old_entropy"].clone())
        return real_loss(log_prob, old_log_prob, advantages, **kw)

    monkeypatch.setattr(ercppo_module, "policy_loss", spy)
    batches = list(buf.get(16))
    order = torch.cat([b.observations[:, 0] for b in batches])
    assert not torch.equal(order, torch.sort(order).values)  # really permuted
    for b in batches:
        torch.testing.assert_close(b.old_entropy - 1000.0, b.observations[:, 0])
    model.train()
    assert len(seen) == 2 * n // 16


def test_buffer_entropy_matches_policy():
    model = _collected_model()
    buf = model.rollout_buffer
    obs = torch.as_tensor(buf.observations.reshape(-1, 4))
    with torch.no_grad():
        expected = model.policy.get_distribution(obs).entropy().numpy()
    np.testing.assert_allclose(buf.old_entropy.reshape(-1), expected, rtol=1e-5)


@pytest.mark.parametrize("env_cls", [IdentityEnv, IdentityEnvMultiDiscrete, IdentityEnvMultiBinary])
def test_discrete_action_spaces(env_cls):
    env = env_cls(5) if env_cls is IdentityEnv else env_cls(3)
    model = ERCPPO("MlpPolicy", env, seed=0, **SMALL).learn(128)
    assert 0.0 <= model.logger.name_to_value["train/erc_clip_fraction"] <= 1.0
    obs = torch.as_tensor(np.stack([env.observation_space.sample() for _ in range(6)]))
    dist = model.policy.get_distribution(obs_as_tensor(obs.numpy(), "cpu"))
    ours = state_entropy(dist)
    torch.testing.assert_close(ours, dist.entropy().detach().float(), rtol=1e-5, atol=1e-6)


def test_dict_observations_use_the_dict_buffer():
    model = ERCPPO("MultiInputPolicy", SimpleMultiObsEnv(), seed=0, **SMALL)
    assert isinstance(model.rollout_buffer, ERCDictRolloutBuffer)
    model.learn(128)
    assert "train/entropy_old" in model.logger.name_to_value


def test_box_actions_with_erc_raise_and_without_erc_work():
    with pytest.raises(ValueError, match=r"erc_low=None, erc_high=None"):
        ERCPPO("MlpPolicy", IdentityEnvBox(), **SMALL)
    model = ERCPPO("MlpPolicy", IdentityEnvBox(), erc_low=None, erc_high=None, **SMALL)
    model.learn(64)
    assert "train/erc_clip_fraction" not in model.logger.name_to_value


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"erc_low": None}, "both be None"),
        ({"erc_high": None}, "both be None"),
        ({"erc_low": 1.2}, "low=1.2"),
        ({"erc_high": 0.9}, "high=0.9"),
        ({"clip_variant": "trpo"}, "'trpo'"),
        ({"dual_clip": 0.5}, "dual_clip=0.5"),
        # h14: were accepted (a clip range of 0 in training) or an unrelated SB3 assertion
        ({"clip_range_high": -1.0}, "clip_range_high must be a finite number >= 0"),
        ({"clip_range_high": float("nan")}, "got clip_range_high=nan"),
        ({"erc_low": "0.9", "erc_high": 1.1}, "erc_low must be a number, a schedule or None"),
        ({"clip_range_high": "0.28"}, "clip_range_high must be a number, a schedule or None"),
    ],
)
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ERCPPO("MlpPolicy", "CartPole-v1", **kwargs)


def test_logged_keys():
    model = ERCPPO(
        "MlpPolicy",
        "CartPole-v1",
        clip_range_high=0.28,
        clip_variant="gppo",
        dual_clip=3.0,
        seed=0,
        **SMALL,
    )
    model.learn(128)
    logged = model.logger.name_to_value
    sb3_keys = {
        "entropy_loss",
        "policy_gradient_loss",
        "value_loss",
        "approx_kl",
        "clip_fraction",
        "loss",
        "explained_variance",
        "clip_range",
    }
    erc_keys = {
        "entropy",
        "entropy_old",
        "entropy_ratio_mean",
        "entropy_ratio_min",
        "entropy_ratio_max",
        "erc_clip_fraction",
        "erc_clip_fraction_low",
        "erc_clip_fraction_high",
        "erc_clipped_entropy_old_mean",
        "grad_norm",
        "clip_range_high",
    }
    missing = {f"train/{k}" for k in sb3_keys | erc_keys} - set(logged)
    assert not missing, missing
    assert logged["train/entropy"] > 0 and logged["train/entropy_loss"] < 0
    assert logged["train/entropy"] == pytest.approx(-logged["train/entropy_loss"], rel=1e-4)
    assert logged["train/clip_range_high"] == 0.28
    assert logged["train/grad_norm"] > 0


def test_sb3_logged_values_match_sb3():
    """The deferred logging reproduces SB3's numbers on identical training."""
    kw = {"n_steps": 128, "batch_size": 48, "n_epochs": 3, "seed": 3, "device": "cpu"}
    ppo = PPO("MlpPolicy", "CartPole-v1", **kw).learn(128)
    erc = ERCPPO("MlpPolicy", "CartPole-v1", erc_low=None, erc_high=None, **kw).learn(128)
    for key in (
        "entropy_loss",
        "policy_gradient_loss",
        "value_loss",
        "approx_kl",
        "clip_fraction",
        "loss",
    ):
        a = ppo.logger.name_to_value[f"train/{key}"]
        b = erc.logger.name_to_value[f"train/{key}"]
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), key


def test_target_kl_early_stop_matches_sb3():
    kw = {"n_steps": 128, "batch_size": 32, "n_epochs": 10, "seed": 1, "device": "cpu"}
    kw |= {"target_kl": 0.001, "learning_rate": 3e-3}
    ppo = PPO("MlpPolicy", "CartPole-v1", **kw).learn(256)
    erc = ERCPPO("MlpPolicy", "CartPole-v1", erc_low=None, erc_high=None, **kw).learn(256)
    assert ppo._n_updates < 2 * 10  # the early stop fired
    assert erc._n_updates == ppo._n_updates
    assert _params_equal(ppo, erc)


@pytest.mark.parametrize("vec_env_cls", [DummyVecEnv, SubprocVecEnv])
def test_make_vec_env(vec_env_cls):
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0, vec_env_cls=vec_env_cls)
    try:
        model = ERCPPO("MlpPolicy", env, seed=0, **SMALL).learn(256)
        assert model.num_timesteps >= 256
        assert "train/erc_clip_fraction" in model.logger.name_to_value
    finally:
        env.close()


def test_eval_and_checkpoint_callbacks(tmp_path: Path):
    eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=1)
    eval_cb = EvalCallback(
        eval_env, eval_freq=64, n_eval_episodes=2, log_path=str(tmp_path / "eval"), verbose=0
    )
    ckpt_cb = CheckpointCallback(save_freq=64, save_path=str(tmp_path / "ckpt"))
    ERCPPO("MlpPolicy", "CartPole-v1", seed=0, **SMALL).learn(256, callback=[eval_cb, ckpt_cb])
    assert (tmp_path / "eval" / "evaluations.npz").exists()
    assert len(eval_cb.evaluations_results) >= 2
    checkpoints = sorted((tmp_path / "ckpt").glob("*.zip"))
    assert checkpoints
    restored = ERCPPO.load(checkpoints[-1])
    assert restored.erc_enabled


def test_progress_bar(capsys):
    ERCPPO("MlpPolicy", "CartPole-v1", seed=0, **SMALL).learn(128, progress_bar=True)
    captured = capsys.readouterr()
    assert "128/128" in captured.out + captured.err


def test_tensorboard_has_erc_keys(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ERCPPO("MlpPolicy", "CartPole-v1", seed=0, tensorboard_log=str(tmp_path), **SMALL).learn(128)
    run_dirs = list(tmp_path.glob("ERCPPO_*"))
    assert len(run_dirs) == 1
    acc = EventAccumulator(str(run_dirs[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ("train/erc_clip_fraction", "train/entropy_ratio_mean", "train/entropy_old"):
        assert key in tags


def test_evaluate_policy():
    model = ERCPPO("MlpPolicy", "CartPole-v1", seed=0, **SMALL).learn(128)
    mean, std = evaluate_policy(model, model.get_env(), n_eval_episodes=3)
    assert math.isfinite(mean) and mean > 0 and std >= 0


def test_save_load_restores_erc_and_continues(tmp_path: Path):
    model = ERCPPO(
        "MlpPolicy",
        "CartPole-v1",
        erc_low=0.9,
        erc_high=1.2,
        clip_range_high=0.28,
        clip_variant="gppo",
        dual_clip=5.0,
        seed=0,
        **SMALL,
    ).learn(128)
    model.save(tmp_path / "model.zip")
    loaded = ERCPPO.load(tmp_path / "model.zip", env=make_vec_env("CartPole-v1", n_envs=1))
    assert loaded.erc_low(1.0) == 0.9 and loaded.erc_high(0.5) == 1.2
    assert loaded.clip_range_high(1.0) == 0.28
    assert (loaded.clip_variant, loaded.dual_clip) == ("gppo", 5.0)
    assert isinstance(loaded.rollout_buffer, ERCRolloutBuffer)
    for k, v in model.policy.state_dict().items():
        assert torch.equal(v, loaded.policy.state_dict()[k])
    loaded.learn(128, reset_num_timesteps=False)
    assert loaded.num_timesteps == model.num_timesteps + 128
    assert loaded.logger.name_to_value["train/erc_low"] == 0.9


def test_seed_gives_identical_runs():
    runs = [ERCPPO("MlpPolicy", "CartPole-v1", seed=42, **SMALL).learn(256) for _ in range(2)]
    assert _params_equal(*runs)
    other = ERCPPO("MlpPolicy", "CartPole-v1", seed=43, **SMALL).learn(256)
    assert not _params_equal(runs[0], other)


def test_logger_formats(tmp_path: Path):
    model = ERCPPO("MlpPolicy", "CartPole-v1", seed=0, **SMALL)
    model.set_logger(configure(str(tmp_path), ["csv", "json"]))
    model.learn(128)
    header = (tmp_path / "progress.csv").read_text().splitlines()[0]
    assert "train/erc_clip_fraction" in header


def test_presets_build_models():
    for env_id in ("CartPole-v1", "Acrobot-v1", "MountainCar-v0"):
        kwargs = ppo_kwargs(env_id, device="cpu")
        model = ERCPPO(PRESETS[env_id]["policy"], gym.make(env_id), **kwargs)
        assert model.n_epochs == PRESETS[env_id]["n_epochs"]
    lr = ppo_kwargs("CartPole-v1")["learning_rate"]
    assert lr(1.0) == pytest.approx(1e-3) and lr(0.5) == pytest.approx(5e-4)
    with pytest.raises(KeyError, match="available"):
        ppo_kwargs("Pong-v5")


def test_lunar_lander_preset_when_box2d_is_installed():
    pytest.importorskip("Box2D", reason="optional extra: pip install -e '.[box2d]'")
    model = ERCPPO(
        "MlpPolicy",
        gym.make("LunarLander-v3"),
        **ppo_kwargs("LunarLander-v3", n_steps=128, device="cpu"),
    )
    model.learn(256)
    assert "train/erc_clip_fraction" in model.logger.name_to_value


def test_fused_discrete_evaluation_matches_sb3_and_the_kernel():
    model = _collected_model()
    assert model._fused_discrete()
    data = next(model.rollout_buffer.get(64))
    actions = data.actions.long().flatten()
    values, log_prob, entropy, dist = model._evaluate(data.observations, actions)
    f_values, f_log_prob, f_entropy, f_new = model._evaluate_discrete(data.observations, actions)
    assert torch.equal(values, f_values)
    torch.testing.assert_close(f_log_prob, log_prob, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f_entropy, entropy, rtol=1e-5, atol=1e-6)
    assert torch.equal(f_new, state_entropy(dist))  # the same fp64 formula as erc_gym.entropy
    params = list(model.policy.action_net.parameters())
    grads = torch.autograd.grad((log_prob - 0.3 * entropy).sum(), params)
    f_grads = torch.autograd.grad((f_log_prob - 0.3 * f_entropy).sum(), params)
    for g, f in zip(grads, f_grads, strict=True):
        torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-6)


def test_fused_path_is_used_only_where_it_applies(monkeypatch):
    fused_calls = []
    real = ERCPPO._evaluate_discrete

    def counting(self, *args):
        fused_calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(ERCPPO, "_evaluate_discrete", counting)
    model = _collected_model(n_epochs=1, batch_size=64)
    assert fused_calls  # the old-entropy pass evaluates as train() will
    fused_calls.clear()
    model.train()
    assert len(fused_calls) == SMALL["n_steps"] // 64
    model = _collected_model(n_epochs=1, batch_size=64, erc_low=None, erc_high=None)
    fused_calls.clear()
    model.train()
    assert not fused_calls  # ERC off: SB3's own evaluation, bit-identical to PPO


def test_load_of_a_plain_sb3_ppo_checkpoint_with_erc_on(tmp_path: Path):
    # a PPO checkpoint stores rollout_buffer_class=RolloutBuffer, which used to
    # win over the ERC buffer and make ERCPPO.load() raise with ERC on.
    ppo = PPO("MlpPolicy", "CartPole-v1", seed=0, **SMALL).learn(64)
    ppo.save(tmp_path / "ppo.zip")
    loaded = ERCPPO.load(tmp_path / "ppo.zip", env=make_vec_env("CartPole-v1", n_envs=1))
    assert loaded.erc_enabled
    assert isinstance(loaded.rollout_buffer, ERCRolloutBuffer)
    assert _params_equal(ppo, loaded)
    loaded.learn(128, reset_num_timesteps=False)
    assert loaded.logger.name_to_value["train/erc_low"] == 0.95
    assert 0.0 <= loaded.logger.name_to_value["train/erc_clip_fraction"] <= 1.0


def test_load_of_a_dict_observation_ppo_checkpoint_gets_the_dict_erc_buffer(tmp_path: Path):
    env = DummyVecEnv([lambda: SimpleMultiObsEnv(random_start=False)])
    PPO("MultiInputPolicy", env, seed=0, **SMALL).save(tmp_path / "ppo.zip")
    loaded = ERCPPO.load(tmp_path / "ppo.zip", env=env)
    assert isinstance(loaded.rollout_buffer, ERCDictRolloutBuffer)


class _TemperaturePolicy(ActorCriticPolicy):
    """Overrides the distribution (logits / 0.25), as action masks or temperatures do."""

    def _get_action_dist_from_latent(self, latent_pi: torch.Tensor) -> Distribution:
        logits = self.action_net(latent_pi) / 0.25
        # a new object, not policy.action_dist updated in place
        return CategoricalDistribution(int(self.action_space.n)).proba_distribution(logits)


class _PredictOnlyPolicy(ActorCriticPolicy):
    """Overrides get_distribution only (what predict() uses); training is SB3's."""

    def get_distribution(self, obs: torch.Tensor) -> Distribution:
        dist = super().get_distribution(obs)
        assert isinstance(dist, CategoricalDistribution)
        return dist.proba_distribution(dist.distribution.logits * 3.0)


@pytest.mark.parametrize("policy_cls", [_TemperaturePolicy, _PredictOnlyPolicy])
def test_custom_distribution_policies_train_on_their_own_distribution(policy_cls, monkeypatch):
    # the fused Discrete path rebuilt the logits from action_net, ignoring the
    # override. One epoch on one mini-batch is on-policy: ratio 1 and entropy ratio 1 exactly,
    # so nothing may be clipped and the k3 KL is 0.
    fused = []
    real = ERCPPO._evaluate_discrete
    monkeypatch.setattr(
        ERCPPO, "_evaluate_discrete", lambda self, *a: fused.append(1) or real(self, *a)
    )
    model = ERCPPO(policy_cls, "CartPole-v1", seed=0, **{**SMALL, "n_epochs": 1, "batch_size": 64})
    assert not model._fused_discrete()
    model.learn(64)
    logged = model.logger.name_to_value
    assert not fused
    assert logged["train/clip_fraction"] == 0.0
    assert abs(logged["train/approx_kl"]) < 1e-6
    assert logged["train/erc_clip_fraction"] == 0.0
    assert logged["train/entropy_ratio_min"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("algo", [ERCPPO, PPO])
def test_schedules_never_go_below_zero_on_an_overshooting_last_rollout(algo):
    # 100 steps with rollouts of 64 -> the second rollout ends at 128 and SB3's
    # progress at -0.28; the zoo's lin_ schedules gave the last update a negative lr and clip.
    seen = []
    kwargs = ppo_kwargs("CartPole-v1", n_steps=64, batch_size=64, n_epochs=1, device="cpu")
    if algo is ERCPPO:
        model = ERCPPO("MlpPolicy", "CartPole-v1", seed=0, **kwargs)
    else:
        model = PPO("MlpPolicy", "CartPole-v1", seed=0, **kwargs)
    train = model.train

    def recording_train():
        train()
        seen.append(
            (
                model.policy.optimizer.param_groups[0]["lr"],
                model.logger.name_to_value["train/clip_range"],
            )
        )

    model.train = recording_train  # type: ignore[method-assign]
    model.learn(100)
    assert model.num_timesteps == 128 and len(seen) == 2
    lr, clip = seen[-1]
    assert lr >= 0.0 and clip >= 0.0
    assert seen[0][0] > 0.0 and seen[0][1] > 0.0

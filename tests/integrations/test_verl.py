"""erc_gym's verl plugin against a real verl (>= 0.9.1): run with `make test-verl`.

Skipped in the main environment (verl pins transformers < 5.11, so it lives in `.venv-verl`).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("verl")

from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import ActorConfig

from erc_gym.integrations.verl import (
    ERCPolicyLossConfig,
    erc_entropies,
    erc_ppo_loss,
    install_erc_loss_fn,
    use_exact_entropy,
)
from erc_gym.losses import ERCConfig, LossConfig, policy_loss

ROOT = Path(__file__).resolve().parents[2]
AGG_MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
]


def actor_config(
    loss_mode: str = "erc_dapo",
    *,
    low: float = 0.95,
    high: float = 1.05,
    clip_high: float = 0.28,
    clip_c: float = 10.0,
    agg: str = "token-mean",
    calculate_entropy: bool = True,
    policy_loss: Any = None,
) -> ActorConfig:
    """An actor config; ``policy_loss`` replaces the ERC loss config built from the band."""
    if policy_loss is None:
        policy_loss = ERCPolicyLossConfig(loss_mode=loss_mode, erc_low=low, erc_high=high)
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=0.2,
        clip_ratio_high=clip_high,
        clip_ratio_c=clip_c,
        loss_agg_mode=agg,
        calculate_entropy=calculate_entropy,
        policy_loss=policy_loss,
    )


def batch(b: int = 6, t: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """Off-policy tensors where every clip case occurs and ERC clips about a third of tokens."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    lp = old + 0.6 * torch.randn(b, t, generator=g, dtype=torch.float64)
    lp[0, 0] = old[0, 0] + 3.0  # r > 10: dual-clip for A < 0
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).clone()
    adv[0] = -1.0
    mask = torch.ones(b, t, dtype=torch.bool)
    for i in range(b):
        mask[i, t - i :] = False  # different lengths
    mask[-1] = False  # one fully masked sequence
    h_old = torch.rand(b, t, generator=g, dtype=torch.float64) + 0.05
    h = h_old * (1 + 0.08 * torch.randn(b, t, generator=g, dtype=torch.float64))
    return {"old": old, "lp": lp, "adv": adv, "mask": mask, "h": h.abs(), "h_old": h_old}


def verl_loss(
    mode: str,
    cfg: ActorConfig,
    x: dict[str, torch.Tensor],
    entropies: bool = True,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    lp = x["lp"].clone().requires_grad_(True)
    fn = get_policy_loss_fn(mode)
    kwargs = dict(
        old_log_prob=x["old"],
        log_prob=lp,
        advantages=x["adv"],
        response_mask=x["mask"],
        loss_agg_mode=cfg.loss_agg_mode,
        config=cfg,
        rollout_is_weights=weights,
    )
    if entropies:
        with erc_entropies(x["h"], x["h_old"]):
            loss, metrics = fn(**kwargs)
    else:
        loss, metrics = fn(**kwargs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), metrics, grad


def reference(
    clip: str, x: dict[str, torch.Tensor], agg: str, band: ERCConfig | None, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    lp = x["lp"].clone().requires_grad_(True)
    erc_agg = "token-mean" if agg == "token-sum" else agg
    cfg = LossConfig(
        clip=clip,  # type: ignore[arg-type]
        eps_low=0.2,
        eps_high=eps_high,
        dual_clip_c=10.0,
        erc=band,
        aggregation=erc_agg,  # type: ignore[arg-type]
    )
    out = policy_loss(
        lp, x["old"], x["adv"], entropy=x["h"], old_entropy=x["h_old"], mask=x["mask"], config=cfg
    )
    # erc_gym has no token-sum; its per-token loss summed over valid tokens is verl's definition.
    loss = (out.token_loss * x["mask"]).sum() if agg == "token-sum" else out.loss
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, out


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize(("mode", "clip"), [("erc_dapo", "ppo"), ("erc_gppo", "gppo")])
def test_registered_losses_equal_policy_loss(mode: str, clip: str, agg: str) -> None:
    x = batch()
    cfg = actor_config(mode, agg=agg)
    loss, metrics, grad = verl_loss(mode, cfg, x)
    ref_loss, ref_grad, out = reference(clip, x, agg, ERCConfig(0.95, 1.05), 0.28)
    # verl 0.9.1 divides seq-mean-token-sum-norm by the number of (non-empty) sequences too:
    # sum(m l) / (B T); erc_gym (and verl <= 0.8, the authors' fork) use sum(m l) / T.
    n_seq = int(x["mask"].any(-1).sum())
    scale = 1.0 / n_seq if agg == "seq-mean-token-sum-norm" else 1.0
    torch.testing.assert_close(loss, ref_loss * scale, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad * scale, rtol=1e-12, atol=1e-12)
    # ERC did act: some valid tokens have their gradient stopped, which PPO alone would keep.
    assert out.erc_keep is not None
    stopped = x["mask"] & ~out.erc_keep
    assert 0 < int(stopped.sum()) < int(x["mask"].sum())
    assert torch.all(grad[stopped] == 0)
    assert metrics["actor/erc_clip_fraction"] == pytest.approx(out.metrics["erc_clip_fraction"])
    assert metrics["actor/erc_clip_fraction"] > 0
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(out.metrics["dual_clip_fraction"])
    assert metrics["actor/pg_clipfrac_lower"] > 0  # dual-clip fired, and it keeps vanilla's key


@pytest.mark.parametrize("distributed", [False, True])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_open_band_equals_vanilla(agg: str, distributed: bool) -> None:
    """Band (0, inf): erc_dapo is verl's vanilla, also with rollout IS weights and data-parallel
    normalisation (``global_batch_info`` as ``ppo_loss`` sets it on a rank of 2)."""
    x = batch(seed=1)
    vanilla_cfg = actor_config("vanilla", agg=agg, clip_c=3.0)
    erc_cfg = actor_config("erc_dapo", low=0.0, high=math.inf, agg=agg, clip_c=3.0)
    weights = None
    if distributed:
        info = {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 11}
        vanilla_cfg.global_batch_info.update(info)
        erc_cfg.global_batch_info.update(info)
        weights = torch.rand(x["lp"].shape, generator=torch.Generator().manual_seed(5)).double()
    v_loss, v_metrics, v_grad = verl_loss("vanilla", vanilla_cfg, x, False, weights)
    e_loss, e_metrics, e_grad = verl_loss("erc_dapo", erc_cfg, x, True, weights)
    torch.testing.assert_close(e_loss, v_loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(e_grad, v_grad, rtol=1e-14, atol=0)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        # vanilla computes its fractions in fp32
        assert e_metrics[key] == pytest.approx(v_metrics[key], rel=1e-6, abs=1e-12)
    assert v_metrics["actor/pg_clipfrac"] > 0 and v_metrics["actor/pg_clipfrac_lower"] > 0
    assert e_metrics["actor/erc_clip_fraction"] == 0.0


def test_loss_without_entropies_names_the_setting() -> None:
    x = batch()
    with pytest.raises(ValueError, match=r"calculate_entropy=True"):
        verl_loss("erc_dapo", actor_config(), x, entropies=False)


def test_erc_mode_without_band_names_the_config_class() -> None:
    from verl.workers.config import PolicyLossConfig

    cfg = actor_config()
    object.__setattr__(cfg, "policy_loss", PolicyLossConfig(loss_mode="erc_dapo"))
    with pytest.raises(
        ValueError, match=r"_target_=erc_gym\.integrations\.verl\.ERCPolicyLossConfig"
    ):
        verl_loss("erc_dapo", cfg, batch())


@pytest.mark.parametrize(("low", "high", "name"), [(1.0, 1.05, "erc_low"), (0.95, 1.0, "erc_high")])
def test_band_outside_range_names_the_setting(low: float, high: float, name: str) -> None:
    with pytest.raises(ValueError, match=rf"policy_loss\.{name}.*0 <= erc_low < 1 < erc_high"):
        ERCPolicyLossConfig(erc_low=low, erc_high=high)


# --- verl's own worker loss path -----------------------------------------------------------


def worker_micro_batch(x: dict[str, torch.Tensor], prompt_len: int = 3) -> tuple[Any, Any]:
    """A micro-batch as verl's engine hands it to the loss: no-padding layout (nested)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    b, t = x["lp"].shape
    keep = x["mask"][:-1]  # the padding layout needs a response token in each sequence
    b -= 1
    resp_len = keep.sum(-1)
    attention = torch.cat([torch.ones(b, prompt_len, dtype=torch.long), keep.long()], dim=1)
    input_ids = torch.randint(3, 50, (b, prompt_len + t))
    td = TensorDict(
        {
            "input_ids": input_ids,
            "attention_mask": attention,
            "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
            "prompts": input_ids[:, :prompt_len],
            "responses": input_ids[:, prompt_len:],
            "response_mask": keep.long(),
            "old_log_probs": x["old"][:-1].float(),
            "advantages": x["adv"][:-1].float(),
            "entropy": x["h_old"][:-1].float(),  # where verl's v1 trainer keeps H_old
        },
        batch_size=[b],
    )
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(
        td, dp_size=1, batch_num_tokens=int(keep.sum()), global_batch_size=b, max_response_len=t
    )
    offsets = td["input_ids"].offsets()
    # The model output: per-token values over prompt + response, shifted by one as verl's are.
    lp_values = torch.zeros(int(offsets[-1]), dtype=torch.float32)
    h_values = torch.zeros_like(lp_values)
    for i in range(b):
        start = int(offsets[i]) + prompt_len - 1
        n = int(resp_len[i])
        lp_values[start : start + n] = x["lp"][i, :n].float()
        h_values[start : start + n] = x["h"][i, :n].float()
    lp_values.requires_grad_(True)
    nested = torch.nested.nested_tensor_from_jagged
    model_output = {
        "log_probs": nested(lp_values, offsets=offsets),
        "entropy": nested(h_values, offsets=offsets),
        "lp_values": lp_values,
    }
    return td, model_output


def test_ppo_loss_path_carries_entropies_and_applies_erc() -> None:
    from verl.workers.utils.losses import ppo_loss

    x = batch(seed=2)
    cfg = actor_config("erc_dapo")
    data, model_output = worker_micro_batch(x)
    loss, metrics = erc_ppo_loss(cfg, model_output, data)
    (grad_values,) = torch.autograd.grad(loss, model_output["lp_values"])

    keep = x["mask"][:-1]
    sub = {k: v[:-1].float() for k, v in x.items()}
    lp = sub["lp"].clone().requires_grad_(True)
    out = policy_loss(
        lp,
        sub["old"],
        sub["adv"],
        entropy=sub["h"],
        old_entropy=sub["h_old"],
        mask=keep,
        config=LossConfig.dapo(erc=ERCConfig(0.95, 1.05)),
    )
    (ref_grad,) = torch.autograd.grad(out.loss, lp)
    torch.testing.assert_close(loss.detach(), out.loss.detach(), rtol=1e-6, atol=1e-7)
    offsets = data["input_ids"].offsets()
    for i in range(keep.shape[0]):
        n = int(keep[i].sum())
        start = int(offsets[i]) + 2
        torch.testing.assert_close(grad_values[start : start + n], ref_grad[i, :n])
    assert out.erc_keep is not None and bool((keep & ~out.erc_keep).any())
    erc = metrics["actor/erc_clip_fraction"]
    assert erc.aggregate() == pytest.approx(out.metrics["erc_clip_fraction"], rel=1e-6)
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_loss"} <= set(metrics)

    # verl's own ppo_loss, without the hook, refuses instead of training without ERC.
    with pytest.raises(ValueError, match=r"calculate_entropy=True"):
        ppo_loss(cfg, model_output, data)


def test_hook_without_current_entropy_names_calculate_entropy() -> None:
    data, model_output = worker_micro_batch(batch())
    del model_output["entropy"]
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.actor\.calculate_entropy=True"):
        erc_ppo_loss(actor_config(calculate_entropy=False), model_output, data)


def test_hook_without_old_entropy_names_the_old_log_prob_pass() -> None:
    data, model_output = worker_micro_batch(batch())
    del data["entropy"]
    with pytest.raises(ValueError, match=r"old-log-prob pass"):
        erc_ppo_loss(actor_config(), model_output, data)


def test_hook_is_transparent_for_other_loss_modes() -> None:
    from verl.workers.utils.losses import ppo_loss

    x = batch(seed=3)
    data, model_output = worker_micro_batch(x)
    cfg = actor_config("vanilla")
    loss, _ = erc_ppo_loss(cfg, model_output, data)
    ref, _ = ppo_loss(cfg, model_output, data)
    assert torch.equal(loss, ref)


class _FakeWorkerGroup:
    def __init__(self) -> None:
        self.loss_fn: Any = None

    def set_loss_fn(self, loss_fn: Any) -> None:
        self.loss_fn = loss_fn


def test_install_erc_loss_fn_sets_the_hook_and_checks_calculate_entropy() -> None:
    wg = _FakeWorkerGroup()
    fn = install_erc_loss_fn(wg, actor_config())
    assert wg.loss_fn is fn and fn.func is erc_ppo_loss
    with pytest.raises(ValueError, match=r"calculate_entropy=True"):
        install_erc_loss_fn(_FakeWorkerGroup(), actor_config(calculate_entropy=False))


# --- entry point, recipes, entropy ---------------------------------------------------------


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_import_verl_registers_losses_through_entry_point() -> None:
    code = (
        "import sys, verl\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R\n"
        "assert 'erc_gym.integrations.verl' in sys.modules\n"
        "print(R['erc_dapo'].func.__module__, R['erc_gppo'].args)\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["erc_gym.integrations.verl", "('erc_gppo',)"]
    off = _run(code, VERL_USE_EXTERNAL_PLUGINS="none")  # the registration came from the plugin
    assert off.returncode != 0


def test_broken_plugin_import_fails_loudly() -> None:
    code = (
        "import sys\n"
        "sys.modules['erc_gym.losses'] = None  # simulate a broken installation\n"
        "import verl\n"
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
        "get_policy_loss_fn('erc_dapo')()\n"
    )
    out = _run(code)
    assert out.returncode != 0
    assert "erc_gym verl plugin failed to import" in out.stderr  # logged at ERROR at import
    assert "RuntimeError: erc_gym's verl plugin failed to import" in out.stderr  # and on use


def _recipe_actor_config(script: str) -> Any:
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    overrides = subprocess.run(
        ["bash", str(ROOT / "examples" / "verl" / script)],
        env={**os.environ, "ERC_DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    import verl

    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose("ppo_trainer", overrides=overrides)
    assert cfg.trainer.v1.trainer_mode == "erc_sync"
    assert cfg.data.train_batch_size == 128 and cfg.actor_rollout_ref.rollout.n == 8
    assert cfg.actor_rollout_ref.actor.ppo_mini_batch_size == 16
    assert cfg.actor_rollout_ref.actor.optim.lr == 1e-6
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


@pytest.mark.parametrize(
    ("script", "recipe"),
    [
        ("run_dapo_erc.sh", LossConfig.dapo(erc=ERCConfig(0.95, 1.05))),
        ("run_gppo_erc.sh", LossConfig.gppo(erc=ERCConfig(0.95, 1.05))),
    ],
)
def test_author_recipes_in_verl_config_reproduce_policy_loss(script: str, recipe: Any) -> None:
    cfg = _recipe_actor_config(script)
    assert isinstance(cfg.policy_loss, ERCPolicyLossConfig) and cfg.calculate_entropy
    x = batch(seed=4)
    loss, _, grad = verl_loss(cfg.policy_loss.loss_mode, cfg, x)
    lp = x["lp"].clone().requires_grad_(True)
    out = policy_loss(
        lp,
        x["old"],
        x["adv"],
        entropy=x["h"],
        old_entropy=x["h_old"],
        mask=x["mask"],
        config=recipe,
    )
    (ref_grad,) = torch.autograd.grad(out.loss, lp)
    torch.testing.assert_close(loss, out.loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_use_exact_entropy_replaces_verls_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    import verl.utils.torch_functional as verl_f

    for name in ("entropy_from_logits", "entropy_from_logits_with_chunking"):
        monkeypatch.setattr(verl_f, name, getattr(verl_f, name))  # restored after the test
    # Near-deterministic rows with a large common logit offset (docs/method.md section 5.4).
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4096, generator=g, dtype=torch.float64) * 2
    logits[:, 0] += torch.linspace(14, 22, 64, dtype=torch.float64)
    logits += 60.0
    p = torch.softmax(logits, -1)
    exact = -(p * torch.log_softmax(logits, -1)).sum(-1)
    verl_rel = ((verl_f.entropy_from_logits(logits.float()).double() - exact) / exact).abs().max()
    use_exact_entropy()
    ours = verl_f.entropy_from_logits(logits.float()).double()
    chunked = verl_f.entropy_from_logits_with_chunking(logits.float(), chunk_size=7).double()
    ours_rel = ((ours - exact) / exact).abs().max()
    assert float(verl_rel) > 1e-2  # verl's formula is off by percents here
    assert float(ours_rel) < 1e-5
    torch.testing.assert_close(chunked, ours)


# --- trainer mode erc_sync (needs verl's verl-core extra, as verl's v1 trainer does) -------


def test_trainer_mode_erc_sync_registers_through_verl_external_modules() -> None:
    pytest.importorskip("transfer_queue")
    code = (
        "import verl\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls\n"
        "cls = get_trainer_cls('erc_sync')\n"
        "print(cls.__module__, [b.__name__ for b in cls.__mro__[1:3]])\n"
    )
    out = _run(code, VERL_USE_EXTERNAL_MODULES="erc_gym.integrations.verl_trainer")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == (
        "erc_gym.integrations.verl_trainer ['PPOTrainerSync', 'PPOTrainer']"
    )


def test_trainer_refuses_bypass_mode_naming_the_setting() -> None:
    pytest.importorskip("transfer_queue")
    from omegaconf import OmegaConf

    from erc_gym.integrations.verl_trainer import check_erc_trainer_config

    cfg = OmegaConf.create(
        {
            "actor_rollout_ref": {"actor": {"policy_loss": {"loss_mode": "erc_dapo"}}},
            "algorithm": {"rollout_correction": {"bypass_mode": True}},
        }
    )
    with pytest.raises(ValueError, match=r"algorithm\.rollout_correction\.bypass_mode"):
        check_erc_trainer_config(cfg)
    cfg.algorithm.rollout_correction.bypass_mode = False
    check_erc_trainer_config(cfg)


def test_env_switch_installs_exact_entropy_at_import() -> None:
    code = (
        "import verl, verl.utils.torch_functional as f\n"
        "print(f.entropy_from_logits.__module__, f.entropy_from_logits_with_chunking.__name__)\n"
    )
    on = _run(code, ERC_GYM_VERL_ENTROPY="exact")
    assert on.returncode == 0, on.stderr
    assert on.stdout.split() == ["erc_gym.integrations.verl", "exact_entropy_from_logits"]
    off = _run(code)
    assert off.stdout.split()[0] == "verl.utils.torch_functional"


def test_erc_sync_setup_installs_the_hook_on_the_actor_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("transfer_queue")
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from erc_gym.integrations.verl_trainer import ERCPPOTrainerSync

    overrides = subprocess.run(
        ["bash", str(ROOT / "examples" / "verl" / "run_dapo_erc.sh")],
        env={**os.environ, "ERC_DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    import verl

    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose("ppo_trainer", overrides=overrides)

    wg = _FakeWorkerGroup()

    def verl_setup(self: Any) -> None:  # stands in for building Ray workers and engines
        self.actor_rollout_wg = wg

    monkeypatch.setattr(PPOTrainerSync, "_setup", verl_setup, raising=False)
    trainer = object.__new__(ERCPPOTrainerSync)
    trainer.config = cfg
    trainer._setup()
    assert wg.loss_fn is not None and wg.loss_fn.func is erc_ppo_loss
    installed = wg.loss_fn.keywords["config"]
    assert installed.policy_loss.loss_mode == "erc_dapo" and installed.clip_ratio_c == 10.0


# --- the rival methods against verl 0.9.1's own registered losses ----------------------------
#
# Each erc_gym method is one LossConfig of policy_loss; verl implements Clip-Cov, KL-Cov,
# DPPO-TV and DPPO-KL as whole loss functions. On the same tensors (and, for Clip-Cov's random
# draw, the same global-RNG state) the value and the per-token gradient must be verl's, for every
# aggregation verl supports. These tests fail if either side changes.


def method_actor_config(
    loss_mode: str, agg: str, *, clip_high: float = 0.28, clip_c: float = 3.0, **policy: Any
) -> ActorConfig:
    from verl.workers.config import PolicyLossConfig

    loss = PolicyLossConfig(loss_mode=loss_mode, **policy)
    return actor_config(agg=agg, clip_high=clip_high, clip_c=clip_c, policy_loss=loss)


def ours_as_verl(
    x: dict[str, torch.Tensor], config: LossConfig, agg: str, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """policy_loss with verl's aggregation conventions (token-sum; seq-mean-token-sum-norm)."""
    import dataclasses

    lp = x["lp"].clone().requires_grad_(True)
    cfg = dataclasses.replace(config, aggregation="token-mean" if agg == "token-sum" else agg)
    if seed is not None:
        torch.manual_seed(seed)
    entropies = {"entropy": x["h"], "old_entropy": x["h_old"]}
    out = policy_loss(lp, x["old"], x["adv"], mask=x["mask"], config=cfg, **entropies)
    loss = (out.token_loss * x["mask"]).sum() if agg == "token-sum" else out.loss
    if agg == "seq-mean-token-sum-norm":  # verl 0.9.1 also divides by the non-empty sequences
        loss = loss / int(x["mask"].any(-1).sum())
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, out


def verl_method_loss(
    mode: str, cfg: ActorConfig, x: dict[str, torch.Tensor], seed: int | None = None
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    if seed is not None:
        torch.manual_seed(seed)
    return verl_loss(mode, cfg, x, entropies=False)


def cov_batch(seed: int) -> dict[str, torch.Tensor]:
    """Covariances that reach verl's default candidate window (1, 5) for many tokens."""
    x = batch(b=10, t=24, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    x["adv"] = x["adv"] * 3 + 0.5 * torch.randn(x["adv"].shape, generator=g, dtype=torch.float64)
    x["lp"] = x["old"] + 0.25 * torch.randn(x["old"].shape, generator=g, dtype=torch.float64)
    return x


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize(
    ("ratio", "lb", "ub"), [(0.05, 1.0, 5.0), (0.1, 0.3, 2.0), (2e-4, 1.0, 5.0)]
)
def test_clip_cov_equals_verl(agg: str, seed: int, ratio: float, lb: float, ub: float) -> None:
    from erc_gym.losses import ClipCov

    x = cov_batch(seed)
    cfg = method_actor_config("clip_cov", agg, clip_cov_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub)
    loss, metrics, grad = verl_method_loss("clip_cov", cfg, x, seed=seed + 7)
    ours = LossConfig(clip="ppo", eps_low=0.2, eps_high=0.28, gate=ClipCov(ratio, lb, ub))
    ref_loss, ref_grad, out = ours_as_verl(x, ours, agg, seed=seed + 7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    n_valid = int(x["mask"].sum())
    drawn = int(out.gate_mask.sum())
    assert drawn == max(int(ratio * n_valid), 1)  # a real draw from a larger candidate set
    assert metrics["actor/pg_clipfrac"] == pytest.approx(out.metrics["clip_cov_fraction"])
    # the drawn tokens have no gradient, and a different global-RNG state draws others
    assert torch.all(grad[out.gate_mask] == 0)
    if drawn > 1:
        other = ours_as_verl(x, ours, agg, seed=seed + 8)[2]
        assert not torch.equal(other.gate_mask, out.gate_mask)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize(("ratio", "coef"), [(0.1, 0.1), (2e-4, 1.0), (0.3, 0.5)])
def test_kl_cov_equals_verl(agg: str, seed: int, ratio: float, coef: float) -> None:
    from erc_gym.losses import KLCov

    x = cov_batch(seed)
    cfg = method_actor_config("kl_cov", agg, kl_cov_ratio=ratio, ppo_kl_coef=coef)
    loss, metrics, grad = verl_method_loss("kl_cov", cfg, x)
    ours = LossConfig(clip="none", gate=KLCov(ratio, coef))
    ref_loss, ref_grad, out = ours_as_verl(x, ours, agg)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert int(out.gate_mask.sum()) == max(1, int(ratio * int(x["mask"].sum())))
    abs_kl = (x["lp"] - x["old"]).abs()[x["mask"]].mean()
    assert metrics["actor/ppo_kl"] == pytest.approx(float(abs_kl))


def dppo_batch(seed: int) -> dict[str, torch.Tensor]:
    """Probabilities up to 1 and moves of +-0.6 in log space: both trust regions bite."""
    x = batch(b=10, t=16, seed=seed)
    g = torch.Generator().manual_seed(seed + 200)
    x["old"] = -torch.rand(x["old"].shape, generator=g, dtype=torch.float64) * 1.2
    x["lp"] = (
        x["old"] + 0.6 * torch.randn(x["old"].shape, generator=g, dtype=torch.float64)
    ).clamp(max=-1e-4)
    x["lp"][0, 0] = x["old"][0, 0] + 3.0  # a ratio above the truncation C
    return x


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("divergence", ["tv", "kl"])
@pytest.mark.parametrize(("eps_high", "cap"), [(0.28, 3.0), (0.1, 20.0)])
def test_dppo_equals_verl(
    agg: str, seed: int, divergence: str, eps_high: float, cap: float
) -> None:
    mode = f"dppo_{divergence}"
    x = dppo_batch(seed)
    cfg = method_actor_config(mode, agg, clip_high=eps_high, clip_c=cap)
    loss, metrics, grad = verl_method_loss(mode, cfg, x)
    ours = LossConfig(
        clip=f"dppo-{divergence}",  # type: ignore[arg-type]
        eps_low=0.2,
        eps_high=eps_high,
        ratio_cap=cap,
    )
    ref_loss, ref_grad, out = ours_as_verl(x, ours, agg)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    m = out.metrics
    assert 0 < m["clip_fraction"] < 1  # the trust region masked some tokens, not all
    assert metrics["actor/pg_clipfrac"] == pytest.approx(m["clip_fraction"])
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(m["dual_clip_fraction"])


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_cov_losses_differ_from_verl_only_by_the_log_ratio_clamp(mode: str) -> None:
    """On purpose: erc_gym clamps every log-ratio to +-20 before exp (as verl's vanilla and DPPO
    do); verl's clip_cov / kl_cov do not, so one stale token (log-ratio 25) makes verl's ratio
    exp(25) and its loss explode. Everywhere else the values are the same (tests above)."""
    from erc_gym.losses import ClipCov, KLCov

    x = cov_batch(0)
    x["lp"][1, 2] = x["old"][1, 2] + 25.0
    x["adv"][1, 2] = -1.0  # a negative advantage: PPO's clip does not bound -A r from above
    kwargs = {"clip_cov_ratio": 2e-4} if mode == "clip_cov" else {"kl_cov_ratio": 2e-4}
    loss, _, grad = verl_method_loss(mode, method_actor_config(mode, "token-mean", **kwargs), x, 0)
    gate = ClipCov(2e-4) if mode == "clip_cov" else KLCov(2e-4)
    ours = LossConfig(clip="ppo" if mode == "clip_cov" else "none", eps_high=0.28, gate=gate)
    ref_loss, ref_grad, _ = ours_as_verl(x, ours, "token-mean", seed=0)
    n = int(x["mask"].sum())
    assert float(loss) > math.exp(24) / n  # verl: the unclamped ratio
    assert float(ref_loss) < math.exp(20.5) / n  # erc_gym: clamped at exp(20)
    assert float(grad[1, 2]) != float(ref_grad[1, 2])


# --- the methods verl lacks, and ERC's combinations, through the plugin -----------------------


def plugin_config(mode: str = "erc_dapo", agg: str = "token-mean", **policy: Any) -> ActorConfig:
    return actor_config(agg=agg, policy_loss=ERCPolicyLossConfig(loss_mode=mode, **policy))


@pytest.mark.parametrize("agg", AGG_MODES)
def test_plugin_matched_random_control_equals_policy_loss(agg: str) -> None:
    from erc_gym.losses import RandomMask

    x = batch(b=8, t=12, seed=6)
    cfg = plugin_config(agg=agg, erc=False, gate="random_matched")
    torch.manual_seed(3)
    loss, metrics, grad = verl_loss("erc_dapo", cfg, x)
    band = ERCConfig(0.95, 1.05)
    ours = LossConfig(eps_high=0.28, dual_clip_c=10.0, gate=RandomMask(match=band))
    ref, ref_grad, out = ours_as_verl(x, ours, agg, seed=3)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    rho = (x["h"] + 1e-8) / (x["h_old"] + 1e-8)
    erc_count = int((((rho <= 0.95) | (rho >= 1.05)) & x["mask"]).sum())
    assert int(out.gate_mask.sum()) == erc_count > 0
    assert metrics["actor/random_mask_fraction"] == pytest.approx(erc_count / int(x["mask"].sum()))
    assert metrics["actor/erc_clip_fraction"] == 0.0  # ERC itself is off


@pytest.mark.parametrize("mode", ["erc_dapo", "erc_gppo"])
@pytest.mark.parametrize("gate", ["clip_cov", "kl_cov", "high_entropy"])
def test_plugin_combines_erc_with_a_gate(mode: str, gate: str) -> None:
    from erc_gym.losses import ClipCov, HighEntropy, KLCov

    x = cov_batch(2)
    x["h"] = x["h"].float().double()
    policy = {"gate": gate, "clip_cov_ratio": 0.1, "clip_cov_lb": 0.3, "kl_cov_ratio": 0.1}
    cfg = plugin_config(mode, **policy)
    torch.manual_seed(9)
    loss, metrics, grad = verl_loss(mode, cfg, x)
    gates = {
        "clip_cov": ClipCov(0.1, 0.3, 5.0),
        "kl_cov": KLCov(0.1, 0.1),
        "high_entropy": HighEntropy(0.2),
    }
    ours = LossConfig(
        clip="ppo" if mode == "erc_dapo" else "gppo",
        eps_high=0.28,
        dual_clip_c=10.0,
        erc=ERCConfig(0.95, 1.05),
        gate=gates[gate],
    )
    ref, ref_grad, _ = ours_as_verl(x, ours, "token-mean", seed=9)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert metrics["actor/gate_fraction"] > 0 and metrics["actor/erc_clip_fraction"] > 0


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("divergence", ["tv", "kl"])
def test_plugin_erc_on_dppo_with_an_open_band_is_verls_dppo(agg: str, divergence: str) -> None:
    x = dppo_batch(3)
    verl_cfg = method_actor_config(f"dppo_{divergence}", agg, clip_c=3.0)
    v_loss, _, v_grad = verl_method_loss(f"dppo_{divergence}", verl_cfg, x)
    cfg = plugin_config(f"erc_dppo_{divergence}", agg, erc_low=0.0, erc_high=math.inf)
    object.__setattr__(cfg, "clip_ratio_c", 3.0)
    e_loss, _, e_grad = verl_loss(f"erc_dppo_{divergence}", cfg, x)
    torch.testing.assert_close(e_loss, v_loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(e_grad, v_grad, rtol=1e-14, atol=0)


def test_plugin_gate_settings_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match=r"policy_loss\.gate must be one of"):
        ERCPolicyLossConfig(gate="forking")
    with pytest.raises(ValueError, match=r"policy_loss\.erc=False"):
        ERCPolicyLossConfig(gate="random_matched")
    with pytest.raises(ValueError, match=r"policy_loss\.gate='random'.*share"):
        ERCPolicyLossConfig(gate="random", random_share=1.5)


def test_plugin_gate_without_erc_needs_no_entropies() -> None:
    """Clip-Cov through the plugin with ERC off reads no entropies (calculate_entropy off)."""
    x = cov_batch(0)
    cfg = plugin_config(erc=False, gate="clip_cov", clip_cov_ratio=0.1)
    torch.manual_seed(1)
    loss, metrics, _ = verl_loss("erc_dapo", cfg, x, entropies=False)
    assert math.isfinite(float(loss)) and metrics["actor/clip_cov_fraction"] > 0

"""ERCGRPOTrainer on TRL's GRPOTrainer: equivalence, ERC gradients, metrics, errors.

Runs only where TRL is installed (``make test-trl`` builds that environment); the main suite skips
it. Tiny Qwen2 models from a config and erc_gym's character tokenizer: no downloads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from trl_sharded_worker import compare_to_reference  # this folder (pytest puts it on sys.path)

from erc_gym.entropy import logprob_and_entropy
from erc_gym.envs.tokenizer import CharTokenizer
from erc_gym.integrations import trl as erc_trl
from erc_gym.integrations.trl import (
    ERC_LOSS_TYPES,
    ERC_METRIC_KEYS,
    OLD_ENTROPY_KEY,
    ERCGRPOConfig,
    ERCGRPOTrainer,
    check_trl_version,
)
from erc_gym.llm.model import make_tiny_lm
from erc_gym.losses import (
    ERCConfig,
    LossConfig,
    clip_flags,
    entropy_ratio,
    erc_keep_mask,
    policy_loss,
)

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["12+3=", "4*5=", "7-2=", "9+9=", "1+1=", "8*3=", "6-4=", "5+7="]


def digit_share(completions: list[str], **kwargs: Any) -> list[float]:
    """A reward with informative groups even for an untrained model: the share of digits."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    tok = CharTokenizer.build()
    tok.padding_side = "left"
    return tok


def make_args(cls: type, tmp_path: Path, **overrides: Any) -> Any:
    base: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 6,
        "max_steps": 3,
        "bf16": False,  # TRL defaults to bf16 even on CPU
        "logging_steps": 1,
        "report_to": "none",
        "num_iterations": 2,
        "learning_rate": 3e-2,
        "seed": 0,
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    return cls(**{**base, **overrides})


def make_trainer(cls: type, tokenizer: Any, tmp_path: Path, **overrides: Any) -> Any:
    config_cls = ERCGRPOConfig if cls is ERCGRPOTrainer else GRPOConfig
    args = make_args(config_cls, tmp_path, **overrides)
    dataset = Dataset.from_dict({"prompt": PROMPTS * 4})
    return cls(
        model=make_tiny_lm(len(tokenizer)),
        reward_funcs=digit_share,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def step_logs(trainer: Any) -> list[dict[str, Any]]:
    return [log for log in trainer.state.log_history if "loss" in log]


# -- equivalence with GRPOTrainer -------------------------------------------------------------


@pytest.mark.parametrize(
    ("entropy", "entropy_coef"), [("trl", 0.0), ("exact", 0.0), ("exact", 0.05)]
)
def test_open_band_matches_grpo_trainer(tokenizer, tmp_path, entropy, entropy_coef):
    """Band (0, inf) is ERC that never clips: the same run as GRPOTrainer, bit for bit.

    With ``entropy_coef != 0`` this also shows that TRL's entropy bonus keeps its gradient (the
    exact entropy feeds only the ratio).
    """
    extra = {"entropy_coef": entropy_coef}
    base = make_trainer(GRPOTrainer, tokenizer, tmp_path / "a", **extra)
    base.train()
    erc = make_trainer(
        ERCGRPOTrainer,
        tokenizer,
        tmp_path / "b",
        erc_low=0.0,
        erc_high=math.inf,
        erc_entropy=entropy,
        **extra,
    )
    erc.train()
    a, b = step_logs(base), step_logs(erc)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == y["loss"]
        assert x["grad_norm"] == y["grad_norm"]
    for p, q in zip(base.model.parameters(), erc.model.parameters(), strict=True):
        if entropy == "trl":
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert any(y["erc_clip_fraction"] == 0.0 for y in b)


# -- ERC acts off-policy only -----------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    [
        {"num_iterations": 2},
        {"num_iterations": 1, "steps_per_generation": 2, "gradient_accumulation_steps": 1},
    ],
    ids=["num_iterations=2", "steps_per_generation>ga"],
)
def test_erc_clips_only_off_policy(tokenizer, tmp_path, schedule):
    # a narrow band and a large step, so that one update of a random tiny model moves ratios out
    trainer = make_trainer(
        ERCGRPOTrainer,
        tokenizer,
        tmp_path,
        erc_low=0.98,
        erc_high=1.02,
        max_steps=2,
        learning_rate=0.1,
        **schedule,
    )
    trainer.train()
    first, second = step_logs(trainer)
    assert first["erc_clip_fraction"] == 0.0  # on-policy: rho == 1 exactly
    assert first["entropy_ratio_min"] == first["entropy_ratio_max"] == 1.0
    assert second["erc_clip_fraction"] > 0.0
    assert second["erc_clip_fraction"] == pytest.approx(
        second["erc_clip_fraction_low"] + second["erc_clip_fraction_high"]
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"erc_low": 0.95, "erc_high": 1.05},
        {},  # ERC off, off-policy schedule
        {"num_iterations": 1},  # ERC off, on-policy: TRL skips the old pass
    ],
    ids=["erc-on", "erc-off", "erc-off-on-policy"],
)
def test_erc_metric_keys_in_log_history(tokenizer, tmp_path, overrides):
    trainer = make_trainer(ERCGRPOTrainer, tokenizer, tmp_path, max_steps=2, **overrides)
    trainer.train()
    logs = step_logs(trainer)
    for log in logs:
        assert set(ERC_METRIC_KEYS) <= set(log)
    if "erc_low" not in overrides:
        assert all(log["erc_clip_fraction"] == 0.0 for log in logs)


# -- per-token gradients against erc_gym.losses.policy_loss -----------------------------------


def completion_logits(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Full logits of the completion positions (the reference the fused head avoids)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    keep = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
    return logits[:, -keep - 1 : -1]


AUTHORS = {
    # docs/method.md section 3 in TRL terms: dual-clip c = 10 is TRL's `delta`, no KL, token-mean.
    "dapo": (
        {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "delta": 10.0, "beta": 0.0},
        LossConfig.dapo,
    ),
    "gppo": (
        {
            "loss_type": "dapo",
            "epsilon": 0.2,
            "epsilon_high": 0.2,
            "delta": 10.0,
            "beta": 0.0,
            "erc_clip": "gppo",
        },
        LossConfig.gppo,
    ),
}


#: TRL loss type -> the equal erc_gym aggregation (one micro-batch per optimizer step).
AGGREGATION = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean"}


@pytest.mark.parametrize(
    ("recipe", "loss_type"),
    [("dapo", "dapo"), ("gppo", "dapo"), ("gppo", "grpo"), ("gppo", "bnpo")],
)
def test_authors_recipe_matches_policy_loss(tokenizer, tmp_path, monkeypatch, recipe, loss_type):
    """DAPO+ERC / GPPO+ERC in TRL config: loss value and per-token gradient of policy_loss.

    GPPO is also run with TRL's other aggregations, whose per-token weights it must respect.
    """
    settings, make_loss = AUTHORS[recipe]
    settings = {**settings, "loss_type": loss_type}
    temperature = 0.7
    trainer = make_trainer(
        ERCGRPOTrainer,
        tokenizer,
        tmp_path,
        erc_low=0.95,
        erc_high=1.05,
        temperature=temperature,
        num_iterations=2,
        per_device_train_batch_size=8,
        num_generations=8,
        **settings,
    )
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()
    # peaked, varied distributions, like a trained LM's (a random init is nearly uniform)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    mask = inputs["completion_mask"].bool()
    ids = inputs["completion_ids"]

    # H_old: completion tokens, sampling temperature, erc_gym's entropy of the full logits
    old_logits = completion_logits(model, inputs)
    old_lp, old_h = logprob_and_entropy(old_logits, ids, temperature=temperature)
    torch.testing.assert_close(inputs[OLD_ENTROPY_KEY][mask], old_h[mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inputs["old_per_token_logps"][mask], old_lp[mask], atol=1e-5, rtol=0)

    # move the policy off the old one, as later mini-batches do
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * (p.std() if p.numel() > 1 else 1))

    captured: dict[str, torch.Tensor] = {}
    parent = GRPOTrainer._get_per_token_logps_and_entropies

    def spy(self, *args, **kwargs):
        out = parent(self, *args, **kwargs)
        if torch.is_grad_enabled():
            out[0].retain_grad()
            captured["logps"] = out[0]
        return out

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", spy)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    logps = captured["logps"]

    _, new_h = logprob_and_entropy(completion_logits(model, inputs), ids, temperature=temperature)
    leaf = logps.detach().clone().requires_grad_()
    config = dataclasses.replace(
        make_loss(erc=ERCConfig(0.95, 1.05)), aggregation=AGGREGATION[loss_type]
    )
    ref = policy_loss(
        leaf,
        inputs["old_per_token_logps"],
        inputs["advantages"],
        entropy=new_h,
        old_entropy=inputs[OLD_ENTROPY_KEY],
        mask=mask,
        config=config,
    )
    ref.loss.backward()

    # TRL's "dapo" divides by the generation batch's token count / steps_per_generation;
    # policy_loss's token-mean by this micro-batch's token count.
    normalizer = count = 1.0
    if loss_type == "dapo":
        normalizer = float(inputs["num_items_in_batch"]) / trainer.args.steps_per_generation
        count = float(mask.sum())
    assert float(loss) * normalizer == pytest.approx(float(ref.loss) * count, rel=1e-5, abs=1e-6)
    assert leaf.grad is not None and logps.grad is not None
    torch.testing.assert_close(logps.grad * normalizer, leaf.grad * count, rtol=0, atol=1e-6)

    # the comparison covers informative advantages, tokens ERC clipped, and tokens PPO clipped
    assert bool((inputs["advantages"] != 0).any())
    assert ref.erc_keep is not None
    assert 0 < int((~ref.erc_keep & mask).sum()) < int(mask.sum())
    ratio = torch.exp(logps.detach() - inputs["old_per_token_logps"])
    adv = inputs["advantages"].unsqueeze(1).expand_as(ratio)
    flags = clip_flags(ratio, adv, eps_low=config.eps_low, eps_high=config.eps_high)
    clipped_kept = (flags["clip_low"] | flags["clip_high"]) & ref.erc_keep
    assert int(clipped_kept.sum()) > 0
    if recipe == "gppo":  # GPPO: clipped, kept tokens still carry gradient
        assert bool((logps.grad[clipped_kept] != 0).all())
    else:
        assert bool((logps.grad[clipped_kept] == 0).all())


def test_erc_keeps_each_loss_types_aggregation(tokenizer, tmp_path, monkeypatch):
    """For every supported loss type: same loss value, gradient = TRL's gradient x keep."""
    trainer = make_trainer(
        ERCGRPOTrainer,
        tokenizer,
        tmp_path,
        erc_low=0.95,
        erc_high=1.05,
        per_device_train_batch_size=8,
        num_generations=8,
    )
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * (p.std() if p.numel() > 1 else 1))
    ids, mask = inputs["completion_ids"], inputs["completion_mask"].bool()
    _, new_h = logprob_and_entropy(completion_logits(model, inputs), ids, temperature=1.0)
    rho = entropy_ratio(new_h, inputs[OLD_ENTROPY_KEY])
    keep = erc_keep_mask(rho, mask, ERCConfig(0.95, 1.05))
    assert 0 < int((~keep & mask).sum()) < int(mask.sum())

    captured: dict[str, torch.Tensor] = {}
    parent = GRPOTrainer._get_per_token_logps_and_entropies

    def spy(self, *args, **kwargs):
        out = parent(self, *args, **kwargs)
        if torch.is_grad_enabled():
            out[0].retain_grad()
            captured["logps"] = out[0]
        return out

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", spy)
    for loss_type in ERC_LOSS_TYPES:
        trainer.loss_type = loss_type
        results = []
        for band in (ERCConfig(0.0, math.inf), ERCConfig(0.95, 1.05)):
            trainer._erc = band
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
            results.append((loss.detach(), captured["logps"].grad))
            model.zero_grad()
        (loss_all, grad_all), (loss_erc, grad_erc) = results
        assert torch.equal(loss_all, loss_erc), loss_type
        assert bool((grad_all[keep & mask] != 0).any()), loss_type
        torch.testing.assert_close(grad_erc, torch.where(keep, grad_all, 0.0), rtol=0, atol=0)


# -- exact entropy ----------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "softcap"), [(2.0, None), (2.0, 30.0)])
def test_exact_entropy_against_float64(scale, softcap):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 16, generator=gen)
    weight = torch.randn(512, 16, generator=gen) * 3
    bias = torch.randn(512, generator=gen) + 80.0  # large common offset
    got = erc_trl._exact_entropy(
        hidden, weight, bias, temperature=0.5, logit_scale=scale, softcap=softcap
    )
    z = torch.nn.functional.linear(hidden.double(), weight.double(), bias.double()) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / 0.5
    want = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    # fp32 logits of magnitude ~400 carry ~3e-5 rounding: that, not the entropy, bounds rtol
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-9)
    if softcap is None:  # the comparison covers near-deterministic rows
        assert float(want.min()) < 1e-3


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, (1.0, None)),
        ({"logit_scale": 0.5}, (0.5, None)),
        ({"lm_head_multiplier": 3.0}, (3.0, None)),
        ({"logits_scaling": 4.0}, (0.25, None)),
        ({"logits_scaling": 4.0, "model_type": "hyperclovax"}, (4.0, None)),
        ({"final_logit_softcapping": 30.0}, (1.0, 30.0)),
    ],
)
def test_head_transform_read_like_trl(fields, expected):
    from types import SimpleNamespace

    assert erc_trl._head_transform(SimpleNamespace(**fields)) == expected


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("low", "high"),
    [(1.0, 1.05), (0.95, 1.0), (-0.1, 1.05), (0.95, None), (float("nan"), 1.05)],
)
def test_bad_band(tmp_path, low, high):
    with pytest.raises(ValueError, match="erc_low"):
        make_args(ERCGRPOConfig, tmp_path, erc_low=low, erc_high=high)


@pytest.mark.parametrize("setting", ["erc_clip", "erc_entropy"])
def test_bad_erc_field_refused_by_config(tmp_path, setting):
    with pytest.raises(ValueError, match=setting):
        make_args(ERCGRPOConfig, tmp_path, erc_low=0.95, erc_high=1.05, **{setting: "other"})


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"loss_type": "luspo"}, "loss_type"),
        ({"loss_type": "vespo"}, "loss_type"),
        ({"loss_type": "cispo", "erc_clip": "gppo"}, "loss_type"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"beta": 0.04}, "beta"),
        ({"num_iterations": 1}, "num_iterations >= 2 or steps_per_generation"),
    ],
)
def test_unsupported_settings_refused(tokenizer, tmp_path, overrides, setting):
    """Refused by check_erc_compatible, which the trainer calls after TRL's own checks."""
    args = make_args(ERCGRPOConfig, tmp_path, erc_low=0.95, erc_high=1.05, **overrides)
    with pytest.raises(ValueError, match=setting):
        args.check_erc_compatible()
    if "beta" in overrides:
        return  # with beta != 0 TRL loads a reference model by its hub id first (offline here)
    with pytest.raises(ValueError, match=setting):
        ERCGRPOTrainer(
            model=make_tiny_lm(len(tokenizer)),
            reward_funcs=digit_share,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=tokenizer,
        )


def test_trl_checks_come_before_erc_checks(tokenizer, tmp_path):
    """An on-policy ERC config with a mistake TRL rejects: the user sees TRL's message first."""
    args = make_args(
        ERCGRPOConfig,
        tmp_path,
        erc_low=0.95,
        erc_high=1.05,
        num_iterations=1,
        reward_weights=[1, 2],
    )
    kwargs = {
        "model": make_tiny_lm(len(tokenizer)),
        "reward_funcs": digit_share,
        "train_dataset": Dataset.from_dict({"prompt": PROMPTS}),
        "processing_class": tokenizer,
    }
    with pytest.raises(ValueError, match="reward weights") as stock:
        GRPOTrainer(args=make_args(GRPOConfig, tmp_path, reward_weights=[1, 2]), **kwargs)
    with pytest.raises(ValueError, match="reward weights") as erc:
        ERCGRPOTrainer(args=args, **kwargs)
    assert str(erc.value) == str(stock.value)


def test_args_none_builds_erc_off_config(tokenizer, tmp_path, monkeypatch):
    """`ERCGRPOTrainer(model, reward_funcs, train_dataset=...)` works like GRPOTrainer's."""
    import transformers.training_args

    monkeypatch.chdir(tmp_path)  # TRL's default output_dir is relative
    # TRL's default config asks for bf16, which transformers refuses without a GPU
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    kwargs = {
        "train_dataset": Dataset.from_dict({"prompt": PROMPTS}),
        "processing_class": tokenizer,
    }
    stock = GRPOTrainer(make_tiny_lm(len(tokenizer)), digit_share, **kwargs)
    erc = ERCGRPOTrainer(make_tiny_lm(len(tokenizer)), digit_share, **kwargs)
    assert type(erc.args) is ERCGRPOConfig
    assert erc.args.erc_band is None and erc.args.erc_clip == "ppo"
    assert erc.args.erc_entropy == "exact"
    # every TRL field as GRPOTrainer chose it (the fields that hold the run's start time aside)
    mine, theirs = erc.args.to_dict(), stock.args.to_dict()
    assert all(key.startswith("erc_") for key in set(mine) - set(theirs))
    mine = {k: v for k, v in mine.items() if k in theirs}
    volatile = {"logging_dir", "run_name"}
    assert {k: v for k, v in mine.items() if k not in volatile} == {
        k: v for k, v in theirs.items() if k not in volatile
    }
    assert Path(erc.args.output_dir).name == Path(stock.args.output_dir).name


def test_missing_old_pass_raises(tokenizer, tmp_path):
    trainer = make_trainer(ERCGRPOTrainer, tokenizer, tmp_path, erc_low=0.95, erc_high=1.05)
    trainer.num_iterations = 1  # TRL's condition for the old pass now says "skip"
    trainer.model.train()
    with pytest.raises(RuntimeError, match="old-log-prob pass"):
        trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_needs_erc_config(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="ERCGRPOConfig"):
        ERCGRPOTrainer(
            model=make_tiny_lm(len(tokenizer)),
            reward_funcs=digit_share,
            args=make_args(GRPOConfig, tmp_path),
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("version", ["1.15.2", "1.17.0", "0.27.0"])
def test_trl_version_outside_tested_range(version):
    with pytest.raises(RuntimeError, match=r"trl>=1\.16,<1\.17"):
        check_trl_version(version)
    check_trl_version("1.16.0")


# -- the example script -----------------------------------------------------------------------


def load_example() -> Any:
    import importlib.util

    path = REPO / "examples" / "trl" / "train_erc_grpo.py"
    spec = importlib.util.spec_from_file_location("train_erc_grpo", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_script_runs(tmp_path):
    example = load_example()
    out = tmp_path / "run"
    argv = ["--max-steps", "2", "--num-problems", "16", "--cpu", "--output-dir", str(out)]
    assert example.main([*argv, "--lr", "0.05"]) == 0
    history = json.loads((out / "log_history.json").read_text())
    steps = [log for log in history if "loss" in log]
    assert len(steps) == 2 and all("erc_clip_fraction" in log for log in steps)


def test_example_script_bad_band_exits_2(capsys):
    assert load_example().main(["--erc-low", "1.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "erc_low=1.2" in err[0]


# -- two processes --------------------------------------------------------------------------


def test_two_process_metrics_reduced(tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo): ERC metrics are global means."""
    launcher = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "ERC_TRL_DUMP": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [
        str(launcher),
        "launch",
        "--multi_gpu",  # the multi-process launcher; the worker sets use_cpu=True (gloo)
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "tests" / "integrations" / "trl_ddp_worker.py"),
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # each rank saw different tokens, yet logged the same, globally reduced, values
    for key in ("erc_clip_fraction", "entropy_old", "entropy_ratio_mean", "entropy_ratio_max"):
        assert ranks[0]["logged"][key] == ranks[1]["logged"][key]
    local = [r["sums"] for r in ranks]
    assert local[0] != local[1]
    for step in range(len(ranks[0]["logged"]["entropy_old"])):
        n = local[0][step][0] + local[1][step][0]
        clipped = sum(loc[step][1] + loc[step][2] for loc in local)
        h_old = local[0][step][3] + local[1][step][3]
        assert ranks[0]["logged"]["erc_clip_fraction"][step] == pytest.approx(clipped / n)
        assert ranks[0]["logged"]["entropy_old"][step] == pytest.approx(h_old / n)
    assert max(ranks[0]["logged"]["erc_clip_fraction"]) > 0


# -- sharded engines: the exact entropy reads the whole LM head -------------------------------


def run_sharded_worker(tmp_path: Path, mode: str, processes: int) -> list[dict[str, Any]]:
    """Run ``trl_sharded_worker.py`` (torchrun on loopback for several processes)."""
    out = tmp_path / mode
    out.mkdir()
    worker = str(REPO / "tests" / "integrations" / "trl_sharded_worker.py")
    env = {**os.environ, "ERC_TRL_DUMP": str(out), "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, worker, str(out / "trainer"), mode]
    else:
        cmd = [
            str(Path(sys.executable).with_name("torchrun")),
            "--standalone",  # rendezvous on a free loopback port
            "--nproc_per_node",
            str(processes),
            worker,
            str(out / "trainer"),
            mode,
        ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory) -> dict[str, Any]:
    return run_sharded_worker(tmp_path_factory.mktemp("single"), "single", 1)[0]


@pytest.mark.parametrize("mode", ["fsdp2-root", "fsdp2-head", "fsdp1-root", "zero3"])
def test_sharded_exact_entropy_equals_one_process(tmp_path, single_process_reference, mode):
    """Two CPU processes (gloo) with ERC on: H_old and H as one process, metrics reduced.

    ``fsdp2-root``: the head in FSDP2's root unit (whole during the forward, read in place);
    ``fsdp2-head``: the head in its own unit (a ``DTensor`` shard, gathered); ``fsdp1-root``: FSDP
    (v1), the head in the root unit (read in place); ``zero3``: DeepSpeed ZeRO-3 (parameters
    partitioned, the head gathered with ``GatheredParameters`` when not already fetched).
    """
    if mode == "zero3":
        pytest.importorskip("deepspeed")
    ref = single_process_reference
    ranks = run_sharded_worker(tmp_path, mode, 2)
    for rank in ranks:
        assert rank["sharded_parameters"] == rank["parameters"] == ref["parameters"]
        assert all(
            head["gathered_shape"] == ref["heads"][0]["gathered_shape"] for head in rank["heads"]
        )
    if mode == "fsdp2-head":  # the hook found a shard and gathered it
        full = ref["heads"][0]["local_numel"]
        assert all(
            h["type"] == "DTensor" and h["local_numel"] == full // 2 for h in ranks[0]["heads"]
        )
    if mode == "zero3":
        assert all(h["zero3_status"].startswith("ZeroParamStatus") for h in ranks[0]["heads"])
    # each process scored its own rows: together they are the one-process batch
    assert [rank["rows"] for rank in ranks] == [[0, 4], [4, 8]]
    diff = compare_to_reference(ranks, ref)
    assert diff["h_old"] <= 1e-6 and diff["h"] <= 1e-6, diff
    # ERC metrics: the same on both ranks, equal to the one-process value over the whole batch,
    # although each rank's local sums differ
    assert ranks[0]["sums"] != ranks[1]["sums"]
    assert 0.0 < ref["logged"]["erc_clip_fraction"] < 1.0
    assert diff["ranks_disagree"] == 0.0 and diff["metrics"] <= 1e-6, diff


def test_fsdp1_head_in_its_own_unit_is_refused(tmp_path):
    """FSDP (v1) cannot gather inside a forward: a sharded head stops the run, engine named."""
    ranks = run_sharded_worker(tmp_path, "fsdp1-head", 2)
    for rank in ranks:
        assert "sharded or empty under FSDP (v1): weight (2624,)" in rank["error"]
        assert "erc_entropy='trl'" in rank["error"]


def fake_zero3(monkeypatch: pytest.MonkeyPatch, head: torch.nn.Module, *, gather: bool) -> dict:
    """Partition ``head.weight`` like ZeRO-3 (numel 0) behind a stand-in DeepSpeed module.

    ``GatheredParameters`` restores the full data for the duration of the context (and counts
    its uses); with ``gather=False`` it does nothing, like a caller that forgot to gather.
    """
    import importlib.machinery
    import types

    weight = head.weight
    full = weight.data.clone()
    weight.data = torch.empty(0)
    status = types.SimpleNamespace(AVAILABLE="AVAILABLE", NOT_AVAILABLE="NOT_AVAILABLE")
    weight.ds_id, weight.ds_status, weight.ds_shape = 0, status.NOT_AVAILABLE, full.shape
    calls = {"gathered": 0}

    class GatheredParameters:
        def __init__(self, params: list[torch.nn.Parameter]) -> None:
            assert all(p is weight for p in params)

        def __enter__(self) -> None:
            calls["gathered"] += 1
            if gather:
                weight.data, weight.ds_status = full, status.AVAILABLE

        def __exit__(self, *exc: Any) -> None:
            weight.data, weight.ds_status = torch.empty(0), status.NOT_AVAILABLE

    deepspeed = types.ModuleType("deepspeed")
    deepspeed.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)  # type: ignore[attr-defined]
    deepspeed.DeepSpeedEngine = type("DeepSpeedEngine", (), {})  # type: ignore[attr-defined]
    partition = types.ModuleType("deepspeed.runtime.zero.partition_parameters")
    partition.ZeroParamStatus = status  # type: ignore[attr-defined]
    for name, module in {
        "deepspeed": deepspeed,
        "deepspeed.runtime": types.ModuleType("deepspeed.runtime"),
        "deepspeed.runtime.zero": types.ModuleType("deepspeed.runtime.zero"),
        "deepspeed.runtime.zero.partition_parameters": partition,
    }.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    import transformers.integrations.deepspeed as hf_deepspeed

    monkeypatch.setattr(hf_deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
    return calls


def old_pass_entropy(trainer: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Run the trainer's old-log-prob pass on ``inputs`` and return its exact H_old."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    trainer._erc_scoring, trainer._erc_old = True, None
    try:
        with torch.no_grad():
            trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, attention, inputs["completion_ids"].shape[1]
            )
    finally:
        trainer._erc_scoring = False
    assert trainer._erc_old is not None
    return trainer._erc_old[1]


def untied_trainer(tokenizer: Any, tmp_path: Path) -> Any:
    args = make_args(ERCGRPOConfig, tmp_path, erc_low=0.95, erc_high=1.05)
    return ERCGRPOTrainer(
        model=make_tiny_lm(len(tokenizer), tie_word_embeddings=False),
        reward_funcs=digit_share,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        processing_class=tokenizer,
    )


def test_exact_entropy_gathers_a_zero3_partitioned_head(tokenizer, tmp_path, monkeypatch):
    """A ZeRO-3-partitioned head (numel 0) is gathered and gives the unsharded H_old exactly."""
    trainer = untied_trainer(tokenizer, tmp_path)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    head = trainer.model.get_output_embeddings()
    calls = fake_zero3(monkeypatch, head, gather=True)
    h_old = old_pass_entropy(trainer, inputs)
    # ours and TRL's own fused projection each gathered once
    assert calls["gathered"] == 2
    assert head.weight.numel() == 0  # partitioned again afterwards
    assert torch.equal(h_old, inputs[OLD_ENTROPY_KEY])


def test_exact_entropy_refuses_an_empty_head(tokenizer, tmp_path, monkeypatch):
    """Nothing gathers the head: a RuntimeError naming the engine, not entropies of nothing."""
    trainer = untied_trainer(tokenizer, tmp_path)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    fake_zero3(monkeypatch, trainer.model.get_output_embeddings(), gather=False)
    with pytest.raises(RuntimeError, match=r"sharded or empty under DeepSpeed ZeRO.*\(0,\)"):
        old_pass_entropy(trainer, inputs)


@pytest.mark.parametrize(
    ("weight", "bias", "problem"),
    [
        (torch.zeros(0), None, "empty"),
        (torch.zeros(41, 64), None, "a row shard"),
        (torch.zeros(82, 32), None, "a column shard"),
        (torch.zeros(82 * 64), None, "flattened (FSDP v1's flat parameter)"),
        (torch.zeros(82, 64), torch.zeros(41), "a bias shard"),
    ],
)
def test_head_shape_check(weight, bias, problem):
    with pytest.raises(RuntimeError, match="FSDP \\(v1\\)"):
        erc_trl._check_head(weight, bias, vocab=82, hidden_size=64, engine="FSDP (v1)")
    erc_trl._check_head(torch.zeros(82, 64), torch.zeros(82), vocab=82, hidden_size=64, engine="x")


# -- tools/trl_own_tests.py: the pieces that decide what counts ---------------------------------


def load_own_tests() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "trl_own_tests", REPO / "tools" / "trl_own_tests.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_tests_classifies_differences():
    own = load_own_tests()
    base = {
        "a": ("passed", ""),
        "b": ("passed", ""),
        "c": ("failed", "old copy"),
        "d": ("passed", ""),
    }
    mode = {
        "a": ("failed", "ValueError: ERC needs beta=0.0, got beta=0.04: ..."),
        "b": ("failed", "AssertionError: Parameter x has not changed."),
        "c": ("failed", "old copy"),  # fails in the baseline too: not a difference
        "d": ("passed", ""),
    }
    diff = own.compare(base, mode)
    assert set(diff["refused"]) == {"a"} and set(diff["other"]) == {"b"}


def test_own_tests_standins():
    own = load_own_tests()
    assert own._standin_spec("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5") == (
        "qwen2",
        "ForCausalLM",
    )
    assert own._standin_spec("trl-internal-testing/tiny-Qwen3MoeForCausalLM") == (
        "qwen3_moe",
        "ForCausalLM",
    )
    assert own._standin_spec("trl-internal-testing/tiny-LlavaForConditionalGeneration") is None
    splits = own.zen("conversational_prompt_only")
    assert (len(splits["train"]), len(splits["test"])) == (17, 2)  # the Zen's 19 lines
    assert splits["train"][0]["prompt"][0]["role"] == "user"
    with pytest.raises(ValueError, match="no offline stand-in"):
        own.zen("standard_preference")


def test_own_tests_without_a_copy_exits_3(tmp_path, monkeypatch, capsys):
    """No --source, an empty cache, no tests in the sdist, no clone: one line, exit 3."""
    own = load_own_tests()
    monkeypatch.setattr(own, "find_tests", lambda version, cache, source: (None, ["cache: empty"]))
    assert own.main(["--cache", str(tmp_path), "--dest", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not available here (cache: empty)" in err[0]


# -- the rival methods against TRL 1.16's own code --------------------------------------------


@pytest.mark.parametrize("quantile", [0.0, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("seed", range(6))
def test_high_entropy_gate_equals_trls_mask(quantile, seed):
    """erc_gym's HighEntropy gate keeps exactly the tokens of GRPOTrainer.get_high_entropy_mask
    (one process: TRL's gather is the identity), ties and padding included, and zeroes the
    others' per-token loss as TRL does (``per_token_loss * entropy_mask``)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from erc_gym.losses import HighEntropy, high_entropy_keep

    g = torch.Generator().manual_seed(seed)
    entropies = torch.rand(5, 13, generator=g) * 3
    entropies[1, :6] = entropies[0, 3]  # ties at the threshold's neighbourhood
    entropies[2] = torch.round(entropies[2])  # many equal values
    mask = (torch.rand(5, 13, generator=g) > 0.25).long()
    mask[4] = 0  # a fully padded row
    stub = SimpleNamespace(accelerator=Accelerator(cpu=True))
    trl_mask = GRPOTrainer.get_high_entropy_mask(stub, entropies, mask, 1 - quantile)
    ours = high_entropy_keep(entropies, mask.bool(), quantile)
    assert torch.equal(ours, trl_mask)
    # in policy_loss: the same tokens keep a loss and a gradient, the others get value 0
    lp = (-torch.rand(5, 13, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = lp.detach() + 0.1
    adv = torch.randn(5, 1, generator=g, dtype=torch.float64)
    cfg = LossConfig(gate=HighEntropy(quantile))
    out = policy_loss(lp, old, adv, entropy=entropies, old_entropy=entropies, mask=mask, config=cfg)
    assert torch.equal(out.token_loss != 0, (out.token_loss != 0) & trl_mask)
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert torch.all(grad[mask.bool() & ~trl_mask] == 0)


def test_high_entropy_gate_on_an_empty_batch_keeps_nothing_like_trl():
    from types import SimpleNamespace

    from accelerate import Accelerator

    from erc_gym.losses import high_entropy_keep

    entropies = torch.rand(2, 4)
    mask = torch.zeros(2, 4, dtype=torch.long)
    stub = SimpleNamespace(accelerator=Accelerator(cpu=True))
    trl_mask = GRPOTrainer.get_high_entropy_mask(stub, entropies, mask, 0.8)
    assert torch.equal(high_entropy_keep(entropies, mask.bool(), 0.2), trl_mask)


def test_adaptive_entropy_coefficient_equals_trls(tokenizer, tmp_path):
    """GRPOTrainer(use_adaptive_entropy=True) and AdaptiveEntropyCoef, fed the same per-step
    entropies, hold the same coefficient after every optimiser step (up, down and clamped)."""
    from transformers import TrainerCallback

    from erc_gym.adaptive_coef import AdaptiveEntropyCoef

    settings = {
        "entropy_coef": 0.1,
        "entropy_target": 4.3,  # the tiny model starts near 4.4 nats and falls below
        "entropy_coef_delta": 0.05,
        "entropy_coef_min": 0.0,
        "entropy_coef_max": 0.15,
    }
    trainer = make_trainer(
        GRPOTrainer, tokenizer, tmp_path, use_adaptive_entropy=True, max_steps=8, **settings
    )
    seen: list[tuple[float, float, float]] = []  # (coef applied, coef after, step entropy)
    applied = [0.0]

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            # TRL's apply rule, read from its own state before the step
            last = trainer._last_world_entropy
            applied[0] = trainer.entropy_coef if last <= args.entropy_target else 0.0

        def on_step_end(self, args, state, control, **kwargs):
            seen.append((applied[0], trainer.entropy_coef, trainer._last_world_entropy))

    trainer.add_callback(Record())
    trainer.train()
    assert len(seen) == 8
    ours = AdaptiveEntropyCoef(target=4.3, coef=0.1, delta=0.05, coef_min=0.0, coef_max=0.15)
    for applied_coef, coef_after, entropy in seen:
        assert ours.applied_coef == applied_coef
        ours.update(entropy)
        assert ours.coef == coef_after
    coefs = [c for _, c, _ in seen]
    assert 0.0 in coefs and 0.15 in coefs  # the rule went down to the floor and up to the cap
    assert any(a > 0 for a, _, _ in seen)  # and the bonus was applied on some steps


# -- the methods TRL lacks, through the adapter -----------------------------------------------


def test_matched_random_control_stops_ercs_count_at_random(tokenizer, tmp_path, monkeypatch):
    """erc_random_matched: in every micro-batch exactly the tokens ERC would clip are counted,
    and that many valid tokens, drawn at random, get no gradient instead of ERC's."""
    calls: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    real = erc_trl.random_mask

    def spy(valid, count, shape, generator):
        drawn = real(valid, count, shape, generator)
        calls.append((valid.clone(), int(count), drawn.clone()))
        return drawn

    monkeypatch.setattr(erc_trl, "random_mask", spy)
    trainer = make_trainer(
        ERCGRPOTrainer,
        tokenizer,
        tmp_path,
        erc_low=0.999,
        erc_high=1.001,
        erc_random_matched=True,
        learning_rate=0.1,
    )
    trainer.train()
    assert calls
    for valid, count, drawn in calls:
        assert int(drawn.sum()) == count and not bool((drawn & ~valid).any())
    assert any(count > 0 for _, count, _ in calls)  # the band would have clipped off-policy
    logs = [log for log in trainer.state.log_history if "random_mask_fraction" in log]
    assert logs and all(log["random_mask_fraction"] == log["erc_clip_fraction"] for log in logs)


def test_matched_random_control_needs_the_band(tmp_path):
    with pytest.raises(ValueError, match="erc_random_matched=True imitates an ERC band"):
        make_args(ERCGRPOConfig, tmp_path, erc_random_matched=True)


def test_erc_combines_with_trls_high_entropy_gate_and_adaptive_entropy(tokenizer, tmp_path):
    """ERC beside TRL's own rivals: top_entropy_quantile (the forking tokens) and the adaptive
    entropy coefficient train together, and both sets of metrics are logged."""
    rivals = {"top_entropy_quantile": 0.3, "use_adaptive_entropy": True, "entropy_target": 5.0}
    trainer = make_trainer(
        ERCGRPOTrainer, tokenizer, tmp_path, erc_low=0.95, erc_high=1.05, **rivals
    )
    trainer.train()
    logs = step_logs(trainer)
    assert all("erc_clip_fraction" in log and "entropy_coef" in log for log in logs)
    assert logs[-1]["entropy_coef"] > 0  # entropy below the target: TRL raised the coefficient

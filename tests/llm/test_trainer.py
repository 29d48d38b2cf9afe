"""ERCTrainer on a tiny model: updates, ERC gradients, scoring passes, metrics, resume, errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import erc_gym.llm.trainer as trainer_module
from erc_gym.jsonl import read_jsonl
from erc_gym.llm import METRIC_KEYS, ERCTrainer, TrainerConfig, make_tiny_lm
from erc_gym.llm.cli import build_parser, config_from_args, field_docs
from erc_gym.losses import clip_flags

LOSS_KEYS = (
    "pg_loss",
    "clip_fraction_low",
    "clip_fraction_high",
    "dual_clip_fraction",
    "approx_kl",
    "ppo_kl",
    "erc_clip_fraction_low",
    "erc_clip_fraction_high",
    "entropy_ratio_mean",
    "entropy_ratio_min",
    "entropy_ratio_max",
    "erc_clipped_entropy_old_mean",
    "erc_kept_entropy_old_mean",
)
TIME_KEYS = {"tokens_per_second", "time_generate", "time_score", "time_train"}


def odd_length(completion: str, answer: str) -> float:
    """A verifier with informative groups even for an untrained model."""
    return float(len(completion) % 2)


def small_config(tmp_path: Path, **overrides) -> TrainerConfig:
    base = {
        "sft_steps": 0,
        "steps": 2,
        "group_size": 4,
        "prompts_per_step": 4,
        "mini_batch_prompts": 2,
        "max_new_tokens": 3,
        "num_train": 64,
        "num_eval": 4,
        "eval_every": 1,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "filter_groups": False,
        "erc_low": 0.95,
        "erc_high": 1.05,
        "progress": False,
        "run_dir": str(tmp_path),
        "device": "cpu",
    }
    return TrainerConfig(**(base | overrides))


def test_one_step_changes_every_parameter(tmp_path):
    trainer = ERCTrainer(small_config(tmp_path), verifier=odd_length)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    line = trainer.train_step()
    assert line["batch_fill"] == 1.0
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged


def test_out_of_band_tokens_get_zero_gradient(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, erc_low=0.999, erc_high=1.001, lr=5e-2, prompts_per_step=8)
    trainer = ERCTrainer(cfg, verifier=odd_length)
    seen = []
    real = trainer_module.policy_loss

    def spy(log_prob, old_log_prob, advantages, **kw):
        out = real(log_prob, old_log_prob, advantages, **kw)
        (grad,) = torch.autograd.grad(out.loss, log_prob, retain_graph=True)
        # Tokens that must carry gradient: kept by ERC, non-zero advantage, no PPO bound active.
        ratio = torch.exp(log_prob.detach() - old_log_prob)
        adv = (advantages[:, None] if advantages.dim() == 1 else advantages).expand_as(ratio)
        flags = clip_flags(
            ratio,
            adv,
            eps_low=cfg_loss.eps_low,
            eps_high=cfg_loss.eps_high,
            dual_clip_c=cfg_loss.dual_clip_c,
        )
        ppo_clipped = flags["clip_low"] | flags["clip_high"] | flags["dual_clip"]
        live = out.erc_keep & kw["mask"] & (adv != 0) & ~ppo_clipped
        seen.append((grad, out.erc_keep, kw["mask"], live))
        return out

    cfg_loss = trainer.loss_config
    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    trainer.train_step()
    clipped_total = 0
    live_total = 0
    for grad, keep, mask, live in seen:
        clipped = mask & ~keep
        clipped_total += int(clipped.sum())
        live_total += int(live.sum())
        assert torch.all(grad[clipped] == 0)
        assert torch.all(grad[~mask] == 0)
        assert torch.all(grad[live] != 0)
    assert live_total > 0  # some kept tokens carried a learning signal
    assert clipped_total > 0  # the later, off-policy mini-batches had out-of-band tokens
    assert seen[0][1][seen[0][2]].all()  # the first mini-batch is on-policy: nothing clipped


def test_old_pass_is_one_no_grad_forward_per_batch(tmp_path, monkeypatch):
    trainer = ERCTrainer(small_config(tmp_path), verifier=odd_length)
    calls = []
    real = trainer_module.response_logprobs

    def counting(model, batch, **kw):
        calls.append((torch.is_grad_enabled(), len(batch)))
        return real(model, batch, **kw)

    monkeypatch.setattr(trainer_module, "response_logprobs", counting)
    trainer.train_step()
    no_grad = [n for grad, n in calls if not grad]
    with_grad = [n for grad, n in calls if grad]
    assert no_grad == [16]  # the whole batch, once
    assert with_grad == [8, 8]  # one forward per mini-batch


def test_metrics_jsonl_has_every_documented_key(tmp_path):
    cfg = small_config(tmp_path, tensorboard=True)
    ERCTrainer(cfg, verifier=odd_length).train()
    lines = [json.loads(x) for x in (tmp_path / "llm" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "eval_accuracy" in lines[0]
    for line in lines[1:]:
        missing = set(METRIC_KEYS + LOSS_KEYS) - set(line)
        assert not missing, missing
    assert json.loads((tmp_path / "llm" / "config.json").read_text())["erc_low"] == 0.95
    assert list((tmp_path / "llm" / "tb").glob("events.*"))


def test_real_model_path_loads_by_directory(tmp_path):
    from erc_gym.envs.tokenizer import CharTokenizer

    tok = CharTokenizer.build("0123456789+-*=")
    model = make_tiny_lm(len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    trainer = ERCTrainer(
        small_config(tmp_path, model=str(tmp_path / "model"), steps=1), verifier=odd_length
    )
    loaded = trainer.model.get_output_embeddings().weight
    torch.testing.assert_close(loaded, model.get_output_embeddings().weight)
    before = loaded.detach().clone()
    trainer.train()
    assert not torch.equal(trainer.model.get_output_embeddings().weight, before)


def test_resume_gives_the_same_metrics(tmp_path):
    straight = ERCTrainer(small_config(tmp_path / "a", steps=3), verifier=odd_length).train()
    cfg = small_config(tmp_path / "b", steps=3)
    ERCTrainer(cfg, verifier=odd_length).train(max_steps=2)
    resumed = ERCTrainer(cfg, verifier=odd_length)
    resumed.train()
    lines = read_jsonl(tmp_path / "b" / "llm" / "metrics.jsonl")  # strict JSON: NaN is null
    assert [ln["step"] for ln in lines] == [0, 1, 2, 3]
    for a, b in zip(straight, lines, strict=True):
        for key in set(a) - TIME_KEYS:
            va, vb = a[key], b[key]
            assert va == vb or (math.isnan(va) and math.isnan(vb)), (key, va, vb)


def test_nan_reward_is_excluded_and_counted(tmp_path):
    def sometimes_nan(completion: str, answer: str) -> float:
        return math.nan if len(completion) == 1 else float(len(completion) % 2 == 0)

    trainer = ERCTrainer(small_config(tmp_path, steps=2), verifier=sometimes_nan)
    lines = trainer.train()
    assert lines[-1]["nan_rewards"] > 0
    assert math.isfinite(lines[-1]["pg_loss"])


def test_a_verifier_that_returns_only_nan_is_an_error(tmp_path):
    """Every reward NaN: each step trained on nothing, and the run ended with exit 0."""

    def unparseable(completion: str, answer: str) -> float:
        return math.nan

    trainer = ERCTrainer(small_config(tmp_path, steps=2), verifier=unparseable)
    with pytest.raises(ValueError, match=r"verifier 'unparseable' returned NaN for every one of"):
        trainer.train()
    assert [r["step"] for r in read_jsonl(tmp_path / "llm" / "metrics.jsonl")] == [0]


@pytest.mark.parametrize(
    ("overrides", "error", "needle"),
    [
        ({"model": "/nonexistent/model"}, ValueError, "nor a local folder"),
        ({"eval_every": 0}, ValueError, "eval_every must be >= 1, got eval_every=0"),
        ({"steps": 0}, ValueError, "steps must be >= 1, got steps=0"),
        ({"top_p": 0.0}, ValueError, "top_p must be in"),
        ({"dtype": "fp8"}, ValueError, "dtype='fp8'"),
        # was a traceback in generate after the warm start: fp16 weights overflow on the CPU
        ({"dtype": "float16", "sft_steps": 20}, ValueError, "dtype='float16' needs a CUDA"),
        ({"dataset": "/nonexistent.jsonl"}, ValueError, "no such file"),
        ({"mini_batch_prompts": 0}, ValueError, "mini_batch_prompts must be >= 1"),
        ({"group_size": 1}, ValueError, "group_size must be >= 2"),
        ({"erc_low": 0.9, "erc_high": None}, ValueError, "both be set"),
        ({"loss": "trpo"}, ValueError, "'trpo'"),
        ({"prompts_per_step": 3}, ValueError, "multiple of mini_batch_prompts"),
        ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*32 - 1\], got seed=-1"),
        ({"positive_nll_coef": float("nan")}, ValueError, "got positive_nll_coef=nan"),
        ({"overlong_penalty_factor": -1.0}, ValueError, "overlong_penalty_factor must be a"),
        ({"weight_decay": float("inf")}, ValueError, "weight_decay must be a finite number"),
        ({"vocab_size": 10**10}, ValueError, "vocab_size must be <= 151936"),
        ({"digits": 19}, ValueError, r"digits must be in \[1, 18\]"),
        ({"device": "cuda:x"}, ValueError, "got device='cuda:x'"),
        ({"name": ".."}, ValueError, "plain folder name, got name='..'"),
    ],
)
def test_bad_config(tmp_path, overrides, error, needle):
    with pytest.raises(error, match=needle):
        ERCTrainer(small_config(tmp_path, **overrides))


def test_vocab_mismatch(tmp_path):
    from erc_gym.envs.tokenizer import CharTokenizer

    tok = CharTokenizer.build("0123456789+-*=")
    make_tiny_lm(len(tok) - 3).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        ERCTrainer(small_config(tmp_path, model=str(tmp_path / "model")))


def test_prompt_longer_than_context(tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "1+" * 40 + "1=", "answer": "41"}) + "\n")
    cfg = small_config(tmp_path, dataset=str(data), eval_dataset=str(data))
    with pytest.raises(ValueError, match="82 tokens, more than the context allows"):
        ERCTrainer(cfg, verifier=odd_length)  # h14: when the trainer is made, not mid-run


def test_max_new_tokens_leaving_no_room_for_prompts_fails_before_the_warm_start(
    tmp_path, monkeypatch
):
    """It was a traceback at the first rollout, after the SFT warm start (h14)."""
    import erc_gym.llm.model as model_module

    def no_warm_start(*args, **kwargs):
        raise AssertionError("the warm start ran before the settings were checked")

    monkeypatch.setattr(model_module, "sft_warmstart", no_warm_start)
    with pytest.raises(ValueError, match=r"max_new_tokens=62 leaves 2 .* at most 60"):
        ERCTrainer(small_config(tmp_path, max_new_tokens=62, sft_steps=10))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_value_error_naming_the_device(tmp_path):
    """It was an AssertionError traceback from torch ("Torch not compiled with CUDA") (h14)."""
    with pytest.raises(ValueError, match="device='cuda', but this torch has no CUDA device"):
        ERCTrainer(small_config(tmp_path, device="cuda"))


def test_progress_false_keeps_stderr_quiet(tmp_path, capfd):
    """transformers' "Writing model shards" bar printed at every export despite progress=False."""
    ERCTrainer(small_config(tmp_path, steps=1)).train()
    assert capfd.readouterr().err == ""


def test_verifier_that_raises_names_the_prompt(tmp_path):
    def broken(completion: str, answer: str) -> float:
        raise RuntimeError("boom")

    trainer = ERCTrainer(small_config(tmp_path), verifier=broken)
    with pytest.raises(ValueError, match=r"raised on prompt '\d\+\d='"):
        trainer.train_step()


def test_cli_help_and_flags():
    parser = build_parser()
    text = parser.format_help()
    assert "--erc-low" in text and "tiny-arith-dapo-erc" in text
    assert "Responses per prompt" in text  # field docstrings are the help
    args = parser.parse_args(
        [
            "--preset",
            "tiny-arith-gppo-erc",
            "--steps",
            "5",
            "--vocab-size",
            "32000",
            "--filter-groups",
            "false",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.loss, cfg.erc_low, cfg.steps, cfg.vocab_size) == ("gppo", 0.95, 5, 32000)
    assert cfg.filter_groups is False and cfg.name == "tiny-arith-gppo-erc"
    assert set(field_docs(TrainerConfig)) == {f.name for f in dataclasses.fields(TrainerConfig)}


def test_held_out_problems_are_disjoint_from_training(tmp_path):
    for digits, ops, expected in ((2, "+", 50), (1, "+", 25)):
        cfg = small_config(tmp_path, digits=digits, ops=ops, num_eval=50, num_train=500)
        trainer = ERCTrainer(cfg, verifier=odd_length)
        held = {p["prompt"] for p in trainer.eval_problems}
        assert len(held) == len(trainer.eval_problems) == expected
        assert not held & {p["prompt"] for p in trainer.train_problems}
        assert len(trainer.train_problems) == 500


def test_fused_head_gives_the_same_metrics(tmp_path):
    """fused_head (hidden states + head weight, no logits) vs the model's own logits."""
    runs = {}
    for fused in (False, True):
        cfg = small_config(tmp_path / str(fused), steps=2, fused_head=fused)
        trainer = ERCTrainer(cfg, verifier=odd_length)
        runs[fused] = trainer.train()
    for a, b in zip(runs[False], runs[True], strict=True):
        for key in set(a) - TIME_KEYS:
            va, vb = a[key], b[key]
            if isinstance(va, float) and math.isnan(va):
                assert math.isnan(vb), key
            else:
                assert vb == pytest.approx(va, rel=1e-5, abs=1e-6), (key, va, vb)


def test_fused_head_scores_equal_logits_path(tmp_path):
    trainer = ERCTrainer(small_config(tmp_path), verifier=odd_length)
    batch, _ = trainer._generate_batch()
    lp_f, h_f = trainer_module.response_logprobs(trainer.model, batch, fused_head=True)
    lp_l, h_l = trainer_module.response_logprobs(trainer.model, batch, fused_head=False)
    torch.testing.assert_close(lp_f, lp_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_f, h_l, rtol=1e-5, atol=1e-6)


def _random_batch(vocab: int, rows: int = 3, prompt: int = 5, response: int = 4):
    from erc_gym.llm.rollout import RolloutBatch

    g = torch.Generator().manual_seed(0)
    prompt_mask = torch.ones(rows, prompt, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    response_mask = torch.ones(rows, response, dtype=torch.bool)
    response_mask[1, -1] = False
    return RolloutBatch(
        prompt_ids=torch.randint(1, vocab, (rows, prompt), generator=g),
        prompt_mask=prompt_mask,
        response_ids=torch.randint(1, vocab, (rows, response), generator=g),
        response_mask=response_mask,
        rewards=torch.zeros(rows),
        prompts=[""] * rows,
        answers=[""] * rows,
        completions=[""] * rows,
    )


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("gemma2", {"final_logit_softcapping": 2.0, "head_dim": 16}),
        ("cohere", {"logit_scale": 0.5}),
        ("granite", {"logits_scaling": 4.0}),
    ],
)
def test_fused_head_reads_softcap_and_logit_scale(model_type, extra):
    """Gemma-2 soft-capping, Cohere logit_scale, Granite logits_scaling: same as the model."""
    model = make_tiny_lm(97, model_type=model_type, **extra).eval()
    batch = _random_batch(97)
    with torch.no_grad():
        lp_f, h_f = trainer_module.response_logprobs(model, batch, temperature=0.8, fused_head=True)
        lp_l, h_l = trainer_module.response_logprobs(model, batch, temperature=0.8)
    torch.testing.assert_close(lp_f, lp_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_f, h_l, rtol=1e-5, atol=1e-5)
    trainer_module.check_fused_head(model, batch, temperature=0.8)  # does not raise


def test_fused_head_check_catches_an_unknown_output_transform():
    model = make_tiny_lm(97).eval()
    model.config.final_logit_softcapping = 0.5  # read by the fused head, ignored by Qwen2
    with pytest.raises(ValueError, match="set fused_head=False"):
        trainer_module.check_fused_head(model, _random_batch(97))


def test_score_is_the_mean_of_the_last_evaluations_and_resumes(tmp_path):
    cfg = small_config(tmp_path / "a", steps=4, score_evals=3)
    lines = ERCTrainer(cfg, verifier=odd_length).train()
    acc = [ln["eval_accuracy"] for ln in lines]
    for i, line in enumerate(lines):
        assert line["eval_score"] == pytest.approx(
            sum(acc[max(0, i - 2) : i + 1]) / len(acc[max(0, i - 2) : i + 1])
        )
    # stopped after 2 steps and resumed: the score still averages the evaluations before the stop
    cfg = small_config(tmp_path / "b", steps=4, score_evals=3)
    ERCTrainer(cfg, verifier=odd_length).train(max_steps=2)
    ERCTrainer(cfg, verifier=odd_length).train()
    resumed = read_jsonl(tmp_path / "b" / "llm" / "metrics.jsonl")
    assert [ln["eval_score"] for ln in resumed] == [ln["eval_score"] for ln in lines]


def test_pass_at_k_leaves_training_unchanged(tmp_path):
    plain = ERCTrainer(small_config(tmp_path / "a", steps=2), verifier=odd_length).train()
    cfg = small_config(tmp_path / "b", steps=2, eval_pass_k=3)
    sampled = ERCTrainer(cfg, verifier=odd_length).train()
    for a, b in zip(plain, sampled, strict=True):
        assert 0.0 <= b["eval_sampled_accuracy"] <= b["eval_pass_at_k"] <= 1.0
        for key in set(a) - TIME_KEYS:
            va, vb = a[key], b[key]
            assert va == vb or (math.isnan(va) and math.isnan(vb)), (key, va, vb)


def test_warm_start_cache_gives_the_same_weights_and_is_used(tmp_path, monkeypatch):
    import erc_gym.llm.model as model_module

    cache = tmp_path / "cache"
    fresh = ERCTrainer(small_config(tmp_path / "a", sft_steps=5), verifier=odd_length)
    first = ERCTrainer(
        small_config(tmp_path / "b", sft_steps=5, warm_start_cache=str(cache)), verifier=odd_length
    )
    assert len(list(cache.glob("*.pt"))) == 1
    calls = []
    monkeypatch.setattr(model_module, "sft_warmstart", lambda *a, **k: calls.append(1))
    # another run with other RL settings (and another lr) shares the warm start: not retrained
    again = ERCTrainer(
        small_config(tmp_path / "c", sft_steps=5, lr=3e-4, warm_start_cache=str(cache)),
        verifier=odd_length,
    )
    assert calls == []
    for trainer in (first, again):
        for (name, p), q in zip(
            fresh.model.named_parameters(), trainer.model.parameters(), strict=True
        ):
            assert torch.equal(p, q), name
    # another seed is another warm start
    ERCTrainer(
        small_config(tmp_path / "d", sft_steps=5, seed=1, warm_start_cache=str(cache)),
        verifier=odd_length,
    )
    assert calls == [1]


def test_clipping_jsonl_one_line_per_step_and_resume_truncates_it(tmp_path):
    cfg = small_config(tmp_path / "a", steps=3, erc_low=0.999, erc_high=1.001, lr=5e-2)
    ERCTrainer(cfg, verifier=odd_length).train()
    straight = read_jsonl(tmp_path / "a" / "llm" / "clipping.jsonl")
    assert [ln["step"] for ln in straight] == [1, 2, 3]
    line = straight[-1]
    assert line["erc"] and line["band"] == [0.999, 1.001]
    # the step counts: every valid token of each optimiser step, the first (on-policy) never out
    assert line["by_step"]["outside"][0] == 0 and sum(line["by_step"]["outside"][1:]) > 0
    assert sum(line["h_old_bins"]["n"]) == line["tokens"] == sum(line["by_step"]["n"][1:])
    assert sum(line["position_bins"]["n"]) == sum(line["h_old_bins"]["n_adv"])
    assert line["states"] > 0 and len(line["state_sample"]["kl"]) == min(16, line["states"])
    cfg = small_config(tmp_path / "b", steps=3, erc_low=0.999, erc_high=1.001, lr=5e-2)
    ERCTrainer(cfg, verifier=odd_length).train(max_steps=2)
    with open(tmp_path / "b" / "llm" / "clipping.jsonl", "a") as f:
        f.write('{"step": 3, "stale": true}\n')  # a line past the checkpoint: dropped on resume
    ERCTrainer(cfg, verifier=odd_length).train()
    assert read_jsonl(tmp_path / "b" / "llm" / "clipping.jsonl") == straight


def test_the_state_audit_reads_a_bounded_number_of_tokens(tmp_path, monkeypatch):
    """The audit keeps two full-vocabulary logit tensors of the audited tokens: a long response
    must not make them grow (8 rows x ``AUDIT_TOKENS`` at most)."""
    import erc_gym.llm.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "AUDIT_TOKENS", 1)
    cfg = small_config(tmp_path, steps=2, erc_low=0.999, erc_high=1.001, lr=5e-2)
    ERCTrainer(cfg, verifier=odd_length).train()
    lines = read_jsonl(tmp_path / "llm" / "clipping.jsonl")
    assert lines and all(0 < ln["states"] <= trainer_module.AUDIT_ROWS for ln in lines)


def test_the_warm_start_runs_once_and_not_at_zero_steps(tmp_path, monkeypatch):
    """Two definitions of the warm start (one with the run-once guard, one with the cache) left
    the unguarded one in force: a fresh run trained its SFT warm start twice (when built and
    again when training began), and ``sft_steps=0`` divided by zero in the schedule."""
    import erc_gym.llm.model

    calls = []
    real = erc_gym.llm.model.sft_warmstart
    monkeypatch.setattr(
        erc_gym.llm.model,
        "sft_warmstart",
        lambda *args, **kwargs: calls.append(kwargs["steps"]) or real(*args, **kwargs),
    )
    ERCTrainer(small_config(tmp_path, name="once", sft_steps=2, steps=1)).train()
    assert calls == [2]
    ERCTrainer(small_config(tmp_path, name="none", steps=1)).train()
    assert calls == [2]

"""GPU check: the entropy kernel and the ERC loss path on a CUDA device, in bf16.

Prints, in order:

1. the device;
2. entropy-kernel accuracy on adversarial logits (fp32 and bf16, V up to 151,936) against fp64;
3. entropy-kernel time, effective bandwidth (bytes of logits read / time) against the card's peak,
   and peak extra memory, against the naive ``log_softmax`` formula;
4. ERC's overhead inside ``policy_loss`` at (B, T) = (64, 1024);
5. a ~100M-parameter Llama-style model built from a config (random init, bf16) in the LLM
   trainer: its old-policy scoring pass, then its own update (off-policy mini-batch steps through
   the fused head + ``policy_loss`` + AdamW) on a synthetic batch of long responses, with ERC on
   and off -- time per step, ERC's share, peak memory, and that no fp32 (B, T, V) tensor is
   needed (peak memory of scoring logits against a naive fp32 path).

6. a short run of the LLM trainer (``erc_gym.llm.ERCTrainer``) on a ~100M model loaded from a
   local directory, DAPO and DAPO+ERC: time split per step and peak memory.

Usage::

    python experiments/gpu/gpu_check.py            # about two minutes on an H100
    python experiments/gpu/gpu_check.py --quick
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

from erc_gym.cli_args import CliParser
from erc_gym.entropy import logprob_and_entropy
from erc_gym.losses import ERCConfig, LossConfig, policy_loss

PEAK_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after two warm-ups (CUDA events)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def peak_extra(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by ``fn`` beyond what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def naive(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(z.float(), -1)
    return lp.gather(-1, y[..., None]).squeeze(-1), -(lp.exp() * lp).sum(-1)


def check_accuracy() -> None:
    print("\n[2] entropy accuracy vs fp64 (max relative error where H >= 1e-6; lp abs error)")
    for v in (32_000, 151_936):
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(v)
            z = torch.randn(256, v, generator=g) + 100.0
            z[:, 0] += torch.linspace(0.0, 30.0, 256)
            y = torch.randint(0, v, (256,), generator=g)
            z = z.to(dtype)
            lp, h = logprob_and_entropy(z.cuda(), y.cuda())
            ref = torch.log_softmax(z.cuda().double(), -1)
            h_ref = -(ref.exp() * ref).sum(-1)
            lp_ref = ref.gather(-1, y.cuda()[:, None]).squeeze(-1)
            ok = h_ref >= 1e-6
            rel = ((h.double() - h_ref).abs() / h_ref)[ok].max().item()
            small = lp_ref.abs() < 128
            lp_err = (lp.double() - lp_ref).abs()[small].max().item()
            print(f"  V={v:>6} {dtype!s:<15} H rel err {rel:.2e}   log_prob abs err {lp_err:.2e}")


def _kernel_vs_naive(z: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float, int, int]:
    import erc_gym.entropy as entropy_module

    with torch.no_grad():
        fused = timed(lambda: logprob_and_entropy(z, y), 5)
        m_ours = peak_extra(lambda: logprob_and_entropy(z, y))
        entropy_module.USE_TRITON = False
        try:
            chunked = timed(lambda: logprob_and_entropy(z, y), 5)
        finally:
            entropy_module.USE_TRITON = True
        return (
            fused,
            chunked,
            timed(lambda: naive(z, y), 5),
            m_ours,
            peak_extra(lambda: naive(z, y)),
        )


def check_bandwidth(quick: bool) -> None:
    name = torch.cuda.get_device_name()
    peak = next((tb for key, tb in PEAK_TBPS.items() if key in name), None)
    print(f"\n[3] entropy kernel speed and memory (peak HBM {peak} TB/s for {name})")
    print(
        "  ours = logprob_and_entropy (fused Triton forward when Triton is installed); "
        "torch = its chunked PyTorch path"
    )
    print(
        f"  {'N':>6} {'V':>7} {'dtype':<9} {'ours ms':>8} {'torch ms':>9} {'naive ms':>9} "
        f"{'ours TB/s':>10} {'% peak':>7} {'ours extra MiB':>15} {'naive extra MiB':>16} "
        f"{'logits MiB':>11}"
    )
    for v in (32_000, 151_936):
        n = 4096 if quick else 8192
        for dtype in (torch.bfloat16, torch.float32):
            z = torch.randn(n, v, device="cuda", dtype=dtype)
            y = torch.randint(0, v, (n,), device="cuda")
            t_ours, t_torch, t_naive, m_ours, m_naive = _kernel_vs_naive(z, y)
            nbytes = z.numel() * z.element_size()
            tbps = nbytes / t_ours / 1e12
            pct = f"{100 * tbps / peak:.0f}%" if peak else "n/a"
            print(
                f"  {n:>6} {v:>7} {str(dtype)[6:]:<9} {t_ours * 1e3:>8.2f} "
                f"{t_torch * 1e3:>9.2f} {t_naive * 1e3:>9.2f} {tbps:>10.2f} {pct:>7} "
                f"{m_ours / 2**20:>15.0f} "
                f"{m_naive / 2**20:>16.0f} {nbytes / 2**20:>11.0f}"
            )


def check_loss_overhead() -> None:
    print("\n[4] policy_loss forward+backward, (B, T) = (64, 1024), ERC off vs on")
    g = torch.Generator().manual_seed(0)
    old = (-torch.rand(64, 1024, generator=g) * 3).cuda()
    base = old + 0.1 * torch.randn(64, 1024, generator=g).cuda()
    adv = torch.randn(64, generator=g).cuda()
    h_old = torch.rand(64, 1024, generator=g).cuda()
    h = h_old * (1 + 0.05 * torch.randn(64, 1024, generator=g).cuda())
    for name, make in (("dapo", LossConfig.dapo), ("gppo", LossConfig.gppo)):
        res = {}
        for key, cfg in (("off", make()), ("on", make(erc=ERCConfig()))):

            def step(cfg: LossConfig = cfg) -> None:
                lp = base.clone().requires_grad_(True)
                out = policy_loss(
                    lp, old, adv, entropy=h, old_entropy=h_old, config=cfg, metrics=False
                )
                out.loss.backward()

            res[key] = timed(step, 50)
        print(
            f"  {name}: off {res['off'] * 1e3:.3f} ms, on {res['on'] * 1e3:.3f} ms, "
            f"ratio {res['on'] / res['off']:.3f}x"
        )


def hundred_m_config(model_type: str, vocab: int, **overrides: object) -> object:
    """A ~100M-parameter transformers config (768 wide, 12 layers) of ``model_type``."""
    from transformers import AutoConfig

    fields = {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        **overrides,
    }
    return AutoConfig.for_model(model_type, vocab_size=vocab, **fields)


def _local_model(folder: str, model_type: str, vocab: int, **overrides: object) -> None:
    """Save a ~100M model of ``model_type`` (random init) and a character tokenizer padded to
    ``vocab`` tokens to ``folder``, for the LLM trainer to load."""
    from transformers import AutoModelForCausalLM

    from erc_gym.envs.tokenizer import CharTokenizer

    tok = CharTokenizer.build("0123456789+-*=", vocab_size=vocab)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(
        hundred_m_config(model_type, len(tok), **overrides)
    ).save_pretrained(folder)
    tok.save_pretrained(folder)


def check_model(quick: bool) -> None:
    """The LLM trainer's own update (``ERCTrainer._train_on``: scoring, ``policy_loss``, AdamW)
    on a synthetic batch of long responses, ERC on and off."""
    import tempfile

    from erc_gym.llm import ERCTrainer, TrainerConfig
    from erc_gym.llm.rollout import RolloutBatch
    from erc_gym.losses import loss_metrics

    vocab = 32_000
    b, t_prompt, t_resp = 16, 64, 448
    minibatches = 4
    with tempfile.TemporaryDirectory() as tmp:
        _local_model(
            f"{tmp}/model",
            "llama",
            vocab,
            num_key_value_heads=12,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        )
        config = TrainerConfig(
            model=f"{tmp}/model",
            group_size=b // minibatches,
            prompts_per_step=minibatches,
            mini_batch_prompts=1,
            lr=1e-5,
            warmup_steps=0,
            num_eval=4,
            progress=False,
            run_dir=f"{tmp}/runs",
            device="cuda",
        )
        trainer = ERCTrainer(config)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(
        f"\n[5] Llama-style model, {n_params / 1e6:.0f}M parameters, {trainer.dtype}, batch {b} x "
        f"{t_prompt}+{t_resp} tokens, {minibatches} off-policy mini-batch steps per batch "
        "(the LLM trainer's update)"
    )
    ids = torch.randint(0, vocab, (b, t_prompt + t_resp), device="cuda")
    mask = torch.ones(b, t_resp, dtype=torch.bool, device="cuda")
    mask[:, -50:] = torch.rand(b, 50, device="cuda") > 0.5
    batch = RolloutBatch(
        prompt_ids=ids[:, :t_prompt],
        prompt_mask=torch.ones(b, t_prompt, dtype=torch.long, device="cuda"),
        response_ids=ids[:, t_prompt:],
        response_mask=mask,
        rewards=(torch.rand(b) > 0.5).float(),
        prompts=[""] * b,
        answers=[""] * b,
        completions=[""] * b,
    )
    adv = torch.randn(b, device="cuda")
    old_lp, old_h = trainer.score(batch)

    def train_steps(loss_config: LossConfig) -> dict[str, float]:
        trainer.loss_config = loss_config
        log = trainer._train_on(batch, old_lp, old_h, adv)
        return loss_metrics(log.stats[-1:])

    results = {}
    for key, loss in (("DAPO", LossConfig.dapo()), ("DAPO+ERC", LossConfig.dapo(ERCConfig()))):
        torch.cuda.reset_peak_memory_stats()
        seconds = timed(functools.partial(train_steps, loss), 2 if quick else 4)
        results[key] = (seconds / minibatches, torch.cuda.max_memory_allocated())
    metrics = train_steps(LossConfig.dapo(ERCConfig()))
    for key, (sec, peak) in results.items():
        print(
            f"  {key:<9} {sec * 1e3:8.1f} ms per optimiser step, peak memory {peak / 2**30:.2f} GiB"
        )
    print(f"  ERC overhead per step: {results['DAPO+ERC'][0] / results['DAPO'][0] - 1:+.1%}")
    print(
        f"  last step: erc_clip_fraction {metrics['erc_clip_fraction']:.3f}, clip_fraction "
        f"{metrics['clip_fraction']:.4f}, entropy_ratio [{metrics['entropy_ratio_min']:.3f}, "
        f"{metrics['entropy_ratio_max']:.3f}], H_old clipped/kept "
        f"{metrics['erc_clipped_entropy_old_mean']:.3f}/{metrics['erc_kept_entropy_old_mean']:.3f}"
    )
    labels = ids[:, t_prompt:]
    with torch.no_grad():
        logits = trainer.model(input_ids=ids).logits[:, t_prompt - 1 : -1]
    fp32_btv = logits.numel() * 4
    with torch.no_grad():
        m_ours = peak_extra(lambda: logprob_and_entropy(logits, labels))
        m_naive = peak_extra(lambda: naive(logits, labels))
    print(
        f"  scoring one batch's logits ({tuple(logits.shape)}, {logits.dtype} "
        f"{logits.numel() * logits.element_size() / 2**20:.0f} MiB): extra memory ours "
        f"{m_ours / 2**20:.0f} MiB, naive fp32 path "
        f"{m_naive / 2**20:.0f} MiB; one fp32 (B, T, V) tensor is {fp32_btv / 2**20:.0f} MiB"
    )


def check_trainer(quick: bool) -> None:
    """A short run of the real LLM trainer (erc_gym.llm.ERCTrainer) on the ~100M model."""
    import tempfile

    from erc_gym.llm import ERCTrainer, TrainerConfig

    with tempfile.TemporaryDirectory() as tmp:
        _local_model(
            f"{tmp}/model",
            "qwen2",
            32_000,
            num_key_value_heads=4,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )

        def odd_length(completion: str, answer: str) -> float:
            # a random-init model never answers correctly; this verifier keeps groups informative
            return float(len(completion) % 2)

        results = {}
        for label, band in (("DAPO", (None, None)), ("DAPO+ERC", (0.95, 1.05))):
            config = TrainerConfig(
                model=f"{tmp}/model",
                digits=2,
                group_size=8,
                prompts_per_step=16,
                mini_batch_prompts=4,
                max_new_tokens=16,
                steps=2 if quick else 4,
                filter_groups=False,
                erc_low=band[0],
                erc_high=band[1],
                lr=1e-5,
                eval_every=1000,
                num_eval=16,
                progress=False,
                run_dir=f"{tmp}/runs",
                name=label,
                device="cuda",
            )
            trainer = ERCTrainer(config, verifier=odd_length)
            torch.cuda.reset_peak_memory_stats()
            lines = trainer.train(resume=False)
            results[label] = (lines[1:], torch.cuda.max_memory_allocated())
        n = sum(p.numel() for p in trainer.model.parameters())
        print(
            f"\n[6] erc_gym.llm.ERCTrainer, {n / 1e6:.0f}M-parameter Qwen2-style model loaded "
            f"from a directory, {trainer.dtype}, 16 prompts x 8 samples, 4 mini-batch steps "
            "per batch"
        )
        for label, (lines, peak) in results.items():
            steady = lines[1:] or lines
            gen = statistics.mean(ln["time_generate"] for ln in steady)
            score = statistics.mean(ln["time_score"] for ln in steady)
            train = statistics.mean(ln["time_train"] for ln in steady)
            last = lines[-1]
            print(
                f"  {label:<9} generate {gen:.3f} s, score {score:.3f} s, train {train:.3f} s "
                f"per step; peak {peak / 2**30:.2f} GiB; erc_clip_fraction "
                f"{last['erc_clip_fraction']:.3f}, entropy {last['entropy']:.3f}, grad_norm "
                f"{last['grad_norm']:.3f}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device")
    props = torch.cuda.get_device_properties(0)
    print(
        f"[1] {torch.cuda.get_device_name()}, {props.total_memory / 2**30:.0f} GiB, "
        f"torch {torch.__version__}"
    )
    t0 = time.perf_counter()
    check_accuracy()
    check_bandwidth(args.quick)
    check_loss_overhead()
    check_model(args.quick)
    check_trainer(args.quick)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

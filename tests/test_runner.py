"""The experiment runner (grid, skip, resume), the analysis, the figures and the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import erc_gym.lab.runner as runner_module
from erc_gym.lab.analysis import load_runs, summarize
from erc_gym.lab.config import load_experiment
from erc_gym.lab.grid import expand
from erc_gym.lab.runner import run_experiment
from erc_gym.lab.stats import bootstrap_ci, iqm, mean_curve

BANDIT = {
    "name": "tiny",
    "kind": "bandit",
    "seeds": 2,
    "algorithms": ["ppo"],
    "erc": [None, [0.95, 1.05]],
    "envs": [{"label": "V64", "vocab_size": 64, "num_contexts": 4}],
    "settings": {"iterations": 4, "group": 4, "minibatches": 2, "save_every": 1},
}


def _strict(constant):
    raise AssertionError(f"metrics.jsonl is not strict JSON: {constant}")


def _lines(path):
    """Every line, parsed as strict JSON (``NaN`` / ``Infinity`` fail)."""
    return [json.loads(x, parse_constant=_strict) for x in path.read_text().splitlines()]


def test_grid_and_variant_names():
    spec = {**BANDIT, "algorithms": ["ppo", "dapo", "gppo"], "erc": [None, [0.9, 1.1]]}
    runs = expand(spec)
    assert len(runs) == 3 * 2 * 2
    assert {r.variant for r in runs} == {
        f"V64-{a}{b}" for a in ("ppo", "dapo", "gppo") for b in ("", "-erc0.9-1.1")
    }
    assert runs[0].folder("runs").as_posix() == "runs/tiny/V64-ppo/0"


@pytest.mark.parametrize(
    "name",
    [
        "quick",
        "classic_control",
        "vocab_scaling",
        "band_sweep",
        "tiny_lm",
        "llm_learning",
        "stress_llm",
        "field_llm",
    ],
)
def test_shipped_configs_load(name):
    spec = load_experiment(name)
    assert expand(spec)


@pytest.mark.parametrize("name", ["llm_learning", "stress_llm", "field_llm"])
def test_lm_configs_can_resolve_a_difference(name):
    """The LM learning, stress and field configs score >= 200 held-out problems (each run's own
    split: the warm start's data, made as the trainer makes it) by a mean of evaluations, over >= 5
    seeds: one problem then moves the score by at most 0.005."""
    from types import SimpleNamespace

    from erc_gym.lab.kinds import get_kind
    from erc_gym.llm.trainer import ERCTrainer, TrainerConfig

    spec = load_experiment(name)
    runs = expand(spec)
    assert len({r.seed for r in runs}) >= 5
    kind = get_kind("llm")
    configs = [TrainerConfig(**kind.trainer_config(r)) for r in runs]
    assert all(c.score_evals >= 3 and c.eval_pass_k >= 2 for c in configs)
    data = ("dataset", "digits", "ops", "num_train", "num_eval", "seed")
    for config in {tuple(getattr(c, k) for k in data): c for c in configs}.values():
        train, held_out = ERCTrainer._load_data(SimpleNamespace(config=config))
        assert len({p["prompt"] for p in held_out}) == len(held_out) >= 200
        assert not {p["prompt"] for p in held_out} & {p["prompt"] for p in train}


def test_bad_config_is_reported(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**BANDIT, "erc": [[1.05, 0.95]]}))
    with pytest.raises(ValueError, match="band"):
        load_experiment(str(path))
    with pytest.raises(FileNotFoundError, match="shipped"):
        load_experiment("no-such-experiment")


def test_finished_runs_are_skipped(tmp_path, monkeypatch):
    folders = run_experiment(BANDIT, tmp_path, workers=1, progress=False)
    assert all((f / "done").exists() for f in folders)
    config = json.loads((folders[-1] / "config.json").read_text())
    assert config["variant"] == "V64-ppo-erc0.95-1.05" and config["erc"] == [0.95, 1.05]
    assert config["vocab_size"] == 64  # the trainer's own settings sit beside the runner's

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(runner_module, "run_one", fail)
    run_experiment(BANDIT, tmp_path, workers=1, progress=False)


def test_unfinished_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    spec = {**BANDIT, "seeds": 1, "erc": [[0.95, 1.05]]}
    full = run_experiment({**spec, "name": "full"}, tmp_path, workers=1, progress=False)[0]

    monkeypatch.setenv("ERC_GYM_STOP_AFTER", "2")
    with pytest.raises(RuntimeError, match="stopped after 2"):
        run_experiment(spec, tmp_path, workers=1, progress=False)
    folder = tmp_path / "tiny" / "V64-ppo-erc0.95-1.05" / "0"
    assert not (folder / "done").exists()
    assert [r["iteration"] for r in _lines(folder / "metrics.jsonl")] == [0, 1, 2]

    monkeypatch.delenv("ERC_GYM_STOP_AFTER")
    run_experiment(spec, tmp_path, workers=1, progress=False)
    assert (folder / "done").exists()
    resumed = _lines(folder / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [0, 1, 2, 3, 4]
    # policy, optimiser and sampler state come back: identical to the uninterrupted run
    assert json.dumps(resumed) == json.dumps(_lines(full / "metrics.jsonl"))


def test_sb3_run_logs_diagnostics_and_resumes(tmp_path, monkeypatch):
    spec = {
        "name": "cp",
        "kind": "sb3",
        "seeds": 1,
        "algorithms": ["dapo"],
        "erc": [[0.95, 1.05]],
        "envs": [{"label": "CartPole", "id": "CartPole-v1"}],
        "settings": {"steps": 1024, "eval_every": 512, "eval_episodes": 2},
    }
    monkeypatch.setenv("ERC_GYM_STOP_AFTER", "512")
    with pytest.raises(RuntimeError, match="stopped"):
        run_experiment(spec, tmp_path, workers=1, progress=False)
    folder = tmp_path / "cp" / "CartPole-dapo-erc0.95-1.05" / "0"
    assert (folder / "checkpoint.zip").exists() and not (folder / "done").exists()
    monkeypatch.delenv("ERC_GYM_STOP_AFTER")
    run_experiment(spec, tmp_path, workers=1, progress=False)
    rows = _lines(folder / "metrics.jsonl")
    evals = [r["time/total_timesteps"] for r in rows if "eval/mean_reward" in r]
    assert evals == [512, 1024, 1024]  # periodic evaluations, then the final one
    assert any("diagnostics/tv_unsampled" in r for r in rows)
    assert any("train/erc_clip_fraction" in r for r in rows)
    (run,) = load_runs(tmp_path / "cp")
    assert run.kind == "sb3" and run.env_label == "CartPole" and math.isfinite(run.final_score())


def test_iqm_and_bootstrap_hand_cases():
    assert iqm([1, 2, 3, 4, 100, 5, 6, 7]) == 4.5  # the middle four of eight
    assert iqm([1.0, 2.0, 3.0]) == 2.0  # fewer than four: the mean
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    lo, hi = bootstrap_ci([0.0, 1.0, 2.0, 3.0, 10.0])
    assert 0.0 <= lo <= iqm([0.0, 1.0, 2.0, 3.0, 10.0]) <= hi <= 10.0
    x, mean, lo, hi = mean_curve(
        [(np.array([0.0, 2.0, 4.0]), np.array([0.0, 2.0, 4.0])), (np.array([0.0, 4.0]), np.ones(2))]
    )
    assert x.tolist() == [0.0, 2.0, 4.0]
    assert mean.tolist() == [0.5, 1.5, 2.5]
    assert np.all(lo <= mean) and np.all(mean <= hi)


def _synthetic_runs(root):
    """Two variants x three seeds of fake bandit logs with known final scores."""
    finals = {"V8-ppo": [0.5, 0.6, 0.7], "V8-ppo-erc0.95-1.05": [0.8, 0.8, 0.9]}
    for variant, scores in finals.items():
        for seed, final in enumerate(scores):
            folder = root / "synth" / variant / str(seed)
            folder.mkdir(parents=True)
            erc = [0.95, 1.05] if "erc" in variant else None
            cfg = {"kind": "bandit", "variant": variant, "seed": seed, "algorithm": "ppo"}
            (folder / "config.json").write_text(json.dumps({**cfg, "erc": erc}))
            lines = []
            for it in range(10):
                hist = [0] * 40
                hist[20 - it % 3] = 5
                lines.append(
                    {
                        "step": 16 * it,
                        "expected_reward": final * it / 9,
                        "entropy": 1.0 / (1 + it),
                        "grad_norm": 1.0 if it != 8 else 50.0,
                        "clip_fraction": 0.1,
                        "erc_clip_fraction": 0.2 if erc else 0.0,
                        "tv_unsampled": 0.01,
                        "entropy_ratio_hist": hist,
                    }
                )
            (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            (folder / "done").write_text("1\n")
    return root / "synth", finals


def test_report_and_figures_from_a_synthetic_runs_folder(tmp_path):
    from erc_gym.lab.report import write_report

    folder, _ = _synthetic_runs(tmp_path)
    rows = {r["variant"]: r for r in summarize(load_runs(folder))}
    assert rows["V8-ppo"]["iqm"] == pytest.approx(0.6)
    assert rows["V8-ppo"]["grad_norm_spikes"] == 1.0  # the 50x update, in every seed
    assert rows["V8-ppo-erc0.95-1.05"]["erc_clip_fraction"] == pytest.approx(0.2)
    report = write_report(folder)
    text = report.read_text()
    assert "| V8-ppo | 3/3 | 0 | 0.6 [" in text
    assert "figures/V8_curves.png" in text and "figures/V8_entropy_ratio.png" in text
    for name in ("V8_curves", "V8_entropy_ratio"):
        for ext in (".png", ".svg"):
            assert (folder / "figures" / f"{name}{ext}").stat().st_size > 10_000
    assert "<table" in (folder / "report.html").read_text()


def test_llm_runs_through_the_runner(tmp_path):
    settings = {
        "sft_steps": 2,
        "steps": 2,
        "group_size": 4,
        "prompts_per_step": 2,
        "mini_batch_prompts": 1,
        "max_new_tokens": 3,
        "num_train": 32,
        "num_eval": 4,
        "eval_every": 1,
        "warmup_steps": 0,
        "filter_groups": False,
    }
    spec = {
        "name": "lm",
        "kind": "llm",
        "seeds": 1,
        "algorithms": ["gppo"],
        "erc": [[0.95, 1.05]],
        "envs": [{"label": "arith", "model": "tiny"}],
        "settings": settings,
    }
    (folder,) = run_experiment(spec, tmp_path, workers=1, progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["loss"] == "gppo" and config["erc_low"] == 0.95  # the trainer's keys ...
    assert config["variant"] == "arith-gppo-erc0.95-1.05"  # ... and the runner's
    (run,) = load_runs(tmp_path / "lm")
    steps, acc = run.series("score")
    assert steps.tolist() == [0.0, 1.0, 2.0] and np.all((acc >= 0) & (acc <= 1))
    assert len(run.histograms()[1][-1]) == 40


def test_sb3_preset_with_vecnormalize_resumes_its_statistics(tmp_path, monkeypatch):
    spec = {
        "name": "acro",
        "kind": "sb3",
        "seeds": 1,
        "algorithms": ["ppo"],
        "erc": [None],
        "envs": [{"label": "Acrobot", "id": "Acrobot-v1"}],
        "settings": {"steps": 2048, "eval_every": 1024, "eval_episodes": 1, "n_steps": 64},
    }
    monkeypatch.setenv("ERC_GYM_STOP_AFTER", "1024")
    with pytest.raises(RuntimeError, match="stopped"):
        run_experiment(spec, tmp_path, workers=1, progress=False)
    folder = tmp_path / "acro" / "Acrobot-ppo" / "0"
    assert (folder / "vecnormalize.pkl").exists()
    monkeypatch.delenv("ERC_GYM_STOP_AFTER")
    run_experiment(spec, tmp_path, workers=1, progress=False)
    rows = _lines(folder / "metrics.jsonl")
    evals = [r["time/total_timesteps"] for r in rows if "eval/mean_reward" in r]
    assert evals == [1024, 2048, 2048]
    assert (folder / "done").exists()

"""Off-policy stress maps: the runner's ``axes``, the statistics, the map tables and the report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from erc_gym.lab.analysis import Run, load_runs
from erc_gym.lab.clipping import run_profile
from erc_gym.lab.config import CONFIG_DIR, load_experiment
from erc_gym.lab.grid import check_axes, expand
from erc_gym.lab.kinds import axis_settings
from erc_gym.lab.plots import _MAP_ROWS, _cell_text
from erc_gym.lab.report import write_report
from erc_gym.lab.runner import run_experiment
from erc_gym.lab.stats import diff_ci, probability_of_improvement
from erc_gym.lab.stress import cell_table, claims_table, effect_table, instability

BAND = [0.9, 1.1]
MINIATURES = {
    "bandit": {
        "envs": [{"label": "V64", "vocab_size": 64, "num_contexts": 4}],
        "settings": {"iterations": 3, "group": 4},
        "axes": {"steps_per_rollout": [1, 4], "lr": [0.05, 0.5]},
    },
    "llm": {
        "envs": [{"label": "add1", "model": "tiny", "digits": 1, "ops": "+"}],
        "settings": {
            "sft_steps": 1,
            "steps": 1,
            "group_size": 4,
            "prompts_per_step": 4,
            "max_new_tokens": 3,
            "num_train": 16,
            "num_eval": 2,
            "eval_every": 1,
            "warmup_steps": 0,
            "filter_groups": False,
        },
        "axes": {"steps_per_rollout": [1, 4], "lr": [1e-3, 1e-2]},
    },
    "sb3": {
        "envs": [{"label": "CartPole", "id": "CartPole-v1", "steps": 256, "eval_every": 256}],
        "settings": {"eval_episodes": 1},
        "axes": {"steps_per_rollout": [1, 4], "lr": [1e-3, 1e-2]},
    },
}


def _spec(kind: str) -> dict:
    return {
        "name": f"mini_{kind}",
        "kind": kind,
        "seeds": 1,
        "algorithms": ["ppo"],
        "erc": [None, BAND],
        **MINIATURES[kind],
    }


@pytest.fixture(scope="module")
def bandit_map(tmp_path_factory):
    root = tmp_path_factory.mktemp("stress")
    run_experiment(_spec("bandit"), root, workers=1, progress=False)
    return root / "mini_bandit"


@pytest.mark.parametrize("kind", ["bandit", "llm", "sb3"])
def test_two_by_two_map_runs_end_to_end(tmp_path, kind, request):
    spec = _spec(kind)
    if kind == "bandit":
        folder = request.getfixturevalue("bandit_map")
    else:
        run_experiment(spec, tmp_path, workers=1, progress=False)
        folder = tmp_path / spec["name"]
    runs = load_runs(folder)
    assert len(runs) == 2 * 2 * 2 and all(r.done for r in runs)
    cells = cell_table(runs)
    assert {(c["steps"], c["lr"], c["band"]) for c in cells} == {
        (s, lr, b) for s in (1, 4) for lr in spec["axes"]["lr"] for b in ("off", "(0.9, 1.1)")
    }
    # one optimiser step per rollout is on-policy (rho = 1): ERC cannot fire there
    on_policy = [c for c in cells if c["band"] != "off" and c["steps"] == 1]
    assert all(c["erc_clip_fraction"] == 0 for c in on_policy)
    assert len(effect_table(cells)) == 4
    report = write_report(folder).read_text()
    assert "## Off-policy stress map" in report and "stress_map.png" in report
    assert (folder / "figures" / f"{cells[0]['env']}_stress_map.png").exists()
    # who gets clipped: every run wrote its audit, the report draws it and tests the claim on it
    env = cells[0]["env"]
    assert "## Who gets clipped" in report and f"{env}_who_gets_clipped.png" in report
    assert (folder / "figures" / f"{env}_who_gets_clipped.png").stat().st_size > 10_000
    profiles = [run_profile(r) for r in runs]
    assert all(p is not None and p.updates > 0 for p in profiles)
    erc_off_policy = [
        p
        for r, p in zip(runs, profiles, strict=True)
        if r.config["erc"] and p.by_step["n"].size > 1
    ]
    assert erc_off_policy and all(p.has_tokens and p.erc for p in erc_off_policy)
    assert all(("position_bins" in p.bins) == (kind == "llm") for p in erc_off_policy)
    low_entropy = next(r for r in claims_table(cells, env) if r["claim"] == "low_entropy")
    assert "A != 0" in low_entropy["measured"] and "not measurable" not in low_entropy["verdict"]


def test_bandit_axis_moves_the_policy_further(bandit_map):
    """More steps per rollout at a higher lr: more drift, so ERC clips more."""
    cells = {
        (c["steps"], c["lr"]): c for c in cell_table(load_runs(bandit_map)) if c["band"] != "off"
    }
    assert cells[(4, 0.5)]["erc_clip_fraction"] > cells[(4, 0.05)]["erc_clip_fraction"]
    assert cells[(4, 0.5)]["erc_clip_fraction"] > cells[(1, 0.5)]["erc_clip_fraction"] == 0
    config = json.loads(
        (bandit_map / "V64-ppo-erc0.9-1.1-s4-lr0.5" / "0" / "config.json").read_text()
    )
    assert config["minibatches"] == 4 and config["lr"] == 0.5
    assert config["axes"] == {"steps_per_rollout": 4, "lr": 0.5}


def test_axis_settings_per_kind():
    assert axis_settings("bandit", {}, {"lr": 1.0}, {"steps_per_rollout": 8, "lr": 0.1}) == {
        "lr": 0.1,
        "minibatches": 8,
    }
    llm = axis_settings("llm", {}, {"prompts_per_step": 16}, {"steps_per_rollout": 4})
    assert llm["mini_batch_prompts"] == 4 and llm["epochs"] == 1
    llm = axis_settings("llm", {}, {"prompts_per_step": 8}, {"steps_per_rollout": 16})
    assert llm["mini_batch_prompts"] == 1 and llm["epochs"] == 2
    with pytest.raises(ValueError, match="steps_per_rollout=3"):
        axis_settings("llm", {}, {"prompts_per_step": 16}, {"steps_per_rollout": 3})
    sb3 = axis_settings("sb3", {"id": "Acrobot-v1"}, {}, {"steps_per_rollout": 2, "lr": 3e-4})
    assert sb3 == {"batch_size": 256 * 16, "n_epochs": 2, "learning_rate": 3e-4}


def test_expand_names_every_point():
    spec = {**_spec("bandit"), "algorithms": ["ppo", "gppo"]}
    runs = expand(spec)
    assert len(runs) == 2 * 2 * 2 * 2
    assert "V64-gppo-erc0.9-1.1-s4-lr0.05" in {r.variant for r in runs}


@pytest.mark.parametrize(
    ("axes", "needle"),
    [
        ({"epochs": [1]}, "unknown stress axis 'epochs'"),
        ({"steps_per_rollout": [2.5]}, "integers >= 1, got 2.5"),
        ({"lr": [0]}, "numbers > 0, got 0"),
        ({"lr": []}, "non-empty list"),
    ],
)
def test_bad_axes_are_named(tmp_path, axes, needle):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**_spec("bandit"), "axes": axes}))
    with pytest.raises(ValueError, match=needle):
        load_experiment(str(path))
    with pytest.raises(ValueError):
        check_axes(axes)


def test_shipped_stress_configs_load():
    names = sorted(p.stem for p in CONFIG_DIR.glob("stress_*.json"))
    assert names
    for name in names:
        spec = load_experiment(name)
        assert spec["axes"] and expand(spec)


def test_probability_of_improvement_and_difference():
    assert probability_of_improvement([3, 4, 5], [0, 1, 2])[0] == 1.0
    assert probability_of_improvement([1, 1], [1, 1])[0] == 0.5
    poi, lo, hi = probability_of_improvement([3, 4, 5, 6], [0, 1, 2, 3.5])
    assert poi == pytest.approx(15 / 16) and lo <= poi <= hi
    d, lo, hi = diff_ci([10, 11, 12, 13], [0, 1, 2, 3])
    assert d == pytest.approx(10) and 0 < lo <= d <= hi
    d, lo, hi = diff_ci([0, 5, 0, 5], [0, 5, 5, 0], statistic="mean")
    assert d == 0 and lo < 0 < hi
    assert all(math.isnan(v) for v in diff_ci([], [1.0]))


def _run(entropy, score, **config):
    rows = [
        {"step": i, "entropy": h, "expected_reward": s}
        for i, (h, s) in enumerate(zip(entropy, score, strict=True))
    ]
    path = Path("runs", str(config.get("variant", "V-ppo")), str(config.get("seed", 0)))
    return Run(path=path, config={"kind": "bandit", **config}, rows=rows, done=True)


def test_instability_thresholds():
    assert not instability(_run([1.0, 0.5, 0.2], [0.1, 0.5, 0.6]))["unstable"]
    assert instability(_run([1.0, 0.5, 0.005], [0.1, 0.5, 0.6]))["collapse"]
    assert instability(_run([1.0, 1.6, 1.2], [0.1, 0.5, 0.6]))["explosion"]
    flags = instability(_run([1.0, 0.5, 0.2], [0.1, 0.9, 0.4]))
    assert flags["score_drop"] and flags["unstable"]


def test_claims_verdict_names_the_axis():
    """ERC lowers the entropy's jitter only at 8 steps per rollout (significantly, paired by
    seed, after Holm over the 4 cells): the verdict says it depends on that."""
    runs = []
    for steps in (1, 8):
        for lr in (0.1, 0.2):
            for band in (None, BAND):
                for seed in range(3):
                    wobble = (0.3 if (band is None and steps == 8) else 0.1) + 0.001 * seed
                    h = [1.0, 1.0 + wobble, 1.0, 1.0 + wobble, 1.0, 1.0 + wobble]
                    runs.append(
                        _run(
                            h,
                            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                            algorithm="ppo",
                            seed=seed,
                            erc=band,
                            variant=f"V-ppo-{band}-{steps}-{lr}",
                            axes={"steps_per_rollout": steps, "lr": lr},
                        )
                    )
    cells = cell_table(runs)
    row = next(r for r in claims_table(cells, "V") if r["claim"] == "smoother_entropy")
    assert row["verdict"] == (
        "holds in 2, opposite in 0 of 4 cells; depends on steps per rollout: holds at 8"
    )
    (row,) = [r for r in claims_table(cells, "V") if r["claim"] == "low_entropy"]
    assert row["verdict"].startswith("not measurable here (no clipping.jsonl")
    score = next(r for r in claims_table(cells, "V") if r["claim"] == "score")
    assert score["verdict"] == "no significant difference in 4 cells"
    assert np.isfinite([c["volatility"] for c in cells]).all()


def test_one_run_per_group_is_never_significant():
    runs = [
        _run([1.0, 0.9, 0.8], [0.1, 0.2, s], algorithm="ppo", erc=band, variant=f"V-ppo-{band}")
        for band, s in ((None, 0.3), (BAND, 0.9))
    ]
    for r in runs:
        r.config["axes"] = {"steps_per_rollout": 2, "lr": 0.1}
    (effect,) = effect_table(cell_table(runs))
    assert effect["d_score"] == pytest.approx(0.6) and effect["significant"] == []


def test_stress_map_colours_blue_for_better_with_erc():
    """Every effect panel: blue = higher score, less jitter, slower fall with ERC; red the
    opposite."""
    import matplotlib

    better_sign = {"score": 1.0, "jitter": -1.0, "trend": 1.0}  # the direction shown blue
    effect_rows = [row for row in _MAP_ROWS if row[2].startswith("d_")]
    assert {row[0] for row in effect_rows} == set(better_sign)
    for name, _, _, cmap in effect_rows:
        # the panels map [-lim, lim] onto [0, 1]
        red, _, blue, _ = matplotlib.colormaps[cmap](0.5 + 0.4 * better_sign[name])
        assert blue > red, name
        red, _, blue, _ = matplotlib.colormaps[cmap](0.5 - 0.4 * better_sign[name])
        assert red > blue, name


@pytest.mark.parametrize(
    "value, text",
    [
        (436.2, "436"),
        (-123.4, "-123"),
        (38.0, "38"),
        (5.1, "5.1"),
        (-0.72, "-0.72"),
        (0.0081, "0.0081"),
    ],
)
def test_stress_map_cell_text(value, text):
    assert _cell_text(value) == text


def _pair_cells(d_by_seed, env="V", steps=2, lr=0.1, algorithm="ppo"):
    """An ERC-off and an ERC cell whose final scores differ by ``d_by_seed[seed]``."""
    runs = []
    for seed, d in d_by_seed.items():
        for band, score in ((None, 0.5 + 0.01 * seed), (BAND, 0.5 + 0.01 * seed + d)):
            run = _run(
                [1.0, 0.9, 0.8, 0.7],
                [0.1, 0.2, 0.3, score],
                algorithm=algorithm,
                seed=seed,
                erc=band,
                variant=f"{env}-{algorithm}-{band}-{steps}-{lr}",
                axes={"steps_per_rollout": steps, "lr": lr},
            )
            run.config["env_label"] = env
            runs.append(run)
    return runs


def test_effects_are_paired_by_seed_and_equal_scipy():
    from scipy import stats

    d = {0: 0.05, 1: 0.07, 2: 0.04, 3: 0.06, 4: 0.08}
    (e,) = effect_table(cell_table(_pair_cells(d)))
    ref = stats.ttest_rel([0.5 + 0.01 * s + v for s, v in d.items()], [0.5 + 0.01 * s for s in d])
    assert e["paired"] and e["n_pairs"] == 5
    assert e["d_score"] == pytest.approx(0.06)
    assert e["p_score"] == pytest.approx(ref.pvalue)
    assert e["p_exact_score"] == pytest.approx(2 / 32)  # every difference positive
    # a family of one: Holm changes nothing
    assert e["q_score"] == pytest.approx(e["p_score"]) and "score" in e["significant"]


def test_holm_over_the_maps_cells_and_primary_cells():
    d_big = {0: 0.05, 1: 0.07, 2: 0.04, 3: 0.06, 4: 0.08}  # p about 0.002
    d_none = {0: 0.02, 1: -0.03, 2: 0.01, 3: -0.01, 4: 0.0}
    runs = _pair_cells(d_big, lr=0.1) + _pair_cells(d_none, lr=0.2)
    runs += _pair_cells(d_none, lr=0.3) + _pair_cells(d_none, lr=0.4)
    rows = {e["lr"]: e for e in effect_table(cell_table(runs))}
    big = rows[0.1]
    others = sorted(r["p_score"] for lr, r in rows.items() if lr != 0.1)
    # the smallest p of four is multiplied by 4 (Holm's first step)
    assert big["q_score"] == pytest.approx(min(1.0, 4 * big["p_score"]))
    assert not any(r["primary"] for r in rows.values())
    # declared up front as the one primary cell, it is a family of one
    primary = [{"env": "V", "lr": 0.1}]
    rows = {e["lr"]: e for e in effect_table(cell_table(runs), primary)}
    assert rows[0.1]["primary"] and rows[0.1]["q_score"] == pytest.approx(rows[0.1]["p_score"])
    q = sorted(r["q_score"] for lr, r in rows.items() if lr != 0.1)
    assert q[0] == pytest.approx(min(1.0, 3 * others[0]))  # the exploratory family of three


def test_primary_cells_are_checked_against_the_grid():
    from erc_gym.lab.config import ConfigError, validate_experiment

    spec = {
        "name": "p",
        "kind": "bandit",
        "algorithms": ["ppo"],
        "erc": [None, [0.95, 1.05]],
        "envs": [{"label": "V", "vocab_size": 16}],
        "axes": {"steps_per_rollout": [2, 8], "lr": [0.1]},
    }
    ok = validate_experiment({**spec, "primary": [{"env": "V", "steps_per_rollout": 8}]})
    assert ok["primary"] == [{"env": "V", "steps_per_rollout": 8}]
    assert "primary" not in validate_experiment(spec)
    for bad, needle in (
        ({"env": "W"}, "primary[0].env = 'W': not a value of the grid"),
        ({"erc": [0.9, 1.1]}, "primary[0].erc"),
        ({"steps_per_rollout": 4}, "primary[0].steps_per_rollout = 4"),
        ({"stepz": 8}, "unknown key"),
        ({}, "at least one of"),
    ):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            validate_experiment({**spec, "primary": [bad]})

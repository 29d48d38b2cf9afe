"""Methods in the experiment grid: the ``methods`` axis, its schema, the comparison tables
(every method against ``base``, ERC against its controls and rivals) and the report's leaderboard,
with a miniature of the comparison for every trainer kind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from erc_gym.cli import main
from erc_gym.lab.analysis import Run, load_runs
from erc_gym.lab.config import ConfigError, validate_experiment
from erc_gym.lab.grid import expand
from erc_gym.lab.rundir import resolved_config
from erc_gym.lab.stress import cell_table, effect_table, method_table
from erc_gym.losses import METHODS, method_settings
from erc_gym.methods import acted_on_metric

BASE = {
    "name": "f",
    "kind": "bandit",
    "seeds": 2,
    "algorithms": ["ppo"],
    "envs": [{"label": "V", "vocab_size": 64, "num_contexts": 4}],
    "settings": {"iterations": 3, "group": 4},
    "axes": {"steps_per_rollout": [4], "lr": [0.1]},
}


def _spec(**change):
    return validate_experiment({**BASE, "methods": ["base", "erc", "random-matched"], **change})


# ------------------------------------------------------------------ the grid


def test_methods_replace_the_band_axis_and_name_the_runs():
    spec = _spec(methods=["base", "erc", {"name": "clip-cov", "clip_cov_ratio": 0.3}])
    assert "erc" not in spec  # each method sets its band
    runs = expand(spec)
    assert [r.variant for r in runs[::2]] == [
        "V-ppo-base-s4-lr0.1",
        "V-ppo-erc-s4-lr0.1",
        "V-ppo-clip-cov-s4-lr0.1",
    ]
    by = {r.method: r for r in runs if r.seed == 1}
    assert by["base"].erc is None and by["erc"].erc == (0.95, 1.05)
    assert by["clip-cov"].settings["clip_cov_ratio"] == 0.3 and by["clip-cov"].erc is None
    assert by["erc"].axes == {"steps_per_rollout": 4, "lr": 0.1, "method": "erc"}
    record = resolved_config(by["clip-cov"])
    assert record["method"] == "clip-cov" and record["trainer"]["clip_cov_ratio"] == 0.3
    assert record["trainer"]["erc_low"] is None
    assert by["erc"].meta()["method"] == "erc"


def test_a_config_without_methods_records_no_method():
    spec = validate_experiment({**BASE, "erc": [None, [0.95, 1.05]]})
    run = expand(spec)[0]
    assert run.method is None and "method" not in run.meta()
    assert "method" not in resolved_config(run) and "methods" not in spec


def test_labels_overrides_and_the_band_of_an_erc_entry():
    spec = _spec(
        methods=[
            "base",
            {"name": "erc", "label": "erc-wide", "erc_low": 0.8, "erc_high": 1.2},
            {"name": "random-matched", "control_low": 0.8, "control_high": 1.2},
        ]
    )
    runs = {r.method: r for r in expand(spec)}
    assert (
        runs["erc-wide"].erc == (0.8, 1.2) and runs["erc-wide"].variant == "V-ppo-erc-wide-s4-lr0.1"
    )
    assert runs["random-matched"].settings["control_low"] == 0.8


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"methods": ["bse"]}, "methods[0] = 'bse': unknown method (did you mean 'base'?)"),
        (
            {"methods": [{"name": "clip_cov"}]},
            "methods[0].name = 'clip_cov': unknown method (did you mean 'clip-cov'?)",
        ),
        ({"methods": [{"label": "x"}]}, "methods[0]: missing 'name'"),
        (
            {"methods": [{"name": "clip-cov", "clip_cov_ration": 0.1}]},
            "methods[0].clip_cov_ration: unknown key (did you mean 'clip_cov_ratio'?)",
        ),
        ({"methods": [{"name": "clip-cov", "lr": 0.1}]}, "methods[0].lr: unknown key"),
        ({"methods": [{"name": "erc", "label": "a b"}]}, "methods[0].label = 'a b'"),
        ({"methods": ["erc", "erc"]}, "methods: duplicate label 'erc'"),
        ({"methods": []}, "methods: a non-empty list"),
        ({"methods": [3]}, "methods[0] = 3: a method is a name"),
        ({"erc": [None]}, "erc and methods: each method sets its own ERC band"),
        (
            {"methods": [{"name": "base", "erc_low": 0.9}]},
            "methods[0] (base): erc_low and erc_high make the band",
        ),
        (
            {"methods": [{"name": "erc", "erc_low": 1.1}]},
            "methods[0] (erc): the ERC band [1.1, 1.05] needs",
        ),
        (
            {
                "methods": [
                    "erc",
                    {"name": "random-matched", "control_low": 0.9, "control_high": 1.1},
                ]
            },
            "methods[1] (random-matched) imitates the band (0.9, 1.1), which no ERC method",
        ),
        (
            {
                "methods": ["base", "entropy-bonus"],
                "settings": {"iterations": 3, "group": 4, "ent_coef": 0.1},
            },
            "settings.ent_coef is also set by method 'entropy-bonus'",
        ),
        (
            {
                "methods": ["base", "target-kl"],
                "envs": [{"label": "V", "vocab_size": 64, "target_kl": 0.1}],
            },
            "envs[0] (V).target_kl is also set by method 'target-kl'",
        ),
        (
            {"methods": [{"name": "clip-cov", "clip_cov_ratio": "x"}]},
            "methods[0] (clip-cov): clip_cov_ratio = 'x'",
        ),
        (
            {"methods": [{"name": "clip-cov", "clip_cov_ratio": 2.0}]},
            "clip_cov_ratio must be a finite number > 0.0 and <= 1.0",
        ),
        (
            {"methods": [{"name": "clip-cov", "kl_cov_ratio": 0.1}]},
            "at most one token gate can be on",
        ),
        ({"primary": [{"method": "ercc"}]}, "primary[0].method = 'ercc': not a value of the grid"),
        (
            {"primary": [{"method": "erc", "against": "erc"}]},
            "primary[0]: a method is not compared with itself",
        ),
    ],
)
def test_bad_methods_are_refused_in_one_line(change, needle):
    with pytest.raises(ConfigError) as err:
        _spec(**change)
    text = str(err.value)
    assert needle in text and "\n" not in text, text


def test_primary_methods_need_a_methods_config():
    with pytest.raises(ConfigError, match="'method' and 'against' select methods; this config"):
        validate_experiment({**BASE, "primary": [{"method": "erc"}]})


def test_sb3_method_settings_are_checked_when_the_config_is_read():
    spec = {
        "name": "s",
        "kind": "sb3",
        "algorithms": ["ppo"],
        "methods": ["base", {"name": "clip-cov", "top_entropy_quantile": 0.5}],
        "envs": [{"label": "CartPole", "id": "CartPole-v1"}],
    }
    with pytest.raises(ConfigError, match=re.escape("methods[1] (clip-cov): at most one token")):
        validate_experiment(spec)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_has_its_acted_on_metric(name):
    settings = method_settings(name)
    erc_on = settings.get("erc_low") is not None
    expected = {
        "base": "clip_fraction",
        "erc": "erc_clip_fraction",
        "random-matched": "random_mask_fraction",
        "random": "random_mask_fraction",
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
    }
    assert acted_on_metric(settings, erc_on=erc_on) == expected[name]


# ------------------------------------------------------------------ the tables


def _runs(scores: dict[str, dict[int, float]], **extra) -> list[Run]:
    """Finished bandit runs of a methods grid at one point: method -> seed -> final score."""
    runs = []
    for method, by_seed in scores.items():
        settings = {
            k: v for k, v in method_settings(method).items() if k not in ("erc_low", "erc_high")
        }
        band = method_settings(method).get("erc_low")
        for seed, score in by_seed.items():
            config = {
                "kind": "bandit",
                "variant": f"V-ppo-{method}-s4-lr0.1",
                "algorithm": "ppo",
                "seed": seed,
                "erc": None if band is None else [0.95, 1.05],
                "env_label": "V",
                "settings": settings,
                "axes": {"steps_per_rollout": 4, "lr": 0.1, "method": method},
                **extra,
            }
            rows = [
                {"step": i, "entropy": h, "expected_reward": s, "grad_norm": 1.0}
                for i, (h, s) in enumerate([(1.0, 0.1), (0.9, 0.2), (0.8, score)])
            ]
            runs.append(
                Run(
                    path=Path("r", config["variant"], str(seed)),
                    config=config,
                    rows=rows,
                    done=True,
                )
            )
    return runs


def test_every_method_is_compared_with_base_and_erc_with_the_others_paired_by_seed():
    from scipy import stats

    base = {s: 0.5 + 0.01 * s for s in range(5)}
    erc = {s: v + 0.05 + 0.001 * s for s, v in base.items()}
    rand = {s: v + 0.01 * (-1) ** s for s, v in base.items()}
    rows = method_table(cell_table(_runs({"base": base, "erc": erc, "random-matched": rand})))
    pairs = {(r["method"], r["against"]): r for r in rows}
    assert set(pairs) == {("erc", "base"), ("random-matched", "base"), ("erc", "random-matched")}
    e = pairs[("erc", "base")]
    ref = stats.ttest_rel(list(erc.values()), list(base.values()))
    assert e["paired"] and e["n_pairs"] == 5 and e["table"] == "reference"
    assert e["d_score"] == pytest.approx(0.052) and e["p_score"] == pytest.approx(ref.pvalue)
    # Holm over the two comparisons with base (one family), not with ERC's own table
    p = sorted([e["p_score"], pairs[("random-matched", "base")]["p_score"]])
    assert e["q_score"] == pytest.approx(min(1.0, 2 * p[0]))
    c = pairs[("erc", "random-matched")]
    assert c["table"] == "erc" and c["q_score"] == pytest.approx(c["p_score"])
    ref = stats.ttest_rel(list(erc.values()), list(rand.values()))
    assert c["p_score"] == pytest.approx(ref.pvalue)
    # the legacy ERC-vs-off table ignores method cells
    assert effect_table(cell_table(_runs({"base": base, "erc": erc}))) == []


def test_a_control_is_compared_only_with_the_erc_of_its_band():
    runs = _runs({"base": {0: 0.5, 1: 0.6}, "erc": {0: 0.5, 1: 0.6}})
    wide = _runs({"random-matched": {0: 0.5, 1: 0.6}})
    for run in wide:
        run.config["settings"] |= {"control_low": 0.8, "control_high": 1.2}
    rows = method_table(cell_table(runs + wide))
    assert {(r["method"], r["against"]) for r in rows} == {
        ("erc", "base"),
        ("random-matched", "base"),
    }


def test_primary_comparisons_are_their_own_family():
    base = {s: 0.5 + 0.01 * s for s in range(5)}
    up = {s: v + 0.05 + 0.001 * s for s, v in base.items()}
    scores = {"base": base, "erc": up, "random-matched": up, "equal-step": up}
    rows = method_table(cell_table(_runs(scores)), primary=[{"method": "erc"}])
    pairs = {(r["method"], r["against"]): r for r in rows}
    assert [k for k, r in pairs.items() if r["primary"]] == [("erc", "base")]  # against: base
    assert pairs[("erc", "base")]["q_score"] == pytest.approx(pairs[("erc", "base")]["p_score"])
    rows = method_table(cell_table(_runs(scores)), primary=[{"against": "equal-step"}])
    assert [(r["method"], r["against"]) for r in rows if r["primary"]] == [("erc", "equal-step")]


# ------------------------------------------------------------------ miniatures, every kind

MINIATURES = {
    "bandit": {
        "envs": [{"label": "V64", "vocab_size": 64, "num_contexts": 4}],
        "settings": {"iterations": 3, "group": 4, "log_time": True},
        "axes": {"steps_per_rollout": [4], "lr": [0.5]},
    },
    "llm": {
        "envs": [{"label": "add1", "model": "tiny", "digits": 1, "ops": "+"}],
        "settings": {
            "sft_steps": 1,
            "steps": 2,
            "group_size": 4,
            "prompts_per_step": 4,
            "max_new_tokens": 3,
            "num_train": 16,
            "num_eval": 2,
            "eval_every": 1,
            "warmup_steps": 0,
            "filter_groups": False,
        },
        "axes": {"steps_per_rollout": [4], "lr": [1e-2]},
    },
    "sb3": {
        "envs": [{"label": "CartPole", "id": "CartPole-v1", "steps": 512, "eval_every": 256}],
        "settings": {"eval_episodes": 1},
        "axes": {"steps_per_rollout": [4], "lr": [1e-2]},
    },
}


@pytest.mark.parametrize("kind", sorted(MINIATURES))
def test_a_miniature_comparison_runs_and_reports_for_every_kind(kind, tmp_path, capsys):
    """2 seeds x (base, ERC, the matched random mask) through ``erc-gym experiment`` and
    ``erc-gym report``: the leaderboard, ERC against its control, the figure."""
    config = {
        "name": f"field_{kind}",
        "kind": kind,
        "seeds": 2,
        "algorithms": ["ppo"],
        "methods": ["base", "erc", "random-matched"],
        "primary": [{"method": "erc", "against": "random-matched"}],
        **MINIATURES[kind],
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    runs = tmp_path / "runs"
    main(["experiment", str(path), "--runs", str(runs), "--workers", "1", "--no-progress"])
    main(["report", str(runs / config["name"])])
    folder = runs / config["name"]
    assert len([r for r in load_runs(folder) if r.done]) == 6
    cells = {c["method"]: c for c in cell_table(load_runs(folder))}
    assert cells["erc"]["acted_on_metric"] == "erc_clip_fraction"
    assert cells["random-matched"]["acted_on_metric"] == "random_mask_fraction"
    for c in cells.values():  # each trainer logs the method's metric and its update time
        assert c["acted_on"] == c["acted_on"] and c["seconds_per_update"] > 0, c["method"]
    report = (folder / "report.md").read_text()
    env = config["envs"][0]["label"]
    assert "## Methods compared" in report and f"{env}_leaderboard.png" in report
    assert (folder / "figures" / f"{env}_leaderboard.png").exists()
    table = report[report.index("#### PPO, 4 steps per rollout") :]
    assert re.search(r"\| `erc` \| 2 \| .* \| erc_clip_fraction ", table)
    assert re.search(r"\| `erc` \| `random-matched` \(P\) \| 2 \|", table)
    assert "## Off-policy stress map" not in report


def test_cells_keep_only_the_selected_cells_of_the_product():
    spec = validate_experiment(
        {
            **BASE,
            "algorithms": ["ppo", "gppo"],
            "methods": ["base", "erc"],
            "axes": {"steps_per_rollout": [2, 16], "lr": [0.05, 0.25]},
            "cells": [
                {"algorithm": "gppo", "steps_per_rollout": 16, "lr": 0.05},
                {"lr": 0.25, "algorithm": "ppo"},
            ],
        }
    )
    points = {(r.algorithm, r.axes["steps_per_rollout"], r.axes["lr"]) for r in expand(spec)}
    assert points == {("gppo", 16, 0.05), ("ppo", 2, 0.25), ("ppo", 16, 0.25)}
    for bad, needle in (
        ({"lr": 0.3}, "cells[0].lr = 0.3: not a value of the grid"),
        ({"method": "erc"}, "cells[0].method = 'erc': unknown key"),
        ({}, "cells[0]: select cells with at least one of"),
    ):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            validate_experiment({**BASE, "cells": [bad]})


def test_a_method_clip_variant_replaces_the_sb3_recipes_clip_and_dual_clip():
    spec = validate_experiment(
        {
            "name": "s",
            "kind": "sb3",
            "seeds": 1,
            "algorithms": ["gppo"],
            "methods": ["base", "kl-cov", "dppo-tv"],
            "envs": [{"label": "CartPole", "id": "CartPole-v1"}],
        }
    )
    trainer = {r.method: resolved_config(r)["trainer"] for r in expand(spec)}
    assert (trainer["base"]["clip_variant"], trainer["base"]["dual_clip"]) == ("gppo", 10.0)
    assert trainer["kl-cov"]["clip_variant"] == "none" and "dual_clip" not in trainer["kl-cov"]
    assert trainer["dppo-tv"]["clip_variant"] == "dppo-tv" and "dual_clip" not in trainer["dppo-tv"]

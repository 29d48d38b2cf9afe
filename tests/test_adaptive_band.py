"""This project's adaptive ERC band: the controller's rule, its input, its validation, and the
option reaching each trainer, the experiment schema and the report."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import subprocess
import sys

import pytest
import torch

from erc_gym.adaptive_band import AdaptiveERCBand, off_policy_clip_fraction
from erc_gym.bandit import BanditConfig, train_bandit
from erc_gym.lab.analysis import load_runs
from erc_gym.lab.config import ConfigError, load_experiment, validate_experiment
from erc_gym.lab.grid import expand
from erc_gym.lab.report import stress_markdown, write_report
from erc_gym.lab.rundir import resolved_config
from erc_gym.lab.runner import run_experiment
from erc_gym.lab.stress import band_rule_table, cell_table
from erc_gym.losses import ERCConfig, LossConfig, policy_loss

# ------------------------------------------------------------------ the rule


def test_widens_above_target_and_narrows_below():
    band = AdaptiveERCBand(
        target=0.2, low=0.9, high=1.1, tolerance=1.5, factor=2.0, min_half_width=0.01
    )
    wide = band.update(0.31)  # above 0.2 * 1.5
    assert (wide.low, wide.high) == pytest.approx((0.8, 1.2))
    narrow = band.update(0.13)  # below 0.2 / 1.5
    assert (narrow.low, narrow.high) == pytest.approx((0.9, 1.1))
    assert band.band == narrow


def test_no_change_inside_the_tolerance():
    band = AdaptiveERCBand(target=0.2, low=0.9, high=1.1, tolerance=1.5)
    for f in (0.2, 0.14, 0.29):
        assert band.update(f) == ERCConfig(0.9, 1.1)


def test_asymmetric_band_scales_each_half_width():
    band = AdaptiveERCBand(target=0.2, low=0.9, high=1.3, factor=2.0)
    new = band.update(0.9)
    assert (new.low, new.high) == pytest.approx((0.8, 1.6))


def test_half_widths_are_clamped():
    band = AdaptiveERCBand(target=0.2, low=0.95, high=1.05, min_half_width=0.02)
    for _ in range(30):
        band.update(0.0)
    assert (band.low, band.high) == pytest.approx((0.98, 1.02))
    for _ in range(30):
        band.update(1.0)
    assert (band.low, band.high) == pytest.approx((0.01, 1.99))
    assert band.low > 0  # still a valid ERCConfig


def test_by_default_the_band_never_gets_narrower_than_its_start():
    band = AdaptiveERCBand(target=0.2, low=0.9, high=1.2)
    for _ in range(5):
        assert band.update(0.0) == ERCConfig(0.9, 1.2)  # too little clipping: stays at start
    band.update(0.9)
    assert band.low < 0.9 and band.high > 1.2  # too much: widens
    for _ in range(5):
        band.update(0.0)
    assert (band.low, band.high) == pytest.approx((0.9, 1.2))  # and narrows back to the start


@pytest.mark.parametrize("measured", [None, math.nan])
def test_no_off_policy_step_keeps_the_band(measured):
    band = AdaptiveERCBand(target=0.2)
    assert band.update(measured) == ERCConfig(0.95, 1.05)


def test_state_dict_round_trip():
    band = AdaptiveERCBand(target=0.2)
    band.update(0.9)
    other = AdaptiveERCBand(target=0.2)
    other.load_state_dict(band.state_dict())
    assert other.band == band.band != ERCConfig(0.95, 1.05)


# ------------------------------------------------------------------ its input


def _stats(rho: float, n: int = 8):
    """LossStats of one policy_loss call whose entropy ratio is ``rho`` on every token."""
    lp = torch.zeros(2, n, requires_grad=True)
    h_old = torch.ones(2, n)
    out = policy_loss(
        lp,
        torch.zeros(2, n),
        torch.ones(2, n),
        entropy=h_old * rho,
        old_entropy=h_old,
        config=LossConfig.ppo(erc=ERCConfig(0.95, 1.05)),
        metrics=False,
    )
    return out.stats


def test_off_policy_clip_fraction_skips_the_on_policy_first_step():
    on_policy, off_clipped, off_kept = _stats(1.0), _stats(1.2), _stats(1.01)
    # the first step's zero clip does not dilute the measurement
    assert off_policy_clip_fraction([on_policy, off_clipped]) == 1.0
    assert off_policy_clip_fraction([on_policy, off_clipped, off_kept]) == 0.5
    # one step per rollout: nothing off-policy, so the band is left alone
    assert off_policy_clip_fraction([on_policy]) is None
    band = AdaptiveERCBand(target=0.2)
    assert band.update(off_policy_clip_fraction([on_policy])) == ERCConfig(0.95, 1.05)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5, True, "0.2", math.nan])
def test_bad_target_names_the_setting(target):
    with pytest.raises(ValueError, match="erc_target_clip_fraction"):
        AdaptiveERCBand(target=target)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="erc_target_clip_fraction"):
        BanditConfig(erc_low=0.95, erc_high=1.05, erc_target_clip_fraction=target).validate()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"tolerance": 1.0}, "tolerance"),
        ({"factor": 0.5}, "factor"),
        ({"min_half_width": 0.0}, "min_half_width"),
        ({"min_half_width": 0.5, "max_half_width": 0.4}, "max_half_width"),
        ({"max_half_width": 1.0}, "max_half_width"),
        ({"low": 1.0}, "low"),
    ],
)
def test_bad_controller_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        AdaptiveERCBand(target=0.2, **kwargs)


def test_target_without_erc_is_refused():
    with pytest.raises(ValueError, match=r"erc_target_clip_fraction=0\.2 adapts the ERC band"):
        BanditConfig(erc_target_clip_fraction=0.2).validate()
    from erc_gym.llm import TrainerConfig

    with pytest.raises(ValueError, match="erc_target_clip_fraction"):
        TrainerConfig(erc_target_clip_fraction=0.2).validate()
    with pytest.raises(ValueError, match="erc_target_clip_fraction"):
        TrainerConfig(erc_low=0.95, erc_high=1.05, erc_target_clip_fraction=2.0).validate()


def test_ercppo_refuses_bad_targets_and_band_schedules():
    from erc_gym import ERCPPO

    with pytest.raises(ValueError, match="erc_target_clip_fraction"):
        ERCPPO("MlpPolicy", "CartPole-v1", erc_target_clip_fraction=1.2, device="cpu")
    with pytest.raises(ValueError, match="but ERC is off"):
        ERCPPO(
            "MlpPolicy",
            "CartPole-v1",
            erc_low=None,
            erc_high=None,
            erc_target_clip_fraction=0.2,
            device="cpu",
        )
    with pytest.raises(ValueError, match="not schedules"):
        ERCPPO(
            "MlpPolicy",
            "CartPole-v1",
            erc_low=lambda p: 0.9,
            erc_high=1.1,
            erc_target_clip_fraction=0.2,
            device="cpu",
        )


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "CartPole-v1", "--erc-target-clip-fraction", "1.5", "--steps", "64"],
        ["train", "CartPole-v1", "--no-erc", "--erc-target-clip-fraction", "0.2"],
        ["train", "CartPole-v1", "--algo", "ppo", "--erc-target-clip-fraction", "0.2"],
        ["llm", "--erc-low", "0.95", "--erc-high", "1.05", "--erc-target-clip-fraction", "3"],
    ],
)
def test_cli_bad_target_is_one_line_and_exit_2(argv, tmp_path, monkeypatch, capsys):
    from erc_gym.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "erc-target-clip-fraction" in err.replace("_", "-")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_is_one_line_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "erc_gym",
            "train",
            "CartPole-v1",
            "--erc-target-clip-fraction",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ the trainers

BANDIT = {
    "vocab_size": 256,
    "num_contexts": 4,
    "group": 8,
    "iterations": 6,
    "minibatches": 4,
    "lr": 0.5,
    "erc_low": 0.95,
    "erc_high": 1.05,
    "save_every": 0,
}


def test_bandit_band_moves_toward_the_target():
    fixed = train_bandit(BanditConfig(**BANDIT))[1:]
    assert {(r["erc_low"], r["erc_high"]) for r in fixed} == {(0.95, 1.05)}
    # a target far below what (0.95, 1.05) clips here: the band widens ...
    wide = train_bandit(BanditConfig(**BANDIT, erc_target_clip_fraction=0.01))[1:]
    assert wide[0]["erc_low"] == 0.95  # the first batch trains with the starting band
    assert wide[-1]["erc_low"] < 0.9 and wide[-1]["erc_high"] > 1.1
    # ... and the loss uses it: fewer samples are clipped than with the fixed band
    clipped = {"fixed": sum(r["erc_clip_fraction"] for r in fixed)}
    clipped["wide"] = sum(r["erc_clip_fraction"] for r in wide)
    assert clipped["wide"] < clipped["fixed"]
    # a target far above: the band stays at its start (its narrowest), so the run is the
    # fixed-band run exactly
    never = train_bandit(BanditConfig(**BANDIT, erc_target_clip_fraction=0.95))[1:]
    assert json.dumps(never) == json.dumps(fixed)  # (NaN-safe comparison)
    # started narrow, the band may narrow down to where it started: it clips more
    narrow_start = {**BANDIT, "erc_low": 0.99, "erc_high": 1.01}
    narrow = train_bandit(BanditConfig(**narrow_start, erc_target_clip_fraction=0.95))[1:]
    assert {r["erc_low"] for r in narrow} == {0.99}
    assert sum(r["erc_clip_fraction"] for r in narrow) > clipped["fixed"]
    # each batch's band is the rule applied to the previous batch's logged off-policy clip
    for rows, target in ((wide, 0.01), (never, 0.95)):
        replay = AdaptiveERCBand(target=target)
        for before, after in itertools.pairwise(rows):
            assert before["erc_clip_fraction_off_policy"] >= before["erc_clip_fraction"]
            assert replay.update(before["erc_clip_fraction_off_policy"]).low == after["erc_low"]


def test_bandit_one_step_per_batch_keeps_the_band():
    rows = train_bandit(BanditConfig(**{**BANDIT, "minibatches": 1}, erc_target_clip_fraction=0.5))
    assert {(r["erc_low"], r["erc_high"]) for r in rows[1:]} == {(0.95, 1.05)}
    assert all(r["erc_clip_fraction"] == 0 for r in rows[1:])
    assert all(math.isnan(r["erc_clip_fraction_off_policy"]) for r in rows[1:])


def test_bandit_resume_restores_the_band(tmp_path):
    config = BanditConfig(**{**BANDIT, "save_every": 1}, erc_target_clip_fraction=0.01)
    whole = train_bandit(config, tmp_path / "a")
    train_bandit(config, tmp_path / "b", max_iterations=3)
    rest = train_bandit(config, tmp_path / "b")
    assert [r["erc_low"] for r in rest] == [r["erc_low"] for r in whole[4:]]
    assert rest[-1]["expected_reward"] == whole[-1]["expected_reward"]


def test_ercppo_band_moves_and_survives_save_load(tmp_path):
    from stable_baselines3.common.env_util import make_vec_env

    from erc_gym import ERCPPO

    kw = {"n_steps": 64, "batch_size": 16, "n_epochs": 4, "learning_rate": 3e-3, "seed": 0}
    model = ERCPPO(
        "MlpPolicy",
        "CartPole-v1",
        erc_low=0.99,
        erc_high=1.01,
        erc_target_clip_fraction=0.01,
        device="cpu",
        **kw,
    )
    lows = []
    for _ in range(3):
        model.learn(64, reset_num_timesteps=False)
        lows.append(model.logger.name_to_value["train/erc_low"])
    assert lows[0] == 0.99 and lows[-1] < 0.99  # logged: the band in force, moving
    assert model.logger.name_to_value["train/erc_clip_fraction_off_policy"] > 0
    assert model.erc_band_control is not None
    assert model.erc_band_control.low < lows[-1]  # the next update's band is wider still
    model.save(tmp_path / "m.zip")
    loaded = ERCPPO.load(tmp_path / "m.zip", env=make_vec_env("CartPole-v1", n_envs=1))
    assert loaded.erc_band_control is not None
    assert loaded.erc_band_control.band == model.erc_band_control.band
    loaded.learn(64, reset_num_timesteps=False)
    assert loaded.logger.name_to_value["train/erc_low"] == model.erc_band_control.low


def test_llm_trainer_band_moves(tmp_path):
    from erc_gym.llm import ERCTrainer, TrainerConfig

    config = TrainerConfig(
        sft_steps=20,
        steps=3,
        group_size=4,
        prompts_per_step=4,
        mini_batch_prompts=1,
        max_new_tokens=3,
        num_train=32,
        num_eval=2,
        eval_every=10,
        lr=0.1,
        warmup_steps=0,
        filter_groups=False,
        erc_low=0.99,
        erc_high=1.01,
        erc_target_clip_fraction=0.01,  # far below what this run clips: the band widens
        progress=False,
        run_dir=str(tmp_path),
        device="cpu",
    )
    trainer = ERCTrainer(config)
    lines = [ln for ln in trainer.train() if "erc_low" in ln]
    assert lines[0]["erc_low"] == 0.99 and lines[0]["erc_clip_fraction_off_policy"] > 0.015
    assert lines[1]["erc_low"] < 0.99 < 1.01 < lines[1]["erc_high"]
    assert lines[-1]["erc_low"] < lines[1]["erc_low"]
    assert trainer.erc_band_control is not None
    saved = torch.load(tmp_path / "llm" / "checkpoint.pt", weights_only=False)
    assert saved["erc_band"] == trainer.erc_band_control.state_dict()


# ------------------------------------------------------------------ runner, schema, report


@pytest.mark.parametrize(
    ("name", "band"),
    [("stress_bandit_adaptive", "0.95-1.05"), ("stress_bandit_adaptive_narrow", "0.99-1.01")],
)
def test_shipped_adaptive_configs_load_and_name_their_variants(name, band):
    spec = load_experiment(name)
    assert spec["settings"]["erc_target_clip_fraction"] == 0.2
    assert spec["baseline"] == "stress_bandit"
    fixed = {
        (r.variant.replace("0.95-1.05", band), r.seed)
        for r in expand(load_experiment("stress_bandit"))
    }
    runs = expand(spec)
    assert len(runs) == 2 * 2 * 2 * 10
    assert all(f"-erc{band}-target0.2-" in r.variant for r in runs)
    # the same points and seeds as the fixed-band map
    same = {(r.variant.replace("-target0.2", ""), r.seed) for r in runs}
    assert same <= fixed


def test_fixed_band_run_json_is_unchanged_by_the_new_setting():
    """Runs recorded before the option existed still match (and resume)."""
    fixed = expand(load_experiment("stress_bandit"))[0]
    assert "erc_target_clip_fraction" not in resolved_config(fixed)["trainer"]
    adaptive = expand(load_experiment("stress_bandit_adaptive"))[0]
    assert resolved_config(adaptive)["trainer"]["erc_target_clip_fraction"] == 0.2


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"settings": {"erc_target_clip_fraction": 1.5}}, "erc_target_clip_fraction"),
        ({"erc": [None, [0.9, 1.1]]}, "ERC is off"),
        ({"settings": {"erc_target_clip_fraction": "0.2"}}, "erc_target_clip_fraction"),
        ({"baseline": "mini"}, "not its own baseline"),
        ({"baseline": "../x"}, "baseline"),
    ],
)
def test_experiment_config_errors(change, needle):
    raw = {
        "name": "mini",
        "kind": "bandit",
        "algorithms": ["ppo"],
        "erc": [[0.9, 1.1]],
        "envs": [{"vocab_size": 64}],
        "settings": {"erc_target_clip_fraction": 0.2},
        **change,
    }
    with pytest.raises(ConfigError, match=needle):
        validate_experiment(raw)


@pytest.mark.parametrize(
    ("erc", "needle"), [([None], "ERC is off"), ([[0.9, 1.1]], "in \\(0, 1\\)")]
)
def test_sb3_experiment_config_checks_the_target(erc, needle):
    raw = {
        "name": "mini",
        "kind": "sb3",
        "algorithms": ["ppo"],
        "erc": erc,
        "envs": [{"id": "CartPole-v1", "erc_target_clip_fraction": 0.2 if erc[0] is None else 2.0}],
    }
    with pytest.raises(ConfigError, match=needle):
        validate_experiment(raw)
    assert validate_experiment(
        {
            **raw,
            "erc": [[0.9, 1.1]],
            "envs": [{"id": "CartPole-v1", "erc_target_clip_fraction": 0.2}],
        }
    )


def test_report_compares_adaptive_with_the_fixed_baseline(tmp_path):
    common = {
        "kind": "bandit",
        "seeds": 2,
        "algorithms": ["ppo"],
        "erc": [[0.95, 1.05]],
        "envs": [{"label": "V64", "vocab_size": 64, "num_contexts": 4}],
        "axes": {"steps_per_rollout": [4], "lr": [0.5]},
    }
    settings = {"iterations": 4, "group": 4}
    run_experiment(
        {"name": "fixed", **common, "settings": settings}, tmp_path, workers=1, progress=False
    )
    adaptive = {
        "name": "adaptive",
        "baseline": "fixed",
        **common,
        "settings": {**settings, "erc_target_clip_fraction": 0.01},
    }
    run_experiment(adaptive, tmp_path, workers=1, progress=False)
    spec = json.loads((tmp_path / "adaptive" / "experiment.json").read_text())
    assert spec["baseline"] == "fixed"
    cells = cell_table(load_runs(tmp_path / "adaptive") + load_runs(tmp_path / "fixed"))
    assert {c["band"] for c in cells} == {"(0.95, 1.05)", "adaptive 0.01 from (0.95, 1.05)"}
    (row,) = band_rule_table(cells)
    assert row["n_erc"] == row["n_off"] == 2
    assert row["erc_low_final"] < 0.95 < 1.05 < row["erc_high_final"]
    assert 0 < row["erc_clip_adaptive"] < 1 and 0 < row["erc_clip_fixed"] < 1
    # the report finds the baseline through the config (experiment.json)
    report = write_report(tmp_path / "adaptive", plots=False).read_text()
    assert "## Adaptive band vs fixed band" in report
    assert "| V64 | ppo | 0.01 | (0.95, 1.05) | (0.95, 1.05) | 4 | 0.5 | 2 vs 2 |" in report
    # without the baseline's runs, the report says how to get them
    missing = stress_markdown(tmp_path / "adaptive", plots=False, baseline=tmp_path / "nope")
    assert any("erc-gym experiment nope" in line for line in missing)


def test_llm_run_folder_from_before_the_option_still_resumes(tmp_path):
    from erc_gym.llm import TrainerConfig
    from erc_gym.llm.trainer import check_resume, config_changes

    config = TrainerConfig(run_dir=str(tmp_path), name="old", erc_low=0.95, erc_high=1.05)
    folder = tmp_path / "old"
    folder.mkdir()
    saved = dataclasses.asdict(config)
    del saved["erc_target_clip_fraction"]  # what a folder written before the option holds
    (folder / "config.json").write_text(json.dumps(saved))
    (folder / "metrics.jsonl").write_text("")
    assert config_changes(config) == {}
    check_resume(config)
    adaptive = dataclasses.replace(config, erc_target_clip_fraction=0.2)
    assert config_changes(adaptive) == {"erc_target_clip_fraction": (None, 0.2)}
    with pytest.raises(ValueError, match=r"erc_target_clip_fraction None -> 0\.2"):
        check_resume(adaptive)


def test_shipped_classic_config_passes_the_target_to_ercppo():
    runs = expand(load_experiment("adaptive_classic"))
    assert [r.variant for r in runs[::3]] == [
        "CartPole-gppo-erc0.95-1.05",
        "CartPole-adaptive-gppo-erc0.95-1.05-target0.2",
    ]
    trainer = [resolved_config(r)["trainer"] for r in runs[::3]]
    assert "erc_target_clip_fraction" not in trainer[0]
    assert trainer[1]["erc_target_clip_fraction"] == 0.2
    assert trainer[1]["n_epochs"] == 20  # the zoo preset's many epochs per rollout

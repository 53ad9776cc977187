"""The DP-SGD planner (issue 18, item 2): the plan a device trains with, the noise on a step's
averaged gradient, and a better plan within the same budget when a plan has too little data per
step. ``bedside privacy plan`` prints what the devices use."""

from __future__ import annotations

import json
import math

import pytest

from bedside.cli import main
from bedside.errors import PrivacyError
from bedside.privacy import accountant as acct
from bedside.privacy.planner import BUDGET_MARGIN, MIN_TOTAL_STEPS, better, plan, poor

pytest.importorskip("dp_accounting")


def test_a_plan_is_dpsgd_calibrated_to_the_budget_over_every_round():
    p = plan(3.0, 1e-5, records=500, rounds=10, batch_size=32, epochs=2)
    assert (p.sample_rate, p.steps_per_round, p.expected_batch) == (1 / 16, 32, 31)
    assert p.total_steps == 320
    z = acct.calibrate(3.0 * BUDGET_MARGIN, 1e-5, 1 / 16, 320)
    assert p.noise_multiplier == z
    # the achieved epsilon is the accountant's, for every planned step, within the budget
    assert p.achieved_epsilon == acct.epsilon(acct.sampled_gaussian(z, 1 / 16, 320), 1e-5)
    assert 3.0 * 0.99 < p.achieved_epsilon <= 3.0
    assert p.noise_per_coordinate == pytest.approx(z / 31)
    assert p.noise_to_signal(650) == pytest.approx(z * math.sqrt(650) / 31)


def test_what_was_released_before_shrinks_the_plan():
    base = acct.sampled_gaussian(1.0, 0.1, 100)
    fresh = plan(8.0, 1e-5, 500, 10, 32, 1)
    after = plan(8.0, 1e-5, 500, 10, 32, 1, base=base)
    assert after.noise_multiplier > fresh.noise_multiplier
    assert after.achieved_epsilon <= 8.0
    with pytest.raises(PrivacyError):
        plan(0.5, 1e-5, 500, 10, 32, 1, base=base)  # the base alone costs more


def test_the_device_trains_with_the_planners_plan():
    from bedside.federation.device import DevicePrivacy, record_noise
    from bedside.federation.settings import RoundSettings, TrainSettings

    settings = RoundSettings(fleet="f", deadline=1e12, model_sha256="0" * 64, clip_norm=1.0,
                             noise="none", noise_multiplier=0.0, planned_rounds=10,
                             train=TrainSettings(epochs=2, batch_size=32))
    dp = record_noise(DevicePrivacy(record_epsilon=3.0), settings, 500)
    p = plan(3.0, 1e-5, 500, 10, 32, 2)
    assert (dp.noise_multiplier, dp.sample_rate, dp.steps) == (
        p.noise_multiplier, p.sample_rate, p.steps_per_round)


def test_a_poor_plan_gets_the_least_change_that_fixes_it_within_the_same_budget():
    asked = plan(8.0, 1e-5, 500, 15, 16, 1)
    assert asked.noise_to_signal(650) > 1 and poor(asked, 650)
    b = better(asked, 650)
    assert b is not None and not poor(b, 650)
    assert b.noise_to_signal(650) <= 1 < asked.noise_to_signal(650)
    assert b.achieved_epsilon <= 8.0 and (b.records, b.rounds, b.delta) == (500, 15, 1e-5)
    assert b.total_steps >= min(MIN_TOTAL_STEPS, asked.total_steps)
    # the least change: no fixing plan of these epochs keeps more steps (a smaller batch, if
    # it exists, is still too noisy)
    if b.batch_size > 8:
        smaller = plan(8.0, 1e-5, 500, 15, b.batch_size // 2, b.epochs)
        assert smaller.noise_to_signal(650) > 1


def test_a_sound_plan_is_left_alone_and_without_a_model_size_the_least_noisy_is_offered():
    asked = plan(8.0, 1e-5, 5000, 15, 16, 1)
    assert poor(asked, 650) == "" and better(asked, 650) is None
    quieter = better(asked)
    assert quieter is not None
    assert quieter.noise_per_coordinate * 1.25 <= asked.noise_per_coordinate
    assert quieter.achieved_epsilon <= 8.0


def test_the_cli_prints_the_plan_and_the_fix(capsys):
    assert main(["privacy", "plan", "--epsilon", "8", "--records", "500", "--rounds", "15",
                 "--parameters", "650", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["noise_to_signal"] > 1 and out["poor"]
    assert out["better"]["noise_to_signal"] <= 1
    assert out["plan"]["batch_size"] == 16 and out["plan"]["epochs"] == 1  # the defaults
    assert main(["privacy", "plan", "--epsilon", "8", "--records", "500", "--rounds", "15",
                 "--parameters", "650"]) == 0
    text = capsys.readouterr().out
    assert "poor: a step's noise" in text and "within the same budget, better:" in text


def test_bad_input_names_the_option(capsys):
    assert main(["privacy", "plan", "--epsilon", "0", "--records", "5", "--rounds", "1"]) == 2
    assert "--epsilon must be > 0" in capsys.readouterr().err
    assert main(["privacy", "plan", "--epsilon", "1", "--records", "0", "--rounds", "1"]) == 2
    assert "--records must be an integer >= 1" in capsys.readouterr().err

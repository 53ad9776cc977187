"""Per-task federation defaults (models/defaults.py) and how ``bedside demo`` picks them."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from bedside.demo.run import DemoConfig, for_task
from bedside.errors import InputError
from bedside.models.defaults import TUNED, TaskDefaults, for_dataset, for_shape, like
from bedside.privacy.planner import better, plan


def test_every_built_in_dataset_has_tuned_defaults_that_the_demo_accepts():
    demo_fields = {f.name for f in fields(DemoConfig)}
    assert set(TUNED) == {"wdbc", "digits", "vitals"}
    for name, d in TUNED.items():
        assert set(d.fields()) <= demo_fields, name
        cfg = for_task({}, dataset=name)
        assert {k: getattr(cfg, k) for k in d.fields()} == d.fields()
        assert cfg.defaults == f"tuned for {name}"


def test_unknown_dataset_is_refused_with_the_choices():
    with pytest.raises(InputError, match="digits"):
        for_dataset("mnist")


def test_another_architecture_keeps_the_training_settings_with_its_own_size():
    tuned = for_dataset("vitals")
    other = "mlp" if tuned.arch != "mlp" else "logreg"
    d = for_dataset("vitals", other)
    assert d.arch == other and d.arch_params == {}
    assert (d.batch_size, d.lr, d.epochs) == (tuned.batch_size, tuned.lr, tuned.epochs)


def test_what_the_user_sets_wins_over_the_tuned_defaults():
    cfg = for_task({"epochs": 7, "lr": 0.123, "arch": "mlp"}, dataset="digits")
    assert (cfg.epochs, cfg.lr, cfg.arch) == (7, 0.123, "mlp")
    assert cfg.batch_size == for_dataset("digits").batch_size


@pytest.mark.parametrize(("kind", "classes", "task"), [
    ("tabular", 2, "wdbc"), ("tabular", 3, "digits"), ("tabular", 10, "digits"),
    ("timeseries", 2, "vitals")])
def test_a_task_is_like_the_built_in_task_of_its_shape(kind, classes, task):
    assert like(kind, classes) == task


def test_small_clinics_get_the_planners_better_batch():
    base = TaskDefaults(batch_size=16, epochs=3, rounds=15)
    parameters = 2_000
    d = for_shape(base, 60, 8.0, 1e-5, parameters)
    alt = better(plan(8.0, 1e-5, 60, 15, 16, 3, account=False), parameters)
    assert alt is not None  # the asked plan is poor for so little data per step
    assert (d.batch_size, d.epochs) == (alt.batch_size, alt.epochs) != (16, 3)
    assert (d.lr, d.rounds) == (base.lr, base.rounds)


def test_a_sound_plan_is_kept():
    base = TaskDefaults(batch_size=64, epochs=1, rounds=5)
    assert for_shape(base, 5_000, 8.0, 1e-5, 10) == base


def test_a_clinic_without_records_is_refused():
    with pytest.raises(InputError, match="at least one record"):
        for_shape(TaskDefaults(), 0, 8.0, 1e-5)


def _csv(path, classes, rows_per_class, features=4, seed=3):
    rng = np.random.default_rng(seed)
    lines = [",".join([f"f{i}" for i in range(features)] + ["outcome"])]
    for c in range(classes):
        for _ in range(rows_per_class):
            v = rng.normal(c, 1.0, features)
            lines.append(",".join(f"{x:.3f}" for x in v) + f",class{c}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("classes", "task"), [(2, "wdbc"), (3, "digits")])
def test_a_users_csv_gets_the_defaults_of_its_shape_from_counts_only(tmp_path, classes, task):
    csv = _csv(tmp_path / "cohort.csv", classes, 60)
    cfg = for_task({}, data=csv, label="outcome", clients=3)
    assert f"tuned for {task}" in cfg.defaults and "privacy planner" in cfg.defaults
    base = for_dataset(task)
    assert (cfg.lr, cfg.optimizer, cfg.rounds, cfg.server_optimizer) == (
        base.lr, base.optimizer, base.rounds, base.server_optimizer)
    # the same CSV with other values (same shape, same counts) gets the same defaults: nothing
    # but the schema and the clinics' sizes decides them
    other = for_task({}, data=_csv(tmp_path / "other.csv", classes, 60, seed=99),
                     label="outcome", clients=3)
    assert {k: getattr(other, k) for k in base.fields()} == {
        k: getattr(cfg, k) for k in base.fields()}


def test_the_demo_partition_does_not_depend_on_the_batch_size():
    from bedside.demo.run import _load_data

    small = _load_data(DemoConfig(dataset="wdbc", batch_size=8))[2]
    large = _load_data(DemoConfig(dataset="wdbc", batch_size=256))[2]
    assert all(np.array_equal(a, b) for a, b in zip(small, large, strict=True))


def test_defaults_module_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; import bedside.models.defaults as d; d.for_dataset('vitals'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_device_noise_keeps_its_noise_on_the_averaged_update_to_its_fraction_of_the_clip():
    from bedside.models.defaults import DEVICE_NOISE_CAP, DEVICE_NOISE_TO_CLIP, device_noise

    assert device_noise(31, 5) == DEVICE_NOISE_CAP  # a small model keeps the cap
    for parameters in (301, 650, 3041, 100_000):
        z = device_noise(parameters, 5)
        assert z * parameters ** 0.5 / 5 == pytest.approx(DEVICE_NOISE_TO_CLIP, rel=0.03)
        z = device_noise(parameters, 5, fraction=0.1)
        assert z * parameters ** 0.5 / 5 == pytest.approx(0.1, rel=0.03)
    assert device_noise(650, 20) > device_noise(650, 5)  # more clinics average it down
    with pytest.raises(InputError):
        device_noise(0, 5)
    with pytest.raises(InputError):
        device_noise(650, 5, fraction=0.0)


@pytest.mark.parametrize("rounds", [15, 40])
def test_the_least_device_noise_keeps_the_rounds_within_the_device_budget(rounds):
    """The floor is the RDP bound solved for z: the accountant's epsilon at that z is within
    the target, and at 15 % less noise it is not (the bound is nearly tight)."""
    from bedside.models.defaults import least_device_noise
    from bedside.privacy.accountant import compose, epsilon, gaussian

    target = 5e5
    z = least_device_noise(rounds, target, 1e-5)

    def spent(multiplier: float) -> float:  # replace-one: a round is Gaussian at z / 2
        return epsilon(compose([gaussian(multiplier / 2)] * rounds), 1e-5)

    assert spent(z) <= target < spent(0.85 * z)
    assert least_device_noise(2 * rounds, target, 1e-5) > z  # more rounds need more noise
    with pytest.raises(InputError):
        least_device_noise(0, target, 1e-5)


def test_device_noise_never_goes_below_what_the_demo_device_budget_allows():
    from bedside.models.defaults import DEMO_DEVICE_EPSILON, device_noise, least_device_noise

    floor = least_device_noise(15, DEMO_DEVICE_EPSILON / 2, 1e-5)
    assert device_noise(650, 5, fraction=0.001, rounds=15) == floor
    assert device_noise(650, 5, fraction=0.25, rounds=15) > floor  # the rule, above the floor
    assert device_noise(650, 5, fraction=0.001) < floor  # without rounds: the rule alone


def test_the_demo_applies_the_device_noise_rule_unless_told():
    from bedside.models.defaults import device_noise

    cfg = for_task({"arch": "logreg"}, dataset="digits")
    assert cfg.noise_multiplier == device_noise(64 * 10 + 10, cfg.clients,
                                                TUNED["digits"].device_noise_to_clip, cfg.rounds)
    assert for_task({"noise_multiplier": 0.3}, dataset="digits").noise_multiplier == 0.3
    # many rounds: the floor that keeps a demo clinic within its device-level budget
    from bedside.models.defaults import DEMO_DEVICE_EPSILON, least_device_noise

    long = for_task({"rounds": 200}, dataset="digits")
    assert long.noise_multiplier == least_device_noise(200, DEMO_DEVICE_EPSILON / 2, long.delta)
    assert long.noise_multiplier > cfg.noise_multiplier


def test_the_demo_configures_a_built_in_task_without_torch_or_sklearn():
    """The demo's own process never imports torch or scikit-learn (its fork server does, once,
    in parallel): choosing a task's settings, device noise included, needs neither."""
    import subprocess
    import sys

    code = ("import sys, json; from bedside.demo.run import for_task\n"
            "for d in ('wdbc', 'digits', 'vitals'): for_task({}, dataset=d)\n"
            "for_task({'arch': 'mlp'}, dataset='digits')\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'sklearn'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"

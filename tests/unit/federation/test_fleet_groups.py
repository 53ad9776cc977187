"""Fleet-wide figures per patient group (issue 15, item 5): each device releases per-group
confusion counts of the round's model on its own records, noised and accounted in its ledger;
the aggregator combines them into the manifest and the round result."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import norm

from bedside.constants import UNIT_DEVICE, UNIT_RECORD
from bedside.errors import ValidationError
from bedside.federation import fairness
from bedside.federation.device import DevicePrivacy, plan_group_counts, plan_round
from bedside.federation.fairness import OTHER, GroupCountSettings
from bedside.federation.settings import RoundSettings
from bedside.privacy import accountant as acct
from bedside.privacy.ledger import Ledger, releases_event
from tests.fleet import mem_fleet
from tests.unit.federation.test_device_privacy import UPDATE_META, published_by_devices

G = GroupCountSettings(attributes=("age_band", "sex"), levels=("18-44/F", "65+/M"),
                       noise_multiplier=3.0, device_records=100, releases=2, release=True)


def _settings(**kw) -> RoundSettings:
    base = dict(fleet="f", deadline=1e9, model_sha256="0" * 64, clip_norm=1.0, noise="central",
                noise_multiplier=0.5, planned_rounds=4, group_counts=G)
    return RoundSettings(**{**base, **kw})


def test_counts_by_hand_and_records_in_no_listed_group_count_as_other():
    groups = [fairness.record_group(a, G) for a in (
        {"age_band": "18-44", "sex": "F"}, {"age_band": "65+", "sex": "M"},
        {"age_band": "45-64", "sex": "F"}, None, {"sex": "F"})]
    assert groups == ["18-44/F", "65+/M", OTHER, OTHER, OTHER]
    y = np.array([1, 1, 0, 0, 1])
    pred = np.array([1, 0, 1, 0, 1])
    c = fairness.counts(y, pred, groups, G, 2).reshape(3, 4)  # rows: groups; tp fp tn fn
    np.testing.assert_array_equal(c, [[1, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 0]])
    multi = fairness.counts(np.array([2, 0]), np.array([2, 1]), ["18-44/F", OTHER], G, 3)
    np.testing.assert_array_equal(multi.reshape(3, 2), [[1, 0], [0, 0], [0, 1]])


def test_one_record_moves_the_clipped_counts_by_at_most_one():
    rng = np.random.default_rng(1)
    n = 400  # L2 norm of the counts well above D = 100: the clip is active
    y, pred = rng.integers(0, 2, n), rng.integers(0, 2, n)
    groups = list(rng.choice(["18-44/F", "65+/M", OTHER], n))

    def clipped(k):
        v = fairness.counts(y[:k], pred[:k], groups[:k], G, 2)
        return v * min(1.0, G.device_records / np.linalg.norm(v))

    for k in (1, 50, 150, 399):
        assert np.linalg.norm(clipped(k + 1) - clipped(k)) <= 1.0 + 1e-9


def test_the_release_is_accounted_as_the_gaussian_mechanism_it_is():
    rec, dev = fairness.count_releases(3, G, "f", "a" * 64)
    assert (rec.unit, rec.mechanism, rec.noise_multiplier) == (UNIT_RECORD, "gaussian", 3.0)
    assert dev.unit == UNIT_DEVICE and dev.noise_multiplier == pytest.approx(3.0 / 200)
    assert fairness.is_count_release(rec) and rec.fleet == "f"
    # against the exact privacy profile of the Gaussian mechanism (Balle & Wang, ICML 2018):
    # delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s), for s = z / sqrt(k)
    delta = 1e-5
    for z, k in ((3.0, 1), (10.0, 4), (4.579, 1)):
        eps = fairness.record_epsilon(replace(G, noise_multiplier=z), delta, k)
        s = z / math.sqrt(k)
        exact = norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps) * norm.cdf(-1 / (2 * s) - eps * s)
        assert exact <= delta * 1.001  # the reported epsilon is a valid bound ...
        tighter = eps * 0.97
        assert (norm.cdf(1 / (2 * s) - tighter * s)
                - math.exp(tighter) * norm.cdf(-1 / (2 * s) - tighter * s)) > delta  # ... tight
    z = fairness.noise_for_budget(0.8, delta)
    assert fairness.record_epsilon(replace(G, noise_multiplier=z), delta, 1) <= 0.8


def test_the_schedule_asks_in_every_nth_and_the_last_round_and_counts_them():
    assert [fairness.schedule(r, 5, 0) for r in (1, 4, 5)] == [(False, 1), (False, 1), (True, 1)]
    asked = [r for r in range(1, 11) if fairness.schedule(r, 10, 3)[0]]
    assert asked == [3, 6, 9, 10] and fairness.schedule(1, 10, 3)[1] == 4
    assert fairness.schedule(1, 0, 10) == (False, 10)  # open-ended: over the assumed 100 rounds


def test_combine_by_hand_floors_noise_and_judges_only_counts_clear_of_it():
    g = replace(G, noise_multiplier=1.0)
    a = np.array([40, 5, 50, 10, 1, 0, 2, 2, 0, 0, 0, 0], np.float64)  # groups x tp fp tn fn
    b = np.array([10, 5, 50, 30, 0, 0, 0, 0, -3, 0, 0, 0], np.float64)
    out = fairness.combine([a, b], g, 2, min_rows=30)
    first = out["groups"]["18-44/F"]
    assert first["rows"] == 200 and first["positives"] == 90
    assert first["sensitivity"] == pytest.approx(50 / 90, abs=1e-4)
    assert first["specificity"] == pytest.approx(100 / 110, abs=1e-4)
    assert first["accuracy"] == pytest.approx(150 / 200, abs=1e-4) and first["judged"]
    assert out["groups"][OTHER]["rows"] == 0  # a negative noised count is floored at 0
    assert out["small_groups"] == sorted(["65+/M", OTHER]) and out["largest_gap"] is None
    assert out["devices"] == 2 and out["count_noise_std"] == pytest.approx(math.sqrt(2), 1e-3)
    assert 0 < first["noise_sd"]["sensitivity"] < 0.05
    # noise far above the counts: nothing is judged
    loud = fairness.combine([a, b], replace(G, noise_multiplier=40.0), 2, min_rows=30)
    assert loud["small_groups"] == sorted(["18-44/F", "65+/M", OTHER])


@pytest.mark.parametrize("value, why", [
    ([1.0] * 11, "list of 12"), ([1.0] * 11 + [float("nan")], "finite"),
    ([1.0] * 11 + [1e9], "exceeds"), ([True] * 12, "list of 12"), ("junk", "list of 12")])
def test_malformed_counts_from_a_device_are_refused(value, why):
    with pytest.raises(ValidationError, match=why) as exc:
        fairness.parse(value, G, 2)
    assert exc.value.reason == "bad_group_counts"


def test_an_announcement_cannot_ask_for_huge_or_odd_group_lists():
    with pytest.raises(ValidationError, match="at most 64"):
        replace(G, levels=tuple(f"g{i}" for i in range(65)))
    with pytest.raises(ValidationError, match="reserved"):
        replace(G, levels=("a", OTHER))
    with pytest.raises(ValidationError, match="only a training round"):
        _settings(task="statistics", statistics=__import__(
            "bedside.federation.statistics", fromlist=["x"]).StatisticsSettings())
    assert RoundSettings.from_meta(_settings().to_meta()) == _settings()


def test_a_device_keeps_budget_for_the_planned_counts_and_withholds_what_its_policy_refuses(
        tmp_path):
    privacy = DevicePrivacy(record_epsilon=4.0)
    ledger = Ledger(tmp_path / "l.db", privacy.budgets())
    with_counts = plan_round(1, _settings(), privacy, 500, ledger)
    without = plan_round(1, _settings(group_counts=None), privacy, 500, ledger)
    assert with_counts.dp.noise_multiplier > without.dp.noise_multiplier
    # every planned round and every planned release of counts together fit the budget
    dp = with_counts.dp
    total = acct.compose([acct.sampled_gaussian(dp.noise_multiplier, dp.sample_rate,
                                                dp.steps * 4),
                          releases_event(fairness.planned(G, "f"))])
    assert acct.epsilon(total, 1e-5) <= 4.0
    rels, why = plan_group_counts(1, _settings(), privacy, ledger, with_counts)
    assert len(rels) == 2 and why == ""
    assert plan_group_counts(1, _settings(group_counts=replace(G, release=False)), privacy,
                             ledger, with_counts) == ([], "")
    refuse = DevicePrivacy(record_epsilon=4.0, group_counts=False)
    assert "policy" in plan_group_counts(1, _settings(), refuse, ledger, with_counts)[1]
    quiet = _settings(group_counts=replace(G, noise_multiplier=1.0))
    assert "minimum 2" in plan_group_counts(1, quiet, privacy, ledger, with_counts)[1]
    ledger.record([*with_counts.releases, *rels])
    ledger.record(fairness.count_releases(2, G, "f"))
    assert "made them all" in plan_group_counts(3, _settings(), privacy, ledger, with_counts)[1]


def test_a_tight_budget_trains_and_withholds_the_counts(tmp_path):
    """Counts the budget cannot cover beside training are withheld; the device still trains,
    at the noise it would use without them."""
    tight = DevicePrivacy(record_epsilon=0.3)
    ledger = Ledger(tmp_path / "l.db", tight.budgets())
    loud = _settings(group_counts=replace(G, noise_multiplier=10.0, releases=1))
    plan = plan_round(1, loud, tight, 500, ledger)
    alone = plan_round(1, _settings(group_counts=None), tight, 500, ledger)
    assert plan.dp.noise_multiplier == alone.dp.noise_multiplier
    assert plan_group_counts(1, loud, tight, ledger, plan) == ([], plan.counts_withheld)
    assert "cannot cover" in plan.counts_withheld


def test_counts_a_device_will_withhold_anyway_reserve_no_budget(tmp_path):
    """A device-level budget (one release of counts costs a large device-level epsilon) or a
    policy that refuses them: no record budget is kept back for them."""
    for privacy in (DevicePrivacy(record_epsilon=4.0, device_epsilon=200.0),
                    DevicePrivacy(record_epsilon=4.0, group_counts=False),
                    DevicePrivacy(record_epsilon=4.0, min_group_noise=5.0)):
        ledger = Ledger(tmp_path / f"{id(privacy)}.db", privacy.budgets())
        plan = plan_round(1, _settings(), privacy, 500, ledger)
        alone = plan_round(1, _settings(group_counts=None), privacy, 500, ledger)
        assert plan.dp.noise_multiplier == alone.dp.noise_multiplier
        assert plan_group_counts(1, _settings(), privacy, ledger, plan)[0] == []


def test_reference_groups_that_cannot_be_counted_stop_the_aggregator_at_start(tmp_path):
    from bedside.aggregator.config import load
    from bedside.aggregator.service import Aggregator
    from bedside.config import to_toml
    from bedside.errors import ConfigError
    from bedside.transport.memory import MemoryBroker, MemoryTransport
    from tests.fleet import seeded_fleet

    fleet = seeded_fleet(tmp_path / "fed", clients=2, rounds=1, dataset="vitals", arch="cnn1d")
    ref = fleet.plan["aggregator_dir"] / "reference.csv"
    lines = ref.read_text().splitlines()
    col = lines[0].split(",").index("sex")

    def long_name(line):  # every "M" becomes a group name no announcement may carry
        cells = line.split(",")
        cells[col] = "a" * 200 if cells[col] == "M" else cells[col]
        return ",".join(cells)
    ref.write_text("\n".join([lines[0], *map(long_name, lines[1:])]) + "\n")
    fleet.aggregator_toml.write_text(to_toml(fleet.plan["aggregator"]))
    agg = Aggregator(load(fleet.aggregator_toml), MemoryTransport(MemoryBroker(), "aggregator"))
    with pytest.raises(ConfigError, match="fleet_counts: the reference set's groups"):
        agg.start()


def test_a_federation_reports_fleet_figures_per_group_in_the_manifest(tmp_path, traffic):
    """Three vitals clinics, two training rounds; the last asks for group counts. One clinic's
    policy refuses them: it still trains, and the figures come from the other two."""
    mf = mem_fleet(tmp_path / "fed", clients=3, rounds=2, dataset="vitals", arch="cnn1d",
                   agent={"privacy": {"group_counts": True}})
    cfg = mf.fleet.plan["clinics"][2]["config"]
    cfg["privacy"]["group_counts"] = False
    mf.fleet.agent_toml(2).write_text(__import__("bedside.config", fromlist=["x"]).to_toml(cfg))
    mf.restart()
    mf.run()
    agg = mf.aggregator
    rows = [r for r in agg.state.rounds() if r.settings.task == "train"]
    assert [r.settings.group_counts.release for r in rows] == [False, True]
    last = agg.state.rounds()[-1]
    m = agg.registry.manifest(agg.registry.latest())
    fleet = m.metrics["fleet_groups"]
    assert fleet["model_version"] == last.model_version and fleet["devices"] == 2
    assert fleet["group_by"] == ["age_band", "sex"]
    assert set(fleet["groups"]) == {*rows[-1].settings.group_counts.levels, OTHER}
    assert fleet["record_epsilon"]["one_release"] == pytest.approx(
        fairness.record_epsilon(rows[-1].settings.group_counts, 1e-5, 1), abs=1e-3)
    # the noised row counts add up to the clinics' records, within the noise
    stored = sum(c["rows"] for c in mf.fleet.plan["clinics"][:2])
    total = sum(g["rows"] for g in fleet["groups"].values())
    assert abs(total - stored) < 6 * fleet["count_noise_std"] * 3
    for i, a in enumerate(mf.agents):
        made = fairness.made(a._ledger.releases(UNIT_RECORD), "demo")
        assert made == (0 if i == 2 else 1)
    # the other clinics' ledgers hold the counts' device-level release too
    assert any(fairness.is_count_release(r) for r in mf.agents[0]._ledger.releases(UNIT_DEVICE))
    # on the wire: counts only in the round that asked, only from clinics that accounted them,
    # and noised (never exact integers); nothing else new beside the update
    sent = []
    for device, topic, body in published_by_devices(mf, traffic):
        if topic != "topic_update":  # status and reports: tests/unit/federation/test_device_privacy
            continue
        assert set(body.header.meta) <= UPDATE_META | {"group_counts"}
        if "group_counts" in body.header.meta:
            sent.append(device)
            assert body.header.round == last.round
            v = np.asarray(body.header.meta["group_counts"])
            assert not np.allclose(v, np.round(v))
    assert sorted(sent) == ["clinic-1", "clinic-2"]

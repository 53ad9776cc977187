"""Privacy accounting: describe what was released as events, then ask an accountant for epsilon.

Nothing here is a hand-rolled privacy formula. Releases are described as ``DpEvent`` objects of
Google's dp-accounting library (https://github.com/google/differential-privacy/tree/main/python)
and the epsilon of a composition of events is computed by one of its two accountants:

* ``"rdp"``: Renyi differential privacy (Mironov, "Renyi Differential Privacy", CSF 2017), with
  the RDP of the Poisson-subsampled Gaussian from Mironov, Talwar and Zhang, "Renyi Differential
  Privacy of the Sampled Gaussian Mechanism" (2019) and the RDP-to-(epsilon, delta) conversion of
  Balle et al. 2020 / Canonne, Kamath and Steinke 2020 (tighter than Mironov 2017, Prop. 3). RDP
  orders are dp-accounting's defaults (1.1 to 1024).
* ``"pld"``: privacy loss distributions (Koskela, Jalko and Honkela, "Computing Tight
  Differential Privacy Guarantees Using FFT", AISTATS 2020; Doroshenko, Ghazi, Kamath, Kumar and
  Manurangsi, "Connect the Dots: Tighter Discrete Approximations of Privacy Loss Distributions",
  PETS 2022), with pessimistic discretisation, so the result is an upper bound.
* ``"auto"`` (the default) computes both and reports the smaller. Both are valid upper bounds on
  the true epsilon, so their minimum is one too. PLD is nearly always the tighter (it is close to
  exact); RDP wins only occasionally, for very large epsilons.

The single-release Gaussian mechanism can also be calibrated exactly with the analytic Gaussian
mechanism of Balle and Wang, "Improving the Gaussian Mechanism for Differential Privacy:
Analytical Calibration and Optimal Denoising", ICML 2018 (:func:`gaussian_sigma`).

Assumptions shared by every function:

* Neighbouring datasets differ by adding or removing one unit (a record, or a device);
  dp-accounting's ``ADD_OR_REMOVE_ONE`` relation.
* ``noise_multiplier`` is the noise standard deviation divided by the L2 sensitivity of what was
  noised (the caller normalises: e.g. a device that noises its own clipped update with
  ``N(0, (zC)^2)`` has sensitivity ``2C`` between any two local datasets, so it records ``z / 2``).
* ``sample_rate`` is the probability that the unit takes part in a step, by Poisson sampling
  whose outcome the adversary does not see. Use 1.0 when that does not hold.

dp-accounting (and scipy through it) is imported only when a function here runs: importing this
module is cheap, and an inference-only device without the ``privacy`` extra never pays for it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, Literal, NotRequired, TypedDict

import numpy as np

from bedside.errors import InputError, PrivacyError

if TYPE_CHECKING:  # pragma: no cover
    from dp_accounting import DpEvent
else:
    DpEvent = Any

__all__ = [
    "ACCOUNTANTS",
    "AccountantName",
    "EpsilonReport",
    "calibrate",
    "compose",
    "epsilon",
    "epsilon_report",
    "gaussian",
    "gaussian_sigma",
    "sampled_gaussian",
]

AccountantName = Literal["rdp", "pld", "auto"]


class EpsilonReport(TypedDict):
    """What :func:`epsilon_report` returns (JSON-serialisable)."""

    epsilon: float
    delta: float
    accountant: str  # "rdp" or "pld": the one that gave ``epsilon``
    epsilon_rdp: NotRequired[float]  # with accountant="auto"
    epsilon_pld: NotRequired[float]  # with accountant="auto"

ACCOUNTANTS: Final[tuple[str, ...]] = ("rdp", "pld", "auto")

# PLD discretisation. Each PLD is first computed on a grid of PLD_COARSE_INTERVAL in privacy-loss
# space (fast: well under 0.2 s for 10^4 DP-SGD steps). Pessimistic rounding makes the result an
# upper bound, loose by roughly ten grid steps (about 0.01 in epsilon). When that first result is
# below PLD_REFINE_BELOW, the computation is repeated on a grid of epsilon * PLD_RELATIVE_INTERVAL
# (not finer than PLD_FINEST_INTERVAL), keeping the discretisation error near 1% of small epsilons.
PLD_COARSE_INTERVAL: Final = 1e-3
PLD_REFINE_BELOW: Final = 1.0
PLD_RELATIVE_INTERVAL: Final = 1e-3
PLD_FINEST_INTERVAL: Final = 1e-4
# Grid for weak guarantees: epsilon / 10^4 once that is coarser than PLD_COARSE_INTERVAL (i.e.
# epsilon > 10). Below that nothing changes; above it the cost stays bounded (see _pld_epsilon).
PLD_WEAK_RELATIVE_INTERVAL: Final = 1e-4

# calibrate(): stop when the achieved epsilon is within this fraction below the target.
_CALIBRATE_RTOL: Final = 2e-3
_CALIBRATE_MAX_Z: Final = 1e6
_CALIBRATE_MIN_Z: Final = 1e-3


# ---------------------------------------------------------------------------------------------
# dp-accounting, imported lazily
# ---------------------------------------------------------------------------------------------
def _dp_accounting() -> ModuleType:
    """Import dp-accounting on first use, or explain how to install it."""
    try:
        import dp_accounting
    except ImportError as exc:
        raise PrivacyError(
            "privacy accounting needs the dp-accounting library, which is not installed; "
            "install it with: pip install 'bedside[privacy]'"
        ) from exc
    _quiet_expected_warnings()
    return dp_accounting


class _DropExcludedOrderWarnings(logging.Filter):
    """Drop dp-accounting's per-order convergence warnings.

    For large sample rates the RDP series of a few small fractional orders does not converge;
    dp-accounting then excludes those orders (the bound stays valid, only computed over fewer
    orders) and logs one warning per order and call, which would flood a device's log every round.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Excluding this order" not in record.getMessage()


_ORDER_FILTER: Final = _DropExcludedOrderWarnings()


def _quiet_expected_warnings() -> None:
    absl_logger = logging.getLogger("absl")
    if _ORDER_FILTER not in absl_logger.filters:
        absl_logger.addFilter(_ORDER_FILTER)


# ---------------------------------------------------------------------------------------------
# Validation (messages name the parameter)
# ---------------------------------------------------------------------------------------------
def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InputError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v):
        raise InputError(f"{name} must be a number, got nan")
    return v


def _check_delta(delta: float, name: str = "delta") -> float:
    d = _number(name, delta)
    if not 0.0 < d < 1.0:
        raise InputError(f"{name} must be in (0, 1), got {delta!r}")
    return d


def _check_sample_rate(sample_rate: float, name: str = "sample_rate") -> float:
    q = _number(name, sample_rate)
    if not 0.0 < q <= 1.0:
        raise InputError(f"{name} must be in (0, 1], got {sample_rate!r}")
    return q


def _check_steps(steps: int, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
        raise InputError(f"{name} must be an integer >= 0, got {type(steps).__name__} {steps!r}")
    if steps < 0:
        raise InputError(f"{name} must be an integer >= 0, got {steps}")
    return int(steps)


def _check_noise_multiplier(noise_multiplier: float, name: str = "noise_multiplier") -> float:
    z = _number(name, noise_multiplier)
    if not (math.isfinite(z) and z >= 0.0):
        raise InputError(
            f"{name} must be a finite number >= 0 (0 means no noise: infinite epsilon), "
            f"got {noise_multiplier!r}"
        )
    return z


def _check_epsilon(eps: float, name: str = "epsilon") -> float:
    e = _number(name, eps)
    if not (math.isfinite(e) and e > 0.0):
        raise InputError(f"{name} must be a finite number > 0, got {eps!r}")
    return e


def _check_accountant(accountant: str, name: str = "accountant") -> str:
    if accountant not in ACCOUNTANTS:
        raise InputError(f"{name} must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")
    return accountant


def _check_event(event: object) -> DpEvent:
    dpa = _dp_accounting()
    if not isinstance(event, dpa.DpEvent):
        raise InputError(
            f"event must be a dp_accounting DpEvent (build it with sampled_gaussian(), gaussian() "
            f"or compose()), got {type(event).__name__}"
        )
    return event


# ---------------------------------------------------------------------------------------------
# Describe: events
# ---------------------------------------------------------------------------------------------
def sampled_gaussian(noise_multiplier: float, sample_rate: float, steps: int) -> DpEvent:
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism (DP-SGD, DP-FedAvg).

    Each step includes every unit independently with probability ``sample_rate`` and adds
    Gaussian noise with standard deviation ``noise_multiplier`` times the L2 sensitivity to the
    sum of clipped contributions (Abadi et al., "Deep Learning with Differential Privacy", 2016;
    McMahan et al., "Learning Differentially Private Recurrent Language Models", 2018).

    ``sample_rate == 1`` is full participation: plain Gaussian composed ``steps`` times.
    ``steps == 0`` is :class:`dp_accounting.NoOpDpEvent` (nothing released).
    """
    z = _check_noise_multiplier(noise_multiplier)
    q = _check_sample_rate(sample_rate)
    t = _check_steps(steps)
    dpa = _dp_accounting()
    if t == 0:
        return dpa.NoOpDpEvent()
    if q == 1.0:
        return gaussian(z, t)
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), t)


def gaussian(noise_multiplier: float, count: int = 1) -> DpEvent:
    """The Gaussian mechanism with full participation, composed ``count`` times."""
    z = _check_noise_multiplier(noise_multiplier)
    n = _check_steps(count, "count")
    dpa = _dp_accounting()
    if n == 0:
        return dpa.NoOpDpEvent()
    event = dpa.GaussianDpEvent(z)
    return event if n == 1 else dpa.SelfComposedDpEvent(event, n)


def compose(events: Iterable[DpEvent]) -> DpEvent:
    """The sequential (adaptive) composition of ``events``. An empty list is a NoOp event."""
    dpa = _dp_accounting()
    items = [_check_event(e) for e in events]
    if not items:
        return dpa.NoOpDpEvent()
    if len(items) == 1:
        return items[0]
    return dpa.ComposedDpEvent(items)


# ---------------------------------------------------------------------------------------------
# Account: epsilon
#
# Everything Bedside releases is a composition of Gaussian mechanisms, some Poisson-subsampled.
# Such an event is flattened into *groups* ``(noise_multiplier, sample_rate, count)`` (the same
# mechanism composed ``count`` times), and the accountants' expensive per-mechanism work is done
# once per process and reused (``functools.lru_cache``):
#
# * RDP: the per-step RDP curve of each (z, q) (``RdpAccountant.rdp`` after composing one step);
#   a composition's curve is ``sum(count * curve)``, exactly what ``RdpAccountant`` accumulates,
#   and epsilon is dp-accounting's ``compute_epsilon`` of it.
# * PLD: the single-step PLD of each (z, q, grid) (``from_gaussian_mechanism``), self-composed
#   ``count`` times and composed across groups, as ``PLDAccountant`` does; the composed PLD of a
#   whole set of groups is cached too, so a device that checks, records and reports the same
#   releases pays for one composition.
#
# A device checks its ledger every round with one more group count than before; without the
# cache each check recomputed every RDP order and every PLD from scratch (about 0.1 s each,
# several times per round). Events of other shapes take dp-accounting's accountants unchanged.
# ---------------------------------------------------------------------------------------------
Group = tuple[float, float, int]


def _groups(event: DpEvent) -> tuple[Group, ...] | None:
    """``event`` as sorted, merged (z, q, count) groups, or None if it has another shape."""
    dpa = _dp_accounting()
    counts: dict[tuple[float, float], int] = {}

    def walk(e: Any, k: int) -> bool:
        if isinstance(e, dpa.NoOpDpEvent):
            return True
        if isinstance(e, dpa.SelfComposedDpEvent):
            return walk(e.event, k * int(e.count))
        if isinstance(e, dpa.ComposedDpEvent):
            return all(walk(x, k) for x in e.events)
        if isinstance(e, dpa.GaussianDpEvent):
            key = (float(e.noise_multiplier), 1.0)
        elif isinstance(e, dpa.PoissonSampledDpEvent) and isinstance(e.event,
                                                                      dpa.GaussianDpEvent):
            if e.sampling_probability == 0:
                return True
            key = (float(e.event.noise_multiplier), float(e.sampling_probability))
        else:
            return False
        counts[key] = counts.get(key, 0) + k
        return True

    if not walk(event, 1):
        return None
    return tuple((z, q, n) for (z, q), n in sorted(counts.items()) if n > 0)


@functools.lru_cache(maxsize=512)
def _rdp_curve(z: float, q: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(orders, RDP of one step of the Poisson-subsampled Gaussian (z, q)) from dp-accounting."""
    dpa = _dp_accounting()
    one = dpa.GaussianDpEvent(z) if q == 1.0 else dpa.PoissonSampledDpEvent(
        q, dpa.GaussianDpEvent(z))
    acc = dpa.rdp.RdpAccountant().compose(one)
    return tuple(float(o) for o in acc.orders), tuple(float(r) for r in acc.rdp)


def _rdp_epsilon_groups(groups: tuple[Group, ...], delta: float) -> float:
    if not groups:
        return 0.0
    if any(z == 0.0 for z, _, _ in groups):
        return math.inf
    dpa = _dp_accounting()
    orders = np.asarray(_rdp_curve(*groups[0][:2])[0])
    total = np.zeros_like(orders)
    for z, q, n in groups:
        total += n * np.asarray(_rdp_curve(z, q)[1])
    return float(dpa.rdp.rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])


@functools.lru_cache(maxsize=256)
def _pld_step(z: float, q: float, interval: float) -> Any:
    dpa = _dp_accounting()
    return dpa.pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=z, value_discretization_interval=interval, sampling_prob=q)


@functools.lru_cache(maxsize=64)
def _pld_groups(groups: tuple[Group, ...], interval: float) -> Any:
    """The PLD of ``groups`` composed in order, as ``PLDAccountant`` builds it."""
    plds = _dp_accounting().pld.privacy_loss_distribution
    pld = plds.identity(value_discretization_interval=interval)
    for z, q, n in groups:
        if q == 1.0:  # n Gaussians compose exactly into one with std z / sqrt(n)
            part = plds.from_gaussian_mechanism(standard_deviation=z / math.sqrt(n),
                                                value_discretization_interval=interval)
        else:
            part = _pld_step(z, q, interval).self_compose(n)
        pld = pld.compose(part)
    return pld


def _compose_into(acc: Any, event: DpEvent, name: str) -> Any:
    dpa = _dp_accounting()
    try:
        return acc.compose(event)
    except dpa.UnsupportedEventError as exc:
        raise PrivacyError(f"the {name} accountant cannot account for {event!r}: {exc}") from exc


def _rdp_epsilon(event: DpEvent, groups: tuple[Group, ...] | None, delta: float) -> float:
    if groups is not None:
        return _rdp_epsilon_groups(groups, delta)
    dpa = _dp_accounting()
    acc = _compose_into(dpa.rdp.RdpAccountant(), event, "rdp")
    return float(acc.get_epsilon(delta))


def _pld_epsilon_at(event: DpEvent, groups: tuple[Group, ...] | None, delta: float,
                    interval: float) -> float:
    if groups is not None:
        if not groups:
            return 0.0
        if any(z == 0.0 for z, _, _ in groups):
            return math.inf
        return float(_pld_groups(groups, interval).get_epsilon_for_delta(delta))
    dpa = _dp_accounting()
    acc = dpa.pld.PLDAccountant(value_discretization_interval=interval)
    acc = _compose_into(acc, event, "pld")
    return float(acc.get_epsilon(delta))


def _pld_epsilon(event: DpEvent, groups: tuple[Group, ...] | None, delta: float,
                 hint: float | None = None) -> float:
    """PLD epsilon. ``hint`` (the RDP epsilon of the same event, an upper bound) sizes the grid.

    The PLD accountant's cost grows with (privacy loss range / grid interval). For a weak
    guarantee (epsilon in the tens or hundreds, e.g. device-level DP in a small fleet) a 1e-3 grid
    means millions of points; above epsilon 10 the grid is ``hint * PLD_WEAK_RELATIVE_INTERVAL``,
    which keeps the result a pessimistic upper bound (discretisation only ever rounds the loss
    up) at a bounded cost. The reported value is the tighter of PLD and RDP in any case.
    """
    if hint is not None and not math.isfinite(hint):
        return math.inf  # no noise somewhere: PLD agrees, and would build an unbounded grid
    coarse = PLD_COARSE_INTERVAL
    if hint is not None and hint * PLD_WEAK_RELATIVE_INTERVAL > coarse:
        coarse = hint * PLD_WEAK_RELATIVE_INTERVAL
    eps = _pld_epsilon_at(event, groups, delta, coarse)
    if math.isfinite(eps) and eps < PLD_REFINE_BELOW:
        interval = max(PLD_FINEST_INTERVAL, eps * PLD_RELATIVE_INTERVAL)
        if interval < PLD_COARSE_INTERVAL:
            # Both are pessimistic upper bounds; keep the tighter.
            eps = min(eps, _pld_epsilon_at(event, groups, delta, interval))
    return max(0.0, eps)


def epsilon_report(event: DpEvent, delta: float, accountant: str = "auto") -> EpsilonReport:
    """Epsilon of ``event`` at ``delta``, with the accountant that produced it.

    Returns a JSON-serialisable dict: ``epsilon``, ``delta``, ``accountant`` (``"rdp"`` or
    ``"pld"``: the one that gave the reported value) and, with ``accountant="auto"``, both
    ``epsilon_rdp`` and ``epsilon_pld``. ``epsilon`` is ``math.inf`` when some part of the event
    has no noise (noise multiplier 0); ``0.0`` for a NoOp event.
    """
    d = _check_delta(delta)
    name = _check_accountant(accountant)
    ev = _check_event(event)
    groups = _groups(ev)
    rdp = _rdp_epsilon(ev, groups, d)
    if name == "rdp":
        return {"epsilon": rdp, "delta": d, "accountant": "rdp"}
    pld = _pld_epsilon(ev, groups, d, rdp)
    if name == "pld":
        return {"epsilon": pld, "delta": d, "accountant": "pld"}
    return {
        "epsilon": min(rdp, pld),
        "delta": d,
        "accountant": "pld" if pld <= rdp else "rdp",
        "epsilon_rdp": rdp,
        "epsilon_pld": pld,
    }


def epsilon(event: DpEvent, delta: float, accountant: str = "auto") -> float:
    """Epsilon of ``event`` at ``delta`` (an upper bound). See :func:`epsilon_report`."""
    return epsilon_report(event, delta, accountant)["epsilon"]


def calibrate(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "auto",
    base: DpEvent | None = None,
) -> float:
    """Smallest noise multiplier ``z`` with ``epsilon(sampled_gaussian(z, q, T), delta) <= target``.

    With ``base`` (what was already released, e.g. a device's ledger), the smallest ``z`` with
    ``epsilon(compose([base, sampled_gaussian(z, q, T)])) <= target``: the noise that fits the
    rest of a budget.

    A safeguarded bracketing search on ``z`` (epsilon decreases as ``z`` grows), stopped once the
    achieved epsilon is within 0.2% below the target: typically 6 to 10 epsilon evaluations.
    Guarantees ``epsilon(result) <= target_epsilon`` with the same accountant.

    Raises:
        InputError: invalid arguments, or ``steps == 0`` (nothing to calibrate).
        PrivacyError: no noise multiplier in [0.001, 10^6] meets the target (for example because
            ``base`` alone already exceeds it).
    """
    target = _check_epsilon(target_epsilon, "target_epsilon")
    d = _check_delta(delta)
    q = _check_sample_rate(sample_rate)
    t = _check_steps(steps)
    name = _check_accountant(accountant)
    if t == 0:
        raise InputError("steps must be >= 1 to calibrate a noise multiplier, got 0")
    base_groups: tuple[Group, ...] = ()
    if base is not None:
        flat = _groups(_check_event(base))
        if flat is None:
            raise InputError("calibrate: base must be a composition of (sampled) Gaussian "
                             "mechanisms")
        base_groups = flat
    if base_groups and epsilon(base, d, name) >= target:
        raise PrivacyError(f"what was already released costs epsilon {epsilon(base, d, name):.4g}"
                           f" at delta {d:g}, at or above the target {target:g}: no noise "
                           "multiplier fits the rest")
    return _calibrate(target, d, q, t, name, base_groups)


def _merge(groups: tuple[Group, ...], extra: Group) -> tuple[Group, ...]:
    counts: dict[tuple[float, float], int] = {(z, q): n for z, q, n in groups}
    counts[extra[:2]] = counts.get(extra[:2], 0) + extra[2]
    return tuple((z, q, n) for (z, q), n in sorted(counts.items()))


@functools.lru_cache(maxsize=256)
def _calibrate(target: float, d: float, q: float, t: int, name: str,
               base: tuple[Group, ...] = ()) -> float:
    """The search behind :func:`calibrate` (deterministic, so cached: a device calibrates once
    for the federation, not every round).

    With ``auto`` the search runs on PLD alone, which is nearly always the tighter accountant for
    DP-SGD (and skips the RDP curve of every candidate, most of the cost), and RDP is consulted at
    the answer: if RDP is the tighter one there, the search is repeated on ``auto``. Either way
    ``epsilon(result, auto) <= epsilon(result, pld) <= target``.
    """
    def groups(z: float) -> tuple[Group, ...]:
        return _merge(base, (z, q, t))

    if name == "auto":
        def pld_of(z: float) -> float:
            return _pld_epsilon(None, groups(z), d)

        z = _search(target, d, q, t, pld_of)
        if _rdp_epsilon_groups(groups(z), d) >= pld_of(z):
            return z

    def eps_of(z: float) -> float:
        event = compose([sampled_gaussian(zz, qq, n) for zz, qq, n in groups(z)])
        return epsilon(event, d, name)

    return _search(target, d, q, t, eps_of)


def _search(target: float, d: float, q: float, t: int, eps_of: Callable[[float], float]) -> float:
    # 1. Bracket from z = 1 by doubling or halving: eps(lo) > target >= eps(hi).
    lo, eps_lo = hi, eps_hi = 1.0, eps_of(1.0)
    if eps_hi > target:
        while eps_hi > target:
            lo, eps_lo = hi, eps_hi
            hi *= 2.0
            if hi > _CALIBRATE_MAX_Z:
                raise PrivacyError(
                    f"no noise multiplier up to {_CALIBRATE_MAX_Z:g} reaches epsilon {target:g} "
                    f"at delta {d:g} with sample rate {q:g} and {t} steps; raise the target "
                    "epsilon or lower the number of steps"
                )
            eps_hi = eps_of(hi)
    else:
        while eps_lo <= target:
            hi, eps_hi = lo, eps_lo
            lo /= 2.0
            if lo < _CALIBRATE_MIN_Z:
                raise PrivacyError(
                    f"even a noise multiplier of {hi:g} meets epsilon {target:g}: with sample "
                    f"rate {q:g} and delta {d:g} the target is met with almost no noise; check "
                    "that delta is well below the sample rate"
                )
            eps_lo = eps_of(lo)

    # 2. Shrink the bracket until eps(hi) is within _CALIBRATE_RTOL below the target. Epsilon is
    # close to a power law in z, so interpolate log(eps) linearly in log(z), aiming a little
    # below the target; keep each step inside the middle 80% of the bracket so it always shrinks
    # (bisection when an end is infinite).
    aim = math.log(target * (1.0 - _CALIBRATE_RTOL / 2.0))
    while eps_hi < target * (1.0 - _CALIBRATE_RTOL) and hi / lo - 1.0 > 1e-9:
        a, b = math.log(lo), math.log(hi)
        if math.isfinite(eps_lo) and eps_hi > 0.0:
            fa, fb = math.log(eps_lo) - aim, math.log(eps_hi) - aim
            x = a + (b - a) * fa / (fa - fb) if fa != fb else (a + b) / 2.0
            x = min(max(x, a + 0.1 * (b - a)), a + 0.9 * (b - a))
        else:
            x = (a + b) / 2.0
        mid = math.exp(x)
        eps_mid = eps_of(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo, eps_lo = mid, eps_mid
    return hi


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Noise standard deviation of the analytic Gaussian mechanism (Balle and Wang, ICML 2018).

    The smallest ``sigma`` such that adding ``N(0, sigma^2)`` to a function with L2 sensitivity
    ``sensitivity`` is ``(epsilon, delta)``-DP, for one release (no composition). Computed by
    dp-accounting's ``get_sigma_gaussian``; valid for every ``epsilon > 0`` (unlike the classical
    ``sqrt(2 ln(1.25/delta)) / epsilon``, which needs ``epsilon < 1`` and is larger).
    """
    eps = _check_epsilon(epsilon)
    d = _check_delta(delta)
    s = _number("sensitivity", sensitivity)
    if not (math.isfinite(s) and s > 0.0):
        raise InputError(f"sensitivity must be a finite number > 0, got {sensitivity!r}")
    dpa = _dp_accounting()
    return float(dpa.get_sigma_gaussian(eps, d)) * s

"""Device-level releases of a federated round, described once for every side that accounts them.

A device's ledger and the aggregator's privacy report both account a round with
:func:`device_round_releases`, so the rule cannot drift between them.

Adjacency: *replace one device's data*. Bedside publishes how many devices contributed and a
device that does not take part sends a signed decline, so membership is public and no
amplification by sampling is claimed. Replacing one device's data moves its clipped update (L2
norm at most C) by at most 2C: the update sum's sensitivity is 2C, and noise of standard deviation
``z C`` on it is a Gaussian mechanism with multiplier ``z / 2``, in both central mode (noise on
the sum) and local mode (noise on each update). With adaptive clipping the round also releases the
count of devices whose update was within the clip norm; one device moves it by at most 1, so its
noise ``count_noise`` is the multiplier itself. The two releases compose (dp-accounting) to exactly
one Gaussian of multiplier ``z / 2`` when the update was noised with
:attr:`RoundSettings.update_noise_multiplier` (Andrew et al., NeurIPS 2021, Theorem 1).
"""

from __future__ import annotations

from bedside.constants import NOISE_CENTRAL, NOISE_NONE, UNIT_DEVICE
from bedside.privacy.ledger import EnforcedBy, Release


def device_round_releases(round_id: int, noise: str, update_noise_multiplier: float,
                          count_noise: float | None = None, fleet: str = "") -> list[Release]:
    """The device-level releases of one round in which a device contributed.

    ``update_noise_multiplier`` is the multiplier the update itself was noised with (standard
    deviation over C); ``count_noise`` the standard deviation of the noise on the count of
    unclipped updates when adaptive clipping is on. Central noise is added by the aggregator
    (``enforced_by="aggregator"``), local noise by the device. Returns ``[]`` for
    ``noise == "none"``: there is no device-level mechanism to describe.
    """
    if noise == NOISE_NONE:
        return []
    by: EnforcedBy = "aggregator" if noise == NOISE_CENTRAL else "device"
    out = [Release(round=round_id, unit=UNIT_DEVICE, mechanism="gaussian",
                   noise_multiplier=update_noise_multiplier / 2.0, sample_rate=1.0, steps=1,
                   note=f"{noise} noise on the clipped update; replace-one, sensitivity 2C",
                   enforced_by=by, fleet=fleet)]
    if count_noise is not None:
        out.append(Release(round=round_id, unit=UNIT_DEVICE, mechanism="gaussian",
                           noise_multiplier=count_noise, sample_rate=1.0, steps=1,
                           note="adaptive clipping: noised count of unclipped updates, "
                                "sensitivity 1", enforced_by=by, fleet=fleet))
    return out

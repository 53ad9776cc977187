"""What the registry holds, for people: one summary per version and a version's lineage.

``bedside models list|show --registry DIR`` print these (the aggregator's registry is
``<data_dir>/registry``). Everything comes from the versions' manifests: where a version came from
(an exported or imported starting model, a feature-statistics round, a training round), its
parent, how many devices contributed, the privacy spent (the device-level epsilon the aggregator's
accountant reported, and the largest record-level epsilon the contributing devices reported) and
its metrics on the data team's reference set.
"""

from __future__ import annotations

from typing import Any

from bedside.errors import InputError
from bedside.manifest import Manifest


def origin(m: Manifest) -> str:
    """Where a version came from, in words."""
    t = m.training
    pushed = t.get("pushed") if isinstance(t.get("pushed"), dict) else None
    if "rollback_of" in t:
        by = f" by {pushed['by']}" if pushed and pushed.get("by") else ""
        return f"rollback to version {t['rollback_of']}{by}"
    if pushed is not None:
        by = f" by {pushed['by']}" if pushed.get("by") else ""
        return f"pushed{by} to {pushed.get('target', 'all')} (from {pushed.get('from', '?')})"
    if "round" in t:
        task = t.get("result", {}).get("task", "train")
        kind = "feature statistics" if task == "statistics" else "training"
        return f"{kind} round {t['round']} ({t.get('contributors', '?')} device(s))"
    if "imported_from" in t:
        return f"imported ONNX ({t['imported_from']})"
    return "starting model (exported)"


def summary(m: Manifest) -> dict[str, Any]:
    """One version as a flat dict (JSON-able)."""
    result = m.training.get("result", {})
    record = result.get("record_epsilon") or {}
    holdout = m.metrics.get("holdout") or m.metrics.get("test") or {}
    return {
        "version": m.version, "parent": m.parent_version, "name": m.name,
        "created_at": m.created_at, "origin": origin(m),
        "contributors": m.training.get("contributors"),
        "accuracy": holdout.get("accuracy"), "auc": holdout.get("auc"),
        "epsilon_device": m.privacy.get("epsilon") if m.privacy else None,
        "epsilon_record_max": record.get("max"),
        "privacy": privacy_text(m), "sha256": m.sha256,
        "bytes": m.files.get("model", {}).get("bytes"),
    }


def privacy_text(m: Manifest) -> str:
    """The privacy a version's manifest states, in words (never a guarantee it does not have)."""
    p = m.privacy or {}
    if p.get("status") == "unknown":
        text = "unknown: " + str(p.get("note", "imported; how it was trained is not known"))
    elif isinstance(p.get("epsilon"), int | float):
        text = (f"device-level epsilon {p['epsilon']:.3g} (delta {p.get('delta', '?')}, "
                f"{p.get('noise', '?')} noise, {p.get('rounds', '?')} round(s))")
    elif "epsilon" in p:
        text = "no device-level guarantee" + (f": {p['note']}" if p.get("note") else "")
    elif p:
        text = ", ".join(f"{k} {v}" for k, v in sorted(p.items()))
    else:
        text = "none recorded (no federated round produced this version)"
    if p.get("seeded_noise") or p.get("warning"):
        text += "; WARNING: " + str(p.get("warning") or "its noise was seeded: NOT private")
    return text


def lineage(registry: Any, version: int) -> list[Manifest]:
    """``version`` and its ancestors, newest first, as far as the registry holds them."""
    have = registry.versions()
    if version not in have:
        raise InputError(f"registry {registry.root}: no version {version} (it holds "
                         f"{f'{have[0]}..{have[-1]}' if have else 'none'})")
    chain, seen = [], set()
    v: int | None = version
    while v is not None and v not in seen and v in have:
        seen.add(v)
        m = registry.manifest(v)
        chain.append(m)
        v = m.parent_version
    return chain

"""The aggregator's side of model releases: sign, roll out in waves, read device reports.

:class:`Rollouts` is driven by the :class:`~bedside.aggregator.service.Aggregator`'s loop (one
thread): ``tick`` advances staged and canary rollouts, ``on_report`` records a device's signed
report, ``release`` signs the release of a version a round produced. The states and the rules
(a round never trains on a version in canary) are described in :mod:`bedside.aggregator.releases`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bedside.aggregator.config import AggregatorConfig
from bedside.aggregator.releases import (
    DONE,
    FAILED,
    ReleaseStore,
    Rollout,
    canary_devices,
    copy_model_dir,
    golden_vectors,
    make_release,
    sign_release,
)
from bedside.constants import KIND_REPORT, topic_model, topic_release
from bedside.errors import InputError, WireError
from bedside.federation.release import Golden, Probation, Release, Target, parse_target
from bedside.files import private_dir
from bedside.manifest import Manifest, load_manifest, verify_model_file
from bedside.models.registry import Registry
from bedside.wire.envelope import decode, peek
from bedside.wire.signing import KeyRing, SigningKey

log = logging.getLogger("bedside.aggregator.rollout")

Publish = Callable[[str, bytes, bool], None]


class Rollouts:
    def __init__(self, cfg: AggregatorConfig, store: ReleaseStore, registry: Registry,
                 key: SigningKey, publish: Publish, clock: Callable[[], float]) -> None:
        self.cfg, self.store, self.registry, self.key = cfg, store, registry, key
        self.publish, self.clock = publish, clock
        self._waiting: set[int] = set()  # rollouts already logged as waiting
        self.servable = self._servable()  # sha256s the download endpoint may serve
        self._notices: set[tuple[str, int, str]] = set()
        self.on_refusal: Callable[[str, str, str], None] | None = None
        self.last_round: Callable[[], int] | None = None  # the service's newest round id

    # -- the federation's version ----------------------------------------------------------------
    def base_version(self) -> int | None:
        """The newest version every device is meant to run (rounds train on it)."""
        return base_version(self.registry, self.store)

    def active(self, enrolled: list[str] | None = None) -> bool:
        """A rollout is staged or in canary, or was sent less than ``wave_timeout_seconds``
        ago and some of its devices have not reported it done (they may still be downloading
        from this service's endpoint): the service keeps running for it."""
        if self.store.rollouts(("staged", "canary")):
            return True
        now = self.clock()
        for r in self.store.rollouts(("complete",)):
            probation = float(r.params.get("probation", {}).get("seconds", 0.0))
            if (r.counter is None
                    or now > r.updated_at + probation + self.cfg.releases.wave_timeout_seconds):
                continue
            targets = list(r.target.devices) if r.target.devices is not None else enrolled or []
            done = {x["device"] for x in self.store.reports(r.counter) if x["state"] in DONE}
            if not set(targets) <= done:
                return True
        return False

    @property
    def url(self) -> str:
        return self.cfg.releases.base_url if self.cfg.releases.http_port else ""

    # -- releases ----------------------------------------------------------------------------------
    def release(self, version: int, round_id: int, origin: str = "round") -> bytes:
        """Sign the fleet-wide release of ``version`` (a round's output, or the first version)."""
        m = self.registry.manifest(version)
        data = self.registry.model_bytes(version)
        try:
            golden: Golden | None = golden_vectors(data, m)
        except Exception as exc:  # devices still self-test it on the schema's reference rows
            log.error("model v%d: no golden vectors (%s: %s); released without them", version,
                      type(exc).__name__, exc)
            golden = None
        rel = make_release(counter=self.store.next_counter(), manifest=m, model_bytes=data,
                           origin=origin, target=Target("all", None),
                           max_message_bytes=self.cfg.releases.max_message_bytes,
                           chunk_bytes=self.cfg.releases.chunk_bytes, url=self.url,
                           golden=golden)
        self.servable.add(rel.sha256)
        return sign_release(self.key, self.cfg.fleet, rel, m, data, round_id)

    # -- reports -----------------------------------------------------------------------------------
    def on_report(self, device: str, payload: bytes, devices: KeyRing) -> None:
        """A device's signed report on a release (its topic must name its signer). Nothing in
        it can stop the service: bad reports are logged and dropped."""
        try:
            self._on_report(device, payload, devices)
        except (sqlite3.Error, OSError):
            raise  # our storage: the message is redelivered once it works again
        except Exception:
            log.exception("release report from %s could not be handled; dropped", device)

    def _on_report(self, device: str, payload: bytes, devices: KeyRing) -> None:
        try:
            env = decode(payload, devices, kinds={KIND_REPORT}, expected={},
                         max_bytes=MAX_REPORT_BYTES)
        except WireError as exc:
            log.warning("release report on %s rejected: %s (%s)", device, exc.reason, exc)
            return
        meta = env.header.meta
        if env.header.sender != device or meta.get("fleet") != self.cfg.fleet:
            log.warning("release report from %s on %s's topic (or another fleet) rejected",
                        env.header.sender, device)
            return
        counter, version, state = meta.get("counter"), meta.get("version",
                                                             env.header.model_version), \
            meta.get("state")
        issued = self.store.current_counter()
        if not (_small_int(counter) and _small_int(version) and isinstance(state, str)
                and counter <= issued):
            log.warning("release report from %s names no release this aggregator signed "
                        "(counter %r); ignored", device, counter)
            return
        assert isinstance(counter, int) and isinstance(version, int)
        reason, detail = str(meta.get("reason", ""))[:64], str(meta.get("detail", ""))[:300]
        if meta.get("refusal"):  # a release refused before it was judged: a notice
            key = (device, counter, reason)
            if key in self._notices:
                return  # once per device, release and reason (e.g. a stale retained copy)
            if len(self._notices) < 100_000:
                self._notices.add(key)
            if reason == "older_counter" and counter:
                # one of ours that the device had passed: a stale retained copy, or a replay
                log.info("%s refused release %d as older than what it runs", device, counter)
            else:
                log.warning("%s refused a release (counter %d): %s: %s", device, counter,
                            reason, detail)
            if self.on_refusal is not None:
                self.on_refusal(device, reason, f"release {counter}: {detail}")
            return
        if self.store.report(device, counter, version, state, reason, detail, self.clock()):
            level = logging.WARNING if state in FAILED else logging.INFO
            log.log(level, "release %d (v%d): %s is %s%s", counter, version, device, state,
                    f" ({reason}: {detail})" if reason else "")

    # -- rollouts ----------------------------------------------------------------------------------
    def tick(self, devices: KeyRing, round_open: bool) -> bool:
        """Advance rollouts; True when a fleet-wide version was released (the base changed)."""
        changed = False
        for r in self.store.rollouts(("staged", "canary")):
            if r.status == "staged":
                if self._blocked(r, round_open):
                    continue
                changed |= self._start(r, sorted(devices))
                break  # one rollout starts at a time, in order
            changed |= self._advance(r, sorted(devices))
        return changed

    def _blocked(self, r: Rollout, round_open: bool) -> bool:
        """Rollouts run one at a time (their retained per-device releases and their counters
        stay in order); a fleet-wide one also waits for the open round to close."""
        other = [o for o in self.store.rollouts(("canary",)) if o.id != r.id]
        why = ("a round is open" if r.everyone and round_open else
               f"rollout {other[0].id} is in canary" if other else "")
        if why and r.id not in self._waiting:
            log.info("rollout %d (%s) waits: %s", r.id, r.target.spec, why)
            self._waiting.add(r.id)
        return bool(why)

    def _start(self, r: Rollout, enrolled: list[str]) -> bool:
        """Store the version, sign its release (for the canary devices alone, if there is a
        canary) and send it. Any failure aborts the rollout with its reason; the service goes
        on."""
        now = self.clock()
        version = r.version
        try:
            m, data = self._materialize(r)
            version = m.version
            p = r.params
            golden = (Golden.from_meta(p["golden"]) if p.get("golden")
                      else golden_vectors(data, m))
            targets = enrolled if r.target.devices is None else list(r.target.devices)
            canary = canary_devices(targets, p.get("canary"))
            wave = canary if canary and len(canary) < len(targets) else []
            # a canary's release names the canary devices only: whoever relays it elsewhere
            # (a broker, a replay) cannot widen it
            target = Target(f"{r.target.spec} (canary)", tuple(wave)) if wave else r.target
            rel = make_release(
                counter=self.store.next_counter(), manifest=m, model_bytes=data, origin=r.origin,
                target=target, max_message_bytes=self.cfg.releases.max_message_bytes,
                chunk_bytes=self.cfg.releases.chunk_bytes, url=self.url, golden=golden,
                probation=Probation.from_meta(p.get("probation", {})),
                min_agent_version=str(p.get("min_agent_version", "")),
                new_schema=bool(p.get("new_schema")), pushed_by=str(p.get("pushed_by", "")))
            envelope = sign_release(self.key, self.cfg.fleet, rel, m, data)
        except Exception as exc:  # a bad model or release must not stop the service
            log.exception("rollout %d aborted before release", r.id)
            self.store.update(r.id, now, status="aborted", version=version,
                              reason=f"{type(exc).__name__}: {exc}")
            return False
        self.servable.add(rel.sha256)
        self.store.update(r.id, now, counter=rel.counter, version=m.version)
        if wave:
            self.registry.put_release(m.version, envelope)  # the wave's: re-signed when it passes
            for d in wave:
                self.publish(topic_release(self.cfg.fleet, d), envelope, True)
            self.store.update(r.id, now, status="canary", canary=wave, wave_started_at=now)
            log.info("rollout %d: release %d (v%d) to %d canary device(s) of %d: %s", r.id,
                     rel.counter, m.version, len(wave), len(targets), ", ".join(wave))
            return False
        return self._complete(r.id, rel, m, envelope, targets)

    def _materialize(self, r: Rollout) -> tuple[Manifest, bytes]:
        """Store the rollout's model as the next version (once: a restart finds it stored)."""
        if r.version is not None:
            return self.registry.manifest(r.version), self.registry.model_bytes(r.version)
        p = r.params
        parent = self.base_version()
        if "source_version" in p:  # a rollback: the old version's model, as a new version
            parent = int(p["source_version"])
            src_m = self.registry.manifest(parent)
            data = self.registry.model_bytes(parent)
            m = Manifest.from_dict(src_m.to_dict())
            m.training = {**src_m.training, "rollback_of": parent,
                          "pushed": {"by": p.get("pushed_by", ""), "target": r.target.spec}}
        else:
            staged = Path(p["staged"])
            m = load_manifest(staged)
            data = verify_model_file(staged, m)
            m.training = {**m.training, "pushed": {"by": p.get("pushed_by", ""),
                                                   "from": p.get("source", str(staged)),
                                                   "target": r.target.spec}}
        latest = self.registry.latest() or 0
        m.parent_version = parent
        m.version, m.created_at, m.files = latest + 1, self.clock(), {}
        self.registry.add(data, m)
        self.store.update(r.id, self.clock(), version=m.version)
        return self.registry.manifest(m.version), data

    def _advance(self, r: Rollout, enrolled: list[str]) -> bool:
        """A canary wave: proceed, abort, or keep waiting. At the wave's timeout a canary
        device that has not reported counts as failed (a model that crashed it cannot say)."""
        now = self.clock()
        assert r.counter is not None and r.version is not None and r.wave_started_at is not None
        reports = {x["device"]: x for x in self.store.reports(r.counter)}
        done = [d for d in r.canary if reports.get(d, {}).get("state") in DONE]
        failed = [d for d in done if reports[d]["state"] in FAILED]
        probation = float(r.params.get("probation", {}).get("seconds", 0.0))
        timed_out = now >= r.wave_started_at + probation + self.cfg.releases.wave_timeout_seconds
        if len(done) < len(r.canary) and not timed_out:
            return False
        silent = [d for d in r.canary if d not in done]
        threshold = float(r.params.get("abort_on_failure_rate", 0.0))
        rate = (len(failed) + len(silent)) / len(r.canary)
        if rate > threshold:
            why = (f"canary failure rate {rate:.2f} > {threshold:.2f} ("
                   + ", ".join([f"{d}: {reports[d]['reason'] or reports[d]['state']}"
                                for d in failed]
                               + [f"{d}: no report within {now - r.wave_started_at:.0f} s"
                                  for d in silent]) + ")")
            self.store.update(r.id, now, status="aborted", reason=why)
            self._unserve(r.version)
            log.error("rollout %d (release %d, v%d) aborted: %s; the rest of %s never sees it",
                      r.id, r.counter, r.version, why, r.target.spec)
            return False
        log.info("rollout %d: canary passed (failure rate %.2f <= %.2f); releasing to %s", r.id,
                 rate, threshold, r.target.spec)
        try:
            m = self.registry.manifest(r.version)
            data = self.registry.model_bytes(r.version)
            canary_release = self.registry.release(r.version)
            assert canary_release is not None
            # signed again for the whole target, with a fresh counter (rounds may have released
            # versions meanwhile): the canary devices see the version they run, and keep it
            rel = replace(Release.from_meta(peek(canary_release).meta["release"]),
                          counter=self.store.next_counter(), target=r.target)
            envelope = sign_release(self.key, self.cfg.fleet, rel, m, data)
        except Exception as exc:
            log.exception("rollout %d aborted after its canary", r.id)
            self.store.update(r.id, now, status="aborted", reason=f"{type(exc).__name__}: {exc}")
            return False
        self.store.update(r.id, now, counter=rel.counter)
        targets = enrolled if r.target.devices is None else list(r.target.devices)
        return self._complete(r.id, rel, m, envelope, targets)

    def _complete(self, rollout_id: int, rel: Release, m: Manifest, envelope: bytes,
                  devices: list[str]) -> bool:
        self.registry.put_release(m.version, envelope)
        if rel.target.everyone:  # one retained message for the fleet, also for later devices
            self.publish(topic_model(self.cfg.fleet), envelope, True)
            self.clear_device_topics()
        else:
            for d in devices:
                self.publish(topic_release(self.cfg.fleet, d), envelope, True)
        r = self.store.get(rollout_id)
        if r is not None and r.params.get("new_federation") and self.last_round is not None:
            self.store.start_federation(self.last_round(), rollout_id, self.clock())
        self.store.update(rollout_id, self.clock(), status="complete")
        log.info("rollout %d: release %d (v%d) sent to %s", rollout_id, rel.counter, m.version,
                 rel.target.spec)
        return rel.target.everyone

    def clear_device_topics(self) -> None:
        """A fleet-wide release supersedes every per-device one: clear their retained copies,
        so that devices reconnecting later are not handed an older release."""
        devices: set[str] = set()
        for r in self.store.rollouts():
            devices.update(r.canary)
            if r.target.devices is not None and r.status in ("canary", "complete"):
                devices.update(r.target.devices)
        for d in sorted(devices):
            self.publish(topic_release(self.cfg.fleet, d), b"", True)

    # -- what the download endpoint serves ------------------------------------------------------
    def _servable(self) -> set[str]:
        """Model files devices may download: every version except aborted rollouts'."""
        aborted = {r.version for r in self.store.rollouts(("aborted",))}
        out = set()
        for v in self.registry.versions():
            if v not in aborted:
                out.add(self.registry.manifest(v).sha256)
        return out

    def _unserve(self, version: int) -> None:
        sha = self.registry.manifest(version).sha256
        if not any(self.registry.manifest(v).sha256 == sha for v in self.registry.versions()
                   if v != version and v not in self.store.held_back()):
            self.servable.discard(sha)


def status(store: ReleaseStore, enrolled: list[str]) -> dict[str, Any]:
    """What ``bedside models status`` shows: each device's latest release report, and every
    rollout's progress."""
    latest = store.devices()
    rollouts = []
    for r in store.rollouts():
        d = r.to_dict()
        if r.counter is not None:
            reports = store.reports(r.counter)
            d["reports"] = {s: sum(1 for x in reports if x["state"] == s)
                            for s in ("downloading", "verified", "active", "rejected",
                                      "rolled_back")}
        rollouts.append(d)
    devices = []
    for dev in sorted(set(enrolled) | set(latest)):
        rep = latest.get(dev)
        devices.append({"device": dev, "enrolled": dev in enrolled,
                        "counter": rep["counter"] if rep else None,
                        "version": rep["version"] if rep else None,
                        "state": rep["state"] if rep else None,
                        "reason": rep["reason"] if rep else "",
                        "at": rep["at"] if rep else None})
    return {"devices": devices, "rollouts": rollouts}


MAX_REPORT_BYTES = 16 * 1024


def _small_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53


def base_version(registry: Registry, store: ReleaseStore) -> int | None:
    """The federation's version: the newest one not held back (in canary, aborted, targeted)."""
    held = store.held_back()
    versions = [v for v in registry.versions() if v not in held]
    return versions[-1] if versions else None


@dataclass(frozen=True)
class PushOptions:
    """What ``bedside models push`` and ``rollback`` take besides the model."""

    to: str = "all"
    canary: str | None = None
    abort_on_failure_rate: float = 0.0
    probation: Probation = field(default_factory=Probation)
    new_schema: bool = False
    min_agent_version: str = ""
    pushed_by: str = ""
    new_federation: bool = False


def _check_options(opts: PushOptions) -> None:
    if opts.new_federation and opts.to != "all":
        raise InputError("--new-federation releases to every device (--to all): a federation "
                         "is the whole fleet")
    if not 0.0 <= opts.abort_on_failure_rate <= 1.0:
        raise InputError(f"--abort-on-failure-rate {opts.abort_on_failure_rate}: expected a "
                         "failure rate between 0 and 1")
    canary_devices(["x"], opts.canary)  # its format: a count or a percentage


def _params(opts: PushOptions, target: Target) -> dict[str, Any]:
    return {"canary": opts.canary, "abort_on_failure_rate": opts.abort_on_failure_rate,
            "probation": opts.probation.to_meta(),
            "new_schema": opts.new_schema or opts.new_federation,
            "min_agent_version": opts.min_agent_version, "pushed_by": opts.pushed_by,
            "new_federation": opts.new_federation}


def stage_push(cfg: AggregatorConfig, store: ReleaseStore, registry: Registry, model_dir: Path,
               opts: PushOptions, golden: Golden | None = None) -> int:
    """Check a model directory and stage its rollout for the service. Returns the rollout id.

    Refused (InputError) when the directory is not a verified model, its input schema differs
    from the federation's without ``new_schema``, or the target names unknown groups or devices.
    ``golden``: the ML engineer's test vectors (default: computed by the service from the
    schema)."""
    _check_options(opts)
    m = load_manifest(model_dir)
    data = verify_model_file(model_dir, m)
    base = base_version(registry, store)
    if base is None:
        raise InputError(f"registry {registry.root} is empty: start the aggregator service once "
                         "(it imports initial_model) before pushing models")
    _check_schema(registry, store, m, str(model_dir), opts.new_schema or opts.new_federation)
    target = _target(cfg, opts.to)
    golden = _checked_golden(model_dir, m, data, golden)
    staged = cfg.staged_path / f"{m.sha256[:16]}-{int(time.time() * 1000)}"
    private_dir(cfg.staged_path)
    copy_model_dir(model_dir, staged)
    params = {**_params(opts, target), "staged": str(staged), "source": str(model_dir),
              "golden": golden.to_meta()}
    rid = store.stage("push", target, params)
    log.info("rollout %d staged: %s v%d (%s) to %s", rid, m.name, m.version, m.sha256[:12],
             target.spec)
    return rid


def stage_rollback(cfg: AggregatorConfig, store: ReleaseStore, registry: Registry, version: int,
                   opts: PushOptions) -> int:
    """Stage an operator's rollback: ``version``'s model released again as a new version with a
    new, higher counter (devices never go back on their own)."""
    _check_options(opts)
    if version not in registry.versions():
        have = registry.versions()
        raise InputError(f"registry {registry.root}: no version {version} to roll back to (it "
                         f"holds {f'{have[0]}..{have[-1]}' if have else 'none'})")
    m = registry.manifest(version)
    registry.model_bytes(version)  # verified now, not when the service gets to it
    _check_schema(registry, store, m, f"version {version}", opts.new_schema)
    target = _target(cfg, opts.to)
    return store.stage("rollback", target, {**_params(opts, target), "source_version": version})


def _check_schema(registry: Registry, store: ReleaseStore, m: Manifest, what: str,
                  new_schema: bool) -> None:
    base = base_version(registry, store)
    assert base is not None
    current = registry.manifest(base).schema
    if m.schema.fingerprint() != current.fingerprint() and not new_schema:
        raise InputError(
            f"{what}: its input schema ({len(m.schema.features)} features, labels "
            f"{list(m.schema.labels)}) differs from the federation's (v{base}: "
            f"{len(current.features)} features, labels {list(current.labels)}); devices hold "
            "records of the current one. Use --new-schema if this is meant")


def _checked_golden(model_dir: Path, m: Manifest, data: bytes, golden: Golden | None) -> Golden:
    """The release's golden vectors (the given ones, or this model's outputs on rows from its
    schema), run here first: a model that fails them, or fails to run, is refused now rather
    than on the devices; and they must fit in a release's signed header."""
    from bedside.constants import MAX_HEADER_BYTES
    from bedside.federation.release import check_golden
    from bedside.models.onnx_model import OnnxClassifier

    try:
        if golden is None:
            golden = golden_vectors(data, m)
        clf = OnnxClassifier(data, m.output, m.schema.labels, where=str(model_dir))
        why = check_golden(golden, clf.probabilities(m.schema.validate(golden.inputs)))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{model_dir}: the model does not run on its golden vectors ({exc})") \
            from None
    if why:
        raise InputError(f"{model_dir}: {why} on this machine already; fix the golden vectors or "
                         "the model before pushing")
    size = len(json.dumps(golden.to_meta())) + len(m.to_json())
    if size > MAX_HEADER_BYTES * 3 // 4:
        raise InputError(f"{model_dir}: the golden vectors and manifest take {size} bytes; a "
                         f"release header holds at most {MAX_HEADER_BYTES}: give fewer rows")
    return golden


def _target(cfg: AggregatorConfig, spec: str) -> Target:
    enrolled = sorted(p.stem for p in cfg.devices.glob("*.pub")) if cfg.devices.is_dir() else []
    from bedside.aggregator.enrollment import enrolled_groups

    return parse_target(spec, enrolled_groups(cfg), enrolled)

"""Metrics and the status page (issue 16, items 4 and 5): Prometheus /metrics on the aggregator
and the agent, bound to 127.0.0.1; /api/status and a self-contained status page on the
aggregator; a forged update shows in rejected_total{reason="bad_signature"} and on the page."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bedside.config import to_toml
from bedside.constants import KIND_UPDATE, topic_update
from bedside.transport import free_port
from bedside.wire.envelope import encode
from bedside.wire.signing import SigningKey
from tests.fleet import seeded_fleet, start_mem
from tests.wire_tools import resign


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read().decode()


def _metric(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample of the Prometheus text ``text``."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    m = re.search(r"^" + pattern + r"$", text, re.M)
    return float(m.group(1)) if m else None


def _monitored_fleet(tmp_path: Path, clock_start: float | None = None):
    """Three clinics and a silent device (rounds stay open until the deadline); the aggregator
    and clinic-1 serve their metrics on free loopback ports."""
    fleet = seeded_fleet(tmp_path / "fed", clients=3, rounds=2, extra_devices=1)
    agg_port, dev_port = free_port(), free_port()
    fleet.plan["aggregator"]["monitor"] = {"port": agg_port}
    fleet.aggregator_toml.write_text(to_toml(fleet.plan["aggregator"]))
    c = fleet.plan["clinics"][0]["config"]
    c["monitor"] = {"port": dev_port}
    fleet.agent_toml(0).write_text(to_toml(c))
    return start_mem(fleet, clock_start), agg_port, dev_port


def _forged_update(mf) -> tuple[str, bytes]:
    """clinic-1's id on an update signed with someone else's key."""
    agg = mf.aggregator
    cur = agg.state.current_round()
    cid = mf.fleet.clinic_ids[0]
    key = SigningKey.load(mf.fleet.plan["clinics"][0]["dir"] / "keys" / f"{cid}.key")
    good = encode(KIND_UPDATE, cid, key, {k: np.zeros(s, np.float32) for k, s in
                                         agg._shapes.items()}, round=cur.round,
                  model_version=cur.model_version, meta={"fleet": mf.fleet.plan["fleet"]})
    return topic_update(mf.fleet.plan["fleet"], cid), resign(good, SigningKey.generate())


def test_metrics_and_status_count_what_happened_and_bind_loopback(tmp_path):
    mf, agg_port, dev_port = _monitored_fleet(tmp_path)
    try:
        assert mf.aggregator.monitor.server.httpd.server_address[0] == "127.0.0.1"
        assert mf.agents[0].monitor.httpd.server_address[0] == "127.0.0.1"
        topic, forged = _forged_update(mf)
        mf.broker.publish(topic, forged, False)
        mf.broker.publish(topic_update(mf.fleet.plan["fleet"], mf.fleet.clinic_ids[1]),
                          encode(KIND_UPDATE, mf.fleet.clinic_ids[1], SigningKey.load(
                              mf.fleet.plan["clinics"][1]["dir"] / "keys" / "clinic-2.key"), {},
                              round=1, model_version=1,
                              meta={"fleet": mf.fleet.plan["fleet"], "decline": "x" * 60}),
                          False)
        for _ in range(30):
            mf.step()
        mf.aggregator.monitor.refresh(force=True)  # the loop's next turn (at most 1 s away)
        status, ctype, text = _get(f"http://127.0.0.1:{agg_port}/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert _metric(text, "bedside_updates_rejected_total", 'reason="bad_signature"') == 1
        # a reason a device made up is not a label of its own
        assert _metric(text, "bedside_updates_declined_total", 'reason="other"') == 1
        accepted = len(mf.aggregator.state.accepted(1))
        assert accepted >= 1
        assert _metric(text, "bedside_updates_accepted_total") == accepted
        assert _metric(text, "bedside_updates_received_total") >= accepted + 2
        assert _metric(text, "bedside_validation_seconds_count") >= accepted + 2
        assert _metric(text, "bedside_devices_enrolled") == 4
        assert _metric(text, "bedside_round") == 1 and _metric(text, "bedside_round_open") == 1
        assert _metric(text, "bedside_broker_connected") == 1
        _, ctype, body = _get(f"http://127.0.0.1:{agg_port}/api/status")
        s = json.loads(body)
        assert ctype == "application/json"
        assert s["round"] == 1 and s["state"] == "open" and s["enrolled"] == 4
        assert s["rejections"]["bad_signature"] == 1
        assert "bad_signature" in s["last_error"]
        assert s["participants"] == len(mf.aggregator.state.answered(1))
        # the round closes at its deadline: its duration and the device-level epsilon appear
        mf.clock.advance(3600)
        mf.run(max_steps=200)
        mf.aggregator.monitor.refresh(force=True)
        _, _, text = _get(f"http://127.0.0.1:{agg_port}/metrics")
        assert _metric(text, "bedside_round_duration_seconds_count") >= 1
        assert _metric(text, "bedside_epsilon_spent", 'unit="device"') > 0
        assert _metric(text, "bedside_model_version") == mf.aggregator.registry.latest()
        s = json.loads(_get(f"http://127.0.0.1:{agg_port}/api/status")[2])
        assert s["epsilon"]["device"] > 0 and s["epsilon"]["device_planned"] > 0
        first = next(r for r in s["recent_rounds"] if r["round"] == 1)
        assert first["status"] == "closed" and first["seconds"] > 0
        # the device: its rounds and its published privacy figures, nothing else
        _, _, dev = _get(f"http://127.0.0.1:{dev_port}/metrics")
        assert _metric(dev, "bedside_agent_rounds_total", 'outcome="contributed"') >= 1
        spent = _metric(dev, "bedside_epsilon_spent", 'unit="record"')
        assert spent is not None and 0 < spent <= 8.0
        assert spent == pytest.approx(math_ceil2(spent))  # rounded, as published
        assert _metric(dev, "bedside_epsilon_budget", 'unit="record"') == 8.0
        with pytest.raises(urllib.error.HTTPError) as exc:  # no status page on a device
            _get(f"http://127.0.0.1:{dev_port}/api/status")
        assert exc.value.code == 404
        # a page elsewhere that points a name at 127.0.0.1 (DNS rebinding) is not answered
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", agg_port, timeout=10)
        conn.request("GET", "/api/status", headers={"Host": "attacker.example:80"})
        assert conn.getresponse().status == 403
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", agg_port, timeout=10)
        conn.request("GET", "/api/status", headers={"Host": f"localhost:{agg_port}"})
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        mf.aggregator.close()
        for a in mf.agents:
            a.close()


def math_ceil2(x: float) -> float:
    import math

    return math.ceil(round(x * 100, 6)) / 100


def test_the_status_page_is_self_contained(tmp_path):
    from bedside.monitoring import status_page

    page = status_page().decode()
    assert "/api/status" in page
    # no script, style, font or image from anywhere else
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.integration
def test_the_status_page_in_a_headless_browser_shows_a_forged_update(tmp_path):
    """Debian's Chromium, driven by Playwright: the page renders the round, the participants and
    the rejected forgery; a screenshot is kept (BEDSIDE_SCREENSHOT_DIR, else beside the test's
    files)."""
    chromium = _chromium()
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Chromium (apt-get install chromium) and Playwright (dev extra)")
        pytest.skip("Chromium or Playwright is not installed")
    mf, agg_port, _ = _monitored_fleet(tmp_path, clock_start=time.time())
    try:
        topic, forged = _forged_update(mf)
        mf.broker.publish(topic, forged, False)
        for _ in range(30):
            mf.step()
        mf.aggregator.monitor.refresh(force=True)  # the loop's next turn (at most 1 s away)
        shots = Path(os.environ.get("BEDSIDE_SCREENSHOT_DIR", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 720})
                outside: list[str] = []
                page.on("request", lambda r: outside.append(r.url)
                        if not r.url.startswith(f"http://127.0.0.1:{agg_port}/") else None)
                page.goto(f"http://127.0.0.1:{agg_port}/")
                expect(page.locator("#rejections")).to_have_attribute("data-total", "1",
                                                                      timeout=15000)
                assert page.locator("#round").inner_text() == "1"
                assert "bad_signature" in page.locator("#rejections").inner_text()
                assert page.locator("#participants").inner_text().endswith("/ 4")
                assert "bad_signature" in page.locator("#last-error").inner_text()
                page.screenshot(path=str(shots / "status-page.png"), full_page=True)
                assert not outside, f"the page fetched from elsewhere: {outside}"
            finally:
                browser.close()
        assert (shots / "status-page.png").stat().st_size > 10_000
    finally:
        mf.aggregator.close()
        for a in mf.agents:
            a.close()

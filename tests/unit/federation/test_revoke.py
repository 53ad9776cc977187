"""Revocation (issue 14, item 2, in part): ``bedside aggregator revoke`` stops accepting a device
at once, while the aggregator runs; ``--ca`` also revokes its broker certificate (CRL)."""

from __future__ import annotations

import pytest
from cryptography import x509

from bedside.cli import main
from bedside.errors import InputError
from bedside.transport.pki import CRL_FILE, create_fleet, revoke, revoked
from tests.fleet import mem_fleet


def test_a_revoked_device_is_rejected_by_the_running_aggregator(tmp_path, capsys):
    mf = mem_fleet(tmp_path / "fleet", clients=3, rounds=2)
    mf.step()  # round 1 is open; the aggregator runs
    certs = create_fleet(tmp_path / "ca", ["aggregator", "clinic-1", "clinic-2", "clinic-3"])
    assert main(["aggregator", "revoke", "clinic-3", "--config", str(mf.fleet.aggregator_toml),
                 "--ca", str(certs)]) == 0
    out = capsys.readouterr().out
    assert "no longer enrolled" in out and "revoked its broker certificate" in out
    mf.run()
    agg = mf.aggregator
    assert agg.finished
    assert [r.result["accepted"] for r in agg.state.rounds()] == [2, 2]
    assert all(sum(agg.state.rejections(r.round).values()) >= 1 for r in agg.state.rounds())
    assert "clinic-3" not in agg.devices
    assert (mf.fleet.plan["aggregator_dir"] / "keys" / "devices" / "revoked" /
            "clinic-3.pub").exists()
    # twice is harmless; an unknown device is an error that says so
    assert main(["aggregator", "revoke", "clinic-3", "--config",
                 str(mf.fleet.aggregator_toml)]) == 0
    assert "revoked before" in capsys.readouterr().out
    assert main(["aggregator", "revoke", "clinic-9", "--config",
                 str(mf.fleet.aggregator_toml)]) == 2
    assert "not enrolled" in capsys.readouterr().err


def test_the_crl_lists_exactly_the_revoked_certificates(tmp_path):
    certs = create_fleet(tmp_path / "ca", ["clinic-1", "clinic-2"])
    empty = x509.load_pem_x509_crl((certs / CRL_FILE).read_bytes())
    assert len(list(empty)) == 0  # written with the CA: the broker config can name it at once
    serial = revoke(certs, "clinic-1")
    assert revoke(certs, "clinic-1") == serial  # idempotent
    crl = x509.load_pem_x509_crl((certs / CRL_FILE).read_bytes())
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    assert crl.is_signature_valid(ca.public_key())
    assert [r.serial_number for r in crl] == [serial]
    assert [e["identity"] for e in revoked(certs)] == ["clinic-1"]
    with pytest.raises(InputError, match="no certificate for 'clinic-9'"):
        revoke(certs, "clinic-9")

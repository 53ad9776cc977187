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


def test_certs_give_the_broker_user_its_files_and_nothing_else(tmp_path, capsys):
    """``bedside broker certs`` makes the broker's certificate, key and CRL readable by the
    ``mosquitto`` group (Mosquitto 2 drops privileges to that user); client keys stay owner-only."""
    import grp
    import os
    import stat

    from bedside.transport.pki import share_with_broker

    out = tmp_path / "certs"
    assert main(["broker", "certs", "--out", str(out), "--identity", "clinic-1"]) == 0
    said = capsys.readouterr().out
    try:
        gid = grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        assert "no group 'mosquitto'" in said
        return
    if os.geteuid() != 0:
        assert "could not give group" in said
        return
    assert "readable by group 'mosquitto'" in said
    for name, mode in ((".", 0o750), ("broker.key", 0o640), ("broker.crt", None),
                       ("ca.crt", None), (CRL_FILE, None)):
        st = (out / name).stat()
        assert st.st_gid == gid, name
        if mode is not None:
            assert stat.S_IMODE(st.st_mode) == mode, name
    for private in ("ca.key", "clinic-1.key"):
        assert stat.S_IMODE((out / private).stat().st_mode) == 0o600, private
    assert "no group 'nobody-here'" in share_with_broker(out, "nobody-here")

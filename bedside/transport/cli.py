"""``bedside broker ...``: the embedded broker, and certificates (and their revocation) for
Mosquitto."""

from __future__ import annotations

import argparse
from pathlib import Path

from bedside.cli import print_json, run_until_signalled
from bedside.constants import DEFAULT_HOST, DEFAULT_MQTT_PORT


def build(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    p = sub.add_parser("serve", help="run the embedded MQTT broker (amqtt) until interrupted")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to bind (default 127.0.0.1; anything else is reachable from the "
                   "network and has no TLS: use Mosquitto for that)")
    p.add_argument("--port", type=int, default=DEFAULT_MQTT_PORT)
    p.set_defaults(func=_serve)

    p = sub.add_parser("certs", help="create a CA, a broker certificate and one client "
                       "certificate per identity, for Mosquitto's TLS + ACL")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--identity", action="append", default=[], metavar="ID",
                   help="device id or 'aggregator' (repeatable)")
    p.add_argument("--broker-group", default="mosquitto", metavar="GROUP",
                   help="make the broker's certificate, key and CRL readable by this group "
                   "(default mosquitto, the user Mosquitto 2 drops to; '' for none)")
    p.add_argument("--broker-host", action="append", default=[], metavar="HOST",
                   help="name or IP clients use to reach the broker (default 127.0.0.1, "
                   "localhost)")
    p.add_argument("--downloads-host", action="append", default=[], metavar="HOST",
                   help="also issue downloads.crt/.key, a server certificate for the "
                   "aggregator's model download endpoint ([releases] in aggregator.toml) at "
                   "this name or IP (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_certs)

    p = sub.add_parser("config", help="write a Mosquitto configuration for a fleet: "
                       "mosquitto.conf (TLS 1.2+, client certificates, no anonymous access, no "
                       "plaintext listener), its ACL, and the CA's files and CRL")
    _fleet_args(p)
    p.add_argument("--ca", required=True, type=Path, metavar="DIR",
                   help="the CA directory ('bedside broker certs --out')")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="where Mosquitto reads it, e.g. /etc/bedside/mosquitto")
    p.add_argument("--listen", action="append", default=[], metavar="HOST:PORT",
                   help="a TLS listener (repeatable; default 127.0.0.1:8883: name the clinic "
                   "network's address explicitly)")
    p.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="Mosquitto's persistence, writable by its user (default "
                   "/var/lib/mosquitto)")
    p.add_argument("--plaintext-loopback", type=int, metavar="PORT",
                   help="also a listener without TLS on 127.0.0.1:PORT, for tools on the "
                   "broker's machine; they log in with a password (passwd, mosquitto_passwd)")
    p.add_argument("--broker-group", default="mosquitto", metavar="GROUP",
                   help="make the broker's key and files readable by this group (default "
                   "mosquitto; '' for none)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_config)

    p = sub.add_parser("acl", help="write the Mosquitto ACL of a fleet: each device publishes "
                       "only its own topics, in its own fleet")
    _fleet_args(p)
    p.add_argument("--out", type=Path, metavar="FILE", help="write here (default stdout; '-' too)")
    p.set_defaults(func=_acl)

    p = sub.add_parser("revoke", help="revoke an identity's certificate and rewrite the CA's CRL "
                       "(then restart or reload Mosquitto)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="the CA directory ('bedside broker certs --out')")
    p.add_argument("--identity", required=True, metavar="ID")
    p.set_defaults(func=_revoke)

    p = sub.add_parser("crl", help="rewrite the CA's CRL (before it expires, or for a CA made "
                       "before Bedside wrote one)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.set_defaults(func=_crl)


def _serve(ns: argparse.Namespace) -> int:
    from bedside.transport.broker import EmbeddedBroker

    broker = EmbeddedBroker(ns.host, ns.port).start()
    print(f"embedded MQTT broker on {broker.url} (MQTT 3.1.1); Ctrl-C to stop", flush=True)
    return run_until_signalled(lambda stop: stop.wait(), broker.stop)


def _fleet_args(p: argparse.ArgumentParser) -> None:
    """Whose broker configuration or ACL: the fleet, its devices, its aggregator's CN."""
    p.add_argument("--fleet", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--devices", type=Path, metavar="DIR",
                   help="the aggregator's enrolled devices (<device_id>.pub files)")
    g.add_argument("--device", action="append", metavar="ID", help="a device id (repeatable)")
    p.add_argument("--aggregator", default="aggregator",
                   help="the aggregator's certificate CN (default aggregator)")
    p.add_argument("--worker", action="append", default=[], metavar="ID",
                   help="a validator worker's id ([workers] ids; repeatable): it may read "
                   "updates and write receipts (certificate CN aggregator-worker-ID)")


def _device_ids(ns: argparse.Namespace) -> list[str]:
    if ns.devices is not None:
        from bedside.wire.signing import KeyRing

        return list(KeyRing.from_dir(ns.devices))
    return list(ns.device)


def _config(ns: argparse.Namespace) -> int:
    from bedside.transport.mosquitto import parse_listener, write_config
    from bedside.transport.pki import share_with_broker

    listeners = [parse_listener(x) for x in ns.listen] or None
    files = write_config(ns.out, ns.ca, ns.fleet, _device_ids(ns), aggregator=ns.aggregator,
                         data_dir=ns.data_dir, listeners=listeners,
                         plaintext_loopback=ns.plaintext_loopback, workers=ns.worker)
    group = share_with_broker(ns.out, ns.broker_group) if ns.broker_group else None
    if ns.json:
        print_json({"dir": str(ns.out), "files": [f.name for f in files],
                    "broker_group": group})
    else:
        print(f"wrote {', '.join(f.name for f in files)} to {ns.out}"
              f"{f'; {group}' if group else ''}")
        print(f"start it with: mosquitto -c {ns.out / 'mosquitto.conf'} (regenerate it when "
              "devices are enrolled or revoked, then reload or restart Mosquitto)")
    return 0


def _acl(ns: argparse.Namespace) -> int:
    from bedside.files import write_output
    from bedside.transport.pki import acl_text

    write_output(ns.out or "-",
                 acl_text(ns.fleet, _device_ids(ns), ns.aggregator, ns.worker) + "\n")
    return 0


def _certs(ns: argparse.Namespace) -> int:
    from bedside.transport.pki import create_fleet, share_with_broker

    create_fleet(ns.out, ns.identity, ns.broker_host or None)
    if ns.downloads_host:
        from bedside.transport.pki import DOWNLOADS_ID, issue

        issue(ns.out, DOWNLOADS_ID, server_hosts=ns.downloads_host)
    group = share_with_broker(ns.out, ns.broker_group) if ns.broker_group else None
    files = sorted(p.name for p in ns.out.iterdir())
    if ns.json:
        print_json({"dir": str(ns.out), "files": files, "broker_group": group})
    else:
        print(f"wrote {', '.join(files)} to {ns.out} (private keys mode 0600: keep them on their "
              f"owner's machine only){f'; {group}' if group else ''}")
    return 0


def _revoke(ns: argparse.Namespace) -> int:
    from bedside.transport.pki import CRL_FILE, revoke

    serial = revoke(ns.out, ns.identity)
    print(f"revoked {ns.identity}'s certificate (serial {serial:x}); {ns.out / CRL_FILE} "
          "rewritten: restart or reload Mosquitto (SIGHUP) for it to take effect")
    return 0


def _crl(ns: argparse.Namespace) -> int:
    from bedside.transport.pki import write_crl

    print(f"wrote {write_crl(ns.out)}")
    return 0

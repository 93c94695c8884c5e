"""``p2pl certs init`` / ``p2pl certs issue DEVICE``: the run's CA and per-device mTLS certificates."""

from __future__ import annotations

import argparse
from pathlib import Path

from p2pl.node import certs


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    parser = sub.add_parser("certs", help="create the CA and device certificates for p2pl node")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    actions.required = True
    init = actions.add_parser("init", help="create a CA (ca.key, ca.crt) in --dir")
    init.add_argument("--dir", type=Path, default=Path("pki"), help="CA directory (default: pki)")
    init.add_argument("--name", default="p2pl-ca", help="CA common name")
    init.add_argument("--days", type=int, default=certs.DEFAULT_CA_DAYS, help="validity in days")
    init.add_argument("--force", action="store_true", help="replace an existing CA (orphans its certificates)")
    init.set_defaults(func=main_init)
    issue = actions.add_parser("issue", help="issue DEVICE.crt / DEVICE.key signed by the CA")
    issue.add_argument("device", metavar="DEVICE", help="device id (its certificate CN), e.g. dev-07")
    issue.add_argument("--ca", type=Path, default=Path("pki"), help="CA directory (default: pki)")
    issue.add_argument("--out", type=Path, default=None, help="output directory (default: certs/DEVICE)")
    issue.add_argument(
        "--host", action="append", default=[], metavar="HOST",
        help="IP address or host name the device is reached at (repeatable; default 127.0.0.1)",
    )  # fmt: skip
    issue.add_argument("--days", type=int, default=certs.DEFAULT_DEVICE_DAYS, help="validity in days")
    issue.set_defaults(func=main_issue)


def main_init(args: argparse.Namespace) -> int:
    paths = certs.init_ca(args.dir, name=args.name, days=args.days, force=args.force)
    print(f"CA created: {paths.cert} (keep {paths.key} off the devices)")
    return 0


def main_issue(args: argparse.Namespace) -> int:
    out = args.out or Path("certs") / args.device
    hosts = args.host or ["127.0.0.1", "localhost"]
    paths = certs.issue_device_cert(args.ca, args.device, out, hosts=hosts, days=args.days)
    print(
        f"issued {paths.cert} and {paths.key} (with {paths.ca_cert}); copy {out}/ to the device and "
        f'set tls.cert_dir = "{out}" in its node.toml (or to wherever the folder was copied)'
    )
    return 0

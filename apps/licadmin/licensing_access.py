"""How ``licadmin`` reaches the licensing server: its URL, bearer token and CA (one home).

Every command that talks to the licensing server takes the same options:
``--licensing-server URL``, ``--token-file FILE`` (else the ``LICADMIN_TOKEN``
environment variable) and, for ``https://``, ``--licensing-ca FILE``.
"""

from __future__ import annotations

import argparse

from apps.licadmin.online import Licensing

__all__ = ["add_options", "client_from"]


def add_options(sp: argparse.ArgumentParser) -> None:
    """The licensing-server options of one subcommand."""
    sp.add_argument("--licensing-server", required=True, metavar="URL",
                    help="the licensing server, e.g. https://licensing.example:8400 or "
                         "http://127.0.0.1:8400")
    sp.add_argument("--token-file", metavar="FILE",
                    help="the bearer token (licserver token create --out writes one); "
                         "default: the LICADMIN_TOKEN environment variable")
    sp.add_argument("--licensing-ca", metavar="FILE",
                    help="PEM CA to verify an https:// licensing server with "
                         "(default: the system's CAs)")


def client_from(args: argparse.Namespace) -> Licensing:
    """The client the options of ``args`` name (the token read now, so a bad file is a usage
    error before anything happens)."""
    from apps.licensing_client import LicensingClient, read_token

    client: Licensing = LicensingClient(args.licensing_server, token=read_token(args.token_file),
                                        ca=args.licensing_ca)
    return client

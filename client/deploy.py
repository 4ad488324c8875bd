"""`hierfed site`: one edge site of a deployment. It starts Flower's own `flower-supernode` against
the coordinator's SuperLink with TLS and the site's authentication key, and a node config that
tells our ClientApp where the site's data is (client/site_data.py) and what its privacy budget is.

Before Flower starts, the SuperLink is probed once, so that a TLS mistake (no TLS against a TLS
SuperLink, an untrusted or misnamed certificate) ends with one line instead of endless retries.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hiermodel.certs import check_site_name
from hiermodel.errors import ConfigError
from server.deploy import flower_executable, host_port, run_foreground, start_flower, tls_context, toml_pairs

RUNTIME_PORT = 9094  # flower-supernode's default; each SuperNode on one machine needs its own
PROBE_SECONDS = 10.0
ACTIVATION_REFUSED = "Failed to activate SuperNode"  # the SuperLink does not know the node's key


@dataclass(frozen=True)
class SiteSpec:
    superlink: str  # HOST:PORT of the SuperLink
    site: str
    data: Path
    root_cert: Path | None = None  # None: the system's CAs (a certificate from a public CA)
    auth_key: Path | None = None
    insecure: bool = False
    budget_epsilon: float | None = None
    site_index: int | None = None
    runtime_port: int = RUNTIME_PORT
    state_dir: Path | None = None  # where the site keeps its accountant history (default ~/.local/state/hierfed/sites)

    def node_config(self) -> dict[str, object]:
        """What the ClientApp reads from context.node_config."""
        config: dict[str, object] = {"data-path": str(Path(self.data).resolve()), "site-name": self.site}
        if self.site_index is not None:
            config["site-index"] = self.site_index
        if self.budget_epsilon is not None:
            config["budget-epsilon"] = float(self.budget_epsilon)
        if self.state_dir is not None:
            config["state-dir"] = str(Path(self.state_dir).resolve())
        return config


def check_site(spec: SiteSpec) -> None:
    """Every argument, before any process starts."""
    check_site_name(spec.site)
    host_port(spec.superlink, option="--superlink")
    if not Path(spec.data).exists():
        raise ConfigError(f"--data {spec.data}: no such file or folder; pass this site's data set (a folder or file `hierfed data --dataset` reads)")
    if spec.insecure and spec.root_cert:
        raise ConfigError("--insecure and --root-cert contradict each other: --root-cert is for a TLS SuperLink")
    if spec.insecure and spec.auth_key:
        raise ConfigError("--auth-key needs TLS (Flower refuses SuperNode authentication without it): drop --insecure and pass --root-cert")
    if spec.root_cert and not Path(spec.root_cert).is_file():
        raise ConfigError(f"--root-cert {spec.root_cert}: no such file; copy the coordinator's ca.crt here")
    if spec.auth_key:
        _check_auth_key(Path(spec.auth_key))
    if spec.budget_epsilon is not None and not spec.budget_epsilon > 0:
        raise ConfigError(f"--budget-epsilon must be positive, got {spec.budget_epsilon}")
    if spec.site_index is not None and spec.site_index < 0:
        raise ConfigError(f"--site-index must be 0 or more, got {spec.site_index}")
    if not 0 < spec.runtime_port < 65536:
        raise ConfigError(f"--runtime-port {spec.runtime_port} is not a TCP port (1-65535)")


def _check_auth_key(path: Path) -> None:
    """The key flower-supernode loads: an OpenSSH EC private key (it says only "unable to parse")."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"--auth-key {path}: no such file; copy the site's key from the coordinator's sites/ folder") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--auth-key {path}: not an unencrypted OpenSSH private key ({exc}); make one with `hierfed certs --site NAME`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"--auth-key {path}: Flower needs an EC (NIST P-256/384/521) key, this is {type(key).__name__}")


def probe_superlink(spec: SiteSpec, *, timeout: float = PROBE_SECONDS) -> str:
    """One TLS handshake with the SuperLink, to catch TLS mistakes before Flower retries forever.

    An unreachable SuperLink is fine (it may start later: flower-supernode keeps trying); returns
    what was found.
    """
    host, port = host_port(spec.superlink, option="--superlink")
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return f"not reachable yet ({exc}); flower-supernode keeps trying"
    with raw:
        if spec.insecure:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            try:
                with context.wrap_socket(raw, server_hostname=host):
                    pass
            except (ssl.SSLError, OSError):
                return "reachable without TLS"
            raise ConfigError(f"the SuperLink at {spec.superlink} uses TLS, but this site was started with --insecure; "
                              "start it with --root-cert (the coordinator's ca.crt) and --auth-key")
        try:
            with tls_context(spec.root_cert).wrap_socket(raw, server_hostname=host):
                return "reachable, TLS certificate verified"
        except ssl.SSLCertVerificationError as exc:
            trust = f"--root-cert {spec.root_cert}" if spec.root_cert else "the system's CAs (no --root-cert)"
            raise ConfigError(f"the SuperLink's certificate at {spec.superlink} fails against {trust}: {exc.verify_message}; "
                              "pass the coordinator's ca.crt, and a host name its server.crt names") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"no TLS handshake with {spec.superlink} ({exc}); is it a SuperLink started with TLS "
                              "(`hierfed superlink`)?") from None


def supernode_command(spec: SiteSpec) -> list[str]:
    """flower-supernode for this site (runtime installs stay off: its default)."""
    command = [flower_executable("flower-supernode"), "--superlink", spec.superlink,
               "--node-config", toml_pairs(spec.node_config()), "--port", str(spec.runtime_port)]
    if spec.insecure:
        command.append("--insecure")
    elif spec.root_cert:
        command += ["--root-certificates", str(Path(spec.root_cert).resolve())]
    if spec.auth_key:
        command += ["--auth-supernode-private-key", str(Path(spec.auth_key).resolve())]
    return command


def start_site(spec: SiteSpec, *, log: Path | None = None, capture: bool = False) -> subprocess.Popen:
    """Check the arguments, probe the SuperLink, and start the SuperNode."""
    check_site(spec)
    probe_superlink(spec)
    return start_flower(supernode_command(spec), log=log, capture=capture)


def refusal_hint(spec: SiteSpec) -> Callable[[int, str], str | None]:
    """For run_foreground: the line to end with when the SuperLink refuses this site's key."""
    def hint(code: int, output: str) -> str | None:
        if ACTIVATION_REFUSED in output:
            return (f"the SuperLink at {spec.superlink} refused site {spec.site}: its public key is not registered "
                    f"there (`hierfed superlink --site-keys .../{spec.site}.pub` on the coordinator)")
        return None

    return hint


def add_site_arguments(parser: argparse.ArgumentParser) -> None:
    """`hierfed site --superlink HOST:PORT --site NAME --data PATH --root-cert FILE --auth-key FILE ...`."""
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink, as its certificate names it")
    parser.add_argument("--site", required=True, help="this site's name (as in hierfed certs --site)")
    parser.add_argument("--data", required=True, type=Path, help="this site's data: a folder or file that --dataset accepts")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--root-cert", type=Path, help="the coordinator's ca.crt (default: the system's CAs)")
    tls.add_argument("--insecure", action="store_true", help="no TLS (only for a SuperLink started without it; no --auth-key then)")
    parser.add_argument("--auth-key", type=Path, help="this site's private key (sites/NAME.key from hierfed certs)")
    parser.add_argument("--budget-epsilon", type=float, help="this site's ε for the whole run (overrides the run's dp.target-epsilon)")
    parser.add_argument("--site-index", type=int, help="this site's number in the results (default 0)")
    parser.add_argument("--state-dir", type=Path, help="where this site keeps what it spent in each run (its accountant "
                        "history, checksummed; default ~/.local/state/hierfed/sites): keep it across restarts")
    parser.add_argument("--runtime-port", type=int, default=RUNTIME_PORT,
                        help=f"local port of the SuperNode's Runtime API on 127.0.0.1 (default {RUNTIME_PORT}; one per SuperNode)")


def spec_from_args(args: argparse.Namespace) -> SiteSpec:
    """The SiteSpec that `hierfed site` arguments describe."""
    return SiteSpec(superlink=args.superlink, site=args.site, data=args.data, root_cert=args.root_cert,
                    auth_key=args.auth_key, insecure=args.insecure, budget_epsilon=args.budget_epsilon,
                    site_index=args.site_index, runtime_port=args.runtime_port, state_dir=args.state_dir)


def run_site(args: argparse.Namespace) -> int:
    """Start this site's SuperNode and serve runs until Ctrl-C."""
    spec = spec_from_args(args)
    if spec.auth_key is None and not spec.insecure:
        print("hierfed site: no --auth-key: only a SuperLink without SuperNode authentication accepts this site", flush=True)
    process = start_site(spec, capture=True)
    print(f"hierfed site {spec.site}: SuperNode started for {spec.superlink} (node config {toml_pairs(spec.node_config())})", flush=True)
    return run_foreground(process, hint=refusal_hint(spec))

"""`hierfed superlink`: the coordinator of a deployment. It starts Flower's own `flower-superlink`
with TLS and SuperNode authentication, registers the sites' public keys, writes the `flwr`
connection for this machine and says how to start the sites and a run.

Flower 1.42 serves the Fleet API (the sites), the Control API (`flwr run`, `flwr supernode
register`) and the Runtime API (its ServerApp process) over HTTPS on one port; the gRPC ports of
earlier releases (9091-9093) are gone. Also here: the plumbing shared with `hierfed site`
(client/deploy.py) for running a Flower executable as a child process.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hiermodel.certs import CA_CERT, SERVER_CERT, SERVER_KEY, SITES_DIR
from hiermodel.errors import ConfigError

DEFAULT_PORT = 8000  # flower-superlink's own default
CONNECTION = "hierfed"  # the [superlink.hierfed] connection `flwr run . hierfed` uses
READY_SECONDS = 60.0
STOP_SECONDS = 15.0
# defaults for Flower's processes where this environment does not set them: no hub or PyPI
# look-ups on machines that may be offline
FLOWER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "FLWR_DISABLE_UPDATE_CHECK": "1"}
ALREADY_REGISTERED = "[code: 23]"  # Flower's PUBLIC_KEY_ALREADY_IN_USE


# -- running Flower's executables ----------------------------------------------------------------

def flower_executable(name: str) -> str:
    """The path of one of Flower's commands, preferring the one installed beside this Python."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"`{name}` not found beside {sys.executable} or on PATH; install hierfed (it brings flwr) in this environment")
    return found


def flower_env() -> dict[str, str]:
    """This process's environment with what Flower's processes need."""
    # always: the project is installed on every machine, so the SuperLink/SuperNode must not try
    # to install the app's dependencies when a run starts
    return {**FLOWER_ENV, **os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def start_flower(command: list[str], *, log: Path | None = None, capture: bool = False) -> subprocess.Popen:
    """Start a Flower process, its output (with stderr) to log, a pipe (capture) or this terminal."""
    if log is None:
        return _popen(command, subprocess.PIPE if capture else None)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return _popen(command, out)


def _popen(command: list[str], out) -> subprocess.Popen:
    # its own session: one signal to the group reaches the SuperExec and app processes it starts
    return subprocess.Popen(command, env=flower_env(), stdout=out, stderr=subprocess.STDOUT if out is not None else None,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def stop_process(process: subprocess.Popen, *, grace: float = STOP_SECONDS) -> int:
    """SIGTERM to the process group (Flower shuts down cleanly on it), then SIGKILL what is left."""
    _signal_group(process, signal.SIGTERM)
    try:
        code = process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        code = process.wait()
    _signal_group(process, signal.SIGKILL)  # stragglers: a SuperExec outlives its SuperNode for a while
    return code


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone


def run_foreground(process: subprocess.Popen, *, hint: Callable[[int, str], str | None] | None = None) -> int:
    """Wait for a started Flower process, passing Ctrl-C / SIGTERM on to its group; its exit code.

    With a captured stdout the output is echoed, and ``hint(code, tail)`` may add one line on exit.
    """
    def forward(signum, _frame) -> None:
        _signal_group(process, signum)

    def echo() -> None:
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            seen.append(line)

    seen: collections.deque[str] = collections.deque(maxlen=200)  # a site runs for days: keep only the end
    reader = threading.Thread(target=echo, daemon=True) if process.stdout is not None else None
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if reader:
            reader.start()
        code = process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop_process(process)  # also after a normal exit: what it started may still hold the output open
    if reader:
        reader.join(timeout=STOP_SECONDS)
    message = hint(code, "".join(seen)) if hint and code else None
    if message:
        raise ConfigError(message)
    return code


def toml_pairs(values: Mapping[str, object]) -> str:
    """`k=v k=v` as Flower's --node-config / --run-config parse them (TOML values, one regex)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def toml_value(value: object) -> str:
    """One value as TOML that survives Flower's pair-splitting regex."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    # Flower splits pairs with a regex that ends a quoted value at its first quote: a literal
    # string keeps backslashes (Windows paths) verbatim, a basic string is the fallback
    if "'" not in text and "\n" not in text:
        return f"'{text}'"
    if '"' not in text and "\n" not in text:
        return json.dumps(text)
    raise ConfigError(f"value {text!r} holds both ' and \" (or a newline), which Flower's config parser cannot take; rename it")


def host_port(address: str, *, option: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) split; ConfigError naming the option when it is not one."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {address!r} is not HOST:PORT; pass e.g. coordinator.example.org:{DEFAULT_PORT}")
    return host, int(port)


def tls_context(root_cert: Path | None) -> ssl.SSLContext:
    """A client TLS context that checks the server against root_cert (or the system's CAs)."""
    try:
        return ssl.create_default_context(cafile=str(root_cert) if root_cert else None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{root_cert}: not a PEM CA certificate ({exc}); pass the coordinator's ca.crt") from None


# -- the coordinator ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SuperLinkSpec:
    certs: Path  # holds ca.crt, server.crt, server.key
    address: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    database: Path | None = None  # None: in memory (registrations are lost on restart)

    @property
    def local_address(self) -> str:
        """Where this machine reaches the SuperLink; the SuperLink's own SuperExec connects here too."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.address, self.address)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def check_certificates(certs: Path) -> None:
    """The three files flower-superlink needs, or one line saying how to get them."""
    missing = [name for name in (CA_CERT, SERVER_CERT, SERVER_KEY) if not (Path(certs) / name).is_file()]
    if missing:
        raise ConfigError(f"{certs}: no {', '.join(missing)}; run `hierfed certs --out {certs} --host NAME --site NAME` "
                          "or put your own certificates there under these names")


def superlink_command(spec: SuperLinkSpec) -> list[str]:
    """flower-superlink with TLS on every API, SuperNode authentication, no runtime installs."""
    certs = Path(spec.certs).resolve()
    command = [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile", str(certs / CA_CERT),
        "--ssl-certfile", str(certs / SERVER_CERT),
        "--ssl-keyfile", str(certs / SERVER_KEY),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", spec.address,
        "--port", str(spec.port),
    ]
    if spec.database is not None:
        command += ["--database", str(Path(spec.database).resolve())]
    return command


def wait_until_ready(process: subprocess.Popen, *, address: str, root_cert: Path, timeout: float = READY_SECONDS) -> None:
    """Poll the SuperLink's /health over HTTPS (checking its certificate) until it answers."""
    context = tls_context(root_cert)
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"flower-superlink exited with code {process.returncode} before it was ready "
                              "(port in use? bad certificate?); see its output")
        try:
            with urllib.request.urlopen(f"https://{address}/health", context=context, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise ConfigError(f"the SuperLink's certificate does not verify for {address} ({exc.reason.verify_message}); "
                                  f"issue server.crt for that name (`hierfed certs --host ...`)") from None
            last = str(exc.reason)
        except (ConnectionError, TimeoutError, ssl.SSLError) as exc:
            last = str(exc)
        time.sleep(0.3)
    raise ConfigError(f"flower-superlink did not answer on https://{address}/health within {timeout:.0f}s ({last})")


def start_superlink(spec: SuperLinkSpec, *, log: Path | None = None) -> subprocess.Popen:
    """Start flower-superlink and return once it serves; stopped again if it never does."""
    check_certificates(spec.certs)
    if spec.database is not None:
        Path(spec.database).parent.mkdir(parents=True, exist_ok=True)
    process = start_flower(superlink_command(spec), log=log)
    try:
        wait_until_ready(process, address=spec.local_address, root_cert=Path(spec.certs) / CA_CERT)
    except BaseException:
        stop_process(process)
        raise
    return process


def write_connection(name: str, *, address: str, root_cert: Path) -> Path:
    """Add (or update) [superlink.NAME] in $FLWR_HOME/config.toml; other connections stay as they are."""
    from flwr.cli.flower_config import read_flower_config, write_flower_config

    config, _ = read_flower_config()  # Flower writes its default file first if there is none
    config.setdefault("superlink", {})[name] = {"address": address, "root-certificates": str(Path(root_cert).resolve())}
    return write_flower_config(config)


def flwr(*args: str, timeout: float = 120.0) -> str:
    """Run a `flwr` CLI command and return its stdout; ConfigError with its message if it fails."""
    try:
        done = subprocess.run([flower_executable("flwr"), *args], env=flower_env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"`flwr {' '.join(args)}` did not finish within {timeout:.0f}s") from None
    if done.returncode != 0:
        message = " ".join((done.stderr or done.stdout).split())[-400:]
        raise ConfigError(f"`flwr {' '.join(args[:2])}` failed (exit {done.returncode}): {message}")
    return done.stdout


def flwr_json(*args: str, timeout: float = 120.0) -> dict:
    """A `flwr ... --format json` command's answer (its JSON is the last thing it prints)."""
    out = flwr(*args, "--format", "json", timeout=timeout)
    try:
        return json.loads(out[out.index("{"):])
    except ValueError:
        raise ConfigError(f"`flwr {' '.join(args[:2])}` printed no JSON: {out[-300:]!r}") from None


def site_public_keys(certs: Path, given: list[Path] | None) -> list[Path]:
    """The public keys to register: those given, else every sites/*.pub `hierfed certs` wrote."""
    keys = list(given) if given else sorted((Path(certs) / SITES_DIR).glob("*.pub"))
    missing = [str(k) for k in keys if not Path(k).is_file()]
    if missing:
        raise ConfigError(f"no such public key file: {', '.join(missing)}")
    return keys


def register_sites(keys: list[Path], *, connection: str = CONNECTION, remember: Path | None = None) -> dict[str, str]:
    """Register each site's public key (named by its file) with the SuperLink: site -> node id.

    Flower answers a key it already knows (its database was kept) without the id, so the ids are
    kept in ``remember`` (JSON) beside the database.
    """
    known = json.loads(remember.read_text()) if remember is not None and remember.exists() else {}
    nodes = {}
    for key in keys:
        name = Path(key).stem
        answer = flwr_json("supernode", "register", str(key), connection, "--name", name)
        if answer.get("success"):
            nodes[name] = str(answer["node-id"])
        elif ALREADY_REGISTERED in answer.get("error-message", ""):
            nodes[name] = known.get(name, "registered before")
        else:
            reason = " ".join(str(answer.get("error-message", answer)).split())
            raise ConfigError(f"registering {key} failed: {reason}")
    if remember is not None:
        remember.write_text(json.dumps({**known, **nodes}, indent=2))
    return nodes


def submit_run(project: Path, *, connection: str = CONNECTION, run_config: Mapping[str, object]) -> int:
    """`flwr run PROJECT CONNECTION --run-config ...`; the new run's id."""
    answer = flwr_json("run", str(project), connection, "--run-config", toml_pairs(run_config))
    if not answer.get("success"):
        raise ConfigError(f"flwr run failed: {' '.join(str(answer.get('error-message', answer)).split())}")
    return int(answer["run-id"])


def run_status(run_id: int, *, connection: str = CONNECTION) -> str:
    """A run's status as Flower reports it: pending, starting, running, finished:completed|failed|stopped."""
    runs = flwr_json("ls", connection, "--run-id", str(run_id)).get("runs", [])
    return str(runs[0]["status"]) if runs else "unknown"


def wait_for_run(run_id: int, *, connection: str = CONNECTION, timeout: float, poll: float = 2.0) -> str:
    """Poll until the run has finished; its final status."""
    deadline, status = time.monotonic() + timeout, "unknown"
    while time.monotonic() < deadline:
        status = run_status(run_id, connection=connection)
        if status.startswith("finished"):
            return status
        time.sleep(poll)
    raise TimeoutError(f"run {run_id} had not finished after {timeout:.0f}s (last status {status})")


def instructions(spec: SuperLinkSpec, nodes: Mapping[str, str], *, connection: str) -> str:
    """What to open, how to start the sites and a run, where the results appear."""
    ca = (Path(spec.certs) / CA_CERT).resolve()
    public = spec.address if spec.address not in ("0.0.0.0", "::") else "<this machine's name or IP in server.crt>"
    sites = "\n".join(f"    {name:<20} node {node}" for name, node in nodes.items()) or "    (none: pass --site-keys)"
    example = toml_pairs({"fed.out-dir": "/abs/path/runs/deployed", "fed.rounds": 3, "fed.min-nodes": max(len(nodes), 1),
                          "fed.round-timeout": 600.0})
    return f"""
SuperLink ready (TLS, SuperNode authentication on).
  open TCP port {spec.port} to the sites: Fleet, Control and Runtime APIs all use it (HTTPS). Anyone who
  reaches it can also submit runs (Flower's Control API has no login here): allow only the sites' addresses.
  registered sites (the ledger names deployed sites node-<id>):
{sites}
  each site starts (with its own data, its key from sites/, and a copy of {ca}):
    hierfed site --superlink {public}:{spec.port} --site NAME --data PATH --root-cert {CA_CERT} --auth-key NAME.key [--budget-epsilon E] [--site-index K]
  start a run from the project folder on this machine (connection [{connection}] in $FLWR_HOME/config.toml):
    flwr run . {connection} --stream --run-config "{example}"
  the ServerApp writes results.json, ledger.jsonl and model/ under fed.out-dir on this machine.
  runs: `flwr ls {connection}`; stop one: `flwr stop RUN_ID {connection}`; Ctrl-C stops the SuperLink.
"""


def add_superlink_arguments(parser: argparse.ArgumentParser) -> None:
    """`hierfed superlink --certs DIR [--address A] [--port P] [--site-keys PUB ...] [--database F]`."""
    parser.add_argument("--certs", required=True, type=Path, help="folder with ca.crt, server.crt, server.key (and sites/*.pub)")
    parser.add_argument("--address", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"the one HTTPS port of the Fleet, Control and Runtime APIs (default {DEFAULT_PORT})")
    parser.add_argument("--site-keys", nargs="+", type=Path, metavar="PUB",
                        help="sites' public keys to register (default: every CERTS/sites/*.pub); the file name is the site")
    parser.add_argument("--database", type=Path,
                        help="SuperLink state file: keeps registrations and node ids across restarts "
                             "(default $FLWR_HOME/hierfed-superlink.db; ':memory:' for none)")
    parser.add_argument("--connection", default=CONNECTION, help=f"name of the flwr connection to write (default {CONNECTION})")


def run_superlink(args: argparse.Namespace) -> int:
    """Start the SuperLink, register the sites, print the instructions, and serve until Ctrl-C."""
    from flwr.supercore.utils import get_flwr_home

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a TCP port (1-65535)")
    database = None if str(args.database) == ":memory:" else args.database or get_flwr_home() / "hierfed-superlink.db"
    spec = SuperLinkSpec(certs=args.certs, address=args.address, port=args.port, database=database)
    keys = site_public_keys(args.certs, args.site_keys)  # checked before anything starts
    process = start_superlink(spec)
    try:
        write_connection(args.connection, address=spec.local_address, root_cert=Path(args.certs) / CA_CERT)
        remember = None if database is None else Path(f"{database}.sites.json")
        nodes = register_sites(keys, connection=args.connection, remember=remember)
        print(instructions(spec, nodes, connection=args.connection), flush=True)
    except BaseException:
        stop_process(process)
        raise
    return run_foreground(process)

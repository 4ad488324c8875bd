"""Deployment: certificates and keys in Flower's formats, the commands we hand to Flower, and real
flower-superlink / flower-supernode processes on 127.0.0.1 with TLS and SuperNode authentication:
a 2-round run of 3 sites, an unregistered site refused, a site killed mid-run, a site without TLS."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client.deploy import SiteSpec, add_site_arguments, check_site, run_site, start_site, supernode_command
from hiermodel.certs import add_certs_arguments, make_certificates, run_certs, site_key_paths
from hiermodel.errors import ConfigError
from server.audit import audit_ledger
from server.ledger import read_ledger
from server.deploy import (CONNECTION, SuperLinkSpec, add_superlink_arguments, flwr_json, register_sites, run_status,
                           start_superlink, stop_process, submit_run, superlink_command, toml_pairs, wait_for_run,
                           write_connection)

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site-0", "site-1", "site-2")
RUN_SECONDS = 240.0
SITE_1_BUDGET = 4.0  # site-1 brings its own ε; the run's dp.target-epsilon is 8
# small and fast: the sites' ClientApp processes start per message, which dominates on 2 cores
RUN_CONFIG = {
    "model.dim": 8, "model.max-tokens": 8, "model.max-history-items": 12, "model.max-baskets": 4,
    "train.batch-size": 32, "fed.rounds": 2, "fed.fraction-evaluate": 0.0,
}


def parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    """What `hierfed COMMAND argv` hands its handler (the same argument definitions)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$FLWR_HOME in the test's folder, never the user's ~/.flwr."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    return tmp_path / "flwr-home"


# -- certificates and keys ----------------------------------------------------------------------

def test_certs_are_a_ca_a_server_certificate_for_the_hosts_and_site_keys_flower_loads(tmp_path: Path, capsys) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    out = tmp_path / "certs"
    args = parse(add_certs_arguments, ["--out", str(out), "--host", "coord.example.org", "--host", "10.1.2.3",
                                       "--site", "north", "--site", "south"])
    assert run_certs(args) == 0
    assert "wrote CA" in capsys.readouterr().out
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    for site in ("north", "south"):
        private, public = site_key_paths(out, site)
        key = load_ssh_private_key(private.read_bytes(), None)  # what flower-supernode does
        assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
        assert try_load_public_key(public)  # what `flwr supernode register` does
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600 and stat.S_IMODE((out / "server.key").stat().st_mode) == 0o600

    # again with one more site: the CA and the existing (maybe registered) keys are kept
    before = {p.name: p.read_bytes() for p in [out / "ca.crt", out / "ca.key", *site_key_paths(out, "north")]}
    again = make_certificates(out, hosts=["coord.example.org"], sites=["north", "east"])
    assert not again.ca_created and [s.created for s in again.sites] == [False, True]
    assert {p.name: p.read_bytes() for p in [out / "ca.crt", out / "ca.key", *site_key_paths(out, "north")]} == before
    x509.load_pem_x509_certificate((out / "server.crt").read_bytes()).verify_directly_issued_by(ca)


@pytest.mark.parametrize("hosts, sites, fragment", [
    ([], ["a"], "at least one --host"),
    (["not a host!"], ["a"], "neither an IP address nor a DNS name"),
    (["example.org"], ["../etc"], "site name '../etc' is not allowed"),
])
def test_bad_certs_arguments_are_one_line_and_write_nothing(tmp_path: Path, hosts, sites, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment) as err:
        make_certificates(tmp_path / "certs", hosts=hosts, sites=sites)
    assert "\n" not in str(err.value) and not (tmp_path / "certs").exists()


# -- what we hand to Flower ---------------------------------------------------------------------

def test_node_and_run_config_values_survive_flowers_parser() -> None:
    from flwr.common.config import parse_config_args

    values = {"data-path": r"C:\sites\north data", "site-name": "it's", "site-index": 2, "budget-epsilon": 4.0,
              "fed.personal-lambda": True, "fed.out-dir": "/srv/runs/a b"}
    assert parse_config_args([toml_pairs(values)]) == values
    with pytest.raises(ConfigError, match="holds both"):
        toml_pairs({"x": "a'b\"c"})


def test_superlink_command_has_tls_supernode_auth_and_no_runtime_installs(tmp_path: Path) -> None:
    make_certificates(tmp_path, hosts=["127.0.0.1"], sites=[])
    command = superlink_command(SuperLinkSpec(certs=tmp_path, port=9999, database=tmp_path / "state.db"))
    assert Path(command[0]).name == "flower-superlink"
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-ca-certfile",
                 "--ssl-certfile", "--ssl-keyfile", "--database"):
        assert flag in command
    assert command[command.index("--port") + 1] == "9999" and "--insecure" not in command
    with pytest.raises(ConfigError, match="no ca.crt, server.crt, server.key; run `hierfed certs"):
        start_superlink(SuperLinkSpec(certs=tmp_path / "none"))


def test_site_command_carries_data_site_and_budget_in_the_node_config(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    made = make_certificates(tmp_path, hosts=["127.0.0.1"], sites=["north"])
    spec = SiteSpec(superlink="coord:8000", site="north", data=tmp_path, root_cert=made.ca_cert,
                    auth_key=made.sites[0].private_key, budget_epsilon=3, site_index=1, runtime_port=9200)
    check_site(spec)
    command = supernode_command(spec)
    node_config = parse_config_args([command[command.index("--node-config") + 1]])
    assert node_config == {"data-path": str(tmp_path.resolve()), "site-name": "north", "site-index": 1, "budget-epsilon": 3.0}
    assert "--root-certificates" in command and "--auth-supernode-private-key" in command and "--insecure" not in command


@pytest.mark.parametrize("change, fragment", [
    ({"data": Path("/no/such/data")}, "--data /no/such/data: no such file"),
    ({"auth_key": Path("ca.crt")}, "not an unencrypted OpenSSH private key"),
    ({"root_cert": None, "insecure": True}, "--auth-key needs TLS"),
    ({"superlink": "coord"}, "is not HOST:PORT"),
    ({"budget_epsilon": 0.0}, "--budget-epsilon must be positive"),
])
def test_bad_site_arguments_are_one_line(tmp_path: Path, monkeypatch, change, fragment) -> None:
    monkeypatch.chdir(tmp_path)
    made = make_certificates(tmp_path, hosts=["127.0.0.1"], sites=["north"])
    spec = dict(superlink="coord:8000", site="north", data=tmp_path, root_cert=made.ca_cert, auth_key=made.sites[0].private_key)
    with pytest.raises(ConfigError, match=fragment) as err:
        check_site(SiteSpec(**{**spec, **change}))
    assert "\n" not in str(err.value)


def test_the_connection_is_added_beside_flowers_own(flwr_home: Path, tmp_path: Path) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    path = write_connection(CONNECTION, address="127.0.0.1:8000", root_cert=tmp_path / "ca.crt")
    connection = read_superlink_connection(CONNECTION)
    assert path.parent == flwr_home and connection.address == "127.0.0.1:8000" and not connection.insecure
    assert connection.root_certificates == str((tmp_path / "ca.crt").resolve())
    assert read_superlink_connection("local").address == ":local:"  # Flower's defaults are still there


def test_superlink_arguments_default_to_flowers_port_and_all_interfaces() -> None:
    args = parse(add_superlink_arguments, ["--certs", "c"])
    assert (args.address, args.port, args.site_keys, args.connection) == ("0.0.0.0", 8000, None, CONNECTION)


# -- real processes -----------------------------------------------------------------------------

@dataclass
class Deployment:
    folder: Path
    certs: Path
    address: str
    partitions: Path
    run_config: dict
    node_ids: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)
    sites: dict[str, subprocess.Popen] = field(default_factory=dict)

    def site_spec(self, name: str, index: int, **change) -> SiteSpec:
        """Site name on partition index, with its key, this deployment's CA and a free runtime port."""
        key = site_key_paths(self.certs, name)[0]
        spec = dict(superlink=self.address, site=name, data=self.partitions / str(index), root_cert=self.certs / "ca.crt",
                    auth_key=key, site_index=index, runtime_port=free_port(), state_dir=self.partitions.parent / "site-state")
        return SiteSpec(**{**spec, **change})

    def start(self, spec: SiteSpec) -> subprocess.Popen:
        """Start a SuperNode (logging to logs/NAME.log); the fixture stops it."""
        process = start_site(spec, log=self.log(spec.site))
        self.processes.append(process)
        return process

    def log(self, name: str) -> Path:
        """Where a site's SuperNode output goes."""
        return self.folder / "logs" / f"{name}.log"

    def run(self, out: Path, **config) -> int:
        """Submit a run of this project writing to out; its run id."""
        return submit_run(ROOT, run_config={**self.run_config, "fed.out-dir": str(out), **config})

    def online(self) -> int:
        """How many SuperNodes the SuperLink has online."""
        return sum(n["status"] == "online" for n in flwr_json("supernode", "ls", CONNECTION)["nodes"])


def _wait(condition, *, timeout: float, what: str, poll: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f}s")
        time.sleep(poll)


@pytest.fixture(scope="module")
def deployment(tiny_backbone: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A SuperLink (TLS, SuperNode auth) with sites site-0..2 registered and running, each on its own partition."""
    from hiermodel.run_config import RunConfig
    from simulation.partitions import make_partitions, write_partitions

    folder = tmp_path_factory.mktemp("deploy")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FLWR_HOME", str(folder / "flwr-home"))
        env.setenv("HIERFED_CACHE", str(folder / "cache"))  # the processes' encodings stay in the test's folder
        dataset = RunConfig.from_flat({"data.synthetic-users": 60, "data.synthetic-sites": 3}).data.load()
        write_partitions(dataset, make_partitions(dataset, scheme="natural", num_clients=None), folder / "partitions")
        certs = make_certificates(folder / "certs", hosts=["127.0.0.1"], sites=[*SITES, "intruder"]).folder
        spec = SuperLinkSpec(certs=certs, address="127.0.0.1", port=free_port())
        processes: list[subprocess.Popen] = []
        try:
            processes.append(start_superlink(spec, log=folder / "logs" / "superlink.log"))
            write_connection(CONNECTION, address=spec.local_address, root_cert=certs / "ca.crt")
            node_ids = register_sites([site_key_paths(certs, s)[1] for s in SITES])
            d = Deployment(folder=folder, certs=certs, address=spec.local_address, partitions=folder / "partitions",
                           run_config={**RUN_CONFIG, "model.backbone": tiny_backbone}, node_ids=node_ids, processes=processes)
            for index, name in enumerate(SITES):
                budget = {"budget_epsilon": SITE_1_BUDGET} if name == "site-1" else {}
                d.sites[name] = d.start(d.site_spec(name, index, **budget))
            _wait(lambda: d.online() == 3, timeout=60, what="the 3 sites were not online")
            yield d
        finally:
            for process in reversed(processes):  # sites first, then the SuperLink
                stop_process(process)


def _ledger(out: Path) -> list[dict]:
    return [r for r in read_ledger(out / "ledger.jsonl") if r["kind"] == "site-round"]


def refused(deployment: Deployment, site: str) -> str:
    """`hierfed site` for a site whose key is not registered: the one line it ends with."""
    spec = deployment.site_spec(site, 0)
    argv = ["--superlink", spec.superlink, "--site", site, "--data", str(spec.data), "--root-cert", str(spec.root_cert),
            "--auth-key", str(spec.auth_key), "--runtime-port", str(spec.runtime_port)]
    # were it accepted, it would serve forever: SIGTERM, which hierfed site passes on, ends it
    watchdog = threading.Timer(60, os.kill, (os.getpid(), signal.SIGTERM))
    watchdog.start()
    try:
        with pytest.raises(ConfigError) as err:
            run_site(parse(add_site_arguments, argv))
    finally:
        watchdog.cancel()
    return str(err.value)


@pytest.fixture(scope="module")
def first_run(deployment: Deployment) -> tuple[Path, dict, str, float]:
    """A 2-round run of the 3 sites; while it runs, a site with an unregistered key tries to join."""
    out = deployment.folder / "run-1"
    started = time.monotonic()
    run_id = deployment.run(out, **{"fed.min-nodes": 3})
    refusal = refused(deployment, "intruder")
    status = wait_for_run(run_id, connection=CONNECTION, timeout=RUN_SECONDS)
    assert status == "finished:completed", (deployment.folder / "logs").as_posix()
    return out, json.loads((out / "results.json").read_text()), refusal, time.monotonic() - started


@pytest.mark.integration
def test_three_sites_with_tls_and_authentication_complete_a_run(first_run, deployment: Deployment) -> None:
    out, results, _, seconds = first_run
    assert [r["replies"] for r in results["rounds"]] == [{"train": 3, "declined": 0, "rejected": 0, "failed": 0}] * 2
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    nodes = {f"node-{n}" for n in deployment.node_ids.values()}
    ledger = _ledger(out)
    assert sorted((r["site"], r["round"]) for r in ledger) == sorted((n, k) for n in nodes for k in (1, 2))
    assert all(r["status"] == "trained" and r["epsilon"] <= r["budget_epsilon"] for r in ledger)
    print(f"2-round deployed run: {seconds:.1f}s")


@pytest.mark.integration
def test_a_site_whose_key_is_not_registered_is_refused_and_the_run_is_unaffected(first_run, deployment: Deployment) -> None:
    _, results, refusal, _ = first_run
    assert refusal.startswith(f"the SuperLink at {deployment.address} refused site intruder: its public key is not registered")
    assert "\n" not in refusal
    assert deployment.online() == 3  # the refused node never became one
    assert all(set(r["clients"]) == {f"node-{n}" for n in deployment.node_ids.values()} for r in results["rounds"])


@pytest.mark.integration
def test_a_sites_own_budget_overrides_the_runs(first_run, deployment: Deployment) -> None:
    out, _, _, _ = first_run
    budgets = {r["site"]: r["budget_epsilon"] for r in _ledger(out)}
    site_1 = f"node-{deployment.node_ids['site-1']}"
    assert budgets.pop(site_1) == SITE_1_BUDGET and set(budgets.values()) == {8.0}


@pytest.mark.integration
def test_a_site_without_tls_against_the_tls_superlink_stops_with_one_line(deployment: Deployment, capsys) -> None:
    argv = ["--superlink", deployment.address, "--site", "site-0", "--data", str(deployment.partitions / "0"), "--insecure"]
    with pytest.raises(ConfigError, match="uses TLS, but this site was started with --insecure; start it with --root-cert") as err:
        run_site(parse(add_site_arguments, argv))
    assert "\n" not in str(err.value)
    # and with TLS but a CA that did not sign the SuperLink's certificate
    other = make_certificates(deployment.folder / "other-ca", hosts=["127.0.0.1"], sites=[])
    argv = [*argv[:-1], "--root-cert", str(other.ca_cert)]
    with pytest.raises(ConfigError, match="the SuperLink's certificate at .* fails against --root-cert"):
        run_site(parse(add_site_arguments, argv))


@pytest.mark.integration
def test_a_site_killed_mid_run_the_others_finish_and_it_is_charged_for_completed_rounds_only(deployment: Deployment) -> None:
    """site-2 dies (SIGKILL to its SuperNode and ClientApp) right after it took round 2's train message."""
    victim = "site-2"
    log = deployment.log(victim)
    offset = log.stat().st_size
    out = deployment.folder / "run-killed"
    started = time.monotonic()
    run_id = deployment.run(out, **{"fed.min-nodes": 2, "fed.round-timeout": 150.0})

    def took_round_two() -> bool:
        return log.read_text(errors="replace")[offset:].count("Receiving: train message") >= 2

    _wait(took_round_two, timeout=RUN_SECONDS, what=f"{victim} never received round 2")
    os.killpg(deployment.sites[victim].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert wait_for_run(run_id, connection=CONNECTION, timeout=RUN_SECONDS) == "finished:completed"
    results = json.loads((out / "results.json").read_text())
    dead = f"node-{deployment.node_ids[victim]}"
    assert [r["replies"]["train"] for r in results["rounds"]] == [3, 2]
    # the SuperLink answers for the vanished node once it missed its heartbeats; the failure is
    # recorded under the node the message went to, not the SuperLink's own id
    failures = results["rounds"][1]["failures"]
    assert [("Node Unavailable" in f["reason"], f["phase"], f["node"]) for f in failures] == [
        (True, "train", str(deployment.node_ids[victim]))]
    charged = sorted((r["site"], r["round"]) for r in _ledger(out))
    alive = {f"node-{deployment.node_ids[s]}" for s in SITES if s != victim}
    assert charged == sorted([(dead, 1), *((n, k) for n in alive for k in (1, 2))])
    assert (out / "model" / "model.safetensors").is_file() and run_status(run_id) == "finished:completed"
    assert audit_ledger(out / "ledger.jsonl").ok  # the independent accountant agrees with what was charged
    print(f"run with a killed site: {time.monotonic() - started:.1f}s, {time.monotonic() - killed_at:.1f}s after the kill")

"""Optional client-level central DP (`dp.central`): Flower's fixed-clipping wrappers, accounted by
Flower's RDP accountant, with one ledger record per round for the federation as a whole.

The unit of privacy here is a whole site: each site's update (its state minus the global one) is
clipped to C, by the server (server-side) or by the site's `fixedclipping_mod` (client-side), the
n sites sampled each round are averaged with equal weights, and Gaussian noise of σ·C / n goes on
the average. Neighbouring federations differ in one site's contribution being there or replaced by
a zero update, n fixed: the average moves by at most C / n. (If one site's data is swapped for
another's, it moves by 2C / n: the ε of σ / 2.) So the global model released after every round is
(ε, δ)-DP with respect to any one site's data, against whoever receives it and the other sites, not
against the server, which sees each clipped update.

No amplification by sampling is claimed. Every sampled site contributes to every round: a site that
declines, fails, is rejected or never answers contributes a zero update, so the round is always
released and composed, and whether it is released says nothing about any site's data.

The spend is on disk (the run directory's central_privacy.json) before the round's model
leaves the server: a server that dies before the round reaches the ledger resumes from it, and its
next ledger record carries the difference as unreported releases.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from flwr.serverapp import GaussianPrivacyEvent, Grid, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from hiermodel.durable_files import atomic_write_text
from hiermodel.errors import ConfigError, DataError
from hiermodel.privacy import DPConfig, calibrate_noise
from hiermodel.run_config import FedConfig
from server.ledger import CENTRAL_SITE

CENTRAL_ACCOUNTANT = "flower-rdp"
# FedAvg's weighted_by_key under central DP, set by the server: 1 for every site's contribution to
# the release (averaged uniformly), the users for an evaluation reply
AGGREGATION_WEIGHT = "aggregation-weight"
_WRAPPERS = {"server-side": DifferentialPrivacyServerSideFixedClipping,
             "client-side": DifferentialPrivacyClientSideFixedClipping}


@dataclasses.dataclass
class CentralPrivacy:
    """The federation's mechanism and Flower's accountant for it, for the whole run."""

    mode: str
    sites: int  # n: sampled each round; the noise is σ·C / n
    noise_multiplier: float
    clip_norm: float
    delta: float
    budget_epsilon: float
    accountant: RdpAccountant
    state_path: Path | None = None  # where the spend is saved after every release

    @property
    def releases(self) -> int:
        return self.accountant.num_releases

    def epsilon(self) -> float:
        return self.accountant.get_privacy_spent().epsilon if self.releases else 0.0

    def save(self) -> None:
        """The mechanism and the releases so far, durably (called before the release leaves the server)."""
        if self.state_path is not None:
            atomic_write_text(self.state_path, json.dumps({
                "mode": self.mode, "sites": self.sites, "noise_multiplier": self.noise_multiplier,
                "clip_norm": self.clip_norm, "delta": self.delta, "budget_epsilon": self.budget_epsilon,
                "releases": self.releases,
            }))

    def ledger_record(self, server_round: int, *, released: bool) -> dict:
        """The round's ledger record: one Gaussian release on all n sites (q = 1); status "declined"
        (no release) when the budget or the sampled sites did not allow the round."""
        return {
            "round": server_round, "site": CENTRAL_SITE, "status": "trained" if released else "declined",
            "accountant": CENTRAL_ACCOUNTANT, "noise_multiplier": self.noise_multiplier, "sample_rate": 1.0,
            "steps": int(released), "total_steps": self.releases, "clip_norm": self.clip_norm,
            "delta": self.delta, "epsilon": self.epsilon(), "budget_epsilon": self.budget_epsilon,
            "users": self.sites,
        }


def _accountant(sites: int, delta: float, budget: float) -> RdpAccountant:
    return RdpAccountant(PrivacyConfig(
        target_delta=delta, population_size=sites, neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=budget,
    ))


def _event(sigma: float, sites: int) -> GaussianPrivacyEvent:
    return GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=sites, population_size=sites)


def central_noise(rounds: int, *, sites: int, delta: float, target_epsilon: float) -> float:
    """σ with which ``rounds`` releases spend ``target_epsilon``, by Flower's own accountant."""
    def epsilon_at(sigma: float) -> float:
        accountant = _accountant(sites, delta, target_epsilon)
        accountant.compose(_event(sigma, sites), count=rounds)
        return accountant.get_privacy_spent().epsilon

    return calibrate_noise(epsilon_at, target_epsilon)


def plan_central(dp: DPConfig, *, sites: int, connected: int | None = None, rounds: int,
                 state_path: Path | None = None, ledger_records: list[dict] = ()) -> CentralPrivacy:
    """The federation's mechanism for n sampled sites (δ by default 1 / (10 × the connected sites)).

    A run that already released (a resumed run: its state file, or else its ledger's last central
    record) keeps its mechanism and its spend, the larger of the two counts; it must sample as many
    sites as it did, as its σ was set for them.
    """
    saved = _read_state(state_path) if state_path is not None and state_path.exists() else None
    saved = _with_ledger(saved, [r for r in ledger_records if r["kind"] == "site-round" and r["site"] == CENTRAL_SITE],
                         state_path)
    if saved is not None:
        if saved["sites"] != sites:
            raise ConfigError(f"central DP: the run sampled {saved['sites']} sites a round when it started, and would "
                              f"sample {sites} now; its noise is set for {saved['sites']}: connect the same sites "
                              "(or set fed.min-nodes to their number) and resume again")
        sigma, delta, released = saved["noise_multiplier"], saved["delta"], saved["releases"]
    else:
        delta = dp.central_target_delta or 1.0 / (10 * max(sites, connected or sites))
        sigma = dp.central_noise_multiplier or central_noise(rounds, sites=sites, delta=delta,
                                                             target_epsilon=dp.central_target_epsilon)
        released = 0
    accountant = _accountant(sites, delta, dp.central_target_epsilon)
    if released:
        accountant.compose(_event(sigma, sites), count=released)
    return CentralPrivacy(mode=dp.central, sites=sites, noise_multiplier=sigma, clip_norm=dp.central_clip_norm,
                          delta=delta, budget_epsilon=dp.central_target_epsilon, accountant=accountant,
                          state_path=state_path)


def _with_ledger(saved: dict | None, central: list[dict], path: Path | None) -> dict | None:
    """The saved state checked against the ledger's last central record (or rebuilt from it when
    the state file is gone): a lost file must not give the run a new budget."""
    if not central:
        return saved
    last = central[-1]
    recorded = {"sites": int(last["users"]), "noise_multiplier": float(last["noise_multiplier"]),
                "delta": float(last["delta"]), "releases": int(last["total_steps"])}
    if saved is None:
        return recorded
    if any(saved[k] != recorded[k] for k in ("sites", "noise_multiplier", "delta")):
        raise DataError(f"{path}: central DP's saved mechanism (σ {saved['noise_multiplier']:g}, δ {saved['delta']:g}, "
                        f"{saved['sites']} sites) is not the ledger's (σ {recorded['noise_multiplier']:g}, δ "
                        f"{recorded['delta']:g}, {recorded['sites']} sites); restore the run's own files before resuming")
    return {**saved, "releases": max(saved["releases"], recorded["releases"])}


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        return {"sites": int(state["sites"]), "noise_multiplier": float(state["noise_multiplier"]),
                "delta": float(state["delta"]), "releases": int(state["releases"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: central DP's saved spend is unreadable ({exc}); restore it, or remove it to resume "
                        "from the ledger's last central record (a release made after that record is then lost)") from None


def wrap(strategy: FedAvg, central: CentralPrivacy):
    """Flower's fixed-clipping wrapper around the (uniformly weighted FedAvg) strategy, with the accountant."""
    if strategy.weighted_by_key != AGGREGATION_WEIGHT:
        raise ValueError("central DP averages the sites with equal weights")
    return _WRAPPERS[central.mode](strategy, central.noise_multiplier, central.clip_norm, central.sites,
                                   accountant=central.accountant)


def sampled_sites(grid: Grid, fed: FedConfig) -> tuple[int, int]:
    """(n, N): the sites FedAvg samples each round (as its configure_train counts them) and the sites
    connected, once fed.min-nodes are; the noise is set for n, so n must not change."""
    deadline = time.monotonic() + fed.round_timeout
    while (connected := len(list(grid.get_node_ids()))) < fed.min_nodes:
        if time.monotonic() > deadline:
            raise ConfigError(f"central DP: {connected} sites connected after {fed.round_timeout:g} s, "
                              f"fed.min-nodes is {fed.min_nodes}; start the sites, or lower fed.min-nodes")
        time.sleep(1.0)
    return max(int(connected * fed.fraction_train), fed.min_nodes), connected

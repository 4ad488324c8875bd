"""Optional client-level central DP (`dp.central`): Flower's fixed-clipping wrappers, accounted by
Flower's RDP accountant, with one ledger record per round for the federation as a whole.

The unit of privacy here is a whole site: each site's update (its state minus the global one) is
clipped to C, by the server (server-side) or by the site's `fixedclipping_mod` (client-side), the
sites' updates are averaged with equal weights, and Gaussian noise of σ·C / n goes on the average of
the n sites sampled each round. So the global model, released after every round, is (ε, δ)-DP with
respect to any one site's data. It protects against whoever receives the global model (and the
other sites), not against the server, which sees each clipped update.

No amplification by sampling is claimed: every round is a Gaussian mechanism on all n sites, so a
round must use every sampled site's update. A round in which one of them failed, or sent an update
that was rejected, is not released (the global model stays where it was) and spends nothing.
"""

from __future__ import annotations

import dataclasses
import time

from flwr.serverapp import GaussianPrivacyEvent, Grid, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from hiermodel.errors import ConfigError
from hiermodel.privacy import DPConfig, calibrate_noise
from hiermodel.run_config import FedConfig
from server.ledger import CENTRAL_SITE

CENTRAL_ACCOUNTANT = "flower-rdp"
# FedAvg's weighted_by_key under central DP, set by the server on each reply: 1 for every training
# reply (the sites' updates are averaged uniformly), the users for an evaluation reply
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

    @property
    def releases(self) -> int:
        return self.accountant.num_releases

    def epsilon(self) -> float:
        return self.accountant.get_privacy_spent().epsilon if self.releases else 0.0

    def ledger_record(self, server_round: int, *, released: bool) -> dict:
        """The round's ledger record: one Gaussian release on all n sites (q = 1), or none."""
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


def central_noise(rounds: int, *, sites: int, delta: float, target_epsilon: float) -> float:
    """σ with which ``rounds`` releases spend ``target_epsilon``, by Flower's own accountant."""
    def epsilon_at(sigma: float) -> float:
        accountant = _accountant(sites, delta, target_epsilon)
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=sites, population_size=sites),
                           count=rounds)
        return accountant.get_privacy_spent().epsilon

    return calibrate_noise(epsilon_at, target_epsilon)


def plan_central(dp: DPConfig, *, sites: int, rounds: int, released: int = 0) -> CentralPrivacy:
    """The federation's mechanism for n sampled sites; ``released`` rounds already spent (a resumed run)."""
    delta = dp.central_target_delta or 1.0 / (10 * sites)
    sigma = dp.central_noise_multiplier or central_noise(rounds, sites=sites, delta=delta,
                                                         target_epsilon=dp.central_target_epsilon)
    accountant = _accountant(sites, delta, dp.central_target_epsilon)
    if released:
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=sites, population_size=sites),
                           count=released)
    return CentralPrivacy(mode=dp.central, sites=sites, noise_multiplier=sigma, clip_norm=dp.central_clip_norm,
                          delta=delta, budget_epsilon=dp.central_target_epsilon, accountant=accountant)


def released_rounds(ledger_records: list[dict]) -> int:
    """The central releases a (resumed) run's ledger already holds."""
    central = [r for r in ledger_records if r["kind"] == "site-round" and r["site"] == CENTRAL_SITE]
    return central[-1]["total_steps"] if central else 0


def wrap(strategy: FedAvg, central: CentralPrivacy):
    """Flower's fixed-clipping wrapper around the (uniformly weighted FedAvg) strategy, with the accountant."""
    if strategy.weighted_by_key != AGGREGATION_WEIGHT:
        raise ValueError("central DP averages the sites with equal weights")
    return _WRAPPERS[central.mode](strategy, central.noise_multiplier, central.clip_norm, central.sites,
                                   accountant=central.accountant)


def check_strategy(fed: FedConfig) -> None:
    if fed.strategy not in ("fedavg", "fedprox"):
        raise ConfigError(f"dp.central needs fed.strategy fedavg or fedprox (Flower's accounted central DP averages "
                          f"the sites' updates uniformly), got {fed.strategy!r}")


def sampled_sites(grid: Grid, fed: FedConfig) -> int:
    """n, the sites FedAvg samples each round (as its configure_train counts them), once
    fed.min-nodes are connected; the noise is calibrated for it, so it must not change."""
    deadline = time.monotonic() + fed.round_timeout
    while (connected := len(list(grid.get_node_ids()))) < fed.min_nodes:
        if time.monotonic() > deadline:
            raise ConfigError(f"central DP: {connected} sites connected after {fed.round_timeout:g} s, "
                              f"fed.min-nodes is {fed.min_nodes}; start the sites, or lower fed.min-nodes")
        time.sleep(1.0)
    return max(int(connected * fed.fraction_train), fed.min_nodes)

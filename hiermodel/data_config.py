"""Where a run's data comes from (run config group `data.*`), so a saved model can find it again."""

from __future__ import annotations

from dataclasses import dataclass

from hiermodel.data.dataset import Dataset


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # synthetic | online-retail | PATH (generic folder, MIND folder, Online Retail file)
    data_path: str | None = None  # where to find online-retail (else $HIERFED_DATA, ../shared/data/online-retail)
    session_gap_minutes: float = 30.0  # generic data without basket_id: split a user's events at this gap
    synthetic_seed: int = 0
    synthetic_users: int = 600
    synthetic_sites: int = 4

    def load(self) -> Dataset:
        from hiermodel.data import load_dataset
        from hiermodel.data.synthetic import SyntheticConfig

        synthetic = SyntheticConfig(
            seed=self.synthetic_seed, num_users=self.synthetic_users, num_sites=self.synthetic_sites
        )
        return load_dataset(
            self.dataset,
            data_path=self.data_path,
            session_gap_minutes=self.session_gap_minutes,
            synthetic=synthetic,
        )

"""The combiner z = Σ_l λ_l z^(l): learned softmax-normalised λ, or λ fixed (by hand or on validation)."""

from __future__ import annotations

import torch
from torch import nn

# validation: trained with uniform λ, then fixed at the best point of a simplex grid on validation data.
COMBINER_MODES = ("learned", "fixed", "validation")


class Combiner(nn.Module):
    """Mixes the level user vectors with weights λ on the simplex."""

    def __init__(self, num_levels: int, *, mode: str = "learned", fixed: list[float] | None = None) -> None:
        super().__init__()
        if mode not in COMBINER_MODES:
            raise ValueError(f"unknown combiner mode {mode!r}; valid: {', '.join(COMBINER_MODES)}")
        self.mode = mode
        self.num_levels = num_levels
        # λ logits as a Linear on a constant input: Opacus then computes their per-sample gradients.
        self.logits = nn.Linear(1, num_levels, bias=False)
        nn.init.zeros_(self.logits.weight)
        self.register_buffer("fixed_lambda", torch.full((num_levels,), 1.0 / num_levels))
        if mode == "fixed" or fixed is not None:
            self.set_fixed(fixed if fixed is not None else [1.0 / num_levels] * num_levels)
        self.logits.weight.requires_grad_(mode == "learned")

    def set_fixed(self, values: list[float]) -> None:
        """Freeze λ at ``values`` (normalised to sum to one)."""
        lam = torch.as_tensor(values, dtype=torch.float32)
        if lam.shape != (self.num_levels,) or (lam < 0).any() or lam.sum() <= 0:
            raise ValueError(f"λ must be {self.num_levels} non-negative weights with a positive sum, got {values}")
        self.fixed_lambda.copy_(lam / lam.sum())

    def lambdas(self, batch_size: int) -> torch.Tensor:
        """(B, L) weights; learned λ are the same for every user."""
        if self.mode == "learned":
            ones = self.logits.weight.new_ones(batch_size, 1)
            return torch.softmax(self.logits(ones), dim=-1)
        return self.fixed_lambda.expand(batch_size, -1)

    def forward(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # users: (B, L, d) -> z (B, d), λ (B, L)
        lam = self.lambdas(users.shape[0])
        return (lam.unsqueeze(-1) * users).sum(1), lam

"""Scores (user, candidate) pairs: text interest (cosine of z and the item tower) plus the repeat signal."""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.nn import functional as F


NORM_EPS = 1e-12  # F.normalize's default: below it a row is divided by eps instead of its norm


class ItemTower(nn.Linear):
    """A linear item tower with unit-norm outputs: (B, C, D) per-user candidates in, (B, C, d) out;
    or the shared catalogue (N, D) in, (N, d) out, projected and normalised once for the whole batch.

    Under Opacus (hooks on this layer) the shared output is expanded over the batch as a view, so
    the backward hook sees each user's own backprop; the grad sampler below then computes each
    user's gradient exactly. Without hooks nothing needs it: the plain step stays (N, d), as
    gradients over a (B, N, d) copy cost more than the rest of the step. ``anchor`` (B,) only
    tells the hooks the batch size.
    """

    # the dtype of the per-user products in the grad sampler below (privacy.private_round sets it for a
    # DP round: dp.grad-sample-precision); the per-sample gradients that are clipped are the ones summed
    grad_sample_dtype: torch.dtype = torch.float32

    def forward(self, items: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        out = F.normalize(super().forward(items), dim=-1, eps=NORM_EPS)
        per_sample = bool(self._forward_hooks)  # Opacus captures activations with a forward hook
        return out.unsqueeze(0).expand(anchor.shape[0], -1, -1) if items.dim() == 2 and per_sample else out


@register_grad_sampler(ItemTower)
def _item_tower_grad_sample(layer: ItemTower, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-user gradients of the item tower, through the normalisation t = u / |u| of u = W x + b:
    Σ_c (g_c − (g_c·t_c) t_c) / |u_c| ⊗ x_c for user b's backprops g (B, N, d) at the unit outputs,
    items x shared (N, D) or per user (B, N, D). The radial part is dropped where |u| is below eps,
    as F.normalize divides by eps there."""
    items, anchor = activations[0], activations[-1]
    batch = anchor.shape[0]
    # one row per user, or a user's gradient lands on another's row and escapes its clipping
    if backprops.dim() != 3 or backprops.shape[0] != batch or (items.dim() == 3 and items.shape[0] != batch):
        raise RuntimeError(f"ItemTower's per-sample gradients need one row per user ({batch}): backprops "
                           f"{tuple(backprops.shape)}, items {tuple(items.shape)}")
    projected = F.linear(items, layer.weight, layer.bias)
    norm = projected.norm(dim=-1)
    inverse = 1.0 / norm.clamp(min=NORM_EPS)
    unit = (projected * inverse.unsqueeze(-1)).transpose(-1, -2)  # (d, N), or (B, d, N) per user
    low = layer.grad_sample_dtype
    # (B, d, N) views: autograd hands the backprops over in this layout (the scores' product), so the
    # tangent part below is computed contiguous, and each user's gradient is then one GEMM
    by_dim, unit = backprops.transpose(1, 2).to(low), unit.to(low).contiguous()
    radial = (by_dim * unit).sum(1) * (norm >= NORM_EPS)  # (B, N); clamp passes no gradient below eps
    by_dim.addcmul_(radial.unsqueeze(1), unit, value=-1.0)  # the tangent part (by_dim is our own copy)
    scaled = (items * inverse.unsqueeze(-1)).to(low)  # 1 / |u_c| folded into the items
    inverse = inverse.to(low)
    batch, d, n = by_dim.shape
    if items.dim() == 2:  # the shared catalogue: one (B·d, N) @ (N, D) product
        weight = (by_dim.reshape(batch * d, n) @ scaled).view(batch, d, -1)
        bias = by_dim @ inverse
    else:
        weight = torch.bmm(by_dim, scaled)
        bias = torch.bmm(by_dim, inverse.unsqueeze(-1)).squeeze(-1)
    grads = {layer.weight: weight.to(backprops.dtype)}
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = bias.to(backprops.dtype)
    return grads


class Scorer(nn.Module):
    """Wide and deep over x = [repeat/popularity/user features, cos(z, t_c)]: score = w·x + MLP(x).

    The linear part lets the text interest and the repeat signal add up directly; the MLP learns
    their interactions (e.g. that text matters most for items the user never bought).
    """

    def __init__(self, *, backbone_dim: int, dim: int, num_features: int, hidden: int, text_scale: float) -> None:
        super().__init__()
        self.item_tower = ItemTower(backbone_dim, dim)
        self.wide = nn.Linear(num_features + 1, 1)
        self.hidden = nn.Linear(num_features + 1, hidden)
        self.output = nn.Linear(hidden, 1)
        self.text_scale = text_scale
        with torch.no_grad():  # start from "text interest alone" so early steps keep the text signal
            self.wide.weight.zero_()
            self.wide.weight[0, -1] = text_scale

    def item_vectors(self, sentence: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(B, C, D) per-user backbone vectors -> (B, C, d) unit-norm candidate vectors; (N, D) shared
        ones -> (N, d), or (B, N, d) under Opacus' hooks (ItemTower)."""
        return self.item_tower(sentence.float(), sentence.new_empty(batch_size))

    def text_scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """users (B, L, d), items (B, C, d) or shared (C, d) -> scaled cosines (B, L, C)."""
        pattern = "bld,bcd->blc" if items.dim() == 3 else "bld,cd->blc"
        return self.text_scale * torch.einsum(pattern, F.normalize(users, dim=-1), items)

    def parts(self, text: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear and the MLP part of the score, each (B, C); explanations show them apart."""
        x = torch.cat([features, text.unsqueeze(-1) / self.text_scale], dim=-1)
        return self.wide(x).squeeze(-1), self.output(torch.relu(self.hidden(x))).squeeze(-1)

    def forward(self, text: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        # text: (B, C) combined text score (scaled cosine), features: (B, C, F) -> (B, C)
        linear, interaction = self.parts(text, features)
        return linear + interaction

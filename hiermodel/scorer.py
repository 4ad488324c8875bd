"""Scores (user, candidate) pairs: text interest (cosine of z and the item tower) plus the repeat signal."""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.nn import functional as F


NORM_EPS = 1e-12  # F.normalize's default: below it a row is divided by eps instead of its norm
_CHUNK_ELEMENTS = 1 << 21  # the item tower's grad sampler forms (users, d, items) backprops this large at a time


class ItemTower(nn.Linear):
    """A linear item tower with unit-norm outputs, read through its cosines with the users' vectors:
    items, the shared catalogue (N, D) or per-user candidates (B, C, D), and users (B, K, d) in;
    cos(user k, item c) (B, K, C) out. The shared catalogue is projected and normalised once.

    Taking the users in lets Opacus hand the grad sampler below the small (B, K, C) backprop at the
    cosines; without them it would need each user's (B, C, d) backprop at the item vectors, for which
    autograd would have to expand the shared catalogue's vectors over the batch. The users come last:
    Opacus reads the batch size from the last input.
    """

    # the dtype of the main per-user product in the grad sampler below, None: the backprops' own
    # (privacy.private_round sets it for a DP round: dp.grad-sample-precision); whatever it is, the
    # per-sample gradients that are clipped are the ones summed
    grad_sample_dtype: torch.dtype | None = None

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """(N, D) or (B, C, D) backbone vectors -> unit item vectors (N, d) or (B, C, d)."""
        return F.normalize(super().forward(items), dim=-1, eps=NORM_EPS)

    def forward(self, items: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        pattern = "bkd,bcd->bkc" if items.dim() == 3 else "bkd,cd->bkc"
        return torch.einsum(pattern, F.normalize(users, dim=-1, eps=NORM_EPS), self.item_vectors(items))


@register_grad_sampler(ItemTower)
def _item_tower_grad_sample(layer: ItemTower, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-user gradients of the item tower, through the normalisation t = u / |u| of u = W x + b:
    Σ_c (g_c − (g_c·t_c) t_c) / |u_c| ⊗ x_c, where g_c = Σ_k a_kc û_k is user b's backprop at t_c,
    from its backprops a (K, C) at the cosines and its unit vectors û (K, d); items x shared (N, D)
    or per user (B, C, D). The radial part is dropped where |u| is below eps, as F.normalize divides
    by eps there."""
    items, users = activations[0], activations[-1]
    batch = users.shape[0]
    # one row per user, or a user's gradient lands on another's row and escapes its clipping
    if (backprops.dim() != 3 or backprops.shape[:2] != users.shape[:2]
            or (items.dim() == 3 and items.shape[0] != batch)):
        raise RuntimeError(f"ItemTower's per-sample gradients need one row per user ({batch}): backprops "
                           f"{tuple(backprops.shape)}, users {tuple(users.shape)}, items {tuple(items.shape)}")
    low = layer.grad_sample_dtype or backprops.dtype
    projected = F.linear(items, layer.weight, layer.bias)
    norm = projected.norm(dim=-1)
    inverse = 1.0 / norm.clamp(min=NORM_EPS)
    unit = (projected * inverse.unsqueeze(-1)).transpose(-1, -2).contiguous()  # (d, N), or (B, d, C)
    unit_users = F.normalize(users, dim=-1, eps=NORM_EPS)  # (B, K, d)
    shared = items.dim() == 2
    kept = norm >= NORM_EPS  # clamp passes no gradient below eps: no radial part there
    scaled = (items * inverse.unsqueeze(-1)).to(low)  # 1 / |u_c| folded into the items
    inverse = inverse.to(low)
    d, n = unit.shape[-2:]
    weight = backprops.new_empty(batch, d, items.shape[-1])
    bias = backprops.new_empty(batch, d)
    # a few users at a time: each chunk's (b, d, C) backprop stays in the cache, where the whole batch's
    # (64 × 64 × 3,659 floats at Online Retail) would cost more in memory traffic than in arithmetic
    step = max(1, _CHUNK_ELEMENTS // max(1, d * n))  # no items: zero gradients
    for start in range(0, batch, step):
        part = slice(start, start + step)
        chunk_unit, chunk_kept = (unit, kept) if shared else (unit[part], kept[part])
        chunk_users, chunk_backprops = unit_users[part], backprops[part]
        # g_c·t_c = Σ_k a_kc cos_kc: one small GEMM for the cosines instead of a pass over g (b, d, C)
        radial = (chunk_backprops * (chunk_users @ chunk_unit)).sum(1) * chunk_kept
        # each user's backprop g at its item vectors, laid out (b, d, C) so that its gradient is then one GEMM;
        # g − (g·t) t in the backprops' precision (it cancels where users align with items), then rounded
        by_dim = torch.bmm(chunk_users.transpose(1, 2), chunk_backprops)
        by_dim.addcmul_(radial.unsqueeze(1), chunk_unit, value=-1.0)  # the tangent part
        by_dim = by_dim.to(low)
        b = by_dim.shape[0]
        if shared:  # the shared catalogue: one (b·d, N) @ (N, D) product
            weight[part] = (by_dim.reshape(b * d, n) @ scaled).view(b, d, -1)
            bias[part] = by_dim @ inverse
        else:
            weight[part] = torch.bmm(by_dim, scaled[part])
            bias[part] = torch.bmm(by_dim, inverse[part].unsqueeze(-1)).squeeze(-1)
    grads = {layer.weight: weight}
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = bias
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

    def item_vectors(self, sentence: torch.Tensor) -> torch.Tensor:
        """(N, D) shared or (B, C, D) per-user backbone vectors -> unit candidate vectors (N, d) or (B, C, d)."""
        return self.item_tower.item_vectors(sentence.float())

    def text_scores(self, users: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """users (B, L, d) against the candidates' backbone vectors, (B, C, D) or shared (C, D) -> scaled
        cosines (B, L, C)."""
        return self.text_scale * self.item_tower(sentence.float(), users)

    def parts(self, text: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear and the MLP part of the score, each (B, C); explanations show them apart."""
        x = torch.cat([features, text.unsqueeze(-1) / self.text_scale], dim=-1)
        return self.wide(x).squeeze(-1), self.output(torch.relu(self.hidden(x))).squeeze(-1)

    def forward(self, text: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        # text: (B, C) combined text score (scaled cosine), features: (B, C, F) -> (B, C)
        linear, interaction = self.parts(text, features)
        return linear + interaction

"""Explanations of a user's top recommendations: per-level contributions, λ, attended items and words."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiermodel.data.split import Example
from hiermodel.features import FeatureBuilder
from hiermodel.model import HierModel


@dataclass
class Recommendation:
    item_id: str
    text: str
    score: float
    level_contributions: dict[str, float]  # the scorer's linear text term, split exactly over the levels
    repeat_and_popularity: float  # the linear term of the repeat, popularity and user features (and the similarity, if on)
    interaction: float  # the MLP part (text × repeat interactions)
    times_bought: int


@torch.no_grad()
def recommend(
    model: HierModel,
    builder: FeatureBuilder,
    *,
    user_index: int,
    n: int = 10,
    tokenizer=None,
    top_history: int = 5,
) -> dict:
    """The top-n items for the user's next basket, with the evidence the model weighted."""
    model.eval()
    user = builder.dataset.users[user_index]
    example = Example(user_index, len(user.baskets))
    history, candidates = builder.ranking_batch([example])
    levels = model.levels(history)
    users = torch.stack([lv.user for lv in levels], dim=1)  # (1, L, d)
    z, lam = model.combiner(users)
    scorer = model.scorer
    items = scorer.item_vectors(candidates.sentence).reshape(-1, model.config.dim)  # (N, d)
    cosine = scorer.text_scores(z.unsqueeze(1), candidates.sentence)[0, 0] / scorer.text_scale  # (N,)
    linear, interaction = (part[0] for part in scorer.parts(scorer.text_scale * cosine[None], candidates.features))
    wide_text = scorer.wide.weight[0, -1]
    scores = linear + interaction  # (N,)
    # w·cos(z, t) = Σ_l w·λ_l (z_l·t)/(|z||t|): an exact split of the linear text term over the levels
    per_level = wide_text * lam[0, :, None] * (users[0] @ items.T) / z[0].norm().clamp(min=1e-12)
    top = torch.argsort(scores, descending=True, stable=True)[:n].tolist()
    stats = builder.stats(example)
    counts = dict(zip(stats.items.tolist(), stats.count.tolist()))
    catalogue = builder.dataset.catalogue
    recs = [
        Recommendation(
            item_id=catalogue.item_ids[i],
            text=catalogue.texts[i],
            score=float(scores[i]),
            level_contributions={name: float(per_level[l, i]) for l, name in enumerate(model.level_names)},
            repeat_and_popularity=float(linear[i] - wide_text * cosine[i]),
            interaction=float(interaction[i]),
            times_bought=int(counts.get(i, 0)),
        )
        for i in top
    ]
    return {
        "user_id": user.user_id,
        "site": user.site,
        "history_baskets": len(user.baskets),
        "lambda": {name: float(v) for name, v in zip(model.level_names, lam[0].tolist())},
        "recommendations": [r.__dict__ for r in recs],
        "attention": _attention(levels, history, builder, model.level_names, tokenizer, top_history),
    }


def _attention(levels, history, builder, names, tokenizer, top: int) -> dict:
    catalogue = builder.dataset.catalogue
    ids = history.item_ids[0].tolist()
    out: dict[str, list] = {}
    by_name = dict(zip(names, levels))
    if "sentence" in by_name:
        w = by_name["sentence"].attention[0]
        order = torch.argsort(w, descending=True)[:top].tolist()
        out["items"] = [{"item_id": catalogue.item_ids[ids[p]], "text": catalogue.texts[ids[p]], "weight": float(w[p])} for p in order if ids[p] >= 0]
    word_w = by_name["word"].attention[0]  # (H, T)
    flat = torch.argsort(word_w.flatten(), descending=True)[: top * 3].tolist()
    words: dict[str, float] = {}
    t = word_w.shape[1]
    for f in flat:
        pos, tok = divmod(f, t)
        if ids[pos] < 0 or word_w[pos, tok] <= 0:
            continue
        word = _token(tokenizer, catalogue.texts[ids[pos]], tok, t) if tokenizer is not None else f"{catalogue.item_ids[ids[pos]]}#{tok}"
        words[word] = words.get(word, 0.0) + float(word_w[pos, tok])
    out["words"] = [{"word": w, "weight": v} for w, v in sorted(words.items(), key=lambda kv: -kv[1])[:top]]
    if "paragraph" in by_name:
        w = by_name["paragraph"].attention[0]
        slots = history.basket_slot[0]
        order = torch.argsort(w, descending=True)[:top].tolist()
        out["baskets"] = [{"baskets_back": int(slots[k]) + 1, "weight": float(w[k])} for k in order if history.basket_mask[0, k]]
    return out


def _token(tokenizer, text: str, position: int, max_tokens: int) -> str:
    """The whole word holding token ``position`` of the text (specials dropped, as the cache stored them)."""
    encoding = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_tokens)
    word_ids = encoding.word_ids()
    if position >= len(word_ids) or word_ids[position] is None:
        return "?"
    start, end = encoding.word_to_chars(word_ids[position])
    return text[start:end].lower()


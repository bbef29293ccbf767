# SPDX-License-Identifier: Apache-2.0
"""Ways of giving a concept to the model, side by side: Ego and the baselines of the paper's Table 3.

Every method starts from the same introduction of the concept's reference views by :meth:`Ego.register` (the
views encoded once, the keywords the model said, Ego's selection) and differs only in what goes after "NAME is "
in the prompt:

    ego        the tokens Ego kept of each view (keyword attention, top K_c): the product's memory
    none       nothing: the name alone, no introduction
    keywords   the model's keywords for the views, as text
    full       every visual token of each view, as soft tokens (the full reference views; no selection)
    random     a uniform random 20% of each view's visual tokens (the paper's Table 3 ablation)

A concept registered earlier (a resumed evaluation) has no traces; :func:`stored_concept` rebuilds what the
methods need from its stored memory (each view's kept indices and keywords) and its views encoded again.

Note: "full" puts the views' visual tokens where Ego puts its memory (soft tokens after the name), rather than
whole images with their vision delimiters, so that it differs from Ego only by the selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ego_ros.engine.backends import EncodedImage, SoftTokens
from ego_ros.engine.ego import ConceptInfo
from ego_ros.engine.memory import ConceptMemory

METHODS = {
    "ego": "Ego: the tokens its keyword attention kept",
    "none": "no memory: the name alone",
    "keywords": "keywords only, as text",
    "full": "full reference views: every visual token",
    "random": "uniform random 20% of the tokens",
}
RANDOM_SHARE = 0.2


def introduction(method: str, concept: ConceptInfo, views: int, seed: int = 0) -> list:
    """The prompt parts that introduce ``concept`` by ``method``, from its first ``views`` reference views."""
    traces = concept.traces[:views]
    if len(traces) < views:
        raise ValueError(f"{concept.name!r} has {len(concept.traces)} introduced views, {views} asked for")
    if method == "ego":
        return [_soft_tokens([(t.image, t.selected) for t in traces])]
    if method == "none":
        return []
    if method == "keywords":
        words = list(dict.fromkeys(word for t in traces for word in t.keywords))
        return [", ".join(words)] if words else []
    if method == "full":
        return [_soft_tokens([(t.image, None) for t in traces])]
    if method == "random":
        rng = np.random.default_rng([seed, views])
        picks = []
        for t in traces:
            n = t.image.num_tokens
            chosen = np.sort(rng.choice(n, max(1, round(RANDOM_SHARE * n)), replace=False))
            picks.append((t.image, torch.from_numpy(chosen)))
        return [_soft_tokens(picks)]
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _soft_tokens(picks: list[tuple[EncodedImage, torch.Tensor | None]]) -> torch.Tensor | SoftTokens:
    """The picked tokens (None: all) of each image, concatenated, as a memory holds them: bare vectors, or for a
    DeepStack family (Qwen3-VL) the vectors with their DeepStack features."""
    vectors = torch.cat([image.features if rows is None else image.features[rows] for image, rows in picks])
    if picks[0][0].deepstack is None:
        return vectors
    return SoftTokens(vectors, torch.cat([image.deepstack if rows is None else image.deepstack[:, rows]
                                          for image, rows in picks], dim=1))


@dataclass
class StoredView:
    """What :func:`introduction` reads of a view: the encoded view, the indices Ego kept of it, its keywords."""

    image: EncodedImage
    selected: torch.Tensor
    keywords: list[str]


def stored_concept(memory: ConceptMemory, encoded: list[EncodedImage]) -> ConceptInfo:
    """A stored concept as :func:`introduction` takes it, from its memory and its reference views encoded again
    (in the order they were registered). The views must be the ones the memory was made from."""
    if len(encoded) != memory.num_views:
        raise ValueError(f"{memory.name!r} has {memory.num_views} views, {len(encoded)} encoded")
    views = []
    for record, image in zip(memory.views, encoded):
        if tuple(record.grid_thw) != tuple(image.grid_thw):
            raise ValueError(f"{memory.name!r}: a view encodes to another grid than the stored one "
                             f"({tuple(image.grid_thw)} vs {tuple(record.grid_thw)}): not the same reference views")
        views.append(StoredView(image, torch.tensor(record.indices, dtype=torch.long), list(record.keywords)))
    return ConceptInfo.of(memory, views)

# SPDX-License-Identifier: Apache-2.0
"""The paper's recognition metric: every test image is asked about every concept; precision and recall are computed
per concept, averaged over concepts, and F1 is computed from the two averages (not averaged itself)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ConceptCounts:
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    true_negatives: int = 0

    def add(self, said_yes: bool, present: bool) -> None:
        if said_yes and present:
            self.true_positives += 1
        elif said_yes:
            self.false_positives += 1
        elif present:
            self.false_negatives += 1
        else:
            self.true_negatives += 1

    @property
    def precision(self) -> float:
        """0 when the concept was never said to be present (nothing it said was right)."""
        said = self.true_positives + self.false_positives
        return self.true_positives / said if said else 0.0

    @property
    def recall(self) -> float:
        present = self.true_positives + self.false_negatives
        return self.true_positives / present if present else 0.0

    @property
    def f1(self) -> float:
        """This concept's own F1 (the paper's table computes F1 from averages instead: RecognitionScore.f1)."""
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass
class RecognitionScore:
    precision: float  # mean over concepts
    recall: float  # mean over concepts
    f1: float  # from the two means
    per_concept: dict[str, ConceptCounts]

    @property
    def accuracy(self) -> float:
        counts = self.per_concept.values()
        right = sum(c.true_positives + c.true_negatives for c in counts)
        total = sum(c.true_positives + c.true_negatives + c.false_positives + c.false_negatives for c in counts)
        return right / total if total else 0.0


def recognition_score(decisions) -> RecognitionScore:
    """``decisions``: (concept, said_yes, present) for every (test image, concept) pair."""
    per_concept: dict[str, ConceptCounts] = {}
    for concept, said_yes, present in decisions:
        per_concept.setdefault(concept, ConceptCounts()).add(bool(said_yes), bool(present))
    if not per_concept:
        raise ValueError("no decisions to score")
    precision = sum(c.precision for c in per_concept.values()) / len(per_concept)
    recall = sum(c.recall for c in per_concept.values()) / len(per_concept)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return RecognitionScore(precision, recall, f1, per_concept)

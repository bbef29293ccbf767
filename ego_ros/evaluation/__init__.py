# SPDX-License-Identifier: Apache-2.0
"""Measuring the method: the paper's recognition metric, Ego beside its baselines, and the toy-world protocol.

- metrics.py: precision and recall per concept, averaged; F1 from the averages (the paper's protocol)
- methods.py: ways of giving a concept to the model: Ego, the name alone, keywords, full views, random tokens
- toy.py: localisation, recognition of personal instances and the many-concepts filter on the toy world
"""

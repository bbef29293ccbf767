# SPDX-License-Identifier: Apache-2.0
"""Measuring the method: the paper's evaluation protocol on its benchmarks, Ego beside its baselines, the toy world.

- metrics.py: precision and recall per concept, averaged; F1 from the averages (the paper's protocol)
- methods.py: ways of giving a concept to the model: Ego, the name alone, keywords, full views, random tokens
- datasets.py: the MyVLM, Yo'LLaVA, This-Is-My-Img and toy layouts, parsed into one structure with fixed splits
- tasks.py: recognition, A/B VQA, captioning recall, multi-concept recognition: prompts and scoring
- runner.py: one resumable run of every selected method (``evaluate``; ``ego-ros eval`` is cli/evaluate.py)
- report.py: summary.json, summary.md (the paper's table), summary.png, timings
- toy_layouts.py: the toy world written as a dataset, in its own layout or in each public one
- toy.py: localisation, recognition of personal instances and the many-concepts filter on the toy world
"""

# SPDX-License-Identifier: Apache-2.0
"""Offline builders of tiny, randomly initialised models of the real architectures.

Tests, benchmarks and smoke runs load what these write exactly as they would load a hub model:
through ``from_pretrained(folder)``. Nothing here downloads anything.
"""

# SPDX-License-Identifier: Apache-2.0
"""The Ego method on Hugging Face VLMs: register concepts, ask personalised questions, recognise concepts.

This package imports torch and transformers, never rclpy: the ROS node and the CLI are thin layers over it.
"""

from .calibration import Calibration, InvalidCalibration
from .config import EgoConfig
from .ego import Answer, ConceptInfo, Ego, ViewTrace
from .images import InvalidImage
from .loading import ModelLoadError
from .memory import ConceptExists, InvalidName, UnknownConcept

__all__ = ["Answer", "Calibration", "ConceptExists", "ConceptInfo", "Ego", "EgoConfig", "InvalidCalibration",
           "InvalidImage", "InvalidName", "ModelLoadError", "UnknownConcept", "ViewTrace"]

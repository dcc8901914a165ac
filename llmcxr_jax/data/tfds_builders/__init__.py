"""TFDS builders (array_record output, usable without TensorFlow). Importing registers them."""

from llmcxr_jax.data.tfds_builders.mimic_cxr_jpg import MimicCxrJpg, build as build_mimic_cxr_jpg

__all__ = ["MimicCxrJpg", "build_mimic_cxr_jpg"]

"""MedMoM-Synth: the built-in multi-organ, multi-sequence 3D MRI volume-report benchmark.

``generate`` writes NIfTI volumes, masks and ``studies.jsonl``; ``write_previews`` writes
PNG montages. See ``docs/benchmark.md``.
"""

from medmap.data.synth.generate import generate, load_synth_config

__all__ = ["generate", "load_synth_config"]

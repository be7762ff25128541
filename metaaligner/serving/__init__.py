"""Correction inference: the Corrector, the Ray Serve application and offline batch correction."""

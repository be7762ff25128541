"""Conditional weak-to-strong correction training (Ray Train + DeepSpeed), three stages."""

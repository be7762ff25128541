"""MetaAligner-style multi-objective correctors, trained and served on Ray."""

__version__ = "0.1.0"

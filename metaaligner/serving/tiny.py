"""A tiny random corrector folder for demos and CPU benchmarks (nothing downloaded; outputs are noise)."""

from __future__ import annotations

from pathlib import Path


def ensure_tiny_model(folder: str | Path, hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Create the folder with a tiny Llama + locally trained tokenizer unless it already holds a model."""
    from metaaligner.modeling import create_tiny_model
    from metaaligner.objectives import BUILTIN_SETS, load_objective_set
    from metaaligner.prompts import PROFILES, get_template

    folder = Path(folder).expanduser()
    if (folder / "config.json").is_file():
        return folder
    corpus = [get_template(p).render("better", "x", "What is the answer?", "An answer.") for p in PROFILES]
    corpus += [load_objective_set(s).render(load_objective_set(s).names) for s in BUILTIN_SETS]
    corpus += ["Thank you for asking. The quick brown fox jumps over the lazy dog."] * 5
    return create_tiny_model(folder, corpus * 20, hidden_size=hidden_size, num_layers=num_layers,
                             num_heads=max(1, hidden_size // 16))

"""Per-layer attention specs and the one dispatcher that runs dense or sparse attention."""

//! Chat template rendering (minijinja, Python-compatible): filled in next.

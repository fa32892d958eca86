//! Per-request output parser over token ids: filled in next.

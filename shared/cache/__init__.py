"""The response cache: exact-match answers, stream replay, coalescing, replay-only mode."""

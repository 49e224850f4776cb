"""Teacher stage: zero-shot-CoT rationales from a large model (engines, recorded outputs)."""

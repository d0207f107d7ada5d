"""Hugging Face integration: TieredCache, the prefetch hooks and model introspection."""

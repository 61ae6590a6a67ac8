"""Recovery training: distil an optimized graph from its original, write weights back."""

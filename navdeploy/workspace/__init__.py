"""The on-disk workspace: layout, manifests, checkpoints, locks, fingerprints, samples, atomic writes."""

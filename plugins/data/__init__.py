"""Generic data sources: digits, image folders, tar shards, datasets, latent seeds."""

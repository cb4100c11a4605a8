"""The training layer: data loading and batching, the epoch loop (`fit`), Ray Train runs, Ray Tune
sweeps and their search spaces. Uses config, model and tracking; serving never imports it."""

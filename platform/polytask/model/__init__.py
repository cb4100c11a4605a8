"""The model layer: the network (encoder + heads), the bundle on disk, compressed-encoder formats
and prediction from raw text. Imports tasks and nothing above it."""

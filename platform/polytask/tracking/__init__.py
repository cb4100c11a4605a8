"""The tracking layer: MLflow runs, the Model Registry (versions, aliases, tags, URI pinning) and
the pyfunc flavour of a bundle. Uses config and the bundle format only."""

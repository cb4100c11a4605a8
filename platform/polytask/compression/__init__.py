"""The compression tool: int8 and structured pruning of a registered model into a new version.
Loading compressed bundles is the model layer's job (`model/variants.py`), so serving never
imports this package."""

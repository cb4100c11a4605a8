"""Every MLflow tag name polytask writes or searches by, in one place: runs, sweeps and versions.

Tags are how a relaunch finds its run, a sweep its trials, and `polytask serve` a compressed
variant, so a name must never be spelled twice.
"""

from __future__ import annotations

# Runs (`polytask train`): the run name a relaunch looks up, and what the run registered.
RUN_NAME_TAG = "polytask.run_name"
MODEL_CHECKPOINT_TAG = "polytask.model_checkpoint"
MODEL_VERSION_TAG = "polytask.model_version"
MODEL_ALIASES_TAG = "polytask.model_aliases"
MODEL_URI_TAG = "polytask.model_uri"

# Sweeps (`polytask tune`): the sweep's name on parent and trials; MLflow's own nesting tag.
SWEEP_TAG = "polytask.sweep"
PARENT_TAG = "mlflow.parentRunId"
BEST_TRIAL_TAG = "polytask.best_trial"
TRIAL_PARAM_PREFIX = "trial."

# Model versions: the objective that decides promotion; for compressed versions (`polytask
# compress`) the method of the last step, the version it was made from, the full-precision
# version at the root of the chain, and the bundle variant.
OBJECTIVE_TAG = "objective"
# What an objective means, so promotion compares like with like: the version's task set
# ("ner,sentiment") and the objective's definition ("mean(ner:f1,sentiment:accuracy)"); and
# why the version did or did not become champion.
TASKS_TAG = "polytask.tasks"
OBJECTIVE_DEF_TAG = "polytask.objective_def"
PROMOTION_TAG = "polytask.promotion"
COMPRESSION_TAG = "polytask.compression"
SOURCE_VERSION_TAG = "polytask.source_version"
BASE_VERSION_TAG = "polytask.base_version"
VARIANT_TAG = "polytask.variant"
# The sha256 of the bundle (integrity.bundle_digest), on the logged model and each version made
# from it: what a serving replica checks its cached copy against.
BUNDLE_DIGEST_TAG = "polytask.bundle_sha256"
# Versions made by `polytask add-task`: the version whose encoder and heads they reuse, and the
# tasks they added (comma-separated). Not BASE_VERSION_TAG: that one marks compressed variants.
ADDED_TO_VERSION_TAG = "polytask.added_to_version"
ADDED_TASKS_TAG = "polytask.added_tasks"

# The promotion lock (`<model>.promotion-lock`, a registered model): who holds it, and until when
# (epoch seconds) its lease runs unless the holder renews it.
LOCK_OWNER_TAG = "polytask.lock_owner"
LOCK_LEASE_TAG = "polytask.lock_lease_until"

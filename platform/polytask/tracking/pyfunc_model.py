"""MLflow models-from-code entry: the pyfunc that wraps a polytask bundle.

MLflow logs this file as the model's code (no cloudpickle); `load_context` reads the bundle
artifact with the same Predictor that `polytask predict` uses, so answers match exactly.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


def to_inputs(model_input: Any) -> list[str | dict[str, Any]]:
    """A str, a list of str/{"text", "text_pair"} dicts, or a DataFrame with a `text` column."""
    if isinstance(model_input, (str, dict)):
        model_input = [model_input]
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        if "text" not in model_input.columns:
            raise ValueError(
                f"DataFrame input needs a 'text' column (and optionally 'text_pair'); "
                f"got columns {list(model_input.columns)}"
            )
        has_pair = "text_pair" in model_input.columns
        rows = model_input.to_dict(orient="records")
        return [
            {"text": str(r["text"]), "text_pair": r["text_pair"]} if has_pair else str(r["text"])
            for r in rows
        ]
    items = list(model_input)
    for i, item in enumerate(items):
        if not isinstance(item, (str, dict)) or (isinstance(item, dict) and "text" not in item):
            raise ValueError(f"input {i}: expected a string or a dict with 'text', got {item!r}")
    return items


class PolytaskModel(PythonModel):
    """predict(inputs, params={"tasks": [...]}) → one {task: answer} dict per input."""

    _skip_type_hint_validation = True  # inputs are mixed (str, dict, DataFrame): to_inputs checks

    def load_context(self, context: Any) -> None:
        from polytask.model.inference import Predictor

        self.predictor = Predictor.from_bundle(context.artifacts["bundle"])

    # No type hints on purpose: MLflow would coerce inputs to the hinted type.
    def predict(self, context, model_input, params=None):
        tasks = (params or {}).get("tasks")
        return self.predictor.predict(to_inputs(model_input), list(tasks) if tasks else None)


mlflow.models.set_model(PolytaskModel())

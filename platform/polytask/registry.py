"""MLflow Model Registry: log a bundle as a model version, move aliases, resolve URIs to bundles."""

from __future__ import annotations

from pathlib import Path

from polytask.config import default_home


def resolve_bundle(uri: str) -> Path:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/PATH` or a directory → local bundle."""
    if "://" not in uri and ":/" not in uri:
        path = Path(uri).expanduser()
        if not (path / "polytask.json").is_file():
            raise FileNotFoundError(
                f"model '{uri}': not a bundle directory (no polytask.json); pass a bundle path "
                "or a models:/NAME@ALIAS URI"
            )
        return path.resolve()
    import mlflow

    dst = default_home() / "models" / uri.replace(":/", "_").replace("/", "_").replace("@", "_")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    for candidate in (local / "artifacts" / "bundle", local / "bundle", local):
        if (candidate / "polytask.json").is_file():
            return candidate
    raise FileNotFoundError(f"model '{uri}' resolved to {local}, which holds no polytask bundle")

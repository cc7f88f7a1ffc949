"""sae-atlas: analysis-ready Parquet files from the raw results of an SAE interpretability study.

>>> from sae_atlas import Atlas
>>> Atlas("master").feature(877)  # doctest: +SKIP
"""

__version__ = "0.1.0"

__all__ = ["Atlas", "__version__"]


def __getattr__(name: str):
    # Imported lazily: `import sae_atlas` stays cheap for the CLI and the pipeline.
    if name == "Atlas":
        from sae_atlas.query.atlas import Atlas

        return Atlas
    raise AttributeError(f"module 'sae_atlas' has no attribute {name!r}")

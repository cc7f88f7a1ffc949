"""sae-atlas: analysis-ready Parquet files from the raw results of an SAE interpretability study."""

__version__ = "0.1.0"

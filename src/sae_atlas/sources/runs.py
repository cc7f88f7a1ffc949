"""The reader of each kind of explainer source, looked up by the source's ``kind``: delphi's run
directories, or Neuronpedia's exported explanations. Each describes a source cheaply (its config,
no directory walk) and then lists (or reads) its files."""

from __future__ import annotations

from sae_atlas.config import SourceConfig
from sae_atlas.problems import Problems
from sae_atlas.sources import delphi, neuronpedia
from sae_atlas.sources.delphi import DelphiRun

READERS = {"delphi": delphi, "neuronpedia": neuronpedia}


def describe_run(source: SourceConfig, problems: Problems) -> DelphiRun:
    """Who explained (and scored) a source, from its config and run config."""
    return READERS[source.kind].describe_run(source, problems)


def list_run_files(run: DelphiRun, problems: Problems, *, width: int | None = None) -> None:
    """Fill in a run's files (for a Neuronpedia source: its explanations, read)."""
    READERS[run.kind].list_run_files(run, problems, width=width)

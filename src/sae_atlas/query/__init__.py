"""The query layer: an output directory read back (:class:`~sae_atlas.query.atlas.Atlas`), its
typed results, its query parameters, the comparison of explainers and scorers, and summaries."""

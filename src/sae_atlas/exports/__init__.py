"""Files for other tools: the feature table in any registered format, Neuronpedia's batch files,
and the comparison report."""

"""The pipeline's stages, one module each; registering a stage is one line here.

The runner orders them by what they read (this order breaks ties), so the list reads as the data
path: activation records and decoder weights first, then scores and explanations, then what is
built from them.
"""

from sae_atlas.stages import (
    activation_embeddings,
    activation_examples,
    activation_patterns,
    activation_similarity,
    claims,
    decoder_similarity,
    diagnosis,
    explanation_embeddings,
    families,
    family_pairs,
    features,
    latent_map,
    scores,
)

REGISTERED = (
    activation_examples.STAGE,
    decoder_similarity.STAGE,
    scores.STAGE,
    explanation_embeddings.STAGE,
    features.STAGE,
    activation_embeddings.STAGE,
    activation_similarity.STAGE,
    activation_patterns.STAGE,
    claims.STAGE,
    diagnosis.STAGE,
    latent_map.STAGE,
    families.STAGE,
    family_pairs.STAGE,
)

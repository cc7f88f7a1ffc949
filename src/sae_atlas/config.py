"""The ``sae-atlas.toml`` run configuration, validated by pydantic.

Every key but ``sources`` is optional. Relative paths are resolved against the directory of the
config file, so a corpus can be moved around together with its config.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_MODEL = "builtin:all-MiniLM-L6-v2"


class ConfigError(ValueError):
    """The config file cannot be read or does not validate; the message is one line."""


class _Section(BaseModel):
    # A typo in a key should fail loudly rather than silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Section):
    """One delphi run directory, i.e. one (explainer, scorer) pair; or, with ``kind =
    "neuronpedia"``, one source directory of a Neuronpedia export, whose explanations by the
    model named ``explainer`` (their ``explanationModelName``) make an unscored explainer."""

    path: Path
    name: str | None = None
    explainer: str | None = None
    scorer: str | None = None
    kind: Literal["delphi", "neuronpedia"] = "delphi"

    @model_validator(mode="after")
    def _default_name(self) -> SourceConfig:
        if not self.name:
            self.name = self.path.name
        if self.kind == "neuronpedia" and not self.explainer:
            raise ValueError(
                "a Neuronpedia source names the explanation model it takes: explainer = its explanationModelName"
            )
        return self


class ActivationsConfig(_Section):
    """Activation records: ``activations.jsonl`` + ``prompts.json``, or a delphi latent cache."""

    path: Path
    format: Literal["jsonl", "delphi"] = "jsonl"
    tokenizer: Path | None = None

    @model_validator(mode="after")
    def _tokenizer_for_delphi(self) -> ActivationsConfig:
        if self.format == "delphi" and self.tokenizer is None:
            raise ValueError("format 'delphi' needs a tokenizer (path to a tokenizer.json)")
        return self


class DecoderConfig(_Section):
    """SAE decoder weights: a Gemma Scope ``params.npz``, a SAELens or a sparsify directory."""

    path: Path
    top_k: Annotated[int, Field(ge=1, le=1000)] = 10
    device: str = "auto"


class EmbeddingConfig(_Section):
    """The sentence-embedding model used for explanations and activation windows."""

    model: str = DEFAULT_MODEL
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    device: str = "auto"
    quantize: Literal["none", "int8"] = "none"
    # Content-addressed vector cache; defaults to <output_dir>/.cache/embeddings.
    cache_dir: Path | None = None


class SamplingConfig(_Section):
    """How activation examples are sampled per feature before they are embedded."""

    quantiles: Annotated[int, Field(ge=1, le=100)] = 4
    per_quantile: Annotated[int, Field(ge=1, le=1000)] = 5
    window: Annotated[int, Field(ge=1, le=4096)] = 32


class OutputConfig(_Section):
    """How the Parquet files are written."""

    embedding_dtype: Literal["float32", "float16", "int8"] = "float32"
    compression: Literal["zstd", "snappy", "lz4", "gzip", "brotli", "uncompressed"] = "zstd"


class ExecutionConfig(_Section):
    """Where the heavy stages run. Never part of a stage's fingerprint: every engine writes the
    same outputs."""

    engine: Literal["local", "ray"] = "local"
    # Ray only. Unset: start a Ray instance on this machine for the run; "auto" or
    # "ray://host:10001" (or "host:6379"): join that cluster.
    address: str | None = None
    # Embedding actors (each loads the model once); unset: as many as the cluster's CPUs (or GPUs,
    # with gpus_per_actor) allow.
    embedding_actors: Annotated[int | None, Field(ge=1, le=4096)] = None
    cpus_per_actor: Annotated[float, Field(gt=0, le=1024)] = 1.0
    gpus_per_actor: Annotated[float, Field(ge=0, le=64)] = 0.0

    @field_validator("address")
    @classmethod
    def _address_given(cls, address: str | None) -> str | None:
        if address is not None and not address.strip():
            raise ValueError("an empty Ray address; leave it out to start a Ray instance of the run's own")
        return address


class LabelsConfig(_Section):
    """People's labels: the causes a label may give besides sae-atlas's own vocabulary."""

    causes: list[Annotated[str, Field(min_length=1, max_length=200)]] = []


class FamiliesConfig(_Section):
    """Feature families and the map of latents, from the decoder-neighbour graph."""

    # Leiden's resolution (RB configuration model): higher gives more, smaller families.
    resolution: Annotated[float, Field(gt=0, le=100)] = 1.0
    # Families larger than this are split again into subfamilies no larger, so each stays readable.
    max_family: Annotated[int, Field(ge=2, le=1_000_000)] = 100
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    map_epochs: Annotated[int, Field(ge=10, le=2000)] = 200


class AtlasConfig(_Section):
    """A whole ``sae-atlas.toml``."""

    sources: Annotated[list[SourceConfig], Field(min_length=1)]
    sae_id: str | None = None
    output_dir: Path = Path("master")
    activations: ActivationsConfig | None = None
    decoder: DecoderConfig | None = None
    embedding: EmbeddingConfig = EmbeddingConfig()
    sampling: SamplingConfig = SamplingConfig()
    output: OutputConfig = OutputConfig()
    execution: ExecutionConfig = ExecutionConfig()
    labels: LabelsConfig = LabelsConfig()
    families: FamiliesConfig = FamiliesConfig()

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [source.name for source in sources]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"source names must be unique; repeated: {', '.join(duplicated)}")
        return sources

    @property
    def embedding_cache_dir(self) -> Path:
        return self.embedding.cache_dir or self.output_dir / ".cache" / "embeddings"

    def resolved(self, base: Path) -> AtlasConfig:
        """A copy with every relative path made absolute against ``base``."""

        def fix(path: Path | None) -> Path | None:
            if path is None:
                return None
            path = path.expanduser()
            return path if path.is_absolute() else (base / path).resolve()

        data = self.model_copy(deep=True)
        data.output_dir = fix(data.output_dir)
        for source in data.sources:
            source.path = fix(source.path)
        if data.activations:
            data.activations.path = fix(data.activations.path)
            data.activations.tokenizer = fix(data.activations.tokenizer)
        if data.decoder:
            data.decoder.path = fix(data.decoder.path)
        data.embedding.cache_dir = fix(data.embedding.cache_dir)
        return data

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data, for sidecars and reports."""
        return self.model_dump(mode="json", exclude_none=True)


def _format_error(path: Path, error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{path}: {where}: {first['msg']}{more}"


def parse_config(data: dict[str, Any], *, base: Path, origin: str | Path = "<config>") -> AtlasConfig:
    """Validate a config mapping and resolve its paths against ``base``."""
    try:
        config = AtlasConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_error(Path(origin), error)) from None
    return config.resolved(base)


def load_config(path: str | Path) -> AtlasConfig:
    """Read and validate a ``sae-atlas.toml``; paths in it are relative to its directory."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as error:
        raise ConfigError(f"{path}: config file cannot be read ({error.strerror or error})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return parse_config(data, base=path.resolve().parent, origin=path)

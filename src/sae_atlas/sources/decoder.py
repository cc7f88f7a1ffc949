"""Reader for SAE decoder weights: Gemma Scope ``params.npz`` (or ``params.safetensors``), SAELens
directories (``cfg.json`` + ``sae_weights.safetensors``; the flat pre-6.0 config and 6.x's, which
keeps hook and model under ``metadata``) and sparsify directories (``cfg.json`` +
``sae.safetensors``; before and after 1.0), or a repository root holding one such directory per
hookpoint (sparsify's ``load_many`` layout), from which the runs' hookpoint is chosen. The reader
names the layout and version it recognised, and what the config says of the SAE (hook, model,
architecture, L0, dead latents from SAELens' ``sparsity.safetensors``).

All three store ``W_dec`` as [d_sae, d_model]; the shape is still checked against what the SAE's
own config (or the Gemma Scope ``width_*`` path component) says d_sae is, and a transposed matrix
is turned back (SAELens' sparsify loader is known to transpose). Only the decoder tensor is
loaded, never the encoder, so memory stays at one d_sae × d_model matrix.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from sae_atlas.sources import files

GEMMA_SCOPE_WIDTHS = {
    "4k": 4096,
    "16k": 16384,
    "32k": 32768,
    "65k": 65536,
    "131k": 131072,
    "262k": 262144,
    "524k": 524288,
    "1m": 1048576,
}
DECODER_KEYS = ("W_dec", "w_dec")


@dataclass
class DecoderWeights:
    """The decoder matrix, rows = latents, and where it came from."""

    weights: np.ndarray
    format: str
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    version: str = ""  # the layout and version recognised, e.g. "SAELens 6.x (6.54.12)"
    details: dict = field(default_factory=dict)  # what the config says: hook, model, architecture…

    @property
    def d_sae(self) -> int:
        return self.weights.shape[0]


class DecoderError(ValueError):
    """The decoder input cannot be used: ``path`` and a one-line ``reason``."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def width_from_text(text: str) -> int | None:
    """d_sae from a Gemma Scope ``width_16k`` path or sae_id component (``2k`` → 2048)."""
    match = re.search(r"width_([0-9]+)([km]?)(?!\w)", text, re.ASCII)
    if not match:
        return None
    label = match.group(1) + match.group(2)
    if label in GEMMA_SCOPE_WIDTHS:
        return GEMMA_SCOPE_WIDTHS[label]
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[match.group(2)]


def _require_regular(path: Path) -> None:
    """A decoder file is opened only when it is a regular file: numpy and safetensors would wait on
    a FIFO for ever, or read a device until memory runs out."""
    refused = files.regular_file_problem(path)
    if refused:
        raise DecoderError(path, refused)


def _read_json(path: Path) -> dict:
    _require_regular(path)
    if path.stat().st_size > files.LIMITS["run config file"]:
        raise DecoderError(path, f"over the {files.LIMITS['run config file'] // files.MiB} MiB limit of a config file")
    try:
        data = orjson.loads(path.read_bytes())
    except OSError as error:
        raise DecoderError(path, f"cannot be read ({files.reason(error)})") from None
    except orjson.JSONDecodeError as error:
        raise DecoderError(path, f"not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise DecoderError(path, "expected a JSON object")
    return data


def _safetensors_decoder(path: Path) -> np.ndarray:
    from safetensors import SafetensorError, safe_open

    _require_regular(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            names = set(handle.keys())  # safe_open handles are not containers
            key = next((key for key in DECODER_KEYS if key in names), None)
            if key is None:
                raise DecoderError(path, f"no W_dec tensor (keys: {', '.join(sorted(handle.keys()))})")
            try:
                return handle.get_tensor(key)
            except (TypeError, SafetensorError):
                pass  # bfloat16 has no NumPy dtype: read it through torch below
        import torch

        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key).to(torch.float32).numpy()
    except SafetensorError as error:
        raise DecoderError(path, f"unreadable safetensors file ({error})") from None
    except OSError as error:
        raise DecoderError(path, f"{error.strerror or error}") from None


def _npz_decoder(path: Path) -> tuple[np.ndarray, int | None]:
    _require_regular(path)
    try:
        with np.load(path) as archive:
            key = next((key for key in DECODER_KEYS if key in archive.files), None)
            if key is None:
                raise DecoderError(path, f"no W_dec array (keys: {', '.join(sorted(archive.files))})")
            weights = archive[key]
            # b_enc / threshold are [d_sae]: a second opinion on the orientation.
            for companion in ("threshold", "b_enc"):
                if companion in archive.files:
                    return weights, int(archive[companion].shape[0])
            return weights, None
    except DecoderError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DecoderError(path, f"not a readable .npz archive ({error})") from None


def _stored_decoder_shape(path: Path) -> tuple[int, ...] | None:
    """The shape of the W_dec a ``.npz`` or ``.safetensors`` file stores, read from its header
    (nothing loaded); None when there is none or it cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        _require_regular(path)
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="numpy") as handle:
                names = set(handle.keys())
                key = next((key for key in DECODER_KEYS if key in names), None)
                return tuple(handle.get_slice(key).get_shape()) if key else None
        with zipfile.ZipFile(path) as archive:
            member = next((f"{key}.npy" for key in DECODER_KEYS if f"{key}.npy" in archive.namelist()), None)
            if member is None:
                return None
            with archive.open(member) as handle:
                major, _ = np.lib.format.read_magic(handle)
                reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, _ = reader(handle)
                return tuple(shape)
    except (DecoderError, OSError, ValueError, EOFError, zipfile.BadZipFile, SafetensorError):
        return None


def _orient(weights: np.ndarray, d_sae: int | None, d_model: int | None, path: Path, notes: list[str]) -> np.ndarray:
    if weights.dtype.kind not in "f":
        # Integer codes (a quantised tensor, bf16 bits kept as uint16) are not weights: their
        # cosines would be wrong without a word. Floating-point dtypes and bf16 proper are read.
        raise DecoderError(
            path, f"W_dec holds {weights.dtype} values, not floating-point weights; store float32, float16 or bf16"
        )
    if weights.ndim == 3:  # Gemma Scope 2 cross-layer transcoders: sum the per-layer decoders
        weights = weights.sum(axis=1)
        notes.append(f"{path}: 3-D decoder summed over its layer axis")
    if weights.ndim != 2:
        raise DecoderError(path, f"W_dec has shape {list(weights.shape)}, expected [d_sae, d_model]")
    rows, columns = weights.shape
    expected = f"[{d_sae if d_sae else 'd_sae'}, {d_model if d_model else 'd_model'}]"
    if d_sae is not None:
        if rows == d_sae and (d_model is None or columns == d_model):
            return weights
        if columns == d_sae and (d_model is None or rows == d_model):
            notes.append(f"{path}: W_dec stored as [d_model, d_sae]; transposed")
            return weights.T
        raise DecoderError(path, f"W_dec has shape [{rows}, {columns}], expected {expected}")
    if d_model is not None and columns != d_model:
        if rows == d_model:
            notes.append(f"{path}: W_dec stored as [d_model, d_sae]; transposed")
            return weights.T
        raise DecoderError(path, f"W_dec has shape [{rows}, {columns}], expected {expected}")
    return weights


def _saelens_details(config: dict, directory: Path) -> tuple[str, dict]:
    """The SAELens version a cfg.json is written by, and what it says of the SAE."""
    metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else None
    source = metadata or config
    details = {
        "hook_name": source.get("hook_name") or config.get("hook_point") or config.get("hook_name"),
        "model_name": source.get("model_name") or config.get("model_name"),
        "architecture": config.get("architecture")
        or ("topk" if "topk" in str(config.get("activation_fn_str", "")).lower() else "standard"),
        "d_sae": config.get("d_sae"),
        "d_in": config.get("d_in"),
        "l0": source.get("l0", config.get("l0")),
    }
    sparsity = directory / "sparsity.safetensors"
    if sparsity.exists():
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            log_density = load_file(str(sparsity)).get("sparsity")
        except (SafetensorError, OSError, ValueError):
            log_density = None
        if log_density is not None:
            # SAELens stores log10(density + 1e-10): a latent that never fired sits at -10.
            details["dead_latents"] = int((log_density <= -10 + 1e-6).sum())
    if metadata is not None:
        version = metadata.get("sae_lens_version") or metadata.get("sae_lens_training_version")
        label = f"SAELens 6.x ({version})" if version else "SAELens 6.x"
    else:
        label = "SAELens < 6.0 (flat cfg.json)"
    return label, {key: value for key, value in details.items() if value is not None}


def _sparsify_details(config: dict) -> tuple[str, dict]:
    """The sparsify generation a cfg.json is written by, and what it says of the SAE."""
    newer = "activation" in config or "transcode" in config
    details = {
        "architecture": ("transcoder" if config.get("transcode") else "sae")
        + f" ({config.get('activation', 'topk')}, k={config.get('k')})",
        "skip_connection": config.get("skip_connection"),
        "d_in": config.get("d_in"),
    }
    label = "sparsify ≥ 1.0" if newer else "EleutherAI/sae (sparsify < 1.0)"
    return label, {key: value for key, value in details.items() if value is not None}


WEIGHT_FILES = (("sae_weights.safetensors", "saelens"), ("sae.safetensors", "sparsify"))


def _is_coder_directory(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name, _ in WEIGHT_FILES)


def _is_repository_root(path: Path) -> bool:
    """A directory of per-hookpoint SAE directories, and no SAE of its own."""
    own = (path / "cfg.json").exists() or any((path / name).exists() for name in ("params.npz", "params.safetensors"))
    return not own and not _is_coder_directory(path) and any(_is_coder_directory(child) for child in path.iterdir())


def _choose_hookpoint(root: Path, hookpoint: str | None) -> Path:
    """The per-hookpoint directory of a repository root (sparsify's ``load_many`` layout): the only
    one, or the one named like the runs' hookpoint."""
    candidates = sorted(path for path in root.iterdir() if _is_coder_directory(path))
    if len(candidates) == 1:
        return candidates[0]
    if hookpoint:
        for candidate in candidates:
            # sparsify resolves `layers.5` to `gpt_neox.layers.5` or `model.layers.5`: either way round
            if (
                candidate.name == hookpoint
                or candidate.name.endswith(f".{hookpoint}")
                or hookpoint.endswith(f".{candidate.name}")
            ):
                return candidate
    names = ", ".join(candidate.name for candidate in candidates[:8])
    raise DecoderError(
        root,
        f"holds {len(candidates)} hookpoint directories ({names}); "
        f"none is the runs' hookpoint {hookpoint!r}: name one in [decoder] path",
    )


def read_decoder(path: Path, *, sae_id: str | None = None, hookpoint: str | None = None) -> DecoderWeights:
    """Load the decoder matrix [d_sae, d_model] as float32 from any supported layout.

    ``hookpoint``: the hookpoint the runs' files name, to choose among a repository's
    per-hookpoint directories. Raises :class:`DecoderError` (one line, naming the file) when the
    input is unusable.
    """
    path = Path(path)
    notes: list[str] = []
    if path.is_dir():
        if _is_repository_root(path):
            chosen = _choose_hookpoint(path, hookpoint)
            weights = read_decoder(chosen, sae_id=sae_id)
            weights.notes.insert(0, f"{path}: hookpoint directory {chosen.name!r} chosen")
            return weights
        config_path = path / "cfg.json"
        for name, layout in WEIGHT_FILES:
            weights_path = path / name
            if weights_path.exists():
                if not config_path.exists():
                    raise DecoderError(config_path, f"missing ({layout} directories need cfg.json)")
                config = _read_json(config_path)
                d_model = config.get("d_in")
                if layout == "saelens":
                    d_sae = config.get("d_sae")
                    version, details = _saelens_details(config, path)
                else:
                    d_sae = config.get("num_latents") or (
                        d_model * config["expansion_factor"]
                        if isinstance(d_model, int) and isinstance(config.get("expansion_factor"), int)
                        else None
                    )
                    version, details = _sparsify_details(config)
                    details["d_sae"] = d_sae
                weights = _safetensors_decoder(weights_path)
                weights = _orient(
                    weights,
                    d_sae if isinstance(d_sae, int) else None,
                    d_model if isinstance(d_model, int) else None,
                    weights_path,
                    notes,
                )
                return DecoderWeights(
                    np.asarray(weights, np.float32), layout, [config_path, weights_path], notes, version, details
                )
        for name in ("params.npz", "params.safetensors"):
            if (path / name).exists():
                return read_decoder(path / name, sae_id=sae_id)
        raise DecoderError(
            path,
            "no decoder weights found (expected params.npz, sae_weights.safetensors "
            "+ cfg.json, or sae.safetensors + cfg.json)",
        )
    if not path.exists():
        raise DecoderError(path, "no such file or directory")
    named_width = width_from_text(path.as_posix()) or (width_from_text(sae_id) if sae_id else None)
    if path.suffix == ".npz":
        weights, own_width = _npz_decoder(path)
        layout = "gemma-scope"
    elif path.suffix == ".safetensors":
        weights, own_width, layout = _safetensors_decoder(path), None, "safetensors"
    else:
        raise DecoderError(path, "unknown decoder format (expected .npz, .safetensors or a directory)")
    # The file's own [d_sae] arrays outrank the width its path or sae_id names.
    if own_width and named_width and own_width != named_width:
        notes.append(f"{path}: the file holds {own_width} latents, its name says {named_width}")
    weights = _orient(weights, own_width or named_width, None, path, notes)
    version = {
        "gemma-scope": "Gemma Scope (params.npz)",
        "safetensors": "Gemma Scope 2 (params.safetensors)" if path.name == "params.safetensors" else "safetensors",
    }[layout]
    return DecoderWeights(np.asarray(weights, np.float32), layout, [path], notes, version, {"d_sae": weights.shape[0]})


def declared_width(path: Path, *, sae_id: str | None = None) -> int | None:
    """The SAE's number of latents as its files declare it, without loading the decoder: SAELens
    ``d_sae``, sparsify ``num_latents`` (or ``d_in × expansion_factor``), the length of a Gemma Scope
    archive's ``threshold`` / ``b_enc``, else the ``width_*`` its path or sae_id names. None when
    nothing says, or the files cannot be read (the decoder stage reports why)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        if path.is_dir() and _is_repository_root(path):
            # one SAE per hookpoint, usually all of one width: that width, when they agree
            widths = {declared_width(child) for child in path.iterdir() if _is_coder_directory(child)}
            return widths.pop() if len(widths) == 1 else None
        if path.is_dir():
            config = path / "cfg.json"
            if config.exists():
                data = _read_json(config)
                d_in, factor = data.get("d_in"), data.get("expansion_factor")
                width = data.get("d_sae") or data.get("num_latents")
                if not width and isinstance(d_in, int) and isinstance(factor, int):
                    width = d_in * factor
                weights = next((path / name for name, _ in WEIGHT_FILES if (path / name).exists()), None)
                shape = _stored_decoder_shape(weights) if weights is not None else None
                # A width the decoder contradicts is not believed: the decoder stage refuses that
                # decoder, and a refused decoder must not decide which latents exist.
                if isinstance(width, int) and width > 0 and shape is not None and width in shape:
                    return width
                return None
            for name in ("params.npz", "params.safetensors"):
                if (path / name).exists():
                    return declared_width(path / name, sae_id=sae_id)
        elif path.suffix in (".npz", ".safetensors"):
            _require_regular(path)
            width = None
            if path.suffix == ".npz":
                with np.load(path) as archive:
                    key = next((key for key in ("threshold", "b_enc") if key in archive.files), None)
                    width = int(archive[key].shape[0]) if key else None  # [d_sae] vectors: small, unlike W_dec
            else:
                with safe_open(str(path), framework="numpy") as handle:
                    key = next((key for key in ("threshold", "b_enc") if key in set(handle.keys())), None)
                    width = int(handle.get_slice(key).get_shape()[0]) if key else None
            shape = _stored_decoder_shape(path)
            if shape is None:
                return None  # no decoder to check a width against: the stage will refuse it
            if width is not None:
                return width if width in shape else None
    except (DecoderError, OSError, ValueError, EOFError, zipfile.BadZipFile, SafetensorError):
        pass
    return width_from_text(path.as_posix()) or (width_from_text(sae_id) if sae_id else None)

"""Decoder weight reader: Gemma Scope npz, SAELens and sparsify directories, and their failures."""

from __future__ import annotations

import shutil

import numpy as np
import orjson
import pytest
from safetensors.numpy import load_file, save_file

from sae_atlas.sources.decoder import DecoderError, read_decoder
from tests.conftest import FIXTURES

GEMMA = FIXTURES / "gemma-scope" / "layer_3" / "width_16k" / "average_l0_82" / "params.npz"
SAELENS = FIXTURES / "saelens" / "blocks.3.hook_resid_post"
SPARSIFY = FIXTURES / "sparsify" / "layers.3.mlp"


@pytest.mark.parametrize(("path", "layout"), [(GEMMA, "gemma-scope"), (SAELENS, "saelens"), (SPARSIFY, "sparsify")])
def test_every_layout_gives_rows_per_latent(path, layout):
    decoder = read_decoder(path)
    assert decoder.format == layout
    assert decoder.weights.shape == (16, 8) and decoder.weights.dtype == np.float32


def test_gemma_scope_decoder_matches_the_npz():
    expected = np.load(GEMMA)["W_dec"]
    np.testing.assert_array_equal(read_decoder(GEMMA).weights, expected)
    # The example's path says width_16k but the file holds 16 latents: its own arrays win, with a note.
    assert any("holds 16 latents" in note for note in read_decoder(GEMMA).notes)


def test_transposed_decoder_is_turned_back_with_a_note(tmp_path):
    directory = shutil.copytree(SPARSIFY, tmp_path / "sparsify")
    tensors = load_file(str(directory / "sae.safetensors"))
    save_file({**tensors, "W_dec": np.ascontiguousarray(tensors["W_dec"].T)}, str(directory / "sae.safetensors"))
    decoder = read_decoder(directory)
    np.testing.assert_array_equal(decoder.weights, tensors["W_dec"])
    assert any("transposed" in note for note in decoder.notes)


def test_bfloat16_weights_are_read_as_float32(tmp_path):
    import torch
    from safetensors.torch import save_file as save_torch

    directory = shutil.copytree(SPARSIFY, tmp_path / "sparsify")
    tensors = load_file(str(directory / "sae.safetensors"))
    save_torch(
        {key: torch.from_numpy(value).to(torch.bfloat16) for key, value in tensors.items()},
        str(directory / "sae.safetensors"),
    )
    decoder = read_decoder(directory)
    assert decoder.weights.dtype == np.float32
    np.testing.assert_allclose(decoder.weights, tensors["W_dec"], rtol=1e-2, atol=1e-2)


def test_gemma_scope_2_safetensors_with_lowercase_keys(tmp_path):
    weights = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    path = tmp_path / "width_32" / "params.safetensors"
    path.parent.mkdir()
    save_file({"w_dec": weights, "w_enc": weights.T.copy()}, str(path))
    np.testing.assert_array_equal(read_decoder(path).weights, weights)


def test_decoder_of_the_wrong_shape_names_the_file(tmp_path):
    directory = shutil.copytree(SAELENS, tmp_path / "saelens")
    config = orjson.loads((directory / "cfg.json").read_bytes())
    (directory / "cfg.json").write_bytes(orjson.dumps({**config, "d_sae": 32}))
    with pytest.raises(DecoderError) as error:
        read_decoder(directory)
    assert error.value.path.endswith("sae_weights.safetensors")
    assert "W_dec has shape [16, 8], expected [32, 8]" in error.value.reason

    archive = tmp_path / "params.npz"
    np.savez(archive, W_dec=np.zeros((15, 8), np.float32), threshold=np.zeros(16, np.float32))
    with pytest.raises(DecoderError, match=r"params.npz: W_dec has shape \[15, 8\], expected \[16, d_model\]"):
        read_decoder(archive)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: (d / "sae.safetensors").write_bytes(b"not a safetensors file"), "unreadable safetensors"),
        (lambda d: (d / "cfg.json").unlink(), "cfg.json: missing"),
        (lambda d: (d / "cfg.json").write_text("{"), "not valid JSON"),
    ],
)
def test_broken_sparsify_directory(tmp_path, make, fragment):
    directory = shutil.copytree(SPARSIFY, tmp_path / "sparsify")
    make(directory)
    with pytest.raises(DecoderError, match=fragment):
        read_decoder(directory)


def test_unusable_paths(tmp_path):
    with pytest.raises(DecoderError, match="no such file"):
        read_decoder(tmp_path / "absent.npz")
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(DecoderError, match="unknown decoder format"):
        read_decoder(tmp_path / "weights.pt")
    with pytest.raises(DecoderError, match="no decoder weights found"):
        read_decoder(tmp_path)
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((8, 16), np.float32))
    with pytest.raises(DecoderError, match="no W_dec array"):
        read_decoder(tmp_path / "params.npz")
    (tmp_path / "truncated.npz").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(DecoderError, match=r"not a readable \.npz"):
        read_decoder(tmp_path / "truncated.npz")


def test_the_reader_names_the_layout_and_version_it_recognised():
    saelens = read_decoder(SAELENS)
    assert saelens.version == "SAELens 6.x (6.54.12)"
    assert saelens.details["hook_name"] == "blocks.3.hook_resid_post"
    assert saelens.details["model_name"] == "pythia-70m"
    assert saelens.details["architecture"] == "jumprelu" and saelens.details["d_sae"] == 16
    sparsify = read_decoder(SPARSIFY)
    assert sparsify.version == "sparsify ≥ 1.0" and sparsify.details["architecture"] == "sae (topk, k=4)"
    assert read_decoder(GEMMA).version == "Gemma Scope (params.npz)"


def test_saelens_before_6_and_its_dead_latents(tmp_path):
    directory = shutil.copytree(SAELENS, tmp_path / "old")
    flat = {
        "d_in": 8,
        "d_sae": 16,
        "hook_point": "blocks.3.hook_resid_post",
        "hook_layer": 3,
        "model_name": "pythia-70m",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4},
        "l0": 4.0,
    }
    (directory / "cfg.json").write_bytes(orjson.dumps(flat))
    # log10 feature density + 1e-10: three latents never fired
    density = np.full(16, -3.0, dtype=np.float32)
    density[[2, 5, 9]] = -10.0
    save_file({"sparsity": density}, str(directory / "sparsity.safetensors"))
    decoder = read_decoder(directory)
    assert decoder.version == "SAELens < 6.0 (flat cfg.json)"
    assert decoder.details == {
        "hook_name": "blocks.3.hook_resid_post",
        "model_name": "pythia-70m",
        "architecture": "topk",
        "d_sae": 16,
        "d_in": 8,
        "l0": 4.0,
        "dead_latents": 3,
    }


def test_older_sparsify_configs_are_recognised(tmp_path):
    directory = shutil.copytree(SPARSIFY, tmp_path / "old")
    (directory / "cfg.json").write_bytes(
        orjson.dumps(
            {"expansion_factor": 2, "normalize_decoder": True, "num_latents": 0, "k": 4, "signed": False, "d_in": 8}
        )
    )
    decoder = read_decoder(directory)
    assert decoder.version == "EleutherAI/sae (sparsify < 1.0)" and decoder.weights.shape == (16, 8)


def test_a_repository_of_hookpoints_gives_the_runs_one(tmp_path):
    from sae_atlas.sources.decoder import declared_width

    root = tmp_path / "repository"
    for name in ("layers.3.mlp", "layers.4.mlp"):
        shutil.copytree(SPARSIFY, root / name)
    (root / "config.json").write_bytes(orjson.dumps({"model": "EleutherAI/pythia-70m"}))
    decoder = read_decoder(root, hookpoint="layers.4.mlp")
    assert decoder.files[-1] == root / "layers.4.mlp" / "sae.safetensors"
    assert any("'layers.4.mlp' chosen" in note for note in decoder.notes)
    assert read_decoder(root, hookpoint="gpt_neox.layers.3.mlp").files[-1].parent.name == "layers.3.mlp"
    assert declared_width(root) == 16  # every hookpoint's SAE has 16 latents
    with pytest.raises(DecoderError, match=r"holds 2 hookpoint directories .* none is the runs' hookpoint 'layers\.9'"):
        read_decoder(root, hookpoint="layers.9")


def test_a_malformed_sparsity_file_is_no_dead_latent_count(tmp_path):
    directory = shutil.copytree(SAELENS, tmp_path / "saelens")
    (directory / "sparsity.safetensors").write_bytes(b"junk")
    decoder = read_decoder(directory)
    assert "dead_latents" not in decoder.details and decoder.weights.shape == (16, 8)


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int32])
def test_integer_weights_are_refused_with_one_line(tmp_path, dtype):
    """An int8 tensor or bf16 bits kept as uint16 are codes, not weights: using them as numbers
    gives wrong neighbours without a word."""
    directory = shutil.copytree(SAELENS, tmp_path / "saelens")
    tensors = load_file(str(directory / "sae_weights.safetensors"))
    save_file({**tensors, "W_dec": (tensors["W_dec"] * 100).astype(dtype)}, str(directory / "sae_weights.safetensors"))
    with pytest.raises(DecoderError, match=f"W_dec holds {np.dtype(dtype).name} values"):
        read_decoder(directory)
    archive = tmp_path / "params.npz"
    np.savez(archive, W_dec=np.zeros((16, 8), dtype=dtype))
    with pytest.raises(DecoderError, match="not floating-point weights"):
        read_decoder(archive)


def test_a_width_the_decoder_contradicts_decides_nothing(tmp_path):
    """cfg.json says d_sae = 4 beside a 16-row W_dec: the decoder is refused, and its declared
    width is not believed either; a consistent one is."""
    from sae_atlas.sources.decoder import declared_width

    directory = shutil.copytree(SAELENS, tmp_path / "saelens")
    assert declared_width(directory) == 16
    config = orjson.loads((directory / "cfg.json").read_bytes())
    (directory / "cfg.json").write_bytes(orjson.dumps({**config, "d_sae": 4}))
    with pytest.raises(DecoderError):
        read_decoder(directory)
    assert declared_width(directory) is None
    archive = tmp_path / "params.npz"
    np.savez(archive, W_dec=np.zeros((16, 8), np.float32), threshold=np.zeros(4, np.float32))
    assert declared_width(archive) is None
    np.savez(archive, W_dec=np.zeros((16, 8), np.float32), threshold=np.zeros(16, np.float32))
    assert declared_width(archive) == 16

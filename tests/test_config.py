from pathlib import Path

import pytest

from sae_atlas.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sae-atlas.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_config_gets_defaults_and_resolves_paths(tmp_path):
    config = load_config(write(tmp_path, '[[sources]]\npath = "raw/run-a"\n'))
    assert config.sources[0].path == (tmp_path / "raw" / "run-a").resolve()
    assert config.sources[0].name == "run-a"
    assert config.output_dir == (tmp_path / "master").resolve()
    assert config.embedding.model == "builtin:all-MiniLM-L6-v2"
    assert config.sampling.quantiles == 4 and config.sampling.per_quantile == 5 and config.sampling.window == 32
    assert config.output.embedding_dtype == "float32"
    assert config.activations is None and config.decoder is None
    assert config.embedding_cache_dir == config.output_dir / ".cache" / "embeddings"


def test_every_documented_key_is_accepted(tmp_path):
    config = load_config(
        write(
            tmp_path,
            """
sae_id = "google/gemma-scope-9b-pt-res/layer_30/width_16k/average_l0_120"
output_dir = "out"
[[sources]]
name = "llama_e-llama_s"
path = "raw/llama_e-llama_s"
explainer = "E"
scorer = "S"
[activations]
format = "delphi"
path = "raw/latents/layers.30"
tokenizer = "tokenizer.json"
[decoder]
path = "raw/sae/params.npz"
top_k = 5
[embedding]
model = "google/embeddinggemma-300m"
batch_size = 32
device = "cpu"
quantize = "int8"
[sampling]
quantiles = 5
per_quantile = 3
window = 16
[output]
embedding_dtype = "int8"
compression = "snappy"
""",
        )
    )
    assert config.sources[0].explainer == "E"
    assert config.activations.tokenizer == (tmp_path / "tokenizer.json").resolve()
    assert config.decoder.top_k == 5
    assert config.embedding.quantize == "int8"
    assert config.output.embedding_dtype == "int8"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "sources"),
        ('[[sources]]\npath = "a"\n[decoder]\npath = "w.npz"\ntop_k = 0\n', "decoder.top_k"),
        ('[[sources]]\npath = "a"\n[embeding]\nmodel = "x"\n', "embeding"),
        ('[[sources]]\npath = "a"\n[[sources]]\npath = "b/a"\n', "unique"),
        ('[[sources]]\npath = "a"\n[activations]\nformat = "delphi"\npath = "x"\n', "tokenizer"),
        ("[[sources]\n", "not valid TOML"),
    ],
)
def test_bad_configs_fail_with_one_line_naming_the_file(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and fragment in message and "\n" not in message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")


PYTHIA_RUN = Path(__file__).parent / "fixtures" / "raw-formats" / "results" / "pythia-demo"


@pytest.mark.parametrize(
    ("section", "device", "fragment"),
    [
        ("embedding", "tpu", "embedding.device = 'tpu' is not a device"),
        ("embedding", "cuda:7", "embedding.device = 'cuda:7' is not available on this machine"),
        ("decoder", "mps", "decoder.device = 'mps' is not available on this machine"),
    ],
)
def test_devices_are_checked_before_the_run_starts(tmp_path, section, device, fragment):
    """Not 20 s into the run as an unexpected RuntimeError: one line, and nothing written."""
    import subprocess
    import sys

    decoder = Path(__file__).parent / "fixtures" / "raw-formats" / "saelens" / "blocks.3.hook_resid_post"
    device_line = f'device = "{device}"\n'
    text = f'output_dir = "out"\n[[sources]]\npath = "{PYTHIA_RUN}"\n'
    text += f'[decoder]\npath = "{decoder}"\n' + (device_line if section == "decoder" else "")
    text += "[embedding]\n" + (device_line if section == "embedding" else "")
    path = write(tmp_path, text)
    result = subprocess.run(
        [sys.executable, "-m", "sae_atlas", "run", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "unexpected" not in result.stderr
    assert not (tmp_path / "out").exists()

"""Activation record readers: activations.jsonl + prompts.json, and delphi latent-cache shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
from safetensors.numpy import load_file, save_file

from sae_atlas.problems import Problems, StrictModeError
from sae_atlas.sources.activations import read_delphi_cache, read_jsonl, token_strings
from tests.conftest import PYTHIA_RUN

PROMPTS = [["<bos>", "▁The", "▁end", "▁of", "▁the", "▁road"], ["<bos>", "▁A", "▁piece", "▁of", "▁cake"]]


def write_jsonl(directory: Path, lines: list, prompts=PROMPTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "prompts.json").write_bytes(orjson.dumps(prompts))
    with (directory / "activations.jsonl").open("wb") as handle:
        for line in lines:
            handle.write(line if isinstance(line, bytes) else orjson.dumps(line))
            handle.write(b"\n")
    return directory


def record(index, prompt, pairs):
    return {"index": index, "dataSetPromptId": prompt, "sparseValues": pairs}


def as_rows(records):
    rows = []
    for i in range(len(records)):
        start, stop = records.offsets[i], records.offsets[i + 1]
        rows.append(
            (
                int(records.feature_id[i]),
                int(records.prompt_id[i]),
                list(
                    zip(
                        records.positions[start:stop].tolist(),
                        np.round(records.values[start:stop].astype(np.float64), 3).tolist(),
                        strict=True,
                    )
                ),
            )
        )
    return rows


def test_jsonl_records_are_sorted_and_accept_string_or_int_ids(tmp_path):
    directory = write_jsonl(
        tmp_path,
        [
            record("877", 1, [[3, 4.125], [1, 0.5]]),
            record(12, 0, [[3, 9.5]]),
            record("12", 1, [[2, 1.0]]),
        ],
    )
    problems = Problems()
    records = read_jsonl(directory, problems)
    assert not problems.items
    assert as_rows(records) == [(12, 0, [(3, 9.5)]), (12, 1, [(2, 1.0)]), (877, 1, [(1, 0.5), (3, 4.125)])]
    assert records.prompts.to_pylist() == PROMPTS


@pytest.mark.parametrize(
    ("bad_line", "fragment"),
    [
        (b'{"index": "5", "dataSetPromptId": 0, "sparseVal', "invalid JSON"),
        (record("abc", 0, [[1, 1.0]]), "is not a latent id"),
        (record("5", "0", [[1, 1.0]]), "dataSetPromptId '0' is not an integer"),
        (record("5", 0, [[1, "x"]]), "non-numeric position or value"),
        (record("5", 0, [1, 2]), "not a list of [position, value] pairs"),
        ({"index": "5", "dataSetPromptId": 0}, "missing key 'sparseValues'"),
        (record("5", 7, [[1, 1.0]]), "prompt id 7 is out of range"),
        (record("5", -1, [[1, 1.0]]), "negative prompt id -1"),
        (record("5", 1, [[5, 1.0]]), "token position 5 is outside prompt 1 (length 5)"),
        (record("5", 1, [[1.5, 1.0]]), "token position 1.5 is outside prompt 1"),
        (b"[1, 2, 3]", "expected a JSON object, got list"),
        (record("4294967296", 0, [[1, 1.0]]), "latent 4294967296 is beyond the largest feature id"),
        (record("9" * 40, 0, [[1, 1.0]]), "is beyond the largest feature id the outputs hold"),
        (record(2**40, 0, [[1, 1.0]]), "latent 1099511627776 is beyond the largest feature id"),
        (record("5", 2**40, [[1, 1.0]]), "prompt id 1099511627776 is out of range"),
    ],
)
def test_a_bad_jsonl_line_is_reported_with_file_and_line_and_nothing_else_is_lost(tmp_path, bad_line, fragment):
    directory = write_jsonl(tmp_path, [record("1", 0, [[1, 1.0]]), bad_line, record("2", 1, [[2, 2.0]])])
    problems = Problems()
    records = read_jsonl(directory, problems)
    assert [int(feature) for feature in records.feature_id] == [1, 2]
    [problem] = problems.items
    assert problem.file == str(directory / "activations.jsonl")
    assert problem.line == 2
    assert fragment in problem.message
    assert "\n" not in str(problem)


def test_duplicate_records_keep_the_first(tmp_path):
    directory = write_jsonl(tmp_path, [record("1", 0, [[1, 1.0]]), record("1", 0, [[2, 7.0]])])
    problems = Problems()
    records = read_jsonl(directory, problems)
    assert as_rows(records) == [(1, 0, [(1, 1.0)])]
    assert problems.items[0].kind == "duplicate" and problems.items[0].line == 2


def test_strict_mode_fails_on_the_first_bad_line(tmp_path):
    directory = write_jsonl(tmp_path, [record("1", -3, [[1, 1.0]])])
    with pytest.raises(StrictModeError, match=r"activations.jsonl:1.*negative prompt id"):
        read_jsonl(directory, Problems(strict=True))


def test_unusable_prompts_json_is_one_problem_not_one_per_record(tmp_path):
    directory = write_jsonl(tmp_path, [record("1", 0, [[1, 1.0]])] * 3)
    (directory / "prompts.json").write_text('[["▁a", "▁b"], ["▁c"')
    problems = Problems()
    records = read_jsonl(directory, problems)
    assert len(records) == 0
    assert [Path(problem.file).name for problem in problems] == ["prompts.json", "activations.jsonl"]


def test_a_prompt_of_the_wrong_type_drops_only_its_records(tmp_path):
    directory = write_jsonl(
        tmp_path, [record("1", 0, [[1, 1.0]]), record("2", 1, [[1, 1.0]])], prompts=[["▁a", "▁b"], ["▁c", 3]]
    )
    problems = Problems()
    records = read_jsonl(directory, problems)
    assert [int(feature) for feature in records.feature_id] == [1]
    messages = [str(problem) for problem in problems]
    assert any(
        "prompts.json" in message and "prompt 1 is not a list of token strings" in message for message in messages
    )
    assert any("activations.jsonl:2" in message for message in messages)


# -- delphi latent cache ----------------------------------------------------------------------


@pytest.fixture
def wordlevel_tokenizer(tmp_path) -> Path:
    """A SentencePiece-like vocabulary large enough for the pythia example ids."""
    from tokenizers import Tokenizer, models

    vocabulary = {f"▁w{index}": index for index in range(50_304)}
    vocabulary["<0x0A>"] = 50_304
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel(vocabulary, unk_token="▁w0")).save(str(path))
    return path


def test_delphi_shards_match_a_direct_decoding(wordlevel_tokenizer):
    directory = PYTHIA_RUN / "latents" / "layers.3.mlp"
    problems = Problems()
    records = read_delphi_cache(directory, wordlevel_tokenizer, problems)
    assert not problems.items
    expected = {}
    for path in sorted(directory.glob("*.safetensors")):
        start = int(path.stem.split("_")[0])
        data = load_file(str(path))
        for (sequence, position, latent), value in zip(data["locations"].astype(int), data["activations"], strict=True):
            expected.setdefault((latent + start, sequence), []).append((position, float(value)))
        tokens = data["tokens"]
    assert len(records) == len(expected)
    assert records.offsets[-1] == sum(len(pairs) for pairs in expected.values())
    for row, (feature, prompt, pairs) in enumerate(as_rows(records)):
        assert pairs == sorted((p, round(v, 3)) for p, v in expected[feature, prompt])
        if row == 0:
            assert records.prompts[prompt].as_py() == [f"▁w{token}" for token in tokens[prompt]]


def test_malformed_shards_are_reported_and_the_others_read(tmp_path, wordlevel_tokenizer):
    directory = shutil.copytree(PYTHIA_RUN / "latents" / "layers.3.mlp", tmp_path / "cache")
    (directory / "shard-a.safetensors").write_bytes(b"junk")  # name does not parse
    (directory / "64_95.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")  # corrupt
    good = load_file(str(directory / "0_31.safetensors"))
    save_file(
        {"locations": good["locations"][:, :2].copy(), "activations": good["activations"], "tokens": good["tokens"]},
        str(directory / "96_127.safetensors"),
    )  # wrong shape
    problems = Problems()
    records = read_delphi_cache(directory, wordlevel_tokenizer, problems)
    assert set(np.unique(records.feature_id // 32)) == {0, 1}  # both good shards fully read
    by_file = {Path(problem.file).name: problem for problem in problems}
    assert by_file["shard-a.safetensors"].kind == "foreign"
    assert "does not parse" in by_file["shard-a.safetensors"].message
    assert "unreadable safetensors" in by_file["64_95.safetensors"].message
    assert "do not match activations" in by_file["96_127.safetensors"].message


def test_legacy_cache_without_tokens_is_reported(tmp_path, wordlevel_tokenizer):
    directory = tmp_path / "cache"
    directory.mkdir()
    data = load_file(str(PYTHIA_RUN / "latents" / "layers.3.mlp" / "0_31.safetensors"))
    save_file({"locations": data["locations"], "activations": data["activations"]}, str(directory / "0_31.safetensors"))
    problems = Problems()
    assert len(read_delphi_cache(directory, wordlevel_tokenizer, problems)) == 0
    assert "no shard has a 'tokens' matrix" in problems.items[0].message


def test_byte_level_tokens_are_decoded_like_delphi_str_tokens(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        ["the end of the road\nand the cake"] * 20,
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    path = tmp_path / "bpe.json"
    tokenizer.save(str(path))
    ids = tokenizer.encode("the end\nof").ids
    strings = token_strings(path, np.array(ids), Problems()).to_pylist()
    assert "".join(strings) == "the end\nof"
    assert " end" in strings


def test_unreadable_tokenizer_is_one_problem(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    problems = Problems()
    assert token_strings(path, np.array([1, 2]), problems) is None
    assert problems.items[0].file == str(path)


# -- streaming: any order, any size, memory bounded by the block -------------------------------


def random_jsonl(directory: Path, n_features: int, records_per_feature: int, seed: int = 0) -> Path:
    """A jsonl input in random line order, with a few duplicates and bad lines among them."""
    rng = np.random.default_rng(seed)
    prompts = [[f"▁t{index}" for index in range(12)] for _ in range(40)]
    lines = []
    for feature in range(n_features):
        for prompt in rng.choice(40, records_per_feature, replace=False):
            pairs = sorted(
                {int(position): round(float(rng.uniform(0.1, 9)), 3) for position in rng.integers(0, 12, 3)}.items()
            )
            lines.append(record(str(feature), int(prompt), [list(pair) for pair in pairs]))
    lines.append(record("3", int(lines[0]["dataSetPromptId"]) if lines[0]["index"] == "3" else 0, [[1, 1.0]]))
    lines.append(record("2", 0, [[99, 1.0]]))  # outside its prompt
    order = rng.permutation(len(lines))
    return write_jsonl(directory, [lines[index] for index in order], prompts=prompts)


def test_spilled_streams_give_the_records_an_in_memory_read_gives(tmp_path):
    from sae_atlas.sources.activations import stream_jsonl
    from sae_atlas.sources.buckets import FeatureBuckets

    directory = random_jsonl(tmp_path / "input", n_features=300, records_per_feature=6)
    whole_problems, spilled_problems = Problems(), Problems()
    whole = read_jsonl(directory, whole_problems)
    buckets = FeatureBuckets(tmp_path / "scratch", bucket_features=16, memory_pairs=200)
    stream = stream_jsonl(directory, spilled_problems, lines_per_batch=37, buckets=buckets)
    blocks = list(stream)
    assert buckets.flushes > 10 and len(blocks) == 300 // 16 + 1
    spilled = [row for block in blocks for row in as_rows(block)]
    assert spilled == as_rows(whole)
    # sorted by (feature, prompt) whatever the line order
    keys = [(feature, prompt) for feature, prompt, _ in spilled]
    assert keys == sorted(keys)
    assert sorted(map(str, spilled_problems)) == sorted(map(str, whole_problems))
    assert {problem.kind for problem in whole_problems} >= {"malformed"}
    assert not (tmp_path / "scratch").exists() or not any((tmp_path / "scratch").iterdir())


def test_delphi_shards_read_in_slices_give_the_same_records(wordlevel_tokenizer):
    from sae_atlas.sources.activations import stream_delphi_cache
    from sae_atlas.sources.buckets import FeatureBuckets

    directory = PYTHIA_RUN / "latents" / "layers.3.mlp"
    whole = read_delphi_cache(directory, wordlevel_tokenizer, Problems())
    sliced = stream_delphi_cache(
        directory,
        wordlevel_tokenizer,
        Problems(),
        slice_rows=7,
        buckets=FeatureBuckets(bucket_features=4, memory_pairs=50),
    ).collect()
    assert as_rows(sliced) == as_rows(whole) and len(whole) > 20


@pytest.mark.slow
def test_reader_peak_memory_does_not_grow_with_the_number_of_records(tmp_path):
    """Reading 8× the records (8× the features, same density) peaks at about the same memory: the
    reader holds one batch of lines, the in-memory budget of buckets and one block, never the input."""
    import tracemalloc

    from sae_atlas.sources.activations import stream_jsonl
    from sae_atlas.sources.buckets import FeatureBuckets

    def peak(n_features: int) -> tuple[int, int]:
        directory = random_jsonl(tmp_path / f"input-{n_features}", n_features=n_features, records_per_feature=8)
        buckets = FeatureBuckets(tmp_path / f"scratch-{n_features}", bucket_features=512, memory_pairs=20_000)
        tracemalloc.start()
        stream = stream_jsonl(directory, Problems(), lines_per_batch=2000, buckets=buckets)
        records = sum(len(block) for block in stream)
        _, highest = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return records, highest

    peak(64)  # imports and caches warmed, so they count in neither measurement
    small_records, small_peak = peak(2000)
    large_records, large_peak = peak(16000)
    assert large_records >= 7.5 * small_records
    assert large_peak < 1.3 * small_peak, (small_peak, large_peak)


@pytest.mark.parametrize("clean_up", [True, False])
def test_byte_level_tokens_follow_clean_up_tokenization_spaces_as_transformers_does(tmp_path, clean_up):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        ["the end . and the cake , is n't it ? we 're here"] * 20,
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    (tmp_path / "tokenizer_config.json").write_bytes(orjson.dumps({"clean_up_tokenization_spaces": clean_up}))
    ids = tokenizer.encode("the end . and the cake , is n't it ? we 're here").ids
    problems = Problems()
    strings = token_strings(path, np.array(ids), problems).to_pylist()
    assert not problems.items
    # delphi's str_tokens: batch_decode of one token at a time, with the transformers 4.x that delphi's
    # vllm pins, which cleaned up BPE tokens too (transformers 5 needs the override to do it)
    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        clean_up_tokenization_spaces=clean_up,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True,
    )
    assert strings == reference.batch_decode([[token] for token in ids])
    assert ("." in strings) == clean_up and (" ." in strings) != clean_up


def test_a_malformed_tokenizer_config_is_reported_and_ignored(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["a . b"] * 10, trainers.BpeTrainer(vocab_size=270))
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    (tmp_path / "tokenizer_config.json").write_bytes(b'{"clean_up_tokenization_spaces": "yes"')
    problems = Problems()
    assert token_strings(path, np.array(tokenizer.encode("a . b").ids), problems) is not None
    [problem] = problems.items
    assert problem.file.endswith("tokenizer_config.json") and "not valid JSON" in problem.message

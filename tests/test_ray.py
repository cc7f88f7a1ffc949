"""The Ray engine against the local one, on a Ray instance of its own and on a two-node cluster
started for the test (its own temp dir and ports; exactly the processes it started are stopped)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pytest
from polars.testing import assert_frame_equal

from sae_atlas.config import load_config
from sae_atlas.layout import read_sidecar
from sae_atlas.pipeline import Pipeline
from sae_atlas.stages import REGISTERED, activation_embeddings
from sae_atlas.synth import SynthOptions, synthesize

pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).with_name("ray"))
EMBEDDING_COLUMNS = {"explanation_embeddings.parquet": "embedding", "activation_embeddings.parquet": "embeddings"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray-corpus")
    synthesize(root, SynthOptions(features=384, explained=24, explainers=2, scorers=2, prompts=200, d_model=64))
    return root


@pytest.fixture(scope="module")
def local_output(corpus) -> Path:
    config = load_config(corpus / "sae-atlas.toml")
    Pipeline(config).run()
    return Path(config.output_dir)


def ray_config(corpus: Path, name: str, address: str | None = None, **execution):
    config = load_config(corpus / "sae-atlas.toml")
    settings = config.execution.model_validate({"engine": "ray", "address": address, **execution})
    return config.model_copy(update={"execution": settings, "output_dir": corpus / name})


def vectors(frame: pl.DataFrame, column: str) -> np.ndarray:
    values = frame[column]
    while values.dtype.inner is not None and isinstance(values.dtype.inner, pl.List):
        values = values.explode()
    values = values.drop_nulls()
    return np.array(values.to_list(), dtype=np.float64)


def assert_same_outputs(local: Path, other: Path) -> None:
    """Every Parquet file of ``local`` is in ``other`` with identical contents, embeddings included
    (the same batches give the same bytes, whatever process or thread count encodes them)."""
    files = sorted(path.relative_to(local) for path in local.rglob("*.parquet") if ".cache" not in path.parts)
    assert files
    for name in files:
        mine, theirs = pl.read_parquet(local / name), pl.read_parquet(other / name)
        assert_frame_equal(mine, theirs, check_exact=True)
        column = EMBEDDING_COLUMNS.get(str(name))
        if column is not None:
            assert len(vectors(mine, column)) > 0


def test_ray_without_an_address_starts_its_own_instance_and_matches_local(corpus, local_output):
    import ray

    config = ray_config(corpus, "ray-own")
    report = Pipeline(config).run()
    assert [outcome.status for outcome in report.outcomes] == ["ran"] * len(REGISTERED)
    assert not ray.is_initialized()  # the instance it started is gone
    assert_same_outputs(local_output, config.output_dir)


def test_int8_on_ray_ships_the_drivers_model_and_gives_the_local_vectors(corpus, monkeypatch):
    """quantize = "int8": the driver exports the ONNX model once; actors run it from the bytes
    shipped through the object store. int8 vectors depend on the batch they are encoded in, so
    this checks, over many stage 4 chunks, that Ray encodes exactly the local engine's batches."""
    monkeypatch.setattr(activation_embeddings, "CHUNK_WINDOWS", 400)
    stages = ["explanation_embeddings", "activation_examples", "activation_embeddings"]
    config = load_config(corpus / "sae-atlas.toml")
    settings = config.embedding.model_copy(update={"quantize": "int8"})
    local = config.model_copy(update={"embedding": settings, "output_dir": corpus / "int8-local"})
    Pipeline(local).run(stages)
    on_ray = ray_config(corpus, "int8-ray").model_copy(update={"embedding": settings})
    report = Pipeline(on_ray).run(stages)
    assert [outcome.status for outcome in report.outcomes] == ["ran"] * 3
    exported = list((on_ray.output_dir / ".cache" / "embeddings" / "onnx").rglob("*.onnx"))
    assert len(exported) == 1  # built once, by the driver
    assert_same_outputs(local.output_dir, on_ray.output_dir)
    windows = read_sidecar(on_ray.output_dir / "activation_embeddings.parquet")["statistics"]["windows"]
    assert windows > 3 * 400  # several chunks


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free now (held open together, so the kernel cannot repeat one)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class Cluster:
    """A head and a worker node started with ``ray start`` on this machine, one CPU each."""

    def __init__(self, temp_dir: Path):
        self.temp_dir = temp_dir
        node_ports = (
            "node-manager-port",
            "object-manager-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
        )
        # Every port of both nodes drawn at once, so none repeats; worker ports below the kernel's
        # ephemeral range (32768 and up), where the drawn ones cannot fall.
        drawn = iter(free_ports(3 + 2 * len(node_ports)))
        self.port = next(drawn)
        self.address = f"127.0.0.1:{self.port}"
        self.processes: list[psutil.Process] = []
        # Token authentication, as Ray's own local clusters use: every node and the driver read
        # the token from Ray's default place (~/.ray/auth_token). `ray start` never makes one:
        # `get-auth-token --generate` does, only where none exists (printed, so captured).
        environment = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True, env=environment)
        head = ["--head", "--port", str(self.port), "--temp-dir", str(temp_dir), "--include-dashboard", "false"]
        head += ["--ray-client-server-port", str(next(drawn)), "--dashboard-port", str(next(drawn))]
        low = 20_000 + 200 * (os.getpid() % 60)
        try:
            for index, arguments in enumerate((head, ["--address", self.address])):
                own = [item for name in node_ports for item in (f"--{name}", str(next(drawn)))]
                first = low + 100 * index
                workers = ["--min-worker-port", str(first), "--max-worker-port", str(first + 99)]
                command = [RAY, "start", *arguments, "--num-cpus", "1", "--disable-usage-stats", *own, *workers]
                started = subprocess.run(command, capture_output=True, text=True, env=environment)
                self.processes = self._started()
                assert started.returncode == 0, started.stderr[-2000:]
        except BaseException:
            self.stop()
            raise

    def _started(self) -> list[psutil.Process]:
        """The cluster's daemons: the processes whose command line names this cluster's temp dir or
        its GCS port (the Ray client server names only the latter)."""
        marks = (str(self.temp_dir), f":{self.port}")
        found = []
        for process in psutil.process_iter(["cmdline"]):
            if any(mark in part for part in process.info["cmdline"] or [] for mark in marks):
                found.append(process)
        return found

    def descendants(self) -> list[psutil.Process]:
        family = []
        for process in self.processes:
            try:
                family.extend(process.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return family

    def stop(self) -> None:
        """Stop exactly the processes this cluster started, and their children."""
        members = {process.pid: process for process in [*self.processes, *self.descendants(), *self._started()]}
        for process in members.values():
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(list(members.values()), timeout=10)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # A short path: Ray's socket paths under the temp dir must stay within the OS limit (107 bytes).
    temp_dir = Path(tempfile_short())
    mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"  # the driver (this process) authenticates like the nodes
    started = Cluster(temp_dir)
    try:
        assert len({process.pid for process in started.processes}) >= 4  # gcs, two raylets, …
        yield started
    finally:
        started.stop()
        if mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = mode


def tempfile_short() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="sa-ray-", dir="/tmp")


def test_a_two_node_cluster_gives_the_local_outputs(corpus, local_output, cluster):
    import ray

    config = ray_config(corpus, "ray-cluster", address=cluster.address, embedding_actors=2)
    report = Pipeline(config).run()
    assert [outcome.status for outcome in report.outcomes] == ["ran"] * len(REGISTERED)
    assert not ray.is_initialized()
    assert_same_outputs(local_output, config.output_dir)
    assert all(process.is_running() for process in cluster.processes)  # joining left the cluster up


def test_killing_an_embedding_actor_mid_stage_changes_nothing(corpus, local_output, cluster):
    config = ray_config(corpus, "ray-fault", address=cluster.address, embedding_actors=2)
    killed: list[int] = []
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["report"] = Pipeline(config).run()
        except BaseException as error:  # reported by the assertion below
            outcome["error"] = error

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 600
    while runner.is_alive() and not killed and time.monotonic() < deadline:
        for process in cluster.descendants():
            try:
                title = " ".join(process.cmdline()) + process.name()
                working = "EmbeddingActor" in title and time.time() - process.create_time() > 2
            except psutil.NoSuchProcess:
                continue
            if working:
                process.kill()
                killed.append(process.pid)
                break
        time.sleep(0.2)
    runner.join()
    assert killed, "no embedding actor was seen to kill"
    assert "error" not in outcome, outcome.get("error")
    assert [item.status for item in outcome["report"].outcomes] == ["ran"] * len(REGISTERED)
    assert_same_outputs(local_output, config.output_dir)


def run_elsewhere(corpus: Path, tmp_path: Path, *arguments: str, env: dict | None = None, execution: str = ""):
    """``sae-atlas run`` of the corpus into tmp_path/out in its own process: (result, seconds)."""
    config = (
        (corpus / "sae-atlas.toml").read_text().replace('output_dir = "master"', f'output_dir = "{tmp_path / "out"}"')
    )
    path = tmp_path / "sae-atlas.toml"
    path.write_text(config.replace('path = "raw/', f'path = "{corpus}/raw/') + execution)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sae_atlas", "run", str(path), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    return result, time.monotonic() - started


def test_an_unreachable_cluster_is_one_line_and_writes_nothing(corpus, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    result, seconds = run_elsewhere(corpus, tmp_path, "--ray-address", address)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and address in lines[0] and "no Ray cluster" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
    assert seconds < 60


class HttpServer:
    """An HTTP server on a free loopback port (IPv4 or IPv6), answering every request with 404."""

    def __init__(self, host: str = "127.0.0.1"):
        import http.server

        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.server = Server((host, 0), http.server.BaseHTTPRequestHandler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "[::1]:{port}"])
def test_an_address_where_something_else_listens_is_one_line_within_30_s(corpus, tmp_path, form):
    """An HTTP server accepts the TCP connection; Ray would retry against it for minutes."""
    server = HttpServer("::1" if "::1" in form else "127.0.0.1")
    try:
        address = form.format(port=server.port)
        result, seconds = run_elsewhere(corpus, tmp_path, "--ray-address", address)
    finally:
        server.close()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and address in lines[0] and "something else listens there" in lines[0], result.stderr
    assert seconds < 30 and not (tmp_path / "out").exists()


def test_gpus_per_actor_on_a_cluster_without_gpus_is_one_line(corpus, tmp_path):
    """Ray would wait for ever for an actor no node can place."""
    result, seconds = run_elsewhere(corpus, tmp_path, execution='[execution]\nengine = "ray"\ngpus_per_actor = 1\n')
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gpus_per_actor = 1 but the Ray cluster has 0 GPU(s)" in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and seconds < 120


def test_an_empty_address_is_refused_not_taken_for_none(corpus, tmp_path):
    result, _ = run_elsewhere(corpus, tmp_path, "--ray-address", "")
    assert result.returncode == 1 and "an empty address" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_addresses_are_parsed_in_every_form():
    from sae_atlas.ray_engine import split_address

    assert split_address("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert split_address("[::1]:6379") == ("::1", 6379)
    assert split_address("ray://head.example:10001") == ("head.example", 10001)
    assert split_address(":6379") == ("127.0.0.1", 6379)
    for bad in ("head", "head:port", "head:70000"):
        with pytest.raises(ValueError):
            split_address(bad)


def test_a_token_cluster_joined_without_its_token_is_one_line(corpus, tmp_path, cluster):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
    environment["HOME"] = str(tmp_path / "home")  # no ~/.ray/auth_token there
    result, seconds = run_elsewhere(corpus, tmp_path, "--ray-address", cluster.address, env=environment)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and cluster.address in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and seconds < 60


def test_a_config_names_the_engine(tmp_path):
    from sae_atlas.config import AtlasConfig, ConfigError, load_config

    path = tmp_path / "sae-atlas.toml"
    path.write_text('sae_id = "x"\n[[sources]]\npath = "."\n[execution]\nengine = "ray"\naddress = "auto"\n')
    config = load_config(path)
    assert config.execution.engine == "ray" and config.execution.address == "auto"
    assert AtlasConfig.model_fields["execution"].default.engine == "local"
    path.write_text('sae_id = "x"\n[[sources]]\npath = "."\n[execution]\nengine = "spark"\n')
    with pytest.raises(ConfigError):
        load_config(path)

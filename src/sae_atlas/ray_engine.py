"""The Ray engine: the heavy stages on a Ray cluster, with the local engine's outputs.

``[execution] engine = "ray"`` (or ``sae-atlas run --engine ray``) runs

- the stages' independent tasks (chunks of score and explanation files) as Ray tasks, and the
  decoder's row blocks as tasks reading one copy of the normalised ``W_dec`` from the object
  store (GPU tasks where the cluster has GPUs);
- embedding as a Ray Data ``map_batches`` over a pool of actors, each loading the model once (on
  its GPU when it has one). The driver forms the batches exactly as the local engine does (texts
  sorted by token count) and sends each as one item, so every vector is computed from the same
  batch as locally; for ``quantize = "int8"`` the driver exports the ONNX model once and ships its
  bytes through the object store.

Results come back keyed by position and are put in the local engine's order; Ray retries a task,
or restarts an actor and re-runs its batch, when a worker dies, so a lost worker changes nothing
in the output.

Without an address the engine starts a Ray instance on this machine for the run (its own temp
dir, no dashboard) and stops it at the end; with one (``"auto"``, ``"host:6379"``,
``"ray://host:10001"``) it joins that cluster and leaves it running. A cluster that does not
answer is reported in one line before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import ray

from sae_atlas.config import ExecutionConfig
from sae_atlas.engine import available_cores

CONNECT_SECONDS = 5.0  # ray.init on an address nobody listens at waits minutes; we ask first
IN_FLIGHT_PER_WORKER = 2  # tasks submitted ahead per CPU: enough to keep workers busy, bounded memory
CLIENT_PREFIX = "ray://"


class ClusterUnreachable(ConnectionError):
    """No Ray cluster answers at the configured address."""


# The client connection preface of HTTP/2 and an empty SETTINGS frame: a gRPC server (Ray's GCS
# and its client server) answers with a SETTINGS frame of its own; anything else (an HTTP/1 server,
# a database) does not, and ray.init would retry against it for minutes.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SETTINGS_FRAME = 0x04


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port``, ``[v6]:port`` or ``ray://`` either; ValueError otherwise."""
    host, separator, port = address.removeprefix(CLIENT_PREFIX).rpartition(":")
    if not separator or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(address)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "127.0.0.1", int(port)


def check_reachable(address: str, timeout: float = CONNECT_SECONDS) -> None:
    """Raise :class:`ClusterUnreachable` unless a gRPC server (a Ray cluster, or its client server
    for ``ray://``) answers at ``address``'s host:port within ``timeout``.

    ``"auto"`` is left to Ray, which fails at once when no cluster runs on this machine."""
    if address == "auto":
        return
    try:
        host, port = split_address(address)
    except ValueError:
        raise ClusterUnreachable(f"Ray address {address!r} is not host:port, ray://host:port or auto") from None
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a TLS cluster expects a handshake first: the TCP connection is all we check
            connection.settimeout(timeout)
            connection.sendall(HTTP2_PREFACE)
            answer = connection.recv(9)
    except OSError as error:
        raise ClusterUnreachable(
            f"no Ray cluster answers at {address} ({error.strerror or type(error).__name__})"
        ) from None
    if len(answer) < 4 or answer[3] != SETTINGS_FRAME:
        raise ClusterUnreachable(f"no Ray cluster answers at {address} (something else listens there, not gRPC)")


@contextlib.contextmanager
def quiet_stderr() -> Iterator[Path]:
    """Standard error, at the file-descriptor level (Ray's C++ core writes there), sent to a
    temporary file for the duration; yields its path, so that a failure can quote it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.NamedTemporaryFile(prefix="sae-atlas-ray-", suffix=".log") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield Path(log.name)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


class RayEngine:
    """Tasks and batch embedding on a Ray cluster (see the module docstring)."""

    batch_inference = True

    def __init__(self, execution: ExecutionConfig):
        self.execution = execution
        self.workers = 1
        self._owned = False
        self._temp_dir: Path | None = None

    def start(self) -> None:
        # Ray's C++ core logs warnings meant for Ray developers to the driver's stderr (e.g. that
        # Ray Data keeps actor constructor arguments in the object store); the run reports its own
        # problems. An explicit RAY_BACKEND_LOG_LEVEL wins.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        if ray.is_initialized():
            self._owned = False
        elif self.execution.address is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="sae-atlas-ray-"))
            with quiet_stderr():  # Ray's C++ core announces its log level on stderr
                ray.init(
                    num_cpus=available_cores(),
                    include_dashboard=False,
                    _temp_dir=str(self._temp_dir),
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                )
            self._owned = True
        else:
            check_reachable(self.execution.address)
            try:
                # Ray logs its retries and an authentication failure in many lines: the run says one.
                with quiet_stderr():
                    ray.init(address=self.execution.address, log_to_driver=False, logging_level=logging.ERROR)
            except Exception as error:  # ConnectionError, an authentication error, a version mismatch, …
                raise ClusterUnreachable(
                    f"cannot join the Ray cluster at {self.execution.address}: {first_line(error)}"
                ) from None
            self._owned = True  # our connection (the cluster itself stays up)
        self._quiet_ray_data()
        resources = ray.cluster_resources()
        self.workers = max(1, int(resources.get("CPU", 1)))
        wanted = self.execution.gpus_per_actor
        if wanted and resources.get("GPU", 0) < wanted:
            gpus = resources.get("GPU", 0)
            self.close()
            # Ray would wait for ever for an actor no node can place.
            raise ClusterUnreachable(
                f"gpus_per_actor = {wanted:g} but the Ray cluster has {gpus:g} GPU(s); "
                "set gpus_per_actor = 0 to embed on CPUs"
            )

    @staticmethod
    def _quiet_ray_data() -> None:
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the run's own progress bar reports the work
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # "execution finished in …" per job

    def _ensure_started(self) -> None:
        if not ray.is_initialized():
            self.start()

    def _ordered(self, submit: Callable, tasks: Sequence) -> Iterator:
        """Submit ``tasks`` a window at a time and yield their results in task order."""
        window = deque()
        pending = iter(tasks)
        limit = self.workers * IN_FLIGHT_PER_WORKER
        for task in pending:
            window.append(submit(task))
            if len(window) >= limit:
                break
        while window:
            result = ray.get(window.popleft())
            following = next(pending, None) if len(window) < limit else None
            if following is not None:
                window.append(submit(following))
            yield result

    def map(self, function: Callable, tasks: Sequence) -> Iterator:
        self._ensure_started()
        if len(tasks) <= 1:
            return map(function, tasks)
        remote = ray.remote(function)
        return self._ordered(lambda task: remote.remote(task), tasks)

    def map_shared(self, function: Callable, shared, tasks: Sequence, *, gpus: float = 0) -> Iterator:
        self._ensure_started()
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        remote = ray.remote(num_gpus=gpus if gpus and cluster_gpus else 0)(function)
        reference = ray.put(shared)  # once; each task reads it from its node's object store
        return self._ordered(lambda task: remote.remote(reference, task), tasks)

    def text_encoder(self, execution: ExecutionConfig) -> RayTextEncoder:
        return RayTextEncoder(self, execution)

    def close(self) -> None:
        if self._owned and ray.is_initialized():
            ray.shutdown()
        self._owned = False
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None


class EmbeddingActor:
    """One model per actor; each call encodes the pre-formed batches it is given."""

    def __init__(
        self,
        spec: str,
        device: str,
        quantize: str,
        threads: int,
        onnx_model: list | None = None,
        rows: int | None = None,
    ):
        self.rows = rows
        if onnx_model is not None:
            from sae_atlas.embedding_int8 import OnnxInt8Backend

            self.backend = OnnxInt8Backend(spec, threads=threads, onnx_model=ray.get(onnx_model[0]))
        else:
            from sae_atlas.embedding import Embedder

            self.backend = Embedder(spec, device=device, quantize=quantize, threads=threads).backend

    def __call__(self, items: dict) -> dict:
        positions = [np.asarray(batch, dtype=np.int64) for batch in items["positions"]]
        from sae_atlas.embedding import encode_filled

        vectors = [encode_filled(self.backend, list(texts), self.rows) for texts in items["texts"]]
        return {"position": np.concatenate(positions), "vector": np.concatenate(vectors)}


class RayTextEncoder:
    """Encodes an embedder's batches on a Ray Data actor pool (``Embedder(encoder=…)``)."""

    def __init__(self, engine: RayEngine, execution: ExecutionConfig):
        self.engine = engine
        self.execution = execution
        self._onnx_model = None

    def _actors(self) -> int:
        if self.execution.embedding_actors:
            return self.execution.embedding_actors
        resources = ray.cluster_resources()
        if self.execution.gpus_per_actor:
            return max(1, int(resources.get("GPU", 0) / self.execution.gpus_per_actor))
        return max(1, int(resources.get("CPU", 1) / self.execution.cpus_per_actor))

    def _shipped_model(self, embedder) -> list | None:
        """The int8 ONNX model the driver built, in the object store (once per run)."""
        model_file = getattr(embedder.backend, "model_file", None)
        if model_file is None:
            return None
        if self._onnx_model is None:
            self._onnx_model = [ray.put(Path(model_file).read_bytes())]  # a list: Ray passes the ref, not the bytes
        return self._onnx_model

    def encode(self, embedder, texts: Sequence[str], batches: list[np.ndarray], progress=None) -> np.ndarray:
        import ray.data

        self.engine._ensure_started()
        gpus = self.execution.gpus_per_actor
        device = "cuda" if gpus else "cpu"
        onnx_model = self._shipped_model(embedder) if embedder.int8 else None
        items = [{"texts": [texts[index] for index in batch], "positions": batch.tolist()} for batch in batches]
        actors = min(self._actors(), len(items))  # no actor without a batch to encode
        dataset = ray.data.from_items(items, override_num_blocks=min(len(items), actors * 4))
        encoded = dataset.map_batches(
            EmbeddingActor,
            batch_size=1,  # one pre-formed batch per call: the same batches as the local engine
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=self.execution.cpus_per_actor,
            num_gpus=gpus,
            fn_constructor_kwargs={
                "spec": embedder.model_spec,
                "device": device,
                "quantize": embedder.quantize if embedder.int8 else "none",
                "threads": max(1, int(self.execution.cpus_per_actor)),
                "onnx_model": onnx_model,
                "rows": embedder.full_rows,
            },
            batch_format="numpy",
        )
        vectors = np.zeros((len(texts), embedder.backend.dimension), dtype=np.float32)
        done = 0
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            vectors[batch["position"]] = batch["vector"]
            done += len(batch["position"])
            if progress:
                progress(done, len(texts))
        return vectors

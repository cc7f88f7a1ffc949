"""``quantize = "int8"``: CPU int8 inference for the embedding engine.

torch's dynamic int8 quantisation is fast but moves cosines too much (mean 0.94 against float32 on
this project's measurements). The route that keeps them (≥ 0.99) at ~1.8-2.4 × the float32
speed is ONNX Runtime: the sentence-transformers model (its whole module chain, pooling and any
Dense layers included, plus L2 normalisation) is exported with ``torch.onnx.export``, BERT-like
graphs are fused by ORT's transformer optimiser, and the weights are quantised per channel with
``quantize_dynamic``. The quantised file is built once per model and kept in the embedding cache.

A model whose graph cannot be exported falls back to torch's per-channel dynamic quantisation of
its Linear layers, with a note in the statistics: slower and less faithful, but it still works.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sae_atlas.embedding_models import SentenceTransformerBackend

EXPORT_VERSION = 1  # bump when the export recipe changes, so cached models are rebuilt
# Model types ORT's optimiser fuses as "bert" (attention, layer norm, GELU).
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "distilbert", "camembert", "electra", "mpnet"}


def _onnx_directory(cache_dir: Path | None, spec: str) -> Path:
    import onnxruntime
    import torch

    identity = f"{spec}|export={EXPORT_VERSION}|torch={torch.__version__}|ort={onnxruntime.__version__}"
    digest = hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()
    root = cache_dir if cache_dir is not None else Path(tempfile.gettempdir()) / "sae-atlas-onnx"
    return Path(root) / "onnx" / digest


def _exportable(model, input_names: list[str]):
    """The sentence-transformers pipeline as a module of plain tensors, normalised at the end."""
    import torch

    class Exportable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            features = dict(zip(input_names, tensors, strict=True))
            embedding = self.model(features)["sentence_embedding"]
            return torch.nn.functional.normalize(embedding, dim=-1)

    return Exportable().eval()


def build_int8_model(model, target: Path) -> None:
    """Export ``model`` (a SentenceTransformer) to ONNX, optimise and quantise it into ``target``."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    transformer = model[0].auto_model
    if hasattr(transformer, "set_attn_implementation"):
        transformer.set_attn_implementation("eager")  # ORT fuses the eager attention graph
    sample = model.tokenizer(["a short text", "a somewhat longer text to export"], padding=True, return_tensors="pt")
    input_names = [name for name in model.tokenizer.model_input_names if name in sample]
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names} | {"embedding": {0: "batch"}}
    with tempfile.TemporaryDirectory() as scratch:
        exported, optimised = Path(scratch) / "model.onnx", Path(scratch) / "optimised.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _exportable(model, input_names),
                tuple(sample[name] for name in input_names),
                str(exported),
                input_names=input_names,
                output_names=["embedding"],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
        config = transformer.config
        if getattr(config, "model_type", None) in BERT_LIKE:
            from onnxruntime.transformers.optimizer import optimize_model

            optimize_model(
                str(exported), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
            ).save_model_to_file(str(optimised))
        else:
            shutil.copyfile(exported, optimised)
        temporary = target.with_suffix(".tmp")
        target.parent.mkdir(parents=True, exist_ok=True)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ORT's quantiser gives advice on the root logger; not the user's concern
        try:
            quantize_dynamic(
                str(optimised),
                str(temporary),
                per_channel=True,
                weight_type=QuantType.QInt8,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        finally:
            root.setLevel(level)
        os.replace(temporary, target)


class OnnxInt8Backend(SentenceTransformerBackend):
    """The model quantised to int8 and run by ONNX Runtime on the CPU."""

    def __init__(
        self,
        spec: str,
        *,
        cache_dir: Path | None = None,
        threads: int | None = None,
        onnx_model: bytes | None = None,
    ):
        """``onnx_model``: the quantised model already built (elsewhere), used as it is."""
        import onnxruntime

        super().__init__(spec, device="cpu", threads=threads)
        self.note = None
        self.model_file: Path | None = None
        if onnx_model is None:
            target = _onnx_directory(cache_dir, spec) / "model-int8.onnx"
            try:
                if not target.exists():
                    build_int8_model(self.model, target)
            except Exception as error:  # export support varies by architecture: fall back, say so
                self.note = f"ONNX export failed ({type(error).__name__}); torch dynamic int8 used instead"
                self._torch_fallback()
                return
            self.model_file = target
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3
        source = onnx_model if onnx_model is not None else str(self.model_file)
        self.session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_names = [node.name for node in self.session.get_inputs()]

    def _torch_fallback(self) -> None:
        import torch

        self.session = None
        self.model = torch.ao.quantization.quantize_dynamic(
            self.model,
            {torch.nn.Linear},
            dtype=torch.qint8,
            qconfig_spec={torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
        )

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self.session is None:
            return super().encode(texts)
        batch = self.tokenize(texts, padding=True, return_tensors="np")
        (vectors,) = self.session.run(None, {name: batch[name].astype(np.int64) for name in self.input_names})
        return np.asarray(vectors, dtype=np.float32)

"""The Predictor protocol and its implementations (torch eager here; ONNX Runtime and TensorRT
are added by the export stage). compare.py and the SageMaker handler use these; nothing else
builds inference sessions by hand.

A batch is what :func:`bertopt.data.pad_batch` returns: a dict of int64 numpy arrays
``input_ids``, ``attention_mask`` and (for BERT) ``token_type_ids``, shape (batch, seq).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Predictor(Protocol):
    name: str        # e.g. "torch-fp32", "ort-int8"
    backend: str     # torch | onnxruntime | tensorrt
    precision: str   # fp32 | fp16 | bf16 | int8 | int4
    device: str      # cpu | cuda

    def predict_logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """float32 logits of shape (batch, num_labels)."""
        ...


class TorchPredictor:
    """PyTorch eager inference of a save_pretrained directory (or an already loaded model)."""

    backend = "torch"

    def __init__(self, model, name: str = "torch-fp32", device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None):
        import torch

        from . import modeling

        if threads:
            torch.set_num_threads(threads)
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            model = modeling.load_model(str(model))
        self.model = model.eval().to(device)
        self.name, self.device, self.precision = name, device, precision
        self._autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.input_names = ("input_ids", "attention_mask") + (
            ("token_type_ids",) if modeling.uses_token_type_ids(self.model) else ())

    def predict_logits(self, batch):
        import torch

        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device)
                  for k, v in batch.items() if k in self.input_names}
        with torch.inference_mode(), torch.autocast(torch.device(self.device).type, dtype=self._autocast,
                                                    enabled=self._autocast is not None):
            logits = self.model(**inputs).logits
        if self.device != "cpu":
            torch.cuda.synchronize()
        return logits.float().cpu().numpy()

"""The PyTorch FP32 reference every converted variant is checked against (ONNX and TensorRT
sub-stages): the source model, its eval split, the parity shapes and a seeded calibration sample,
each built lazily once."""
from __future__ import annotations

from functools import cached_property

import numpy as np

from . import export as ex
from .logs import progress


class Reference:
    """The PyTorch FP32 source, its eval split and calibration sample, built lazily once."""

    def __init__(self, cfg, source):
        self.cfg = cfg
        self.source = source
        self.data_cfg = dict(cfg.to_dict(), **(source.manifest or {}).get("config", {}))

    @cached_property
    def tokenizer(self):
        from . import modeling

        return modeling.load_tokenizer(str(self.source.model_dir))

    @cached_property
    def model(self):
        from . import modeling

        return modeling.load_model(str(self.source.model_dir), attn_implementation="eager").eval()

    @cached_property
    def max_length(self) -> int:
        from . import modeling

        return min(int(self.data_cfg.get("max_length") or self.cfg.max_length), modeling.max_positions(self.model))

    @cached_property
    def input_names(self) -> tuple[str, ...]:
        return ex.input_names_for(self.model)

    @cached_property
    def torch(self):
        from .runtimes import TorchPredictor

        return TorchPredictor(self.model, name="torch-fp32", device="cpu")

    @cached_property
    def splits(self):
        from . import data

        d = self.data_cfg
        return data.load_splits(d.get("dataset", self.cfg.dataset), d.get("data_dir", self.cfg.data_dir),
                                d.get("text_column"), d.get("label_column"), d.get("max_train_samples"),
                                d.get("max_eval_samples"), int(d.get("seed", self.cfg.seed)))

    def _batches(self, texts, batch_size: int) -> tuple[list[dict], np.ndarray]:
        """Length-sorted, dynamically padded batches and the row order they hold."""
        from . import data

        ids = data.tokenize(texts, self.tokenizer, self.max_length)
        order = np.argsort([-len(s) for s in ids], kind="stable")
        pad = self.tokenizer.pad_token_id or 0
        with_tt = "token_type_ids" in self.input_names
        batches = [data.pad_batch([ids[i] for i in order[s:s + batch_size]], pad, with_tt)
                   for s in range(0, len(order), batch_size)]
        return batches, order

    @cached_property
    def eval_set(self) -> tuple[list[dict], np.ndarray]:
        batches, order = self._batches(self.splits.eval.texts, self.cfg.eval_batch_size)
        return batches, np.asarray(self.splits.eval.labels)[order]

    @cached_property
    def shape_batches(self) -> list[dict]:
        shapes = ex.parity_shapes(self.max_length)
        cls = self.tokenizer.cls_token_id if self.tokenizer.cls_token_id is not None else 101
        return ex.random_batches(self.input_names, shapes, int(self.model.config.vocab_size), seed=self.cfg.seed,
                                 cls_id=cls, pad_id=self.tokenizer.pad_token_id or 0)

    def logits(self, predictor, batches, desc: str) -> list[np.ndarray]:
        loop = progress(batches, desc=desc, unit="batch") if len(batches) >= 20 else batches  # no bar for a few
        return [predictor.predict_logits(b) for b in loop]

    @cached_property
    def torch_shape_logits(self):
        return self.logits(self.torch, self.shape_batches, "torch shapes")

    @cached_property
    def torch_eval_logits(self):
        return self.logits(self.torch, self.eval_set[0], "torch eval")

    @cached_property
    def torch_accuracy(self) -> float:
        return accuracy(self.torch_eval_logits, self.eval_set[1])

    def calibration_feeds(self, n: int, batch_size: int = 32, fixed_shape: bool = False) -> list[dict]:
        """A seeded sample of training sentences, as length-grouped batches; ``fixed_shape`` pads
        every batch to one width and drops a short last batch (histogram calibrators stack them)."""
        from . import data

        train = self.splits.train
        rng = np.random.default_rng(int(self.data_cfg.get("seed", self.cfg.seed)))
        idx = rng.choice(len(train), size=min(n, len(train)), replace=False)
        texts = [train.texts[i] for i in sorted(idx)]
        if not fixed_shape:
            return self._batches(texts, batch_size)[0]
        ids = data.tokenize(texts, self.tokenizer, self.max_length)
        width = max(len(s) for s in ids)
        with_tt = "token_type_ids" in self.input_names
        usable = len(ids) - len(ids) % batch_size if len(ids) >= batch_size else len(ids)
        return [data.pad_batch(ids[s:s + batch_size], self.tokenizer.pad_token_id or 0, with_tt, pad_to=width)
                for s in range(0, usable, batch_size)]


def accuracy(logits: list[np.ndarray], labels: np.ndarray) -> float:
    preds = np.concatenate(logits).argmax(-1)
    return float((preds == labels).mean()) if len(labels) else float("nan")

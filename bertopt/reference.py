"""The PyTorch FP32 reference every converted variant is checked against (ONNX and TensorRT
sub-stages): the source model, its eval split, the parity shapes and a seeded calibration sample,
each built lazily once."""
from __future__ import annotations

from functools import cached_property

import numpy as np

from . import export as ex
from .config import DEFAULT_DATA_DIR
from .logs import progress


class Reference:
    """The PyTorch FP32 source, its eval split and calibration sample, built lazily once."""

    def __init__(self, cfg, source):
        self.cfg = cfg
        self.source = source
        self.data_cfg = dict(cfg.to_dict(), **(source.manifest or {}).get("config", {}))
        if cfg.data_dir != DEFAULT_DATA_DIR:  # where the trained-on data set lies now (compare's rule too)
            self.data_cfg["data_dir"] = cfg.data_dir

    @cached_property
    def tokenizer(self):
        from . import modeling

        return modeling.load_tokenizer(str(self.source.model_dir))

    @cached_property
    def model(self):
        from . import modeling

        return modeling.load_model(str(self.source.model_dir), attn_implementation="eager").eval()

    @cached_property
    def config(self):
        return self.model.config

    def release_model(self) -> None:
        """Drop the PyTorch weights once the reference outputs exist (a large model's converters
        need the memory: xlm-roberta-large's 2.24 GB would sit beside each of them); what was derived
        from the model stays, and a later use of ``model`` / ``torch`` loads it again."""
        for name in ("torch_shape_logits", "torch_eval_logits", "torch_accuracy", "input_names", "max_length",
                     "config"):
            getattr(self, name)
        self.__dict__.pop("torch", None)
        self.__dict__.pop("model", None)

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

        return data.load_splits_for(self.data_cfg)

    @cached_property
    def spec(self):
        """The task the source was trained for (bertopt.tasks.TaskSpec; plain accuracy for old manifests)."""
        from . import tasks

        return tasks.spec_from_record((self.source.manifest or {}).get("data"))

    def _ids(self, texts, pairs=None):
        """Token ids under the source's long-text strategy, and the text of each window (chunk) or None."""
        from . import data

        d = self.data_cfg
        return data.encode(texts, self.tokenizer, self.max_length, pairs, d.get("long_text") or "truncate",
                           d.get("stride"))

    def _batches(self, texts, batch_size: int, pairs=None) -> tuple[list[dict], np.ndarray, object]:
        """Length-sorted, dynamically padded batches (pairs with their token types), the row order
        they hold and, for chunked long texts, each row's text."""
        from . import data

        ids, owners = self._ids(texts, pairs)
        order = np.argsort([-len(s) for s in ids], kind="stable")
        pad = self.tokenizer.pad_token_id or 0
        with_tt = "token_type_ids" in self.input_names
        sep = self.tokenizer.sep_token_id if pairs is not None else None
        batches = [data.pad_batch([ids[i] for i in order[s:s + batch_size]], pad, with_tt, sep_id=sep)
                   for s in range(0, len(order), batch_size)]
        return batches, order, None if owners is None else np.asarray(owners)[order]

    @cached_property
    def _eval(self):
        ev = self.splits.eval
        batches, order, owners = self._batches(ev.texts, self.cfg.eval_batch_size, ev.pairs)
        labels = np.asarray(ev.labels)
        return batches, labels[owners] if owners is not None else labels[order], owners

    @property
    def eval_set(self) -> tuple[list[dict], np.ndarray]:
        """Eval batches and the labels of their rows (one per chunk window)."""
        return self._eval[0], self._eval[1]

    @property
    def eval_owners(self):
        return self._eval[2]

    def score(self, logits: list[np.ndarray], labels=None) -> float:
        """The task metric (accuracy for a plain classifier) of eval-set logits."""
        return accuracy(logits, self.eval_set[1] if labels is None else labels, self.spec,
                        self.eval_owners if labels is None else None)

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
        return self.score(self.torch_eval_logits)

    def calibration_feeds(self, n: int, batch_size: int = 32, fixed_shape: bool = False) -> list[dict]:
        """A seeded sample of training sentences, as length-grouped batches; ``fixed_shape`` pads
        every batch to one width and drops a short last batch (histogram calibrators stack them)."""
        from . import data

        train = self.splits.train if len(self.splits.train) else self.splits.eval  # --trained, eval file only
        rng = np.random.default_rng(int(self.data_cfg.get("seed", self.cfg.seed)))
        idx = rng.choice(len(train), size=min(n, len(train)), replace=False)
        texts = [train.texts[i] for i in sorted(idx)]
        pairs = [train.pairs[i] for i in sorted(idx)] if train.pairs is not None else None
        if not fixed_shape:
            return self._batches(texts, batch_size, pairs)[0]
        ids = self._ids(texts, pairs)[0]
        width = max(len(s) for s in ids)
        with_tt = "token_type_ids" in self.input_names
        sep = self.tokenizer.sep_token_id if pairs is not None else None
        usable = len(ids) - len(ids) % batch_size if len(ids) >= batch_size else len(ids)
        return [data.pad_batch(ids[s:s + batch_size], self.tokenizer.pad_token_id or 0, with_tt, pad_to=width,
                               sep_id=sep) for s in range(0, usable, batch_size)]


def accuracy(logits: list[np.ndarray], labels: np.ndarray, spec=None, owners=None) -> float:
    """Argmax accuracy, or with a non-plain ``spec`` (bertopt.tasks.TaskSpec) its metric (chunk
    windows named by ``owners`` aggregated per text): what the quantization gate compares."""
    from .metrics import score

    return score(spec, np.concatenate(logits), labels, owners)

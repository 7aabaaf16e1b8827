"""Training curves mirrored to TensorBoard (``--report-to tensorboard``).

The manifest's ``loss_curve`` / ``eval_curve`` stay the record the HTML report plots; this writer
only adds live curves for ``tensorboard --logdir <stage dir>/tensorboard``. The ``tensorboard``
package is imported only when asked for.
"""
from __future__ import annotations

from typing import Optional

from .errors import BackendUnavailable

SUBDIR = "tensorboard"


class Writer:
    """A SummaryWriter into ``log_dir``, or nothing at all when ``log_dir`` is None."""

    def __init__(self, log_dir: Optional[str]):
        self.log_dir = log_dir
        self._writer = None

    def __enter__(self):
        if self.log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise BackendUnavailable("--report-to tensorboard needs the tensorboard package "
                                         "(pip install tensorboard)") from None
            self._writer = SummaryWriter(str(self.log_dir))
        return self

    def purge_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: hide the killed run's copies."""
        if self._writer is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer.close()
            self._writer = SummaryWriter(str(self.log_dir), purge_step=step + 1)

    def scalars(self, step: int, values: dict) -> None:
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def __exit__(self, *exc):
        if self._writer is not None:
            self._writer.close()
        return False

#!/usr/bin/env python
"""Quantization-aware INT8 training: fake quantization (nvidia-modelopt; symmetric signed INT8,
weights per output channel, activations per tensor), calibration, a short distilled fine-tune
(a fraction of an epoch, dropout off) and one Q/DQ ONNX for ONNX Runtime, OpenVINO and TensorRT,
written to saved_models/qat/<source>/ with each runtime's row checked and gated like the ONNX
stage's variants."""
import sys

from bertopt import cli
from bertopt.qat_stage import QatConfig, add_args
from bertopt.stages import QAT

EPILOG = """examples:
  python qat.py                                  # QAT of saved_models/baseline
  python qat.py --qat-source pruned --qat-fraction 0.5
  python qat.py --dataset /work/shared/data/glue/CoLA --qat-lr 2e-5"""


def main(argv=None) -> int:
    return cli.stage_main("qat", __doc__, QatConfig, lambda p: add_args(p, standalone=True),
                          lambda cfg: QAT.run(cfg), argv, epilog=EPILOG, build=QAT.build_config)


if __name__ == "__main__":
    sys.exit(main())

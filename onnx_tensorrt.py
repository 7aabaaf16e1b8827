#!/usr/bin/env python
"""Export the trained models to ONNX, build ONNX Runtime variants (graph-fused, dynamic INT8,
INT4 weight-only, FP16, static INT8 QDQ) with parity and accuracy checks, and TensorRT engines
on NVIDIA GPUs.

Reads every finished trained stage under --output-dir (baseline, mixed_precision, pruned) or
--source; writes <output-dir>/onnx/<source>/ and <output-dir>/tensorrt/<source>/. On machines
without CUDA/TensorRT the TensorRT manifest says 'skipped' with the reason."""
import sys

from bertopt import cli
from bertopt.stages import ONNX_TENSORRT


def main(argv=None) -> int:
    from bertopt.onnx_stage import add_args

    return cli.stage_main("onnx_tensorrt", __doc__, None, lambda parser: add_args(parser, standalone=True),
                          lambda cfg: ONNX_TENSORRT.run(cfg), argv, build=ONNX_TENSORRT.build_config)


if __name__ == "__main__":
    sys.exit(main())

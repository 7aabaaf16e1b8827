#!/usr/bin/env python
"""Measure every variant in saved_models/ (accuracy, end-to-end throughput, latency, a batch x
sequence sweep, size, load time, peak memory, efficiency vs the measured matmul peak), recommend
one, and write reports/results.json, results.csv, summary.md and performance_report.html.

Examples:
  python compare.py                          # full protocol, recommend for CPU throughput
  python compare.py --optimize-for latency --accuracy-budget 0.005
  python compare.py --quick                  # reduced protocol (CI, smoke test)
  python compare.py --report-only            # re-render the report from reports/results.json"""
import sys

from bertopt import cli
from bertopt.compare.config import CompareConfig, add_compare_args, build_compare
from bertopt.compare.stage import run


def main(argv=None) -> int:
    return cli.stage_main("compare", __doc__, CompareConfig, add_compare_args, run, argv, build=build_compare)


if __name__ == "__main__":
    sys.exit(main())

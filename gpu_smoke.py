#!/usr/bin/env python
"""gpu_smoke.py: check every GPU path (CUDA AMP fine-tunes, torch GPU inference, ONNX Runtime CUDA,
TensorRT, compare --quick --target gpu) in a few minutes; ends with a summary table. See README.md."""
import argparse
import sys


def main(argv=None) -> int:
    from bertopt import cli, logs
    from bertopt import gpu_smoke as smoke
    from bertopt.errors import ConfigError

    parser = argparse.ArgumentParser(prog="gpu_smoke.py", description=__doc__, allow_abbrev=False)
    smoke.add_args(parser)
    ns = parser.parse_args(argv)
    try:
        cfg = smoke.SmokeConfig(model=ns.model, data_dir=ns.data_dir, out=ns.out, rows=ns.rows, epochs=ns.epochs,
                                repeats=ns.repeats, bert_base=ns.bert_base, skip_compare=ns.skip_compare,
                                device=ns.device, external_data=ns.external_data)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    logs.configure(quiet=False)
    code, result = cli.run_stage("gpu_smoke", smoke.run, cfg)
    if result is not None:
        print(smoke.table(result))
        failed = [r["name"] for r in result["rows"] if r["status"] == "failed"]
        print(f"[gpu_smoke] {'failed: ' + ', '.join(failed) if failed else 'ok'} in {result['wall_s']}s "
              f"({sum(r['status'] == 'ok' for r in result['rows'])} ok, "
              f"{sum(r['status'] == 'skipped' for r in result['rows'])} skipped); {cfg.out}/gpu_smoke.json")
        return 1 if failed else 0
    return code


if __name__ == "__main__":
    sys.exit(main())

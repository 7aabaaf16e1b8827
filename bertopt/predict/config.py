"""predict.py's configuration: PredictConfig (validated once) and its flags."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import CommonConfig, SageMakerJobFields

ON_ERROR = ("fail", "skip")
OUTPUT_SUFFIXES = (".csv", ".jsonl")


@dataclass
class PredictConfig(SageMakerJobFields, CommonConfig):
    """predict.py: which file, which variant, where the predictions go."""

    input: str = ""
    output: Optional[str] = None          # None = reports/predictions/<input stem>.csv
    variant: Optional[str] = None         # None = compare's recommendation (reports/results.json)
    on_error: str = "fail"
    id_column: Optional[str] = None       # None = an "id"/"idx"/"guid" column if present, else the row number
    threads: Optional[int] = None
    chunk_rows: int = 10000               # rows read, scored and written at a time (bounded memory)
    batch: int = 0                        # texts per model run; 0 = compare's measured batch size for the row, else 32

    def problems(self) -> list[str]:
        p = super().problems()
        if not self.input:
            p.append("give the INPUT file to score (CSV/TSV/JSONL/Parquet, or s3://... with --sagemaker-instance-type)")
        if self.on_error not in ON_ERROR:
            p.append(f"--on-error must be one of {', '.join(ON_ERROR)} (got {self.on_error!r})")
        if self.output and not self.output.lower().endswith(OUTPUT_SUFFIXES):
            p.append(f"--output {self.output}: write .csv or .jsonl")
        for name, value in (("--chunk-rows", self.chunk_rows),):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                p.append(f"{name} must be a positive integer (got {value!r})")
        if not isinstance(self.batch, int) or self.batch < 0:
            p.append(f"--predict-batch-size must be >= 0 (got {self.batch!r})")
        if str(self.input).startswith("s3://") and not self.sagemaker_instance_type:
            p.append(f"{self.input}: an s3:// input is scored by Batch Transform; add --sagemaker-instance-type")
        return p + self.job_problems()

    @property
    def remote(self) -> bool:
        return bool(self.sagemaker_instance_type)


def add_predict_args(parser) -> None:
    from functools import partial

    from .. import cli

    parser.add_argument("input", metavar="INPUT",
                        help="CSV/TSV/JSONL/Parquet file to score (text columns detected as in training, "
                             "pairs included; s3://... with --sagemaker-instance-type)")
    cli.add_common_args(parser)
    g = parser.add_argument_group("prediction options")
    add = partial(cli.add, g, config=PredictConfig)
    add("--output", metavar="FILE", help="predictions file, .csv or .jsonl (default: reports/predictions/"
                                          "<input name>.csv)")
    add("--variant", metavar="NAME",
        help="variant to score with: a compare row (ort-int8, ov-int8, torch) or SOURCE:NAME "
             "(pruned:int8); default: compare's recommendation in reports/results.json")
    add("--on-error", choices=ON_ERROR,
        help="a bad row (empty text, missing pair column): fail (default) names its row number and stops; "
             "skip leaves it out of the output and lists the row numbers")
    add("--id-column", metavar="COL", help="column copied into the output as the row id (default: id/idx/guid "
                                            "if present, else the 0-based row number)")
    add("--predict-batch-size", dest="batch", type=int, metavar="N",
        help="most texts per model run (length-grouped); default: compare's measured batch size for the row, else 32")
    add("--threads", type=int, metavar="N", help="CPU threads of the model (default: the runtime's)")
    add("--chunk-rows", type=int, metavar="N",
        help="rows read, scored and written at a time; memory stays bounded by it (default: {default})")
    cli.add_sagemaker_args(parser, job="transform")


def build_predict(ns) -> PredictConfig:
    from .. import cli

    return cli.build_config(PredictConfig, ns)

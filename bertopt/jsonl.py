"""JSON Lines for the serving handler (Batch Transform): one record per line in, one answer per line
out, in order. Vendored into model.tar.gz beside code/inference.py (which wraps its hooks with
:func:`with_json_lines`), so it imports nothing from bertopt.

A record is ``{"text": "..."}`` or ``{"text": "...", "text_pair": "..."}`` (other keys such as ``id``
are ignored: Batch Transform's ``JoinSource: Input`` puts them back beside the answer), or a bare
JSON string. Answers carry every label's score, best first (``top_k: null``), or the regression value.
A request's records are scored ``max_batch`` at a time, so one request may hold many lines."""
from __future__ import annotations

import json

MEDIA = ("application/jsonlines", "application/x-jsonlines", "application/jsonl")


def _media(value) -> str:
    return str(value or "").split(";")[0].strip().lower()


def parse(text: str) -> list:
    """The records of a JSON Lines body (str, or {"text", "text_pair"} dicts); ValueError naming the line."""
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {n}: malformed JSON ({exc.msg})") from None
        if isinstance(record, dict) and "text_pair" in record:
            items.append({"text": record.get("text"), "text_pair": record.get("text_pair")})
        elif isinstance(record, dict):
            items.append(record.get("text", record.get("inputs")))
        else:
            items.append(record)
    return items


class Lines(list):
    """input_fn's answer for a JSON Lines body: the raw records, checked a slice at a time."""


def with_json_lines(input_fn, predict_fn, output_fn, check_texts, error_cls):
    """The handler's three hooks, also speaking JSON Lines (Content-Type / Accept application/jsonlines)."""
    def jsonl_input_fn(input_data, content_type):
        if _media(content_type) not in MEDIA:
            return input_fn(input_data, content_type)
        text = input_data.decode("utf-8") if isinstance(input_data, (bytes, bytearray)) else str(input_data)
        try:
            items = parse(text)
        except ValueError as exc:
            raise error_cls(400, str(exc)) from None
        check_texts(items, None)  # every record is valid before any is scored
        return Lines(items)

    def jsonl_predict_fn(data, model):
        if not isinstance(data, Lines):
            return predict_fn(data, model)
        step = max(1, int(model.max_batch))
        out = Lines()
        for i in range(0, len(data), step):
            out += predict_fn(check_texts(data[i:i + step], None), model)
        return out

    def jsonl_output_fn(prediction, accept):
        if isinstance(prediction, Lines) or any(_media(a) in MEDIA for a in str(accept or "").split(",")):
            return "".join(json.dumps(p) + "\n" for p in prediction)
        return output_fn(prediction, accept)

    return jsonl_input_fn, jsonl_predict_fn, jsonl_output_fn

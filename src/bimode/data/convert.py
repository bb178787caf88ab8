"""Converters from common instruction-data layouts into records.

- LLaVA JSON: {"id", "image": str | [str], "conversations": [{"from": "human", "value": "<image>\\nQ"},
  {"from": "gpt", "value": "A"}]}
- ShareGPT / OpenAI messages: {"id", "images": [...], "messages": [{"role": "user", "content": ...},
  {"role": "assistant", "content": ...}]} (content a string, or OpenAI parts with image_url / image)
- plain QA: {"id", "question", "answer", "image" | "images"} (also `problem`, `solution`)
Only the last user turn and the assistant reply after it become a record; a think block in the reply is
split into reasoning and answer. Each converter raises RecordError naming the row and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from bimode.data.records import Record, RecordError, record_from_dict
from bimode.modes import parse_response


def detect_format(row: dict) -> str:
    if "conversations" in row:
        return "llava"
    if "messages" in row:
        return "sharegpt"
    return "records"


def _answer_fields(reply: str) -> dict:
    parsed = parse_response(reply)
    if parsed.mode == "think":
        return {"answer": parsed.answer, "reasoning": parsed.reasoning}
    return {"answer": parsed.answer if parsed.mode != "malformed" else "", "reasoning": None}


def _images_field(row: dict) -> list:
    images = row.get("images", row.get("image"))
    if images is None:
        return []
    return images if isinstance(images, list) else [images]


def from_llava(row: dict, path=None, row_number=None) -> dict:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError("conversations must be a non-empty list", path, row_number, "conversations")
    human = [i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("from") in ("human", "user")]
    if not human:
        raise RecordError("no human turn", path, row_number, "conversations")
    last = human[-1]
    question = turns[last].get("value")
    if not isinstance(question, str):
        raise RecordError("a turn's value must be a string", path, row_number, "conversations")
    reply = next((t.get("value") for t in turns[last + 1:] if t.get("from") in ("gpt", "assistant")), "")
    images = _images_field(row)
    # LLaVA puts <image> only in the first human turn; carry images to the last question we keep
    if last != human[0] and "<image>" in (turns[human[0]].get("value") or "") and "<image>" not in question:
        question = "<image>\n" + question
    out = {"id": row.get("id"), "question": question, "images": images, **_answer_fields(reply or "")}
    return {**out, **{k: row[k] for k in ("answer_type", "family", "level", "domain") if k in row}}


def from_messages(row: dict, path=None, row_number=None) -> dict:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("messages must be a non-empty list", path, row_number, "messages")
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise RecordError("no user message", path, row_number, "messages")
    last = users[-1]
    images = list(_images_field(row))
    content = messages[last].get("content")
    if isinstance(content, list):
        text = ""
        for part in content:
            if part.get("type") in ("image", "image_url"):
                text += "<image>"
                url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else part.get("image")
                if url and not url.startswith("data:"):
                    images.append(url)
            elif part.get("type") == "text":
                text += part.get("text", "")
        content = text
    if not isinstance(content, str):
        raise RecordError("content must be a string or a list of parts", path, row_number, "messages")
    system = next((m.get("content") for m in messages[:last] if m.get("role") == "system"), None)
    reply = next((m for m in messages[last + 1:] if m.get("role") == "assistant"), None)
    reply_text = ""
    if reply is not None:
        reply_text = reply.get("content") or ""
        if reply.get("reasoning_content"):
            reply_text = f"<think>\n{reply['reasoning_content']}\n</think>\n\n{reply_text}"
    out = {"id": row.get("id"), "question": content, "images": images, "system": system,
           **_answer_fields(reply_text)}
    if "answer" in row:  # a separate gold answer wins over the reply text
        out["answer"] = str(row["answer"])
    return out


def from_plain_qa(row: dict, path=None, row_number=None) -> dict:
    out = dict(row)
    if "image" in out:
        out["images"] = _images_field(out)
        del out["image"]
    if "solution" in out and "reasoning" not in out:
        out["reasoning"] = out.pop("solution")
    if out.get("images") and "<image>" not in out.get("question", out.get("problem", "")):
        key = "question" if "question" in out else "problem"
        if isinstance(out.get(key), str):
            out[key] = "<image>" * len(out["images"]) + "\n" + out[key]
    return out


CONVERTERS = {"llava": from_llava, "sharegpt": from_messages, "qa": from_plain_qa}
INPUT_FORMATS = ("auto", *CONVERTERS)  # auto: detected per row


def iter_converted(path, fmt: str = "auto", on_error=None) -> Iterator[Record]:
    """Records from a JSON/JSONL file in any supported layout; `auto` detects per row."""
    from bimode.data.records import iter_raw_rows, normalize_plain

    path = Path(path)
    if not path.exists():
        raise RecordError("no such file or directory", path)
    for row_number, row in iter_raw_rows(path, on_error):
        try:
            if not isinstance(row, dict):
                raise RecordError(f"expected an object, got {type(row).__name__}", path, row_number)
            kind = detect_format(row) if fmt == "auto" else fmt
            if kind == "records":
                kind = "qa"
            if kind not in CONVERTERS:
                raise RecordError(f"unknown format {fmt!r}; use auto, llava, sharegpt or qa", path)
            converted = CONVERTERS[kind](row, path, row_number)
            if converted.get("id") in (None, ""):
                converted["id"] = f"{path.stem}-{row_number}"
            converted = {k: v for k, v in converted.items() if v is not None or k in ("reasoning",)}
            yield record_from_dict(normalize_plain(converted, path, row_number), path, row_number, path.parent)
        except RecordError as exc:
            if on_error is None:
                raise
            on_error(exc)


def convert_file(src, dst, fmt: str = "auto", overwrite: bool = False) -> int:
    from bimode.data.records import write_records

    records = list(iter_converted(src, fmt))
    write_records(records, dst, overwrite=overwrite)
    return len(records)


__all__ = ["CONVERTERS", "convert_file", "detect_format", "iter_converted"]

#!/usr/bin/env python3
"""Every operation of a running provider simulator, through the official OpenAI Python SDK.

The SDK is the client: its request building, its response models and its stream accumulators
(`client.chat.completions.stream()`, `client.responses.stream()`, whose
`lib/streaming/responses/_responses.py` rejects Responses API events out of order) parse what the
simulator sends. The SDK builds its models without validating them, so every parsed object is also
validated again against its SDK model (`strict`): a field the API reference marks required and the
simulator left out fails here, as it would fail a stricter client.

    PYTHONPATH=$(scripts/install-openai-sdk) python3 devkit/tests/sdk_contract.py \\
        --base-url http://127.0.0.1:PORT/v1 --key sk-... --chat-model gpt-4o \\
        --embedding-model text-embedding-3-small --serves embeddings,completions,responses

`--target JSON` (repeatable) checks several simulators in one run: {"name", "base_url", "key",
"chat_model", "embedding_model", "serves": [...], "headers": {...}, "azure_api_version"}.
Prints one line per check; exits 1 when any failed, with each failure's traceback.
"""

from __future__ import annotations

import argparse
import array
import base64
import json
import sys
import traceback

import openai
from openai import AzureOpenAI, OpenAI

PROMPT = "say hello to the official sdk"
RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    # one or more response.output_text.delta
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


class ContractError(AssertionError):
    pass


def check(cond, what):
    if not cond:
        raise ContractError(what)


def strict(obj, data=None):
    """Validates an object the SDK built (without validation) against its own pydantic model."""
    type(obj).model_validate(obj.to_dict() if data is None else data)
    return obj


def strict_text_chunk(chunk):
    """`strict` for a streamed text completion: the SDK parses its chunks as `Completion`, whose
    `finish_reason` is not nullable, while the API sends `"finish_reason": null` in every chunk but
    the one that ends the text (as in chat completion chunks)."""
    data = chunk.to_dict()
    for choice in data.get("choices", []):
        check("finish_reason" in choice, "a choice without finish_reason")
        if choice["finish_reason"] is None:
            choice["finish_reason"] = "stop"
    return strict(chunk, data)


def check_chat_usage(usage, what):
    check(usage is not None, f"{what}: no usage")
    check(usage.prompt_tokens > 0, f"{what}: prompt_tokens {usage.prompt_tokens}")
    check(usage.completion_tokens > 0, f"{what}: completion_tokens {usage.completion_tokens}")
    check(
        usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
        f"{what}: total_tokens {usage.total_tokens}",
    )


# ------------------------------------------------------------------------------ chat completions
def chat_create(c, t):
    r = strict(c.chat.completions.create(model=t["chat_model"], messages=[{"role": "user", "content": PROMPT}]))
    check(r.id and r.object == "chat.completion", f"id/object {r.id!r} {r.object!r}")
    check(r.model == t["chat_model"], f"model {r.model!r}")
    check(len(r.choices) == 1, f"{len(r.choices)} choices")
    m = r.choices[0].message
    check(m.role == "assistant" and m.content, f"message {m}")
    check(r.choices[0].finish_reason == "stop", f"finish_reason {r.choices[0].finish_reason!r}")
    check_chat_usage(r.usage, "usage")


def chat_stream_chunks(c, t, include_usage):
    kwargs = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = c.chat.completions.create(
        model=t["chat_model"], messages=[{"role": "user", "content": PROMPT}], stream=True, **kwargs
    )
    chunks = [strict(chunk) for chunk in stream]
    check(chunks, "no chunks")
    check(len({ch.id for ch in chunks}) == 1 and chunks[0].id, f"ids {[ch.id for ch in chunks]}")
    check(all(ch.object == "chat.completion.chunk" for ch in chunks), "object")
    check(chunks[0].choices and chunks[0].choices[0].delta.role == "assistant", "first delta without role")
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check(text, "no text")
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    check(finishes == ["stop"], f"finish reasons {finishes}")
    with_usage = [ch for ch in chunks if ch.usage is not None]
    if include_usage:
        # The API reference: with include_usage, one last chunk with empty `choices` carries the usage.
        check(len(with_usage) == 1 and with_usage[0] is chunks[-1], "usage not in exactly the last chunk")
        check(chunks[-1].choices == [], "the usage chunk has choices")
        check_chat_usage(chunks[-1].usage, "usage chunk")
    else:
        check(not with_usage, "usage sent without include_usage")
    return text


def chat_stream(c, t):
    chat_stream_chunks(c, t, include_usage=True)
    chat_stream_chunks(c, t, include_usage=False)


def chat_stream_helper(c, t):
    deltas = []
    with c.chat.completions.stream(
        model=t["chat_model"],
        messages=[{"role": "user", "content": PROMPT}],
        stream_options={"include_usage": True},
    ) as stream:
        for event in stream:
            if event.type == "content.delta":
                deltas.append(event.delta)
        final = stream.get_final_completion()
    check(deltas, "no content.delta events")
    msg = final.choices[0].message
    check(msg.content and msg.content == "".join(deltas), f"final content {msg.content!r} vs deltas {deltas}")
    check(final.choices[0].finish_reason == "stop", "finish_reason")
    check(final.id, "id")
    check_chat_usage(final.usage, "final usage")


# ------------------------------------------------------------------------------ text completions
def completions_create(c, t):
    r = strict(c.completions.create(model=t["chat_model"], prompt=PROMPT))
    check(r.id and r.object == "text_completion", f"id/object {r.id!r} {r.object!r}")
    check(r.choices and r.choices[0].text, "no text")
    check(r.choices[0].finish_reason == "stop", "finish_reason")
    check_chat_usage(r.usage, "usage")


def completions_stream(c, t):
    chunks = [
        strict_text_chunk(ch)
        for ch in c.completions.create(
            model=t["chat_model"], prompt=PROMPT, stream=True, stream_options={"include_usage": True}
        )
    ]
    check(len({ch.id for ch in chunks}) == 1 and chunks[0].id, "ids")
    check(all(ch.object == "text_completion" for ch in chunks), "object")
    check("".join(ch.choices[0].text for ch in chunks if ch.choices), "no text")
    check(chunks[-1].choices == [] and chunks[-1].usage is not None, "no last usage chunk")
    check(all(ch.usage is None for ch in chunks[:-1]), "usage before the last chunk")
    check_chat_usage(chunks[-1].usage, "usage chunk")
    plain = list(c.completions.create(model=t["chat_model"], prompt=PROMPT, stream=True))
    check(all(ch.usage is None for ch in plain), "usage sent without include_usage")


# ------------------------------------------------------------------------------ embeddings
def embeddings(c, t):
    model, inputs = t["embedding_model"], ["hello world", "three words here"]
    # No encoding_format: the SDK asks for base64 and decodes it (lib/_parsing/_embeddings.py).
    raw = c.embeddings.with_raw_response.create(model=model, input=inputs)
    sent = json.loads(raw.http_response.text)
    check(all(isinstance(d["embedding"], str) for d in sent["data"]), "base64 asked, numbers sent")
    decoded = strict(raw.parse())
    as_floats = strict(c.embeddings.create(model=model, input=inputs, encoding_format="float"))
    for r in (decoded, as_floats):
        check(r.object == "list" and r.model == model, f"object/model {r.object!r} {r.model!r}")
        check([d.index for d in r.data] == [0, 1], f"indices {[d.index for d in r.data]}")
        check(all(d.object == "embedding" and d.embedding for d in r.data), "embeddings")
        check(r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens, f"usage {r.usage}")
    for a, b in zip(decoded.data, as_floats.data):
        check(array.array("f", a.embedding).tolist() == array.array("f", b.embedding).tolist(), "base64 != float")
    check(base64.b64decode(sent["data"][0]["embedding"]), "empty base64")
    r = strict(c.embeddings.create(model=model, input="one", dimensions=8, encoding_format="float"))
    check(len(r.data) == 1 and len(r.data[0].embedding) == 8, "dimensions not honoured")


# ------------------------------------------------------------------------------ responses
def check_response_usage(usage, what):
    check(usage is not None, f"{what}: no usage")
    check(usage.input_tokens > 0 and usage.output_tokens > 0, f"{what}: {usage}")
    check(usage.total_tokens == usage.input_tokens + usage.output_tokens, f"{what}: total {usage}")
    check(usage.input_tokens_details is not None and usage.output_tokens_details is not None, "details")


def responses_create(c, t):
    r = strict(c.responses.create(model=t["chat_model"], input=PROMPT, instructions="be brief"))
    check(r.id and r.object == "response" and r.status == "completed", f"{r.id!r} {r.object!r} {r.status!r}")
    check(r.model == t["chat_model"], f"model {r.model!r}")
    check(r.instructions == "be brief", f"instructions not echoed: {r.instructions!r}")
    check(len(r.output) == 1 and r.output[0].type == "message" and r.output[0].id, "output")
    check(r.output_text, "no output_text")
    check_response_usage(r.usage, "usage")


def responses_stream(c, t):
    events = [strict(e) for e in c.responses.create(model=t["chat_model"], input=PROMPT, stream=True)]
    types = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    check(deltas, f"no text deltas: {types}")
    check(
        [k for k in types if k != "response.output_text.delta"] == RESPONSE_EVENTS
        and types[4 : 4 + len(deltas)] == ["response.output_text.delta"] * len(deltas),
        f"event order {types}",
    )
    check([e.sequence_number for e in events] == list(range(len(events))), "sequence numbers")
    ids = {e.response.id for e in events if e.type.startswith("response.") and hasattr(e, "response")}
    check(len(ids) == 1, f"response ids {ids}")
    item_id = events[2].item.id
    check(item_id, "item id")
    content = [e for e in events if hasattr(e, "content_index")]
    check(all(e.item_id == item_id and e.output_index == 0 and e.content_index == 0 for e in content), "ids")
    check(events[0].response.status == "in_progress" and events[1].response.status == "in_progress", "status")
    text = "".join(e.delta for e in deltas)
    check(text, "empty text")
    done, part_done, item_done, completed = events[-4:]
    check(done.text == text and part_done.part.text == text, "done text")
    check(item_done.item.id == item_id and item_done.item.status == "completed", "item done")
    check(item_done.item.content[0].text == text, "item text")
    check(completed.response.status == "completed" and completed.response.output_text == text, "completed")
    check_response_usage(completed.response.usage, "response.completed usage")


def responses_stream_helper(c, t):
    seen = []
    with c.responses.stream(model=t["chat_model"], input=PROMPT) as stream:
        for event in stream:
            seen.append(event)
        final = stream.get_final_response()
    deltas = [e for e in seen if e.type == "response.output_text.delta"]
    check(deltas and deltas[-1].snapshot == "".join(e.delta for e in deltas), "delta snapshots")
    check(final.id == seen[0].response.id and final.status == "completed", "final id/status")
    check(final.output_text and final.output_text == deltas[-1].snapshot, f"final text {final.output_text!r}")
    check_response_usage(final.usage, "final usage")


# ------------------------------------------------------------------------------ models
def models(c, t):
    page = c.models.list()
    listed = [strict(m) for m in page]
    check(listed, "empty models list")
    check(page.object == "list", f"list object {page.object!r}")
    check(all(m.object == "model" and m.id and m.owned_by for m in listed), "model objects")
    check(t["chat_model"] in [m.id for m in listed], f"{t['chat_model']} not listed")
    for m in listed:
        got = strict(c.models.retrieve(m.id))
        check(got.id == m.id and got.object == "model", f"retrieve {m.id}: {got}")
    try:
        c.models.retrieve("no-such-model-sim")
    except openai.APIStatusError as e:
        check(e.status_code in (400, 404), f"unknown model: status {e.status_code}")
    else:
        raise ContractError("an unknown model was retrieved")


CHECKS = [
    ("chat.completions.create", None, chat_create),
    ("chat.completions.create(stream, stream_options.include_usage)", None, chat_stream),
    ("chat.completions.stream().get_final_completion()", None, chat_stream_helper),
    ("completions.create", "completions", completions_create),
    ("completions.create(stream, stream_options.include_usage)", "completions", completions_stream),
    ("embeddings.create (base64 and float)", "embeddings", embeddings),
    ("responses.create", "responses", responses_create),
    ("responses.create(stream=True)", "responses", responses_stream),
    ("responses.stream().get_final_response()", "responses", responses_stream_helper),
    ("models.list, models.retrieve", None, models),
]


def client_for(t):
    common = dict(api_key=t["key"], max_retries=0, timeout=30, default_headers=t.get("headers") or None)
    if t.get("azure_api_version"):
        return AzureOpenAI(azure_endpoint=t["base_url"], api_version=t["azure_api_version"], **common)
    return OpenAI(base_url=t["base_url"], **common)


def run(t):
    c = client_for(t)
    failed = 0
    for name, needs, fn in CHECKS:
        if needs and needs not in t.get("serves", []):
            continue
        try:
            fn(c, t)
            print(f"ok    {t['name']}: {name}")
        except Exception:  # noqa: BLE001 - every failure is reported
            failed += 1
            print(f"FAIL  {t['name']}: {name}\n{traceback.format_exc()}")
    return failed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", default=[], type=json.loads, help="a target as JSON")
    p.add_argument("--name", default="sim")
    p.add_argument("--base-url")
    p.add_argument("--key")
    p.add_argument("--chat-model")
    p.add_argument("--embedding-model")
    p.add_argument("--serves", default="", help="comma-separated: embeddings,completions,responses")
    p.add_argument("--expect-sdk-version", help="fail unless the imported SDK has this version")
    a = p.parse_args()
    targets = list(a.target)
    if a.base_url:
        targets.append(
            {
                "name": a.name,
                "base_url": a.base_url,
                "key": a.key,
                "chat_model": a.chat_model,
                "embedding_model": a.embedding_model,
                "serves": [s for s in a.serves.split(",") if s],
            }
        )
    if not targets:
        p.error("no target: --base-url ... or --target JSON")
    print(f"openai {openai.__version__} from {openai.__file__}, python {sys.version.split()[0]}")
    if a.expect_sdk_version and openai.__version__ != a.expect_sdk_version:
        print(f"FAIL  expected openai {a.expect_sdk_version}")
        return 1
    failed = sum(run(t) for t in targets)
    print(f"{failed} check(s) failed" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

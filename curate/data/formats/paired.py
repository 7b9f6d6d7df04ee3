"""Layouts whose columns name the preferred reply outright.

- ``openai-dpo``: OpenAI's DPO fine-tuning JSONL, ``input.messages`` (system
  turn kept), ``preferred_output`` / ``non_preferred_output`` assistant messages.
- ``sharegpt``: LLaMA-Factory's ShareGPT preference layout, ``conversations``
  of ``from``/``value`` turns (``system``, ``human``, ``gpt``; a top-level
  ``system`` column too), ``chosen`` / ``rejected`` one ``{from, value}`` each.
- ``orca-dpo`` (Intel/orca_dpo_pairs): ``system``, ``question``, ``chosen``,
  ``rejected``; the system text becomes the system turn.
- ``stack-exchange`` (lvwerra/stack-exchange-paired): ``question``,
  ``response_j`` (preferred), ``response_k``; ``qid`` kept.
"""

from __future__ import annotations

from typing import Any, Mapping

from curate.data.formats.base import Options, Parsed, RowError, messages, reply, require, text, with_system


def parse_openai_dpo(record: Mapping[str, Any], options: Options) -> Parsed:
    require(record, "input", "preferred_output", "non_preferred_output")
    source = record["input"]
    if not isinstance(source, Mapping) or source.get("messages") is None:
        raise RowError("missing_field", "input has no 'messages' list")
    return Parsed(messages(source["messages"], "input.messages"),
                  reply(record["preferred_output"], "preferred_output"),
                  reply(record["non_preferred_output"], "non_preferred_output"))


def parse_sharegpt(record: Mapping[str, Any], options: Options) -> Parsed:
    require(record, "conversations", "chosen", "rejected")
    prompt = with_system(messages(record["conversations"], "conversations"), record.get("system"))
    return Parsed(prompt, reply(record["chosen"], "chosen"), reply(record["rejected"], "rejected"))


def parse_orca(record: Mapping[str, Any], options: Options) -> Parsed:
    require(record, "question", "chosen", "rejected")
    prompt = with_system([{"role": "user", "content": text(record["question"], "question")}], record.get("system"))
    return Parsed(prompt, text(record["chosen"], "chosen"), text(record["rejected"], "rejected"))


def parse_stack_exchange(record: Mapping[str, Any], options: Options) -> Parsed:
    require(record, "question", "response_j", "response_k")
    extras = {"qid": record["qid"]} if record.get("qid") is not None else {}
    return Parsed([{"role": "user", "content": text(record["question"], "question")}],
                  text(record["response_j"], "response_j"), text(record["response_k"], "response_k"), extras)

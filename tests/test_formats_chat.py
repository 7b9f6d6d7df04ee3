"""OpenAI DPO JSONL, LLaMA-Factory ShareGPT, Orca DPO pairs, content-part lists, stack-exchange: system turns kept."""

from pathlib import Path

from curate.data import load_pairs

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def load(name, **kwargs):
    result = load_pairs(str(FIXTURES / name), **kwargs)
    assert result.info["rows"] == result.pairs.height + result.quarantine.height
    return result


def test_openai_dpo_keeps_the_system_turn():
    result = load("openai_dpo.jsonl")
    assert result.info["format"] == "openai-dpo"
    row = result.pairs.row(0, named=True)
    assert row["prompt"] == [{"role": "system", "content": "You are a terse weather bot."},
                             {"role": "user", "content": "Hello, can you tell me how cold San Francisco is today?"}]
    assert row["chosen"].startswith("Today in San Francisco") and row["rejected"].startswith("It is not particularly")


def test_openai_layout_by_nested_column_paths(tmp_path):
    # the same file through --columns with dotted paths and message-list replies
    result = load_pairs(str(FIXTURES / "openai_dpo.jsonl"),
                        columns="prompt=input.messages,chosen=preferred_output,rejected=non_preferred_output")
    assert result.info["format"] == "messages"
    assert result.pairs["pair_id"].to_list() == load("openai_dpo.jsonl").pairs["pair_id"].to_list()


def test_sharegpt_roles_mapped_system_kept_unknown_role_quarantined():
    result = load("sharegpt_preference.json")
    assert result.info["format"] == "sharegpt"
    first, second = result.pairs.to_dicts()
    assert first["prompt"] == [{"role": "system", "content": "You answer in French."},
                               {"role": "user", "content": "Say thank you."}]
    assert (first["chosen"], first["rejected"]) == ("Merci.", "Thank you.")
    assert second["prompt"][0] == {"role": "system", "content": "Be brief."}  # the system column
    assert [m["role"] for m in second["prompt"]] == ["system", "user", "assistant", "user"]
    assert result.quarantine["reason"].to_list() == ["unknown_role"]  # from: observation
    assert "observation" in result.quarantine["detail"][0]


def test_orca_system_turn_kept_and_blank_system_dropped():
    result = load("orca_dpo_pairs.jsonl")
    assert result.info["format"] == "orca-dpo"
    first, second = result.pairs["prompt"].to_list()
    assert first[0] == {"role": "system", "content": "You are an AI assistant. You will be given a task. "
                                                     "You must generate a detailed and long answer."}
    assert first[1]["content"] == "Generate a short sentence about a cat."
    assert second == [{"role": "user", "content": "What is 2+2?"}]


def test_content_part_lists_become_text_and_images_are_quarantined():
    result = load("content_parts.jsonl")
    assert result.info["format"] == "messages"
    row = result.pairs.row(0, named=True)
    assert row["prompt"] == [{"role": "system", "content": "Be kind."},
                             {"role": "user", "content": "Describe\na rainbow."}]
    assert (row["chosen"], row["rejected"]) == ("Seven bands of colour in an arc.", "Wet light.")
    assert result.quarantine["reason"].to_list() == ["non_text_content"]


def test_stack_exchange_response_j_is_chosen():
    result = load("stack_exchange_paired.jsonl")
    assert result.info["format"] == "stack-exchange"
    row = result.pairs.row(0, named=True)
    assert (row["chosen"], row["rejected"], row["qid"]) == ("Use `reversed(xs)` or `xs[::-1]`.", "Write a loop.", 10)

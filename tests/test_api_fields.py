"""The request fields beside vLLM's: docs/api.md's parameter table lists every field of mmllm's chat
request and of vLLM 0.32's `ChatCompletionRequest` (tests/data holds its field list, read from vLLM's
source), says which of ours each backend honours, and cannot drift from either. Where a vLLM virtual
environment is installed (`make install-vllm`), its live class is diffed too (the slow job)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import engine_python
from mmllm.serve.schemas import METADATA_FIELDS, ChatCompletionRequest

ROOT = Path(__file__).resolve().parent.parent
VLLM_FIELDS = Path(__file__).parent / "data" / "vllm_0.32_chat_request_fields.txt"
DOC = ROOT / "docs" / "api.md"
UNKNOWN = "unknown field (400)"


def vllm_fields() -> list[str]:
    return [line for line in VLLM_FIELDS.read_text().splitlines() if line and not line.startswith("#")]


def ours() -> set[str]:
    return {field.alias or name for name, field in ChatCompletionRequest.model_fields.items()}


def table() -> dict[str, list[str]]:
    """docs/api.md's parameter table: each field named in a row's first cell -> the row's other cells."""
    section = DOC.read_text().split("### Parameters beside vLLM 0.32", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 6 or not cells[0].startswith("`"):
            continue
        for field in re.findall(r"`([a-z_]+)`", cells[0]):
            assert field not in rows, f"{field} is in two rows"
            rows[field] = cells[1:]
    return rows


def test_the_vllm_list_is_vllm_0_32s():
    fields = vllm_fields()
    assert len(fields) == len(set(fields)) == 68
    assert {"messages", "response_format", "tools", "logprobs", "min_p", "structured_outputs"} <= set(fields)


def test_the_table_lists_every_field_of_ours_and_of_vllms_as_it_is():
    rows = table()
    vllm = set(vllm_fields())
    assert set(rows) == ours() | vllm, (
        f"missing: {sorted((ours() | vllm) - set(rows))}; not a field: {sorted(set(rows) - ours() - vllm)}"
    )
    for field, (in_vllm, torch, llama, onnx, _) in rows.items():
        assert (in_vllm == "yes") == (field in vllm), field
        if field not in ours():  # vLLM's alone: refused as unknown on every backend
            assert torch == llama == onnx == UNKNOWN, field
            continue
        assert UNKNOWN not in (torch, llama, onnx), field
        if field in METADATA_FIELDS:
            assert torch == llama == onnx == "no effect", field
        kinds = {"honoured", "no effect", "400", "partly"}
        assert all(cell.startswith(tuple(kinds)) for cell in (torch, llama, onnx)), (
            field,
            torch,
            llama,
            onnx,
        )


def test_fields_the_table_calls_refused_are_refused_by_name():
    """Every field the table marks 400 (or partly: `n`) on torch is one `unsupported()` refuses."""
    refused = {
        field for field, cells in table().items() if cells[1] == "400" or cells[1].startswith("partly")
    }
    example = {"n": 2, "modalities": ["audio"], "audio": {}, "prediction": {}, "reasoning_effort": "low"}
    example |= {"verbosity": "low", "web_search_options": {}, "moderation": {}, "functions": [{}]}
    example |= {"function_call": {"name": "f"}}
    assert refused == set(example)
    for field, value in example.items():
        body = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], field: value}
        )
        assert body.unsupported()[0] == field


@pytest.mark.slow
@pytest.mark.vllm
def test_the_list_matches_the_installed_vllm():
    python = engine_python(".venv-vllm", "install-vllm")
    code = (
        "import json, vllm; "
        "from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as R; "
        "print(json.dumps([vllm.__version__, list(R.model_fields)]))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    version, fields = json.loads(out.stdout.strip().splitlines()[-1])
    if not version.startswith("0.32"):
        pytest.skip(f"the vLLM there is {version}, not 0.32")
    assert fields == vllm_fields()

"""Opt-in (CT_CONVERT_ENGINE_TESTS=1 and CT_LLAMA_CPP_SDIST=/path/to/unpacked/llama_cpp_python-0.3.36):
llama.cpp's convert_hf_to_gguf.py, run now on the dense equivalent of every fixture, still writes what
tests/data/llamacpp/ records, so the default suite's expectations are llama.cpp's own output."""

import json
import os

import pytest

from llamacpp_oracle import DATA, FIXTURES, expectations, sdist_root

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(os.environ.get("CT_CONVERT_ENGINE_TESTS") != "1", reason="set CT_CONVERT_ENGINE_TESTS=1"),
    pytest.mark.skipif(not os.environ.get("CT_LLAMA_CPP_SDIST"), reason="set CT_LLAMA_CPP_SDIST to the unpacked llama-cpp-python sdist"),
]


@pytest.mark.parametrize("name", list(FIXTURES))
def test_recorded_expectations_are_the_converters_output(name):
    now = json.loads(json.dumps(expectations(name, sdist_root()), ensure_ascii=False))
    assert now == json.loads((DATA / f"{name}.json").read_text())

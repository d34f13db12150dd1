"""`QuantizedWeight.to(device)` unpacks bit-stream codes where it runs, from the moved packed words; the
codes and the dequantized weight equal the source's decoding (run on the CPU here: the same code path
`--device cuda` takes; tests/test_cuda.py compares whole outputs on a GPU)."""

import pytest

from conftest import FIXTURES, equal_bits
from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.source import resolve


@pytest.mark.parametrize("fixture", ["w4a16-g128", "w3a16-g128", "w8a16-g128", "w2a16-g128", "w4a16-asym-g128",
                                     "moe-w4a16", "legacy-0.8.1-actorder-group", "legacy-0.14-w3a16"])
def test_moved_module_decodes_the_same(fixture):
    reader = open_checkpoint(resolve(str(FIXTURES / fixture), None))
    checked = 0
    for name in reader.modules:
        here = reader.read(name)
        if here.encoding.value != "int":
            continue
        moved = reader.read(name).to("cpu")
        assert equal_bits(moved.codes, here.codes), name
        assert equal_bits(moved.dequantize(), here.dequantize()), name
        checked += 1
    assert checked

"""Facts of the AutoAWQ GEMM checkpoint (targets.md §2) that the writer and the reader share."""

from ct_convert.bitpack import INTERLEAVE

QUANT_METHOD = "awq"
NIBBLE_ORDER = INTERLEAVE[4]  # nibble i of a word holds column 8c + NIBBLE_ORDER[i] (FasterTransformer's interleave)

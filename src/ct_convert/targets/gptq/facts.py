"""Facts of the GPTQ checkpoint (targets.md §3) that the writer and the reader share."""

QUANT_METHOD = "gptq"
CHECKPOINT_FORMATS = {"v1": "gptq", "v2": "gptq_v2"}  # --gptq-format -> quantization_config.checkpoint_format
V1_ZERO_OFFSET = 1  # v1 stores zero point - 1 (loaders add it back)

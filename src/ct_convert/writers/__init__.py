"""Target writers, one module each, in a registry keyed by the target name."""

from ct_convert.writers.base import WRITERS, RepackOptions, Writer, writer_for

# importing a writer module registers it
from ct_convert.writers import dense  # noqa: F401,E402
from ct_convert.writers import trtllm  # noqa: F401,E402
from ct_convert.writers import awq, gptq, marlin  # noqa: F401,E402

__all__ = ["WRITERS", "RepackOptions", "Writer", "writer_for"]
from ct_convert.writers import gguf  # noqa: F401,E402
from ct_convert.targets.mlx import writer as _mlx_writer  # noqa: F401,E402
from ct_convert.targets.modelopt import writer as _modelopt  # noqa: F401,E402

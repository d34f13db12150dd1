"""One decoder per compressed-tensors storage format, in a registry keyed by the format name."""

from ct_convert.readers.formats.base import DECODERS, Decoder, ModuleTensors, decoder_for
from ct_convert.readers.formats import dense, fp4, marlin24, mx, naive, packed  # noqa: F401  (registration)

__all__ = ["DECODERS", "Decoder", "ModuleTensors", "decoder_for"]

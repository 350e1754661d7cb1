"""voxflow: streaming text-to-speech for conversational agents."""

import os

# oneDNN keeps the convolution kernels it builds for 1024 input shapes by default. The decoder's
# bucketed windows and the acoustic steps' shapes go past that, and every rebuilt kernel costs
# milliseconds: whole-text synthesis ran 1.35x slower with the default than with 4096, RSS
# unchanged within noise (docs/ARCHITECTURE.md, "Decoder precision and shapes"). oneDNN reads
# it at its first convolution, so it is set on import; a value the user exported wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")

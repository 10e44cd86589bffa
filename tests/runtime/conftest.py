# The compile tests need real JITFunctions in this process; launch() sets TRITON_INTERPRET
# for the simulated ranks it spawns, never for the test process itself.
import os

os.environ.pop("TRITON_INTERPRET", None)

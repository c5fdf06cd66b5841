"""A decoder for the loader tests that dies or hangs on chosen files (runs in workers)."""

import os
import time

from embedpipe.images.loader import decode_chunk


def crashy_decode_chunk(paths, preprocessing, max_pixels, mode):
    for p in paths:
        if "crash" in os.path.basename(p):
            os._exit(139)  # as a segfaulting native decoder would
        if "hang" in os.path.basename(p):
            time.sleep(3600)
    return decode_chunk(paths, preprocessing, max_pixels, mode)

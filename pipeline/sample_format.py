"""What a source's samples are made of, in a leaf module: ``sources`` and ``tar_index`` (which ``sources``
calls) both need these rules, and neither may import the other. ``pipeline.sources`` re-exports them."""

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
LABEL_EXT = ".cls"
NO_CRC = -1  # crc32c column value of a sample whose bytes were not read at indexing
MAX_LABEL_BYTES = 64  # a .cls holds a class index: a few digits and maybe a newline

"""The Pillow side of `resize_matches_pillow_bit_for_bit` in plugin/tests/preprocess.rs.

Resizes deterministic RGB images with Pillow's bicubic filter and prints the FNV-1a hash of
each output as the test's table of cases. Run through plugin/scripts/pillow-resize-hashes.sh,
which installs the Pillow version the table was made with into a cached venv.
"""

import sys

import PIL
from PIL import Image

# (src w, src h, dst w, dst h, seed): the test's cases, in its order.
CASES = [
    (37, 91, 224, 551, 1000),
    (64, 48, 74, 56, 1001),
    (91, 37, 20, 9, 1002),
    (1001, 7, 13, 3, 1003),
    (3, 1000, 7, 50, 1004),
    (1, 1, 5, 3, 1005),
    (50, 50, 50, 20, 1006),
    (50, 50, 17, 50, 1007),
    (640, 360, 398, 224, 1008),
    (5, 4, 1, 1, 1009),
]


def lcg_bytes(seed, n):
    """The test's `lcg_bytes`: s = (s * 1103515245 + 12345) & 0x7fffffff; byte = (s >> 16) & 255."""
    out = bytearray(n)
    s = seed
    for i in range(n):
        s = (s * 1103515245 + 12345) & 0x7FFFFFFF
        out[i] = (s >> 16) & 255
    return bytes(out)


def fnv1a(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def main():
    if PIL.__version__ != "10.4.0":
        print(f"warning: Pillow {PIL.__version__}, the table was made with 10.4.0", file=sys.stderr)
    for w, h, ow, oh, seed in CASES:
        image = Image.frombytes("RGB", (w, h), lcg_bytes(seed, w * h * 3))
        out = image.resize((ow, oh), Image.BICUBIC).tobytes()
        print(f"        ({w}, {h}, {ow}, {oh}, {seed}, 0x{fnv1a(out):016x}),")


if __name__ == "__main__":
    main()

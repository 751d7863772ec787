#!/usr/bin/env python3
"""Raw frames <-> 16-bit PNG, standard library only (GStreamer 1.22 has no 16-bit RGB image
encoder: pngenc and avenc_png take 8-bit RGB or 16-bit grey only).

  png16.py write RAW WIDTH HEIGHT OUT.png    RAW: RGBA64_LE pixels (what dpirrestore outputs)
  png16.py ramp WIDTH HEIGHT OUT.png         a 16-bit test image (smooth ramps finer than 8 bits)
  png16.py depth IN.png                      prints the PNG's bits per sample (8 or 16)
"""
import struct
import sys
import zlib


def write_png16(path, width, height, rgb16_rows):
    """rgb16_rows: per row, bytes of big-endian 16-bit R, G, B samples."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row for row in rgb16_rows)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(png)
    import os

    os.replace(tmp, path)


def main():
    cmd = sys.argv[1]
    if cmd == "write":
        raw_path, w, h, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        data = open(raw_path, "rb").read()
        if len(data) != w * h * 8:
            sys.exit(f"png16.py: {raw_path} holds {len(data)} bytes, not one {w}x{h} RGBA64_LE frame")
        rows = []
        for y in range(h):
            px = struct.unpack_from(f"<{w * 4}H", data, y * w * 8)
            rgb = [v for i, v in enumerate(px) if i % 4 != 3]
            rows.append(struct.pack(f">{w * 3}H", *rgb))
        write_png16(out, w, h, rows)
    elif cmd == "ramp":
        w, h, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        rows = []
        for y in range(h):
            rgb = []
            for x in range(w):
                # Ramps a few 8-bit levels high: 8-bit rounding would band them.
                rgb += [20000 + x * 3, 30000 + y * 5, 40000 + (x + y) * 2]
            rows.append(struct.pack(f">{w * 3}H", *rgb))
        write_png16(out, w, h, rows)
    elif cmd == "depth":
        head = open(sys.argv[2], "rb").read(32)
        if head[:8] != b"\x89PNG\r\n\x1a\n":
            print(8)
        else:
            print(head[24])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

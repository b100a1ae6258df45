# ruff: noqa: UP031
# %-formatting: MicroPython may be built without f-strings.
# Runs under MicroPython: decode, re-encode and stream-decode what the CPython
# test prepared in /input.json, and print the results as one JSON line.
import json
import sys

import kit_codec as kc


def hexlify(data):
    return "".join(["%02x" % b for b in data])


with open("/input.json") as f:
    data = json.loads(f.read())
out = {"implementation": sys.implementation.name, "vectors": [], "errors": []}
for frame_hex in data["frames"]:
    frame = bytes.fromhex(frame_hex)
    msg = kc.decode_frame(frame[:-1])
    out["vectors"].append({"decoded": msg, "reencoded": hexlify(kc.encode_message(msg))})
dec = kc.FrameDecoder()
stream = bytes.fromhex(data["stream"])
msgs = []
for i in range(0, len(stream), 37):
    msgs.extend(dec.feed(stream[i : i + 37]))
out["stream"] = {
    "counters": dec.counters(),
    "reencoded": [hexlify(kc.encode_message(m)) for m in msgs],
}
for bad in data["bad"]:
    try:
        kc.encode_message(bad)
        out["errors"].append("none")
    except TypeError:
        out["errors"].append("TypeError")
    except ValueError:
        out["errors"].append("ValueError")
out["crc_check"] = kc.crc16_ccitt_false(b"123456789")
print(json.dumps(out))

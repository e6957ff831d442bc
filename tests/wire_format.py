"""Hand encoding of protobuf's wire format, for tests that write files as another Caffe would."""


def varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number, wire, payload):
    """One field's bytes: its tag, then the payload (length-prefixed for wire type 2)."""
    if wire == 2:
        payload = varint(len(payload)) + payload
    return varint(number << 3 | wire) + payload

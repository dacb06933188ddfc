"""Line protocol: CRC, framing, the parser on hostile input; reject timing."""

import pytest

from firmware_io import protocol as P
from firmware_io.timing import RejectTiming, compute_target, retarget


def test_crc_check_value():
    assert P.crc16_ccitt_false(b"123456789") == 0x29B1
    assert P.crc16_ccitt_false(b"") == 0xFFFF


def _crc16_ccitt_false_reference(data: bytes, crc: int = 0xFFFF) -> int:
    # the bitwise definition (poly 0x1021, init 0xFFFF, MSB first), kept as the oracle
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


# docs/serial-protocol.md's example session, line for line
DOC_LINES = [b"REJ 7 P42 1 d350 50*7BB9", b"HELLO*49D6", b"HELLO gate-2.1.0 1*754D", b"HB 41*E858",
             b"ACK 41*C77C", b"REJ 42 P1007 1 d350 50*4B22", b"ACK 42*F71F",
             b"FIRED P1007 1 918273*2FA1", b"REJ 43 P1008 2 e120500 40*4BB5", b"NAK 43 UNSUP*50E5",
             b"ACC 44 P1009*CE1D", b"CFG 45 hb_timeout_ms 1500*97FC", b"TRG T88 120450*7B1E",
             b"FAULT HBLOST no heartbeat for 2000 ms, diverting all*A858",
             b"FAULT CLEAR heartbeat resumed*3A9C"]


@pytest.mark.parametrize("line", DOC_LINES)
def test_crc_matches_the_doc_vectors(line):
    body, crc = line.split(b"*")
    assert P.crc16_ccitt_false(body) == int(crc, 16) == _crc16_ccitt_false_reference(body)


def test_crc_equals_the_bitwise_definition_on_random_data():
    import random
    rng = random.Random(22)
    for n in list(range(0, 64)) + [rng.randrange(64, 4096) for _ in range(200)]:
        data = rng.randbytes(n)
        init = rng.choice([0xFFFF, 0, rng.randrange(0x10000)])
        assert P.crc16_ccitt_false(data, init) == _crc16_ccitt_false_reference(data, init)


def test_worked_example_from_the_doc():
    # docs/serial-protocol.md uses this line as its worked example
    assert P.encode("REJ", 7, "P42", 1, "d350", 50) == b"REJ 7 P42 1 d350 50*7BB9\n"
    assert P.encode("HELLO") == b"HELLO*49D6\n"


ALL_TO_GATE = [P.Hello(), P.Heartbeat(1), P.Reject(4294967295, "cam1-000123", 2, "e123456", 40),
               P.Accept(9, "P9"), P.Config(10, "hb_timeout_ms", "1500")]
ALL_TO_HOST = [P.HelloReply("gate-2.1.0", 1), P.Ack(5), P.Nak(6, "FULL"),
               P.Fired("P42", 1, 123456), P.Trigger("T7", -5), P.Fault("HBLOST", "no heartbeat 2000 ms")]


@pytest.mark.parametrize("msg", ALL_TO_GATE)
def test_roundtrip_to_gate(msg):
    p = P.LineParser("to_gate")
    assert p.feed(msg.encode()) == [msg]


@pytest.mark.parametrize("msg", ALL_TO_HOST)
def test_roundtrip_to_host(msg):
    p = P.LineParser("to_host")
    assert p.feed(msg.encode()) == [msg]


def test_partial_lines_byte_by_byte_and_crlf():
    data = b"".join(m.encode() for m in ALL_TO_HOST)
    data = data.replace(b"\n", b"\r\n")
    p = P.LineParser("to_host")
    out = []
    for i in range(len(data)):
        out += p.feed(data[i:i + 1])
    assert out == ALL_TO_HOST
    assert p.total_errors() == 0


def test_garbage_bad_crc_unknown_verb_overlong_bad_fields():
    good = P.Ack(1).encode()
    bad_crc = bytearray(P.Ack(2).encode())
    bad_crc[4] = ord("3")                              # ACK 3 with ACK 2's CRC
    unknown = P.frame(b"WHAT 1 2")
    to_gate_verb = P.Heartbeat(3).encode()              # valid line, wrong direction
    bad_fields = P.frame(b"ACK notanumber")
    overlong = b"X" * 1000 + b"\n"
    overlong_unterminated = b"Y" * 700                  # then the good line after a newline
    noise = bytes(range(11, 256)) + b"Z" * 20 + b"\n"    # 265 bytes of line noise
    stream = (b"\x00\xff" + b"junk without trailer\n" + good + bytes(bad_crc) + unknown
              + to_gate_verb + bad_fields + overlong + overlong_unterminated + b"\n" + noise
              + b"ACK 4*zzzz\n" + b"\n\n" + P.Ack(5).encode() + P.Ack(6).encode()[:-3])
    p = P.LineParser("to_host")
    msgs = []
    for i in range(0, len(stream), 7):                  # odd-sized chunks
        msgs += p.feed(stream[i:i + 7])
    assert msgs == [P.Ack(1), P.Ack(5)]
    assert p.errors["bad_checksum"] == 1
    assert p.errors["unknown_verb"] == 2
    assert p.errors["bad_fields"] == 1
    assert p.errors["overlong"] == 3                    # 1000 X, 700 Y, the 256+ noise line
    assert p.errors["garbage"] == 2                     # "junk..." line (with NULs), "*zzzz"
    # the partial ACK 6 completes with the next chunk
    assert p.feed(P.Ack(6).encode()[-3:]) == [P.Ack(6)]


def test_encode_refuses_bad_fields():
    for bad in ("has space", "star*", "", "tab\t", "é"):
        with pytest.raises((P.ProtocolError, UnicodeEncodeError)):
            P.encode("REJ", 1, bad, 1, "d0", 50)
    with pytest.raises(P.ProtocolError):
        P.encode("REJ", 1, "P" * 300, 1, "d0", 50)      # line > 256 bytes


def test_fault_text_is_free_but_sanitised():
    line = P.Fault("HBLOST", "no * heartbeat\r\n").encode()
    assert line.count(b"*") == 1 and line.count(b"\n") == 1
    assert P.LineParser("to_host").feed(line) == [P.Fault("HBLOST", "no # heartbeat")]


# ------------------------------------------------------------------------ timing

MS = 1_000_000


def test_time_mode_target_and_late_policy():
    t = RejectTiming(delay_ms=500, min_lead_ms=5)
    now = 10_000 * MS
    on_time = compute_target(t, now - 120 * MS, None, now)
    assert (on_time.at, on_time.late) == ("d380", False)
    just_late = compute_target(t, now - 497 * MS, None, now)      # 3 ms lead < 5 ms
    assert (just_late.at, just_late.late) == ("d0", True)
    very_late = compute_target(t, now - 900 * MS, None, now)
    assert (very_late.at, very_late.late) == ("d0", True) and very_late.lead_ms < 0
    # a resend 30 ms later still aims at the same instant
    assert retarget(on_time, now + 30 * MS) == "d350"
    assert retarget(very_late, now + 30 * MS) == "d0"


def test_encoder_mode_target():
    t = RejectTiming(mode="encoder", encoder_offset=1200)
    tgt = compute_target(t, 0, encoder=1000, now_ns=5 * MS)
    assert (tgt.at, tgt.late, tgt.mode) == ("e2200", False, "encoder")
    assert compute_target(t, 0, encoder=2**32 - 100, now_ns=0).at == "e1100"   # wraps
    assert compute_target(t, 0, encoder=1000, now_ns=0, encoder_now=2300).late
    assert not compute_target(t, 0, encoder=1000, now_ns=0, encoder_now=2100).late
    # no latched count: fall back to time mode rather than lose the reject
    fb = compute_target(t, 0, encoder=None, now_ns=100 * MS)
    assert fb.mode == "time" and fb.at == "d400"


def test_timing_validation():
    with pytest.raises(ValueError):
        RejectTiming(mode="laser")
    with pytest.raises(ValueError):
        RejectTiming(pulse_ms=0)


def test_one_nearest_rank_quantile():
    from firmware_io.gates.base import quantiles_ms
    from firmware_io.timing import quantile
    assert quantile([], 0.5) is None
    assert quantile([7], 0.0) == quantile([7], 0.99) == 7
    s = list(range(1, 101))                       # 1..100
    assert quantile(s, 0.5) == 51 and quantile(s, 0.99) == 100 and quantile(s, 0.0) == 1
    assert quantile(s, 1.0) == 100
    for n in range(1, 40):
        s = sorted((i * 37) % 101 for i in range(n))
        for q in (0.0, 0.25, 0.5, 0.9, 0.99, 1.0):
            assert quantile(s, q) == s[min(len(s) - 1, int(q * len(s)))]
    assert quantiles_ms([3_000_000, 1_000_000, 2_000_000]) == {"p50": 2.0, "p99": 3.0, "max": 3.0, "n": 3}
    assert quantiles_ms([]) == {}

"""Coverage-guided fuzzing of the FastAGI session with atheris (libFuzzer).

    python fuzz/fuzz_agi.py -runs=20000 -seed=1     # bounded, as tests/test_fuzz_agi.py does
    python fuzz/fuzz_agi.py -max_total_time=600 corpus/  # a longer hunt, keeping a corpus

Each input is split by FuzzedDataProvider into: the channel type, the caller's address
(which appears only in Asterisk's true answer to the nonce resync), the environment
block, and per command the bytes Asterisk writes before and after its answer. The
session runs through the production path (fuzz/harness.py); any exception escaping
it, a loop error, or a count for an address other than the caller's aborts the run.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["fastagi", "asterisk"]):
    from fuzz.harness import CALLERS, Case, Fuzzer, Reply, _true_answer

TYPES = [b"SIP", b"PJSIP", b"Local", b"IAX2", b""]
HEAD = b"agi_network: yes\nagi_network_script: screen\nagi_type: "

_loop = asyncio.new_event_loop()
_fuzzer = Fuzzer()


class _Rng:
    """The one random choice _true_answer makes, taken from the fuzzer's bytes."""

    def __init__(self, fdp: atheris.FuzzedDataProvider) -> None:
        self.fdp = fdp

    def choice(self, seq):
        return seq[self.fdp.ConsumeIntInRange(0, len(seq) - 1)]


def case_from_bytes(data: bytes) -> Case:
    fdp = atheris.FuzzedDataProvider(data)
    channel_type = TYPES[fdp.ConsumeIntInRange(0, len(TYPES) - 1)]
    caller = CALLERS[fdp.ConsumeIntInRange(0, len(CALLERS) - 1)]
    raw_env = fdp.ConsumeBool()
    env = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    if not raw_env:  # the attacker's view: a genuine head, then anything
        env = HEAD + channel_type + b"\nagi_dnid: " + env
    if fdp.ConsumeBool():
        env += b"\n\n"  # the block's end, often enough to reach the later commands
    replies = []
    for n in range(fdp.ConsumeIntInRange(1, 6)):
        reply = Reply(
            before=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512)),
            after=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 128)),
        )
        if n == 0 and fdp.ConsumeBool():
            reply.true_answer = _true_answer(_Rng(fdp), channel_type, caller)
        reply.eof = fdp.ConsumeIntInRange(0, 15) == 0
        replies.append(reply)
    return Case(env, caller, replies, eof_after=fdp.ConsumeBool(), env_eof=fdp.ConsumeBool())


def TestOneInput(data: bytes) -> None:
    _loop.run_until_complete(_fuzzer.run_case(case_from_bytes(data)))


def _report() -> None:
    print(f"fuzz_agi: {_fuzzer.cases} cases run", flush=True)


def main() -> None:
    atexit.register(_report)  # libFuzzer ends the process with exit()
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

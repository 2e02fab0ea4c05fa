"""`image-service` with the telemetry forwarder's clock slowed down (`python -m bench.scaled_server
SCALE serve ...`), for a server run under valgrind, ~100 times slower than native.

The forwarder's rounds, its patience with the encoder process and the encoder's reply deadline are
seconds of wall time. At a hundredth of its speed, a server would poll about once a request instead
of once every few hundred, and encode small batches on the event loop because they grew old before
a frame filled: a different path from the one it takes at full speed. Scaled by SCALE (50 in
`bench cycles`), each comes about twice as often a request as natively, overstating the forwarder.
"""

from __future__ import annotations

import sys

from image_service.cli import main
from image_service.tracking import encoder, forwarder

SCALED = ("POLL_SECONDS", "COLLECT_SECONDS", "GUARD_SECONDS", "HELPER_PATIENCE")


def scale(factor: float) -> None:
    for name in SCALED:
        setattr(forwarder, name, getattr(forwarder, name) * factor)
    encoder.REPLY_TIMEOUT *= factor
    encoder.START_TIMEOUT *= factor


if __name__ == "__main__":
    scale(float(sys.argv[1]))
    raise SystemExit(main(sys.argv[2:]))

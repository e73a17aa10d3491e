"""The KBS benchmark suite (``make bench``): handshakes, resource GETs, the crypto floor,
scaling and memory, against real ``kbs`` processes on loopback. See docs/performance.md."""

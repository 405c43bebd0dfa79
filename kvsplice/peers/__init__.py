"""Peer methods in the same harness: one small file per peer, all behind `Peer` + the `PEERS`
registry (base.py). Importing this package registers every built-in peer.

    "kivi"          KIVI as its authors' code: K per-channel groups of 32 tokens flushed in blocks of
                    R = 128 (L mod R raw), V per-token groups of 32 channels (newest R raw)
    "h2o"           H2O: fixed heavy-hitter (accumulated attention) + recent rows (token eviction)
    "streamingllm"  StreamingLLM: 4 attention-sink tokens + window (token eviction)
    "hf-quantized"  transformers' QuantizedCache (optimum-quanto / HQQ backend, library defaults)
Fidelity to each reference, parameters and departures: docs/PEERS.md.
    "uniform-int"   plain per-token int8 / int4 / int2 of K and V (the "uniform" codec)
"""

from kvsplice.peers.base import PEERS, Peer, PeerError, get_peer, peer_names, register_peer
from kvsplice.peers import h2o, hf_quantized, kivi, streaming, uniform  # noqa: F401  (registration)

__all__ = ["PEERS", "Peer", "PeerError", "get_peer", "peer_names", "register_peer"]

"""Peer methods in the same harness: one small file per peer, all behind `Peer` + the `PEERS`
registry (base.py). Importing this package registers every built-in peer.

    "kivi"          KIVI-style: K per-channel groups of g tokens, V per-token, fp residual window
    "h2o"           H2O: accumulated attention + recent window (token eviction)
    "streamingllm"  StreamingLLM: attention-sink tokens + window (token eviction)
    "hf-quantized"  transformers' QuantizedCache (optimum-quanto / HQQ backend), bytes counted
    "uniform-int"   plain per-token int8 / int4 / int2 of K and V (the "uniform" codec)
"""

from kvsplice.peers.base import PEERS, Peer, PeerError, get_peer, peer_names, register_peer
from kvsplice.peers import h2o, hf_quantized, kivi, streaming, uniform  # noqa: F401  (registration)

__all__ = ["PEERS", "Peer", "PeerError", "get_peer", "peer_names", "register_peer"]

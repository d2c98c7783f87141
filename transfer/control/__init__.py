"""The ZMQ control plane between a decoder's workers and a prefill's workers.

    channel.py   SideChannelServer and the client calls (``request``, ``handshake``); every
                 message both ways in an HMAC-authenticated envelope (seal, open_envelope,
                 ReplayCache), size-capped, rejections counted
    messages.py  the typed, versioned messages (Envelope, Compat, HandshakeRequest/Reply,
                 AbortNotice, KVTransferParams, ...)
"""

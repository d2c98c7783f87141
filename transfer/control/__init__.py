"""The ZMQ control plane between a decoder's workers and a prefill's workers.

    channel.py   SideChannelServer and the client calls (``request``, ``handshake``)
    messages.py  the typed, versioned messages (Compat, HandshakeRequest/Reply,
                 AbortNotice, KVTransferParams, ...)
"""

"""No pickle crosses any wire: no product module imports a pickle-like serializer or calls
one, and the side channel refuses a pickled payload (it is JSON both ways, authenticated)."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

from disagg.transfer.control import channel
from disagg.transfer.control.channel import REPLY, REQUEST, open_envelope, seal
from disagg.transfer.control.messages import (
    AbortNotice,
    Compat,
    ErrorReply,
    HandshakeRequest,
    decode_message,
    decode_reply,
)

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("disagg", "transfer", "kernels", "scheduler", "launch")
BANNED_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve",
                  "jsonpickle"}
BANNED_CALLS = {"send_pyobj", "recv_pyobj"}  # pyzmq's pickling helpers
PICKLE_FUNCS = {"loads", "load", "dumps", "dump", "Unpickler", "Pickler"}
KEY = b"no-pickle test key"
# Files that may ``import pickle`` to call ``pickle.dumps`` and nothing else (no loads, no
# other module), with why. Nothing they pickle is sent or ever unpickled.
DUMPS_ONLY = {
    "scheduler/hashing.py": "reproduces vLLM's block hashes, sha256(pickle.dumps((parent, "
                            "tokens, None))), in the gateway; the bytes are hashed, not sent",
}


def _root(name: str) -> str:
    return name.split(".")[0]


def violations(source: str, where: str = "<string>", dumps_only: bool = False) -> list[str]:
    """Every pickle import or call in ``source``, as 'where:line: what'. ``dumps_only``:
    ``import pickle`` and ``pickle.dumps(...)`` are allowed (see ``DUMPS_ONLY``)."""
    tree = ast.parse(source, where)
    found: list[str] = []
    aliases: set[str] = set()  # local names bound to a banned module

    def bad(node: ast.AST, what: str) -> None:
        found.append(f"{where}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _root(a.name) in BANNED_MODULES:
                    if not (dumps_only and a.name == "pickle" and a.asname is None):
                        bad(node, f"import {a.name}")
                    aliases.add(a.asname or _root(a.name))
        elif (isinstance(node, ast.ImportFrom) and node.module and not node.level
              and _root(node.module) in BANNED_MODULES):
            bad(node, f"from {node.module} import ...")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
        owner = fn.value if isinstance(fn, ast.Attribute) else None
        owner_name = getattr(owner, "id", None) or getattr(owner, "attr", None)
        if name in BANNED_CALLS:
            bad(node, f"call of {name}")
        elif name in PICKLE_FUNCS and (owner_name in BANNED_MODULES or owner_name in aliases):
            if not (dumps_only and name == "dumps" and owner_name == "pickle"):
                bad(node, f"call of {owner_name}.{name}")
        elif name in ("import_module", "__import__") and any(
                isinstance(a, ast.Constant) and isinstance(a.value, str)
                and _root(a.value) in BANNED_MODULES for a in node.args):
            bad(node, f"dynamic import of a pickle module ({name})")
        elif name == "load" and owner_name == "torch" and not any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                and k.value.value is True for k in node.keywords):
            bad(node, "torch.load without weights_only=True (unpickles)")
        elif name == "load" and owner_name in ("np", "numpy") and any(
                k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant)
                                                  and k.value.value is False)
                for k in node.keywords):
            bad(node, "numpy load with allow_pickle")
    return found


def product_files() -> list[Path]:
    files = [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20, "the product modules were not found"
    return files


def test_no_product_module_pickles():
    found = []
    for path in product_files():
        rel = path.relative_to(ROOT).as_posix()
        found += violations(path.read_text(), rel, dumps_only=rel in DUMPS_ONLY)
    assert not found, "pickle in the product (JSON/msgpack/raw bytes only):\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "import pickle",
    "import cloudpickle as cp",
    "from dill import loads",
    "import marshal\nmarshal.loads(b'')",
    "import pickle as p\np.loads(x)",
    "sock.send_pyobj({'a': 1})",
    "obj = self._sock.recv_pyobj()",
    "importlib.import_module('pickle').loads(x)",
    "torch.load(path)",
    "np.load(path, allow_pickle=True)",
])
def test_the_scan_catches_pickle(source):
    assert violations(source)


def test_dumps_only_files_may_not_load():
    assert not violations("import pickle\npickle.dumps(x)", dumps_only=True)
    for source in ("import pickle\npickle.loads(x)", "import pickle as p\np.dumps(x)",
                   "import pickle\npickle.Unpickler(f)", "import dill\ndill.dumps(x)",
                   "from pickle import loads"):
        assert violations(source, dumps_only=True), source
    assert all((ROOT / rel).is_file() for rel in DUMPS_ONLY)  # no stale exceptions


@pytest.mark.parametrize("source", [
    "json.loads(raw)", "msgspec.msgpack.decode(raw)", "torch.load(p, weights_only=True)",
    "np.load(path)", "Model.model_validate_json(raw)",
])
def test_the_scan_lets_json_and_safe_loads_through(source):
    assert not violations(source)


_detonated: list[str] = []


def _detonate(tag: str) -> str:
    _detonated.append(tag)
    return tag


class _Payload:
    """Unpickling this runs ``_detonate``: proof that nobody unpickled it."""

    def __reduce__(self):
        return (_detonate, ("unpickled",))


def test_the_side_channel_refuses_a_pickled_payload():
    calls: list[bytes] = []

    def handler(raw: bytes):
        calls.append(raw)
        msg = decode_message(raw)  # what ConnectorWorker._on_message does first
        return msg if isinstance(msg, AbortNotice) else ErrorReply(message="unexpected")

    server = channel.SideChannelServer("127.0.0.1", 0, handler, key=KEY)
    compat = Compat(model="m", dtype="bf16", block_size=16, num_layers=1, plane_bytes=[1])
    pickled = [pickle.dumps(_Payload(), protocol=p) for p in (2, 5)] + [
        pickle.dumps(HandshakeRequest(engine_id="d", compat=compat))]
    try:
        import zmq

        ctx = zmq.Context.instance()
        for i, payload in enumerate(pickled):
            # Bare, as pyzmq's send_pyobj would send it: no envelope, dropped unanswered.
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 500)
            sock.connect(f"tcp://127.0.0.1:{server.port}")
            sock.send(payload)
            with pytest.raises(zmq.Again):
                sock.recv_multipart()
            sock.close(0)
            # Even in a valid envelope (a peer with the key): refused as not JSON.
            nonce = bytes([i + 1]) * 16
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 5000)
            sock.connect(f"tcp://127.0.0.1:{server.port}")
            sock.send_multipart(seal(KEY, payload, REQUEST, nonce=nonce))
            reply = decode_reply(open_envelope(KEY, sock.recv_multipart(), REPLY, 1 << 20,
                                               re=nonce)[1])
            sock.close(0)
            assert isinstance(reply, ErrorReply) and "not a JSON object" in reply.message
        assert server.rejected["malformed"] == len(pickled)
        assert calls == pickled  # the handler saw the bytes only when authenticated...
        assert not _detonated  # ...and nothing was ever unpickled
        # The server still serves valid peers.
        assert channel.request("127.0.0.1", server.port, AbortNotice(request_ids=["x"]), 5,
                               key=KEY) == AbortNotice(request_ids=["x"])
    finally:
        server.close()

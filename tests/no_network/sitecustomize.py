"""Imported at interpreter start-up when this directory is on PYTHONPATH: blocks and records network access.

Every socket connect / name look-up / datagram to anything but the loopback interface (or to the port named
by ``NO_NETWORK_DEAD_PORT``, the dead proxy the tests point HTTP(S)_PROXY at) raises OSError and is appended to
the file named by ``NO_NETWORK_LOG``, so a test can prove a subprocess tried no network at all.
"""

import ipaddress
import os
import sys

_LOG = os.environ.get("NO_NETWORK_LOG")
_DEAD_PORT = int(os.environ.get("NO_NETWORK_DEAD_PORT", "0"))


def _is_local(host) -> bool:
    if host in (None, "", "localhost", "localhost.localdomain"):
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _hook(event, args):
    if event == "socket.connect" or event == "socket.sendto":
        address = args[1]
        if not isinstance(address, tuple):  # AF_UNIX path: local by definition
            return
        host, port = address[0], address[1]
        blocked = not _is_local(host) or (_DEAD_PORT and port == _DEAD_PORT)
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        host, port = args[0], (args[1] if len(args) > 1 else None)
        blocked = not _is_local(host)
    else:
        return
    if blocked:
        if _LOG:
            with open(_LOG, "a") as f:
                f.write(f"{event} {host!r}:{port!r} pid={os.getpid()} argv={sys.argv[:3]}\n")
        raise OSError(f"network access blocked by tests/no_network: {event} {host!r}:{port!r}")


if _LOG:
    sys.addaudithook(_hook)

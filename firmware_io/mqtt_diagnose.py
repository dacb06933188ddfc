"""Why the MQTT broker cannot be reached, in one line a plant engineer can act on.

paho retries a failed connect in its network thread and keeps the reason to itself
(on_connect_fail carries no error), so a wrong port, a TLS/plain mismatch or a bad host
would show as "connecting" forever. This repeats the steps of a connect (resolve, TCP,
TLS handshake) with short timeouts and names the first that fails.
"""

from __future__ import annotations

import socket
import ssl


def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """The context paho's tls_set() builds from the same settings (verified, hostname checked)."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def why_unreachable(host: str, port: int, tls: ssl.SSLContext | None,
                    timeout: float = 2.0) -> str:
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        return (f"cannot resolve host {host!r} ({getattr(e, 'strerror', None) or e}); "
                "mqtt.host takes a bare host name or address, the port goes in mqtt.port")
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return f"nothing listens on {host}:{port} (connection refused): is the broker running?"
    except (TimeoutError, socket.timeout):
        return f"no answer from {host}:{port} within {timeout:g} s (wrong address, or a firewall?)"
    except OSError as e:
        return f"cannot reach {host}:{port}: {e.strerror or e}"
    with sock:
        if tls is None:
            return (f"{host}:{port} accepts TCP but closed the MQTT connect (a TLS port? then "
                    "set tls = true)")
        sock.settimeout(timeout)
        try:
            with tls.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as e:
            return (f"the broker's TLS certificate is not trusted ({e.verify_message}); "
                    "check mqtt.ca_file and that host names the certificate's host")
        except (ssl.SSLError, OSError) as e:
            return (f"TLS handshake with {host}:{port} failed ({e.__class__.__name__}: "
                    f"{getattr(e, 'reason', None) or e}): is this a plain MQTT port? "
                    "(tls = true needs the broker's TLS listener, usually 8883)")
    return f"{host}:{port} completed TCP and TLS but the MQTT connect failed"

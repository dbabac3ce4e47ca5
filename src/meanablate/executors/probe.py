"""Probing a Ray address before ``ray.init``: a fast, clear ``ConnectionError``.

``ray.init`` on an address where nothing (or something other than Ray) listens can hang
for minutes; :func:`probe` answers within about ``connect_timeout`` seconds.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["AUTH_HINT", "host_port", "probe"]

AUTH_HINT = (
    "Clusters started with token authentication (the default of recent Ray) need "
    "RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file "
    "~/.ray/auth_token copied from the head node) in the driver's environment."
)


class _AuthError(ConnectionError):
    pass


def host_port(address: str) -> tuple[str, int]:
    """``host:port`` of a Ray address (GCS ``host:6379`` or client ``ray://host:10001``)."""
    client = address.startswith("ray://")
    rest = address[len("ray://") :] if client else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep:
        return rest, 10001 if client else 6379
    if not port.isdigit():
        raise ValueError(f"bad Ray address {address!r}: the port must be a number")
    return host.strip("[]"), int(port)


def _unreachable(
    address: str, host: str, port: int, reason: str, timeout: float
) -> ConnectionError:
    return ConnectionError(
        f"cannot reach the Ray cluster at {address!r} ({host}:{port}: {reason}; gave up after "
        f"at most {timeout:g} s). Start one with `ray start --head` on the head node and pass "
        "its address (host:6379, or ray://host:10001 for Ray Client), or 'auto' on a node of "
        "the cluster."
    )


def _ask_ray(address: str, host: str, port: int, timeout: float) -> None:
    """One request to the GCS (or the Ray Client server): ``Exception`` if it is not Ray.

    Uses Ray's own clients where this Ray version has them; otherwise it does nothing.
    """
    if address.startswith("ray://"):
        try:
            import grpc
            from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc
        except ImportError:  # Ray without the [client] extra: ray.init will say so
            return
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stub = ray_client_pb2_grpc.RayletDriverStub(channel)
            request = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
            try:
                stub.ClusterInfo(request, timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED:  # a Ray server all the same
                    raise RuntimeError(f"{exc.code().name}: {exc.details()}") from None
        return
    try:
        from ray._raylet import InnerGcsClient
    except ImportError:
        return
    standalone = getattr(InnerGcsClient, "standalone", None)
    if standalone is None:
        return
    try:
        standalone(f"{host}:{port}", None, max(1, int(timeout * 1000)))
    except Exception as exc:
        text = str(exc).lower()
        if "authentication" in text or "authtoken" in text:
            raise _AuthError(
                f"the Ray cluster at {address!r} refused this driver's authentication token. "
                f"{AUTH_HINT}"
            ) from None
        raise


def probe(address: str, timeout: float) -> None:
    """``ConnectionError`` within about ``timeout`` s unless a Ray cluster answers there.

    A TCP connect first (refused, unroutable); then one request in Ray's protocol, since
    something else may listen on the port. Nothing is initialized by either.
    """
    host, port = host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise _unreachable(address, host, port, reason, timeout) from None
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            _ask_ray(address, host, port, timeout)
            outcome.append(None)
        except BaseException as exc:  # reported to the caller below
            outcome.append(exc)

    thread = threading.Thread(target=ask, name="meanablate-ray-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome:
        raise _unreachable(address, host, port, "no answer in Ray's protocol", timeout)
    if isinstance(outcome[0], _AuthError):
        raise ConnectionError(str(outcome[0])) from None
    if outcome[0] is not None:
        reason = f"something answers, but not a Ray cluster: {str(outcome[0]).strip()[:200]}"
        raise _unreachable(address, host, port, reason, timeout)

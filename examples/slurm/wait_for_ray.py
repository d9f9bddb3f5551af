"""Wait until a Ray cluster is up with NODES nodes: `python3 wait_for_ray.py ADDRESS NODES`."""

from __future__ import annotations

import sys
import time

import ray

TIMEOUT_S = 300


def main(address: str, num_nodes: int) -> int:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            break
        except (ConnectionError, RuntimeError) as e:  # the head is not listening yet
            if time.monotonic() > deadline:
                print(f"no Ray head at {address} after {TIMEOUT_S}s: {e}", file=sys.stderr)
                return 1
            time.sleep(2)
    try:
        while (alive := sum(n["Alive"] for n in ray.nodes())) < num_nodes:
            if time.monotonic() > deadline:
                print(f"only {alive} of {num_nodes} Ray nodes joined", file=sys.stderr)
                return 1
            time.sleep(2)
        res = ray.cluster_resources()
        print(
            f"Ray cluster at {address}: {alive} node(s), {int(res.get('CPU', 0))} CPUs, "
            f"{int(res.get('GPU', 0))} GPUs"
        )
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))

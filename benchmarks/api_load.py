"""API latency under load: N concurrent clients submit merges and poll their status while workers are busy.

Prints p50/p99 latency of submit (POST /v1/merges) and status (GET /v1/merges/{id}) calls. Two modes:

    # against a running service (its rate limit must allow the submissions: ALLOY_RATE_LIMIT_PER_MINUTE)
    python benchmarks/api_load.py --url http://127.0.0.1:8000 --token $TOKEN --base /data/base \
        --model /data/ft1 --model /data/ft2 --clients 16 --duration 30

    # self-contained: starts `alloy serve` (SQLite + filesystem broker, one local worker) in a temp ALLOY_HOME,
    # generates small models, creates a token, runs the load, stops the service
    python benchmarks/api_load.py --spawn --clients 16 --duration 30

``--readyz-clients N`` adds N clients that call the public ``/readyz`` back to back (its p99 is printed too).
Timeouts and resets count as errors. Every submission is a distinct recipe (its lambda differs), so none is answered from the idempotency cache and
the worker stays busy for the whole run. The API reads only the database, so the status latency is what a busy
job store costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Samples:
    submit_s: list[float] = field(default_factory=list)
    status_s: list[float] = field(default_factory=list)
    readyz_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, seconds: float) -> None:
        with self.lock:
            {"submit": self.submit_s, "status": self.status_s, "readyz": self.readyz_s}[kind].append(seconds)

    def error(self, what: str) -> None:
        with self.lock:
            self.errors[what] = self.errors.get(what, 0) + 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def run_client(
    index: int,
    *,
    url: str,
    token: str,
    base: str,
    models: list[str],
    deadline: float,
    polls_per_submit: int,
    poll_interval_s: float,
    samples: Samples,
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            recipe = {
                "method": "task_arithmetic",
                "base": base,
                "models": [{"source": m} for m in models],
                # distinct per submission (no idempotent replay)
                "params": {"lambda": round(0.001 + (index * 100_000 + n) * 1e-7, 7)},
            }
            start = time.perf_counter()
            try:
                response = client.post("/v1/merges", json=recipe)
            except httpx.HTTPError as exc:  # a timeout or reset is an error of the run, not a dead client
                samples.error(f"submit {type(exc).__name__}")
                continue
            elapsed = time.perf_counter() - start
            if response.status_code != 202:
                samples.error(f"submit {response.status_code}")
                time.sleep(poll_interval_s)
                continue
            samples.add("submit", elapsed)
            job_id = response.json()["id"]
            for _ in range(polls_per_submit):
                if time.monotonic() >= deadline:
                    break
                start = time.perf_counter()
                try:
                    response = client.get(f"/v1/merges/{job_id}")
                except httpx.HTTPError as exc:
                    samples.error(f"status {type(exc).__name__}")
                    continue
                elapsed = time.perf_counter() - start
                if response.status_code == 200:
                    samples.add("status", elapsed)
                else:
                    samples.error(f"status {response.status_code}")
                time.sleep(poll_interval_s)


def run_prober(*, url: str, deadline: float, samples: Samples) -> None:
    """Hammers the public /readyz (no token, no pause): it must stay cached, bounded and harmless."""
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                response = client.get("/readyz")
            except httpx.HTTPError as exc:
                samples.error(f"readyz {type(exc).__name__}")
                continue
            if response.status_code in (200, 503):  # 503: not ready is an answer
                samples.add("readyz", time.perf_counter() - start)
            else:
                samples.error(f"readyz {response.status_code}")


def report(samples: Samples, *, clients: int, duration_s: float, busy_jobs: int | None) -> None:
    print(
        f"clients={clients} duration={duration_s:.0f}s submits={len(samples.submit_s)} "
        f"status_calls={len(samples.status_s)} errors={samples.errors or 0}"
        + (f" active_jobs_at_end(first page)={busy_jobs}" if busy_jobs is not None else "")
    )
    for name, values in (
        ("submit", samples.submit_s),
        ("status", samples.status_s),
        ("readyz", samples.readyz_s),
    ):
        if values:
            print(
                f"{name:>6}: p50 {percentile(values, 50) * 1000:7.1f} ms   p99 {percentile(values, 99) * 1000:7.1f} ms"
                f"   mean {statistics.fmean(values) * 1000:7.1f} ms   ({len(values) / duration_s:.1f}/s)"
            )


def count_active(url: str, token: str) -> int | None:
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
            return sum(
                len(client.get("/v1/merges", params={"status": s}).json().get("items", []))
                for s in ("queued", "running")
            )
    except (httpx.HTTPError, ValueError):
        return None


@contextmanager
def spawned_service(home: Path, *, rate_limit: int) -> Iterator[tuple[str, str, str, list[str]]]:
    """`alloy serve` in a temp home with small generated models; yields (url, token, base, models)."""
    import socket

    sys.path.insert(0, str(REPO_ROOT))
    from merge_ops.demo import write_synthetic_model

    data = home / "data"
    base = write_synthetic_model(data / "base", layers=4, hidden=128, vocab=512, seed=0)
    models = [
        write_synthetic_model(data / f"ft{i}", layers=4, hidden=128, vocab=512, seed=i, base_seed=0)
        for i in (1, 2)
    ]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOY_")}
    env.update(
        {
            "ALLOY_HOME": str(home),
            "ALLOY_DATA_DIRS": str(data),
            "ALLOY_RATE_LIMIT_PER_MINUTE": str(rate_limit),
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    code = (
        f"from app.serve import serve; serve(host='127.0.0.1', port={port}, workers=1, log_level='warning')"
    )
    log = (home / "serve.log").open("wb")
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"alloy serve did not start; see {home / 'serve.log'}")
            time.sleep(0.2)
        os.environ.update({k: v for k, v in env.items() if k.startswith("ALLOY_")})
        from app.core.config import Settings
        from app.db import get_engine, session_factory
        from app.services.tokens import create_token

        settings = Settings()
        with session_factory(get_engine(settings.database_url))() as session:
            token = create_token(session, name="api-load")
        yield url, token, str(base), [str(m) for m in models]
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url")
    parser.add_argument("--token")
    parser.add_argument("--base", help="base model path (as the service sees it)")
    parser.add_argument("--model", action="append", default=[], help="fine-tuned model path (repeat)")
    parser.add_argument("--spawn", action="store_true", help="start a throwaway `alloy serve` and models")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--polls-per-submit", type=int, default=10)
    parser.add_argument("--poll-interval", type=float, default=0.05, help="seconds between a client's polls")
    parser.add_argument("--readyz-clients", type=int, default=0, help="extra clients hammering /readyz")
    args = parser.parse_args(argv)

    def load(url: str, token: str, base: str, models: list[str]) -> None:
        samples = Samples()
        deadline = time.monotonic() + args.duration
        threads = [
            threading.Thread(
                target=run_client,
                kwargs=dict(
                    index=i,
                    url=url,
                    token=token,
                    base=base,
                    models=models,
                    deadline=deadline,
                    polls_per_submit=args.polls_per_submit,
                    poll_interval_s=args.poll_interval,
                    samples=samples,
                ),
            )
            for i in range(args.clients)
        ] + [
            threading.Thread(target=run_prober, kwargs=dict(url=url, deadline=deadline, samples=samples))
            for _ in range(args.readyz_clients)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        report(
            samples,
            clients=args.clients,
            duration_s=time.monotonic() - started,
            busy_jobs=count_active(url, token),
        )

    if args.spawn:
        with (
            tempfile.TemporaryDirectory(prefix="alloy-load-") as tmp,
            spawned_service(Path(tmp), rate_limit=1_000_000) as (url, token, base, models),
        ):
            load(url, token, base, models)
        return 0
    if not (args.url and args.token and args.base and args.model):
        parser.error("give --url, --token, --base and --model (or --spawn)")
    load(args.url, args.token, args.base, args.model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The black box: a live Bastion server seen through its public REST protocol only.

An :class:`Oracle` sends a batch of inputs to one model or zoo name, with optional zoo
targets (``parameters: {"accuracy": a, "latency_ms": l}``) and an API key, and returns
the probabilities the server answered. It counts what it spends (rows and requests,
answered or not: a server's quota counts a refused request as well), stops at a row
budget, waits out ``429`` + ``Retry-After`` (rate limits) up to a bound, and reports
progress through a callback. It knows nothing of the server's internals: the input and
output names come from the model's public metadata.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bastion.client import Client, ClientError
from bastion.core.datatypes import numpy_dtype

if TYPE_CHECKING:
    import httpx

__all__ = ["Answer", "BudgetExhausted", "Oracle", "OracleError", "Targets"]

# zoo targets as the client sends them: {"accuracy": a, "latency_ms": l}, either absent
Targets = Mapping[str, float]
Progress = Callable[[int, int | None], None]  # (rows spent, row budget or None)


class OracleError(Exception):
    """The server answered something the lab cannot use (not a 200 or a 422)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BudgetExhausted(OracleError):
    """The lab's own row budget is spent, or the server's quota refuses for longer than
    the oracle is willing to wait."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One request's outcome: ``probs`` [rows, classes] when served (status 200), else None
    (422: no variant meets the targets; ``message`` is the server's reason)."""

    probs: np.ndarray | None
    status: int
    latency_ms: float  # client-side round trip: a secondary signal only (network noise included)
    message: str = ""

    @property
    def served(self) -> bool:
        return self.probs is not None


class _HeaderClient(Client):
    """Client keeps Retry-After out of ClientError; a response hook remembers it."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.retry_after: float | None = None
        self._http.event_hooks["response"].append(self._remember)

    def _remember(self, response: httpx.Response) -> None:
        value = response.headers.get("retry-after")
        try:
            self.retry_after = float(value) if value is not None else None
        except ValueError:
            self.retry_after = None


@dataclass
class Oracle:
    """Query ``model`` (a model or a zoo) on the server at ``url``.

    ``budget``: rows this oracle may send in all (None: unlimited); a request that would
    pass it raises :class:`BudgetExhausted` without being sent. ``max_wait_s``: the
    longest single ``Retry-After`` the oracle waits out; a longer one (a spent daily
    quota) ends the run with :class:`BudgetExhausted`.
    """

    url: str
    model: str
    api_key: str | None = None
    budget: int | None = None
    max_wait_s: float = 30.0
    timeout_s: float = 60.0
    progress: Progress | None = None
    verify: str | bool = True
    queries: int = 0  # rows sent, answered or not
    requests: int = 0
    rejected: int = 0  # 422 answers (targets nobody meets)
    retries: int = 0  # 429s waited out
    waited_s: float = 0.0
    # keep every answered (rows, probabilities) pair in ``answers``: what an attacker that is
    # cut off mid-way still holds and can train on
    keep_answers: bool = False
    answers: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)
    input_name: str = ""
    input_dtype: Any = None
    output_name: str = ""
    _client: _HeaderClient | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._client = _HeaderClient(self.url, api_key=self.api_key, timeout=self.timeout_s, verify=self.verify)
        try:
            meta = self._client.model_metadata(self.model)
        except ClientError as err:
            self.close()
            raise OracleError(f"{self.model}: {err}", err.status) from None
        inputs, outputs = meta.get("inputs", []), meta.get("outputs", [])
        if len(inputs) != 1:
            self.close()
            raise OracleError(f"{self.model}: the lab handles models with one input, this one has {len(inputs)}")
        self.input_name = inputs[0]["name"]
        self.input_dtype = numpy_dtype(inputs[0]["datatype"])
        names = [o["name"] for o in outputs]
        # "probabilities" is the scenarios' convention; otherwise the first float matrix
        floats = [o["name"] for o in outputs if o.get("datatype", "").startswith("FP") and len(o.get("shape", [])) == 2]
        if "probabilities" in names:
            self.output_name = "probabilities"
        elif floats:
            self.output_name = floats[0]
        else:
            self.close()
            raise OracleError(f"{self.model}: no probability output among {', '.join(names) or 'none'}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> Oracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.queries

    def ask(self, x: np.ndarray, targets: Targets | None = None) -> Answer:
        """Send the rows ``x`` (one request); 200 and 422 come back as an :class:`Answer`,
        anything else raises :class:`OracleError`."""
        rows = int(x.shape[0])
        if self.budget is not None and self.queries + rows > self.budget:
            raise BudgetExhausted(f"row budget {self.budget} spent ({self.queries} sent; this request needs {rows})")
        assert self._client is not None
        params = {k: float(v) for k, v in (targets or {}).items()}
        data = np.ascontiguousarray(x, dtype=self.input_dtype)
        while True:
            self._client.retry_after = None
            started = time.perf_counter()
            try:
                response = self._client.infer(self.model, {self.input_name: data}, parameters=params)
            except ClientError as err:
                latency = (time.perf_counter() - started) * 1000.0
                if err.status == 429:
                    self._wait(self._client.retry_after, str(err))
                    continue
                self._spend(rows)
                if err.status == 422:
                    self.rejected += 1
                    return Answer(None, 422, latency, str(err))
                raise OracleError(f"{self.model}: {err}", err.status) from None
            latency = (time.perf_counter() - started) * 1000.0
            self._spend(rows)
            out = next((t for t in response.outputs if t.name == self.output_name), None)
            if out is None:
                raise OracleError(f"{self.model}: the answer has no output '{self.output_name}'")
            probs = np.asarray(out.data, dtype=np.float64).reshape(rows, -1)
            if self.keep_answers:
                self.answers.append((np.array(x), probs))
            return Answer(probs, 200, latency)

    def predict(self, x: np.ndarray, targets: Targets | None = None, *, batch_size: int = 32) -> np.ndarray:
        """Probabilities for all rows of ``x``, in requests of ``batch_size`` rows; a 422 raises."""
        parts = []
        for start in range(0, len(x), batch_size):
            answer = self.ask(x[start:start + batch_size], targets)
            if answer.probs is None:
                raise OracleError(f"{self.model}: {answer.message}", answer.status)
            parts.append(answer.probs)
        return np.concatenate(parts) if parts else np.empty((0, 0))

    def _spend(self, rows: int) -> None:
        self.queries += rows
        self.requests += 1
        if self.progress is not None:
            self.progress(self.queries, self.budget)

    def _wait(self, retry_after: float | None, message: str) -> None:
        # no Retry-After, or one longer than we accept, is a quota that will not come back soon
        if retry_after is None or not math.isfinite(retry_after) or retry_after > self.max_wait_s:
            raise BudgetExhausted(f"{self.model}: the server refuses for now ({message})", 429)
        self.retries += 1
        self.waited_s += retry_after
        time.sleep(retry_after)

    def stats(self) -> dict[str, Any]:
        return {"model": self.model, "queries": self.queries, "requests": self.requests, "rejected": self.rejected,
                "retries_429": self.retries, "waited_s": round(self.waited_s, 3), "budget": self.budget}

"""A file of measured distances (``--sensitivity-cache``), so a rerun or a budget sweep does not measure again.

Every end-to-end number the search takes is a measurement of one thing: a
weight at one option (rounded one way) on a set of samples, a block
distance, or a whole plan. Each is stored under a key that names it
(``e2e|weight|4|block32|rtn|screen``...). The file also records what every
value depends on besides its key: a digest of the model (graph and weight
bytes), of the samples the measurements ran on, of the calibration data
(data-aware rounding), and the settings that change a measurement (scheme,
rounding method, evaluator). When any of them differs the file is *stale*:
nothing in it is used, the run says so, and the file is rewritten with the
new run's values. A cache is never reused for another model or other data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "mixq-onnx sensitivity cache 1"


def feeds_digest(feeds: Iterable[Mapping[str, np.ndarray]] | None) -> str:
    """A digest of samples: every input's name, dtype, shape and bytes, in order."""
    h = hashlib.blake2b(digest_size=16)
    for feed in feeds or ():
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
        h.update(b"\x00")
    return h.hexdigest()


# The first part of the keys of error-table entries (the rest are end-to-end measurements).
TABLE = "table"


def _key(parts: Iterable[object]) -> str:
    return "|".join(str(p) for p in parts)


class SensitivityCache:
    """Measured distances by key, read from and written to one JSON file, valid for one ``context``."""

    def __init__(self, path: Path | None, context: Mapping[str, str]) -> None:
        """``path`` None keeps the measurements for this run only."""
        self.path = path
        self.context = dict(sorted(context.items()))
        self.values: dict[str, float] = {}
        # Facts about the measurements that are not distances (the model's output kinds, whether its reference
        # pass ran): a later run can answer its report from them without running the model.
        self.meta: dict[str, str] = {}
        self.hits = 0
        self.misses = 0
        # Weights whose whole error table came from the file.
        self.tables_reused = 0
        self.note = ""
        # True when the file was there but could not be used (stale or unreadable): it is replaced, and the run says so.
        self.discarded = False
        self._load()

    def _load(self) -> None:
        if self.path is None:
            return
        if not self.path.exists():
            self.note = f"{self.path}: new sensitivity cache"
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError("not a sensitivity cache of this version")
            stored = {str(k): str(v) for k, v in data["context"].items()}
            values = {str(k): float(v) for k, v in data["values"].items()}
            meta = {str(k): str(v) for k, v in data.get("meta", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.note = f"{self.path}: not a usable sensitivity cache ({exc}); measuring afresh and replacing it"
            self.discarded = True
            log.warning(self.note)
            return
        changed = sorted(k for k in set(stored) | set(self.context) if stored.get(k) != self.context.get(k))
        if changed:
            self.note = (f"{self.path}: stale sensitivity cache (made for another {', '.join(changed)}); "
                         "nothing in it is used, and it is replaced with this run's measurements")
            self.discarded = True
            log.warning(self.note)
            return
        self.values, self.meta = values, meta
        self.note = f"{self.path}: sensitivity cache with {len(values)} measurements"

    def measured(self, parts: Iterable[object], compute: Callable[[], float]) -> float:
        """The stored value for ``parts``, or ``compute()`` stored under it."""
        return self.measured_many([parts], lambda _: [compute()])[0]

    def measured_many(self, parts: Sequence[Iterable[object]],
                      compute: Callable[[list[int]], Iterable[float]]) -> list[float]:
        """The stored value of each of ``parts``; ``compute(indices)`` measures the missing ones, in one batch."""
        keys = [_key(p) for p in parts]
        missing: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in self.values and k not in missing:
                missing[k] = i
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:  # nothing to measure: the measuring side (a float pass, a session) is not even set up
            for k, value in zip(missing, compute(list(missing.values()))):
                self.values[k] = float(value)
        return [self.values[k] for k in keys]

    def store(self, parts: Iterable[object], value: float) -> None:
        """Keep a value measured elsewhere (an error table's entry) under ``parts``."""
        self.values[_key(parts)] = float(value)

    @property
    def warm(self) -> bool:
        """Whether a file of this context was read: its model ran end to end before, on these samples."""
        return self.path is not None and not self.discarded and self.meta.get("references") == "ran"

    def forget(self, parts: Iterable[object]) -> None:
        """Drop a value that was stored but turned out not to be a measurement (a run that failed)."""
        self.values.pop(_key(parts), None)

    def peek(self, parts: Iterable[object]) -> float | None:
        """The stored value for ``parts`` if there is one (nothing is measured)."""
        return self.values.get(_key(parts))

    def text(self) -> str:
        """The file's content: sorted keys and shortest round-tripping floats, so the same values give the same bytes."""
        values = {k: (v if math.isfinite(v) else str(v)) for k, v in sorted(self.values.items())}
        return json.dumps({"format": FORMAT, "context": self.context, "meta": dict(sorted(self.meta.items())),
                           "values": values}, indent=0, sort_keys=True) + "\n"

    def describe(self) -> dict[str, object]:
        tables = sum(1 for k in self.values if k.startswith(TABLE + "|"))
        return {"path": str(self.path), "hits": self.hits, "misses": self.misses, "stored": len(self.values) - tables,
                "error_table_entries": tables, "error_tables_reused": self.tables_reused, "note": self.note}


__all__ = ["FORMAT", "SensitivityCache", "feeds_digest"]

"""Claims: a paper's named, checkable statements about its table, and their verdicts on the measured records.

A preset lists its claims (``Preset.claims``); ``python cli.py reproduce PRESET`` prints one verdict line per
claim under the gap table. A claim compares *values*: the top-1 of a method spec at one bit-width (``bits``), or,
with ``bits=None``, its mean over the record's trained bit-widths; the full-precision reference row (method
``fp``) is always read at 32 bits. Kinds:

``within``      |a - b| <= margin (top-1 points)
``no_worse``    a - b >= -margin (a at most ``margin`` points below b)
``better``      a - b > margin, and also a - c > margin when ``c`` is given (a beats b and c)
``between``     b < a < c: a at ``bits`` strictly between b at ``b_bits`` and c at ``c_bits`` (b, c default to a),
                i.e. a - b > margin and c - a > margin
``cost_ratio``  cost(a) / cost(b) >= ratio; cost is ``device_hours`` (every phase, scoring included) unless
                ``cost`` names another (``sample_passes_total``, ``hours_prepare``/``train``/``finalize``/``eval``)
``all_of``      every claim in ``parts`` (e.g. accuracy within a margin *and* a speed-up)

Verdict rule. Each comparison is an *effect* per seed: the difference of the two values, paired by seed (only
the seeds both methods have), or for ``cost_ratio`` the per-seed ratio. Its mean over seeds gets the 95%
percentile bootstrap interval of ``harness.report.seed_stats`` (2000 resamples, seeded, so verdicts are
reproducible; all seeds equal gives the point interval). The effect **holds** when the whole interval satisfies
the test, **does not hold** when the whole interval violates it, and is **inconclusive** when the interval
straddles the threshold. With one seed there is no interval: the verdict is decided on the point estimate and
the line says "1 seed". A missing record (e.g. no ``fp`` row) makes the effect inconclusive with the reason. A
claim of several effects (``all_of``, ``between``, ``better`` with ``c``) holds when every effect holds, does
not hold when any does not, and is inconclusive otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from harness.config import MAX_BITS, JsonConfig, check_positive
from harness.errors import ConfigError, MbqError

FP = "fp"  # the full-precision reference row's method spec (harness.config's reference method)
FP_BITS = 32
KINDS = ("within", "no_worse", "better", "between", "cost_ratio", "all_of")
COSTS = ("device_hours", "sample_passes_total", "hours_prepare", "hours_train", "hours_finalize", "hours_eval")
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE)
# a tie computed through float sums (93.1 - 94.1 = -1.0000000000000142) counts as a tie, not as a violation
EPS = 1e-9


def _check_bits(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BITS):
        raise ConfigError(f"claim {name} must be a bit-width in 1..{MAX_BITS} or None, got {value!r}")


@dataclass(frozen=True)
class Claim(JsonConfig):
    """One checkable statement; ``name`` and ``source`` (paper, table or figure) are required at the top level,
    optional on the ``parts`` of an ``all_of``. ``text`` replaces the generated statement when given."""

    name: str = ""
    source: str = ""
    kind: str = "within"
    a: str = ""
    b: str = ""
    c: str = ""
    bits: int | None = None
    b_bits: int | None = None
    c_bits: int | None = None
    margin: float = 0.0
    ratio: float | None = None
    cost: str = "device_hours"
    parts: tuple[Claim, ...] = ()
    text: str = ""

    def __post_init__(self) -> None:
        label = f"claim {self.name!r}" if self.name else "a claim"
        for key in ("name", "source", "a", "b", "c", "text"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{label}: {key} must be a string, got {getattr(self, key)!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"{label}: unknown kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        for key in ("bits", "b_bits", "c_bits"):
            _check_bits(key, getattr(self, key))
        check_positive(f"{label}: margin", self.margin, allow_zero=True)
        if self.kind == "all_of":
            object.__setattr__(self, "parts", tuple(self.parts))
            if not self.parts or not all(isinstance(p, Claim) for p in self.parts):
                raise ConfigError(f"{label}: all_of needs parts, a tuple of Claim")
            if self.a or self.b or self.c or self.bits is not None or self.ratio is not None:
                raise ConfigError(f"{label}: all_of takes parts only (no a, b, c, bits or ratio)")
            return
        if self.parts:
            raise ConfigError(f"{label}: only all_of takes parts")
        if not self.a:
            raise ConfigError(f"{label}: {self.kind} needs method a")
        if self.kind == "between":  # neighbours of the same method by default: bit-width interpolation
            object.__setattr__(self, "b", self.b or self.a)
            object.__setattr__(self, "c", self.c or self.a)
            if self.b_bits is None or self.c_bits is None:
                raise ConfigError(f"{label}: between needs b_bits and c_bits (the lower and upper neighbour)")
        elif not self.b:
            raise ConfigError(f"{label}: {self.kind} needs method b")
        if self.c and self.kind not in ("better", "between"):
            raise ConfigError(f"{label}: only better and between take a third method c")
        if self.kind == "cost_ratio":
            if self.ratio is None:
                raise ConfigError(f"{label}: cost_ratio needs a ratio (cost(a) / cost(b) >= ratio)")
            check_positive(f"{label}: ratio", self.ratio)
            if self.cost not in COSTS:
                raise ConfigError(f"{label}: unknown cost {self.cost!r}; choose one of {', '.join(COSTS)}")
            if (self.bits, self.b_bits, self.c_bits) != (None, None, None) or self.margin:
                raise ConfigError(f"{label}: cost_ratio compares whole runs; it takes no bits or margin")
            return
        if self.ratio is not None:
            raise ConfigError(f"{label}: only cost_ratio takes a ratio")
        # b and c are read at a's bit-width unless told otherwise; the fp row has only its 32-bit result
        for method, key in ((self.a, "bits"), (self.b, "b_bits"), (self.c, "c_bits")):
            value = getattr(self, key)
            if method == FP:
                if value not in (None, FP_BITS):
                    raise ConfigError(f"{label}: the full-precision reference {FP!r} is read at {FP_BITS} bits, "
                                      f"got {key}={value}")
                object.__setattr__(self, key, FP_BITS)
            elif method and key != "bits" and value is None:
                object.__setattr__(self, key, self.bits)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Claim:
        data = dict(data)
        data["parts"] = tuple(cls.from_dict(p) for p in data.get("parts", ()))
        return super().from_dict(data)

    def refs(self) -> list[tuple[str, int | None]]:
        """Every (method spec, bit-width) this claim reads, parts included; None: the mean over bit-widths."""
        if self.kind == "all_of":
            return [ref for part in self.parts for ref in part.refs()]
        if self.kind == "cost_ratio":
            return [(self.a, None), (self.b, None)]
        return [(self.a, self.bits), (self.b, self.b_bits)] + ([(self.c, self.c_bits)] if self.c else [])

    @property
    def statement(self) -> str:
        """The claim in words (``text`` when given)."""
        if self.text:
            return self.text
        a, b, c = _ref(self.a, self.bits), _ref(self.b, self.b_bits), _ref(self.c, self.c_bits)
        if self.kind == "all_of":
            return "; and ".join(part.statement for part in self.parts)
        if self.kind == "within":
            return f"{a} within {self.margin:g} pt of {b}"
        if self.kind == "no_worse":
            return f"{a} at most {self.margin:g} pt below {b}" if self.margin else f"{a} at least {b}"
        if self.kind == "better":
            rivals = f"{b} and {c}" if self.c else b
            return f"{a} above {rivals}" + (f" by more than {self.margin:g} pt" if self.margin else "")
        if self.kind == "between":
            return f"{a} strictly between {b} and {c}"
        return f"{_COST_WORDS.get(self.cost, self.cost)} of {self.a} over {self.b} >= {self.ratio:g}x"


_COST_WORDS = {"device_hours": "device-hours (every phase)", "sample_passes_total": "sample-passes"}


def _ref(method: str, bits: int | None) -> str:
    if not method:
        return ""
    if method == FP:
        return "full-precision top-1"
    return f"top-1 of {method} " + (f"at {bits} bits" if bits is not None else "(mean over bit-widths)")


def check_claims(claims: Iterable[Claim], methods: Sequence[str], bits: Sequence[int]) -> tuple[Claim, ...]:
    """Validate a preset's claims against its methods and evaluated bit-widths (the ``fp`` row is always allowed);
    returns them as a tuple."""
    claims = tuple(claims)
    names: set[str] = set()
    for claim in claims:
        if not isinstance(claim, Claim):
            raise ConfigError(f"a preset's claims must be Claim objects, got {claim!r}")
        if not claim.name or not claim.source:
            raise ConfigError(f"every claim needs a name and a source (paper, table or figure), got {claim!r}")
        if claim.name in names:
            raise ConfigError(f"claim {claim.name!r} is defined twice")
        names.add(claim.name)
        for method, read_bits in claim.refs():
            if method == FP:
                continue
            if method not in methods:
                raise ConfigError(f"claim {claim.name!r} names method {method!r}, which the preset does not run; "
                                  f"its methods: {', '.join(methods)} (and {FP!r}, the full-precision row)")
            if read_bits is not None and read_bits not in bits:
                raise ConfigError(f"claim {claim.name!r} reads {method} at {read_bits} bits, which the preset does "
                                  f"not evaluate (bits {', '.join(map(str, bits))})")
    return claims


@dataclass(frozen=True)
class Effect:
    """One measured comparison: the effect's mean over ``n`` seeds, its 95% bootstrap interval (None for one seed
    or no data), the test it must pass and the verdict; ``reason`` says why there are no numbers."""

    label: str
    unit: str
    test: str
    verdict: str
    n: int = 0
    mean: float | None = None
    low: float | None = None
    high: float | None = None
    reason: str = ""

    def describe(self) -> str:
        """``LABEL = MEAN [LOW, HIGH] UNIT (TEST; N seeds)``, or ``LABEL: REASON`` when there was nothing to measure."""
        if self.mean is None:
            return f"{self.label}: {self.reason}"
        interval = f" [{self.low:.2f}, {self.high:.2f}]" if self.low is not None else ""
        value = f"{self.mean:.2f}x{interval}" if self.unit == "x" else f"{self.mean:.2f}{interval} {self.unit}"
        return f"{self.label} = {value} ({self.test}; {'1 seed' if self.n == 1 else f'{self.n} seeds'})"


@dataclass(frozen=True)
class Verdict:
    """A claim's verdict with every effect it was decided on."""

    claim: str
    source: str
    statement: str
    verdict: str
    effects: tuple[Effect, ...]

    def line(self) -> str:
        """``holds  NAME: EFFECT, EFFECT  — SOURCE``: one line per claim under the reproduce table."""
        effects = ", ".join(effect.describe() for effect in self.effects)
        return f"{self.verdict:<13s} {self.claim}: {effects}  — {self.source}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def combine(verdicts: Iterable[str]) -> str:
    verdicts = list(verdicts)
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return FAILS if FAILS in verdicts else INCONCLUSIVE


def decide(op: str, threshold: float, low: float, high: float) -> str:
    """The verdict of ``effect OP threshold`` given the effect's interval [low, high] (``abs<=``: |effect| <=)."""
    if op == ">=":
        return HOLDS if low >= threshold - EPS else FAILS if high < threshold - EPS else INCONCLUSIVE
    if op == ">":
        return HOLDS if low > threshold + EPS else FAILS if high <= threshold + EPS else INCONCLUSIVE
    if op == "abs<=":
        if -threshold - EPS <= low and high <= threshold + EPS:
            return HOLDS
        return FAILS if low > threshold + EPS or high < -threshold - EPS else INCONCLUSIVE
    raise ValueError(f"unknown test {op!r}")


def _test_text(op: str, threshold: float, unit: str) -> str:
    suffix = "x" if unit == "x" else ""
    return f"within ±{threshold:g}" if op == "abs<=" else f"{op} {threshold:g}{suffix}"


class _Table:
    """Per-seed values of the records: top-1 at a bit-width or over the trained ones, and whole-run costs."""

    def __init__(self, records: Sequence[dict[str, Any]]):
        self.by_method: dict[str, dict[int, dict[str, Any]]] = {}
        for record in records:
            seeds = self.by_method.setdefault(record["method"], {})
            if record["seed"] in seeds:
                raise MbqError(f"two records of {record['method']} seed {record['seed']}: evaluate the claims of "
                               f"one comparison at a time")
            seeds[record["seed"]] = record

    def top1(self, method: str, bits: int | None) -> tuple[dict[int, float], str]:
        """{seed: value} and, when empty, the reason."""
        if method not in self.by_method:
            return {}, f"no {method} record"
        values = {}
        for seed, record in self.by_method[method].items():
            results = record["results"]
            if bits is None:
                trained = [str(b) for b in record.get("bits", results)] or list(results)
                cells = [results[b]["top1"] for b in trained if b in results]
                if cells:
                    values[seed] = sum(cells) / len(cells)
            elif str(bits) in results:
                values[seed] = results[str(bits)]["top1"]
        return values, "" if values else f"no {method} result at {bits} bits"

    def cost(self, method: str, cost: str) -> tuple[dict[int, float], str]:
        if method not in self.by_method:
            return {}, f"no {method} record"
        if cost.startswith("hours_"):
            return {s: r["device_hours_by_phase"].get(cost[len("hours_"):], 0.0)
                    for s, r in self.by_method[method].items()}, ""
        return {s: r[cost] for s, r in self.by_method[method].items()}, ""


def _label(method: str, bits: int | None) -> str:
    return f"{method}@{'mean' if bits is None else bits}"


def _effect(label: str, unit: str, op: str, threshold: float, values: list[float] | None, reason: str = "") -> Effect:
    from harness.report import seed_stats  # the same bootstrap as stats.csv, so intervals agree with the report

    test = _test_text(op, threshold, unit)
    if not values:
        return Effect(label, unit, test, INCONCLUSIVE, reason=reason)
    stats = seed_stats(values)
    mean = stats["mean"]
    if len(values) == 1:
        return Effect(label, unit, test, decide(op, threshold, mean, mean), n=1, mean=mean)
    low, high = stats["ci_low"], stats["ci_high"]
    return Effect(label, unit, test, decide(op, threshold, low, high), n=len(values), mean=mean, low=low, high=high)


def _paired(x: dict[int, float], y: dict[int, float], why: str, combine_xy) -> tuple[list[float] | None, str]:
    if why:
        return None, why
    seeds = sorted(set(x) & set(y))
    if not seeds:
        return None, "no seed in common"
    return [combine_xy(x[s], y[s]) for s in seeds], ""


def _difference(table: _Table, first: tuple[str, int | None], second: tuple[str, int | None], op: str,
                threshold: float) -> Effect:
    (m1, b1), (m2, b2) = first, second
    v1, why1 = table.top1(m1, b1)
    v2, why2 = table.top1(m2, b2)
    values, reason = _paired(v1, v2, why1 or why2, lambda p, q: p - q)
    return _effect(f"{_label(m1, b1)} - {_label(m2, b2)}", "pt", op, threshold, values, reason)


def _effects(claim: Claim, table: _Table) -> list[Effect]:
    a, b, c = (claim.a, claim.bits), (claim.b, claim.b_bits), (claim.c, claim.c_bits)
    if claim.kind == "all_of":
        return [effect for part in claim.parts for effect in _effects(part, table)]
    if claim.kind == "within":
        return [_difference(table, a, b, "abs<=", claim.margin)]
    if claim.kind == "no_worse":
        return [_difference(table, a, b, ">=", -claim.margin)]
    if claim.kind == "better":
        return [_difference(table, a, rival, ">", claim.margin) for rival in ([b, c] if claim.c else [b])]
    if claim.kind == "between":
        return [_difference(table, a, b, ">", claim.margin), _difference(table, c, a, ">", claim.margin)]
    va, why_a = table.cost(claim.a, claim.cost)
    vb, why_b = table.cost(claim.b, claim.cost)
    why = why_a or why_b or ("zero cost" if any(v <= 0 for v in vb.values()) else "")
    values, reason = _paired(va, vb, why, lambda p, q: p / q)
    return [_effect(f"{claim.cost} {claim.a} / {claim.b}", "x", ">=", claim.ratio, values, reason)]


def evaluate(claim: Claim, records: Sequence[dict[str, Any]]) -> Verdict:
    """The claim's verdict on one comparison's records (``harness.train.make_record`` dicts)."""
    effects = tuple(_effects(claim, _Table(records)))
    return Verdict(claim.name, claim.source, claim.statement, combine(e.verdict for e in effects), effects)


def evaluate_all(claims: Iterable[Claim], records: Sequence[dict[str, Any]]) -> list[Verdict]:
    return [evaluate(claim, records) for claim in claims]

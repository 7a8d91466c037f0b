"""The fail-safe's taxonomy is the server's.

``backstop._taxonomy`` mirrors ``src/domain/taxonomy.rs`` so that decisions
taken while Backstop is unreachable classify outcomes as the fleet does. Two
independent checks hold it there:

* the Rust source is parsed (marker lists, the quota rule, the status match,
  the order of the error-type rules) into a reference classifier, and the
  client's marker lists and classification must equal it: a marker, status
  or rule added to the server alone fails here;
* a running server classifies every status and every marker either side
  knows (RecordOutcome with ``outcome = UNSPECIFIED``, read ``classified_as``),
  and the client must agree on each.

A disagreement fails with a table of every differing case.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest

from backstop import Backstop, OutcomeClass, OutcomeReport
from backstop import _convert as conv
from backstop import _taxonomy
from backstop._local import classify as local_classify
from backstop.testing import BackstopServer

REPO = Path(__file__).resolve().parents[3]
TAXONOMY_RS = REPO / "src" / "domain" / "taxonomy.rs"

Case = Tuple[int, str]


# --- the Rust source, parsed ----------------------------------------------------------


def _rust_class(name: str) -> OutcomeClass:
    """``OutcomeClass::RateLimited`` -> OutcomeClass.RATE_LIMITED."""
    return OutcomeClass[re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()]


def _rust_strings(body: str, where: str) -> List[str]:
    out = []
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"', body):
        text = m.group(1)
        if "\\" in text:
            raise AssertionError(f"{where}: escapes in {text!r} are not understood by this parser")
        out.append(text)
    return out


@dataclass
class RustTaxonomy:
    """What ``taxonomy.rs``'s ``classify`` does, read from its source."""

    markers: Dict[str, List[str]]
    #: (lo, hi_exclusive, marker list, class): markers that win over any status outside [lo, hi).
    quota_rule: Tuple[int, int, str, OutcomeClass]
    #: Match arms on http_status, in order: (alternatives, class or None); an
    #: alternative is (lo, hi) inclusive, or None for `_`.
    status_arms: List[Tuple[List[Optional[Tuple[int, int]]], Optional[OutcomeClass]]]
    #: Without a status: (marker list, class) in order, then the default class.
    by_error_type: List[Tuple[str, OutcomeClass]]
    default: OutcomeClass

    def classify(self, status: int, error_type: str) -> Optional[OutcomeClass]:
        """The server's answer, or None where it refuses to classify."""
        if status != 0 and not 100 <= status <= 599:
            return None
        et = error_type.encode().lower().decode()  # to_ascii_lowercase
        lo, hi, quota, cls = self.quota_rule
        if not lo <= status < hi and any(m in et for m in self.markers[quota]):
            return cls
        for alternatives, arm_class in self.status_arms:
            if any(a is None or a[0] <= status <= a[1] for a in alternatives):
                if arm_class is not None:
                    return arm_class
                break
        if not et:
            return None
        for name, c in self.by_error_type:
            if any(m in et for m in self.markers[name]):
                return c
        return self.default


def parse_taxonomy(src: str) -> RustTaxonomy:
    markers = {
        m.group(1): _rust_strings(m.group(2), m.group(1))
        for m in re.finditer(r"const (\w+): &\[&str\] = &\[(.*?)\];", src, re.S)
    }
    body_match = re.search(r"pub fn classify\((.*?)\n}\n", src, re.S)
    assert body_match, "taxonomy.rs: `pub fn classify` not found"
    body = body_match.group(1)

    q = re.search(
        r"if !\((\d+)\.\.(\d+)\)\.contains\(&http_status\) && contains_any\(&et, (\w+)\) \{\s*"
        r"return Ok\(OutcomeClass::(\w+)\);",
        body,
    )
    assert q, "taxonomy.rs: the quota rule changed shape; update this parser"
    quota_rule = (int(q.group(1)), int(q.group(2)), q.group(3), _rust_class(q.group(4)))

    m = re.search(r"match http_status \{(.*?)\n    \};", body, re.S)
    assert m, "taxonomy.rs: `match http_status` not found"
    arms: List[Tuple[List[Optional[Tuple[int, int]]], Optional[OutcomeClass]]] = []
    for line in m.group(1).splitlines():
        line = line.split("//")[0].strip()
        if not line:
            continue
        arm = re.fullmatch(r"(.+?) => (None|Some\(OutcomeClass::(\w+)\)),", line)
        assert arm, f"taxonomy.rs: cannot read the match arm {line!r}"
        alternatives: List[Optional[Tuple[int, int]]] = []
        for pat in arm.group(1).split("|"):
            pat = pat.strip()
            if pat == "_":
                alternatives.append(None)
            elif "..=" in pat:
                lo, hi = pat.split("..=")
                alternatives.append((int(lo), int(hi)))
            else:
                alternatives.append((int(pat), int(pat)))
        arms.append((alternatives, _rust_class(arm.group(3)) if arm.group(3) else None))

    chain = re.search(r"Ok\(if (.*)\}\)\s*$", body, re.S)
    assert chain, "taxonomy.rs: the error-type rules changed shape; update this parser"
    rules = [
        (name, _rust_class(c))
        for name, c in re.findall(r"contains_any\(&et, (\w+)\) \{\s*OutcomeClass::(\w+)\s*\}", chain.group(1))
    ]
    default = re.search(r"\} else \{[^{}]*?OutcomeClass::(\w+)\s*$", chain.group(1), re.S)
    assert default, "taxonomy.rs: the default class was not found"
    return RustTaxonomy(markers, quota_rule, arms, rules, _rust_class(default.group(1)))


@pytest.fixture(scope="module")
def rust() -> RustTaxonomy:
    assert TAXONOMY_RS.exists(), f"{TAXONOMY_RS} is missing: these tests run inside the repository"
    parsed = parse_taxonomy(TAXONOMY_RS.read_text())
    # The parser understood the file (else every comparison below would be vacuous).
    assert len(parsed.markers) >= 5 and all(parsed.markers.values()), parsed.markers
    assert len(parsed.status_arms) >= 8 and len(parsed.by_error_type) >= 4
    return parsed


# --- the cases both sides classify ----------------------------------------------------


def corpus(marker_lists: Sequence[Sequence[str]]) -> List[Case]:
    """Every status alone; every marker in several spellings and positions,
    alone and next to a status of each class; each pair of lists together
    (precedence); a few errors no list names; and a non-ASCII look-alike."""
    cases: List[Case] = [(s, "") for s in range(100, 600)]
    statuses = (0, 200, 302, 400, 401, 404, 408, 409, 429, 500, 529)
    for marker in sorted({m for ms in marker_lists for m in ms}):
        for text in (marker, marker.upper(), f"Error: {marker} (see docs)"):
            cases += [(s, text) for s in statuses]
    for a, b in itertools.permutations([ms[0] for ms in marker_lists if ms], 2):
        cases += [(s, f"{a} {b}") for s in (0, 400, 429)]
    for neutral in ("overloaded_error", "api_error", "ECONNRESET", "server_is_overloaded"):
        cases += [(0, neutral), (503, neutral)]
    # The Kelvin sign lower-cases to "k" in Python, but not with to_ascii_lowercase.
    cases += [(0, "invalid_api_\u212aey"), (400, "\u212aey insufficient_quota")]
    return list(dict.fromkeys(cases))


def diff_table(cases: Sequence[Case], theirs: Callable[[Case], object], ours: Callable[[Case], object], who: str) -> str:
    rows = [(c, theirs(c), ours(c)) for c in cases]
    bad = [(c, t, o) for c, t, o in rows if t != o]
    if not bad:
        return ""
    lines = [f"{len(bad)} of {len(rows)} classifications differ (http_status, error_type: {who} | client):"]

    def name(v: object) -> str:
        return str(getattr(v, "name", v))

    for (status, et), t, o in bad[:60]:
        lines.append(f"  {status:>3} {ascii(et):<48} {name(t):<13} | {name(o)}")
    if len(bad) > 60:
        lines.append(f"  ... and {len(bad) - 60} more")
    return "\n".join(lines)


def client_lists() -> Dict[str, Tuple[str, ...]]:
    return {name: getattr(_taxonomy, name) for name in dir(_taxonomy) if name.endswith("_MARKERS")}


def marker_diff(server: Dict[str, List[str]], client: Dict[str, Tuple[str, ...]]) -> List[str]:
    problems = []
    for name in sorted(set(server) | set(client)):
        if name not in client:
            problems.append(f"{name}: the server has this list, backstop._taxonomy has not")
        elif name not in server:
            problems.append(f"{name}: backstop._taxonomy has this list, the server has not")
        else:
            for m in sorted(set(server[name]) - set(client[name])):
                problems.append(f"{name}: server marker {m!r} is unknown to the client")
            for m in sorted(set(client[name]) - set(server[name])):
                problems.append(f"{name}: client marker {m!r} is not the server's")
    return problems


# --- against the source ------------------------------------------------------------------


def test_every_marker_of_the_server_is_known_to_the_client(rust: RustTaxonomy) -> None:
    problems = marker_diff(rust.markers, client_lists())
    assert not problems, "backstop._taxonomy differs from src/domain/taxonomy.rs:\n" + "\n".join(problems)


def test_the_client_follows_the_server_rules(rust: RustTaxonomy) -> None:
    """Same precedence, same status table, same error-type order (the
    classifier read from the source against the client's, on every case)."""
    client_order = [(name, cls) for markers, cls in _taxonomy.BY_ERROR_TYPE for name, ms in client_lists().items() if ms is markers]
    assert client_order == rust.by_error_type
    cases = [c for c in corpus(list(rust.markers.values()) + list(client_lists().values())) if rust.classify(*c) is not None]
    table = diff_table(
        cases,
        lambda c: rust.classify(*c),
        lambda c: local_classify(OutcomeClass.UNSPECIFIED, *c),
        "taxonomy.rs",
    )
    assert not table, table


def test_the_source_check_notices_a_server_change(rust: RustTaxonomy) -> None:
    """The checks above can fail: a marker added to, or a status moved in,
    the server's source is reported."""
    src = TAXONOMY_RS.read_text()
    added = parse_taxonomy(src.replace('"too_many_requests"', '"too_many_requests",\n    "slow_down"', 1))
    assert marker_diff(added.markers, client_lists()) == [
        "RATE_MARKERS: server marker 'slow_down' is unknown to the client"
    ]
    moved = parse_taxonomy(src.replace("409 | 425 =>", "409 | 425 | 451 =>", 1))
    assert moved.classify(451, "") == OutcomeClass.TRANSIENT
    assert local_classify(OutcomeClass.UNSPECIFIED, 451, "") == OutcomeClass.BAD_INPUT
    assert "451 ''" in diff_table([(451, "")], lambda c: moved.classify(*c), lambda c: local_classify(OutcomeClass.UNSPECIFIED, *c), "x")


# --- against the running server --------------------------------------------------------------


def server_classes(bs: Backstop, cases: Sequence[Case]) -> Dict[Case, object]:
    """RecordOutcome(outcome=UNSPECIFIED, http_status, error_type) for each case,
    in batches; the server's ``classified_as`` (or its error) per case."""
    out: Dict[Case, object] = {}
    for i in range(0, len(cases), 1000):
        chunk = cases[i : i + 1000]
        reports = [OutcomeReport(target="taxonomy/check", http_status=s, error_type=et) for s, et in chunk]
        response = bs.stubs.resilience.RecordOutcomeBatch(conv.record_batch_request(reports), timeout=30)
        assert len(response.items) == len(chunk)
        for case, item in zip(chunk, response.items):
            out[case] = f"error: {item.error.message}" if item.HasField("error") else conv.outcome_class(item.ok.classified_as)
    return out


def test_the_client_classifies_like_the_running_server(
    rust: RustTaxonomy, start_server: Callable[..., BackstopServer], make_client: Callable[..., Backstop]
) -> None:
    """Reports without a permit are counted (and may open the probe target's
    breaker on a streak); neither changes ``classified_as``."""
    server = start_server()
    bs = make_client(server.address)
    cases = corpus(list(client_lists().values()) + list(rust.markers.values()))
    assert len(cases) > 1000  # two batches at least: the batching is exercised too
    answers = server_classes(bs, cases)
    table = diff_table(cases, answers.__getitem__, lambda c: local_classify(OutcomeClass.UNSPECIFIED, *c), "server")
    assert not table, table

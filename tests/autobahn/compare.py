"""Compares an Autobahn report (index.json) with the committed expectations.

expected.json maps each case to the behavior we accept ("OK",
"NON-STRICT", "INFORMATIONAL", ...) and, where that is not OK, why.
Exits non-zero on any case whose result differs, or that is new or missing.
"""
import json
import sys

report_path, expected_path = sys.argv[1], sys.argv[2]
update = len(sys.argv) > 3 and sys.argv[3] == "--update"
report = json.load(open(report_path))["chat-server"]
got = {case: r["behavior"] for case, r in report.items()}
close = {case: r.get("behaviorClose") for case, r in report.items()}

def key(case):
    return [int(p) for p in case.split(".")]

if update:
    try:
        old = json.load(open(expected_path))
    except FileNotFoundError:
        old = {}
    out = {}
    for case in sorted(got, key=key):
        entry = {"behavior": got[case], "close": close[case]}
        why = old.get(case, {}).get("why")
        if why:
            entry["why"] = why
        out[case] = entry
    json.dump(out, open(expected_path, "w"), indent=1, ensure_ascii=False)
    print(f"autobahn: wrote {len(out)} expectations to {expected_path}")
    sys.exit(0)

expected = json.load(open(expected_path))
bad = []
for case in sorted(set(got) | set(expected), key=key):
    want = expected.get(case, {}).get("behavior")
    have = got.get(case)
    if want != have:
        bad.append(f"  {case}: expected {want}, got {have}")
counts = {}
for b in got.values():
    counts[b] = counts.get(b, 0) + 1
summary = ", ".join(f"{n} {b}" for b, n in sorted(counts.items()))
if bad:
    print(f"autobahn: {len(bad)} unexpected results ({summary}):")
    print("\n".join(bad))
    sys.exit(1)
print(f"autobahn: all {len(got)} cases as expected ({summary})")

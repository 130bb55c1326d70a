"""The report of ``make contract``: which versions were tested, and what passed or broke.

    report.py versions --main-python PY --out versions.json   # tested versions (this interpreter) and pinned
    report.py summary --versions versions.json --junit a.xml b.xml --json report.json --text report.txt

Standard library only: it runs in the contract venv, whose packages are the ones under test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

# the frameworks whose private surface gruflow touches, and what they bring along that the worker uses too
PACKAGES = ("faust-streaming", "aiokafka", "mode-streaming", "prometheus-client", "rocksdict", "aiohttp")
_VERSIONS_SNIPPET = ("import json, sys\nfrom importlib import metadata\nout = {}\n"
                     "for name in sys.argv[1:]:\n"
                     "    try:\n        out[name] = metadata.version(name)\n"
                     "    except metadata.PackageNotFoundError:\n        out[name] = None\n"
                     "print(json.dumps(out))\n")


def installed(names: tuple[str, ...]) -> dict[str, dict[str, str | None]]:
    """Version and location of each package as THIS interpreter imports it (the .pth order decides)."""
    out: dict[str, dict[str, str | None]] = {}
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            out[name] = {"version": None, "location": None}
            continue
        out[name] = {"version": dist.version, "location": str(dist.locate_file(""))}
    return out


def pinned(main_python: str, names: tuple[str, ...]) -> dict[str, str | None]:
    """The versions of the main venv (what ``make test`` runs against)."""
    res = subprocess.run([main_python, "-c", _VERSIONS_SNIPPET, *names], capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout)


def log_tail(path: Path, lines: int = 5) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def parse_junit(path: Path) -> list[dict[str, str]]:
    """(test id, outcome, message) of every test case; a missing file (pytest did not run or died) is one
    error, with the end of its log (``<name>.log`` beside it)."""
    if not path.exists():
        why = log_tail(path.with_suffix(".log")) or "pytest did not run"
        return [{"test": path.stem, "outcome": "error", "message": f"no junit report: {why}"}]
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip()
                if tag == "error" and message == "collection failure":  # the reason is in the text
                    reasons = [ln[1:].strip() for ln in (node.text or "").splitlines() if ln.startswith("E ")]
                    message = f"collection failure: {reasons[-1]}" if reasons else message
                break
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        cases.append({"test": name, "outcome": outcome, "message": message[:2000]})
    return cases


def version_lines(versions: dict) -> list[str]:
    lines = []
    for name, info in versions["tested"].items():
        pin = versions["pinned"].get(name)
        mark = "" if info["version"] == pin else f"   (pinned: {pin})"
        lines.append(f"  {name:18} {info['version']}{mark}   [{info['location']}]")
    return lines


def group_by_error(broken: list[dict[str, str]]) -> dict[str, list[str]]:
    """First line of each error -> the tests that failed with it (one missing name fails dozens of tests)."""
    groups: dict[str, list[str]] = {}
    for b in broken:
        first = b["message"].splitlines()[0] if b["message"] else "(no message)"
        name = b["test"].split("::", 1)[-1] or b["test"]
        groups.setdefault(first, []).append(f"[{b['suite']}] {name}")
    return groups


def summary(versions: dict, junits: list[Path], import_log: Path) -> tuple[dict, str]:
    suites = {p.stem: parse_junit(p) for p in junits}
    import_error = log_tail(import_log, 1)
    counts = {s: {k: sum(1 for c in cases if c["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
              for s, cases in suites.items()}
    broken = [dict(c, suite=s) for s, cases in suites.items() for c in cases if c["outcome"] in ("failed", "error")]
    report = {"versions": versions, "worker_import_error": import_error or None, "counts": counts,
              "broken": broken, "tests": suites}
    lines = ["gruflow contract run: worker against the versions below", *version_lines(versions)]
    if all(info["version"] == versions["pinned"].get(name) for name, info in versions["tested"].items()):
        lines.append("  (every tested version is the pinned one: no newer release to test)")
    lines.append("")
    for s, n in counts.items():
        lines.append(f"{s}: " + ", ".join(f"{v} {k}" for k, v in n.items()))
    lines.append("")
    if import_error:
        lines += [f"the worker does not import: {import_error}", ""]
    if broken:
        lines.append(f"BROKEN ({len(broken)}), grouped by error:")
        for first, tests in group_by_error(broken).items():
            shown = ", ".join(tests[:4]) + (f", ... ({len(tests) - 4} more)" if len(tests) > 4 else "")
            lines.append(f"  {first[:300]}\n      in {len(tests)} test(s): {shown}")
    else:
        lines.append("nothing broke")
    return report, "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("versions")
    v.add_argument("--main-python", required=True)
    v.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("summary")
    s.add_argument("--versions", type=Path, required=True)
    s.add_argument("--import-log", type=Path, required=True)
    s.add_argument("--junit", type=Path, nargs="+", required=True)
    s.add_argument("--json", type=Path, required=True)
    s.add_argument("--text", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "versions":
        versions = {"tested": installed(PACKAGES), "pinned": pinned(args.main_python, PACKAGES),
                    "python": sys.version.split()[0]}
        args.out.write_text(json.dumps(versions, indent=2) + "\n")
        print("contract: testing with\n" + "\n".join(version_lines(versions)), flush=True)
        return 0
    versions = json.loads(args.versions.read_text())
    report, text = summary(versions, args.junit, args.import_log)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    args.text.write_text(text)
    print(text, end="")
    print(f"contract: report in {args.json} and {args.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

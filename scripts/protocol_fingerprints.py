"""Fingerprints of every protocol's summary.json on its shipped config at small step counts.

A refactor of the protocol code must leave every figure unchanged. Run this before and after and
compare (`--compare BEFORE`): it prints, per protocol, every key added or removed and every value
changed (numbers to 12 significant digits; timings, provenance and absolute paths left out).

    python scripts/protocol_fingerprints.py --out /tmp/fp --save before.json
    python scripts/protocol_fingerprints.py --out /tmp/fp2 --compare before.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.threads=1", "data.eval_examples=32"]
PROTOCOLS = {
    "compare": ("configs/demo.toml", ["train.steps=40", "train.eval_every=10", "seeds=[0,1]", "data.train_examples=500"]),
    "transfer": ("configs/transfer.toml", [
        "transfer.tasks=[\"add\",\"sub\",\"copy\"]", "transfer.pretrain_tasks=[\"kv\"]", "transfer.seeds=[0,1]", "transfer.pretrain_steps=20",
        "transfer.steps_a=8", "transfer.steps_b=4", "transfer.proxy_steps=4", "transfer.proxy_every=2",
        "data.train_examples=500", "workers=1"]),
    "overhang": ("configs/overhang.toml", [
        "overhang.phase1_steps=30", "overhang.phase2_steps=20", "overhang.phase2_eval_every=10",
        "overhang.seeds=[0,1]", "train.eval_every=10", "data.train_examples=500", "workers=1"]),
    "distill": ("configs/distill_digits.toml", [
        "seeds=[0]", "train.steps=40", "train.eval_every=20", "distill.backdoor_steps=10", "distill.distill_steps=10",
        "distill.rounds=1", "distill.relearn_steps=10"]),
    "unlearn": ("configs/unlearn.toml", [
        "train.steps=30", "train.eval_every=10", "unlearn.post_steps=10", "unlearn.relearn.sizes=[1,4]",
        "unlearn.relearn.steps=5", "unlearn.relearn.seeds=[0]", "unlearn.digits.steps=20",
        "unlearn.digits.certificate_steps=20", "data.train_examples=500", "seeds=[0]", "unlearn.undo.steps=10",
        "unlearn.icl.steps=10", "unlearn.icl.seeds=[0]", "unlearn.icl.train_examples=500"]),
}
DROP = {"seconds", "provenance", "wall_this_invocation", "compute", "grid_seconds", "relative_cost", "probe_seconds", "base",
        "path"}


def canonical(value):
    """The summary without timings and paths, floats to 12 significant digits."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in sorted(value.items()) if k not in DROP}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.12g}")
    return value


def differences(before, after, path: str = "") -> list[str]:
    """Where two canonical summaries differ: keys added or removed, values changed."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after)):
            where = f"{path}/{key}"
            if key not in before:
                found.append(f"added {where} = {str(after[key])[:60]}")
            elif key not in after:
                found.append(f"removed {where}")
            else:
                found += differences(before[key], after[key], where)
        return found
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [d for i, (b, a) in enumerate(zip(before, after)) for d in differences(b, a, f"{path}[{i}]")]
    return [] if before == after else [f"changed {path}: {str(before)[:40]} -> {str(after)[:40]}"]


def fingerprint(protocol: str, out: Path) -> dict:
    config, overrides = PROTOCOLS[protocol]
    directory = out / protocol
    shutil.rmtree(directory, ignore_errors=True)
    sets = [arg for o in SMALL + overrides for arg in ("--set", o)]
    command = [sys.executable, "-m", "capshape", protocol, str(ROOT / config), "--out", str(directory), *sets]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    summary = canonical(json.loads((directory / "summary.json").read_text()))
    text = json.dumps(summary, sort_keys=True)
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--only", nargs="*", default=list(PROTOCOLS))
    args = parser.parse_args()
    found = {protocol: fingerprint(protocol, args.out) for protocol in args.only}
    if args.save:
        args.save.write_text(json.dumps(found, indent=1, sort_keys=True))
    before = json.loads(args.compare.read_text()) if args.compare else {}
    for protocol, result in found.items():
        if "error" in result:
            print(f"{protocol:>9}: failed: {result['error']}")
            continue
        print(f"{protocol:>9}: {result['sha256'][:16]}")
        if protocol in before:
            found = differences(canonical(before[protocol]["summary"]), result["summary"])
            print("           every figure the same as before" if not found else "\n".join(f"           {d}" for d in found))


if __name__ == "__main__":
    main()

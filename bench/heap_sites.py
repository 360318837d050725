#!/usr/bin/env python3
"""Live heap by allocation site from a dhat profile (the scale harness's
`--heap`): the bytes still allocated when the profile ended, summed by the
first two frames of weft's or chitchat's own code on each allocation's
stack, largest first.

    python3 bench/heap_sites.py dhat-heap-100.json [NODES]

With NODES, also per node and per (node, peer) pair.
"""
import json
import re
import sys

OWN = re.compile(r"(chitchat::|weft_gossip::|weft_runtime::|scale::)")
# Generic helpers that say nothing about who holds the memory.
GENERIC = re.compile(r"(::clone|::to_owned|::to_string|::from_iter|::collect|::extend|::insert|::entry|::or_insert|::push|::deserialize|::from_str)\b")


def function(frame):
    # "0xADDR: path::to::fn (file:line:col)"
    text = frame.split(": ", 1)[-1]
    return re.sub(r" \(.*\)$", "", text)


def owner(frames, ftbl):
    names = [function(ftbl[i]) for i in frames]
    own = [n for n in names if OWN.search(n) and not GENERIC.search(n)]
    if not own:
        own = [n for n in names if OWN.search(n)]
    return " <- ".join(own[:2]) if own else (names[1] if len(names) > 1 else "?")


def main():
    profile = json.load(open(sys.argv[1]))
    nodes = int(sys.argv[2]) if len(sys.argv) > 2 else None
    sites = {}
    for pp in profile["pps"]:
        if pp["eb"] == 0:
            continue
        key = owner(pp["fs"], profile["ftbl"])
        b, k = sites.get(key, (0, 0))
        sites[key] = (b + pp["eb"], k + pp["ebk"])
    total = sum(b for b, _ in sites.values())
    print(f"live heap at the end: {total / 1e6:.1f} MB in {sum(k for _, k in sites.values())} blocks")
    if nodes:
        pairs = nodes * (nodes - 1)
        print(f"per node: {total / nodes / 1e3:.0f} KB; per (node, peer) pair: {total / pairs:.0f} B")
    print()
    print("| MB | share | blocks | per pair B | site (first own frames) |")
    print("|---|---|---|---|---|")
    for key, (b, k) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:25]:
        per_pair = f"{b / (nodes * (nodes - 1)):.0f}" if nodes else "-"
        print(f"| {b / 1e6:.2f} | {100 * b / total:.1f} % | {k} | {per_pair} | `{key}` |")


if __name__ == "__main__":
    main()

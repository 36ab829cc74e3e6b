#!/usr/bin/env python3
"""Lists import cycles between the top-level modules of a crate.

Usage: scripts/module-cycles.py CRATE_SRC_DIR...   (e.g. vmm/src vpmu/src)

A file's module is the first component of its path under the source folder
(`vcpu/exit.rs` and `vcpu/mod.rs` are both `vcpu`; `lib.rs` and `main.rs`
are the root and not counted). Every `crate::NAME` a file names in code (not in
a comment) is an import of module NAME. Prints each strongly
connected group of two or more modules (a cycle) and exits 1 if there is
one; prints the imports, one line per module, with -v. Test code counts
too, unless given --no-tests.
"""

import os
import re
import sys

CRATE_PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
TESTS = re.compile(r"^#\[cfg\(test\)\]\s*\n(pub )?mod tests\b", re.M)


def imports(src):
    graph = {}
    for root, _, files in os.walk(src):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, src)
            module = rel.split(os.sep)[0].removesuffix(".rs")
            if module in ("lib", "main"):
                continue
            with open(path, encoding="utf-8") as f:
                text = f.read()
            tests = TESTS.search(text) if SKIP_TESTS else None
            if tests:
                text = text[: tests.start()]
            # Comments may name modules without importing them.
            code = "\n".join(line.split("//")[0] for line in text.splitlines())
            used = {m for m in CRATE_PATH.findall(code) if m != module}
            graph.setdefault(module, set()).update(used)
    return graph


def cycles(graph):
    """Tarjan's strongly connected components of size > 1."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


SKIP_TESTS = False


def main(argv):
    global SKIP_TESTS
    verbose = "-v" in argv
    SKIP_TESTS = "--no-tests" in argv
    dirs = [a for a in argv if a not in ("-v", "--no-tests")]
    if not dirs:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    found = False
    for src in dirs:
        graph = imports(src)
        if verbose:
            for module in sorted(graph):
                print(f"{src}: {module} -> {', '.join(sorted(graph[module])) or '(nothing)'}")
        for group in cycles(graph):
            found = True
            print(f"{src}: cycle between {', '.join(group)}")
        if not found:
            print(f"{src}: no cycles between its {len(graph)} top-level modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
